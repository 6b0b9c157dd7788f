"""The fused layer ops on the code path CUDA tensors take, against the C++ CPU path.

``bn_act_pool``, ``gn_act_pool``, ``conv_bn_act_pool`` and ``direct_conv2d`` are called
as the ensemble calls them (the public functions, and ``torch.ops.scaleinv.*`` for the
outputs the layers do not return), forward and backward through autograd, so the C++
autograd functions (``csrc/*_autograd.cpp``) redispatch into the Python kernels
registered for CUDA. With CUDA present that happens on CUDA tensors; without it on CPU
tensors inside :func:`~scaleinv_kernels.ops.registry.cuda_code_path_on_cpu` (the Triton
kernels in the interpreter). Spies registered on top of the CUDA kernels for the block
count their calls, so a test cannot pass by running the C++ kernels twice.

Tolerance: both paths compute the statistics and the backward sums in float64 from the
same float32 inputs and normalise in float32; they differ in summation order, in where
x̂ comes from (the C++ backward recovers it from out on well-conditioned channels), in
fused multiply-adds, and for the convolution ops in the algorithm (C++ direct
convolution / patch moments against cuDNN or oneDNN with a materialised y). All of that
is float32 rounding, a few ulps of a tensor's largest entry; 1e-5 of that entry (about
80 ulps) is the bound, far below what a wrong formula, routing or index would give
(order 1). The window indices must agree bit for bit (the same first-max rule on the
same float32 values), the patch moments (float64 sums of float32 products) to 1e-12.
On CUDA, cuDNN may round convolution inputs to TF32 by default; that is the user's
global setting, not the ops', so the convolution tests switch it off.

Without triton every op still has a CUDA kernel: plain torch, logged once with the fix
(``test_without_triton_every_op_has_a_torch_cuda_kernel``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from scaleinv_kernels.ops import registry
from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool
from scaleinv_kernels.ops.direct_conv import direct_conv2d
from scaleinv_kernels.ops.gn_act import gn_act_pool
from scaleinv_kernels.ops.norm_act import bn_act_pool
from tests.devices import CUDA, TRITON_DEVICE
from tests.helpers import assert_bitwise, assert_close

ROOT = Path(__file__).resolve().parents[2]
EPS, MOMENTUM = 1e-5, 0.1


@contextlib.contextmanager
def cuda_code_path(*ops: str):
    """Within the block, ``ops`` ("scaleinv::name", forward and ``_backward``) run their
    registered CUDA kernels on TRITON_DEVICE's tensors; yields a Counter of the calls.

    Without CUDA, CPU tensors are routed to those kernels by cuda_code_path_on_cpu. The
    counting spies wrap the same kernels and are registered on top of them for the block
    (for "CUDA" on a GPU, for "CPU" inside the routing), then removed."""
    calls: collections.Counter[str] = collections.Counter()

    def spy(op, fn):
        def kernel(*args, **kwargs):
            calls[op] += 1
            return fn(*args, **kwargs)
        return kernel

    with contextlib.ExitStack() as stack:
        if not CUDA:
            stack.enter_context(registry.cuda_code_path_on_cpu())
        lib = torch.library.Library("scaleinv", "IMPL")
        try:
            with warnings.catch_warnings():  # "Overriding a previously registered kernel"
                warnings.simplefilter("ignore", UserWarning)
                for name in ops:
                    for op in (name, name + "_backward"):
                        # on top of a kernel registered from Python (torch < 2.13
                        # refuses that unless asked)
                        lib.impl(op.split("::")[1], spy(op, registry._CUDA_KERNELS[op]),
                                 "CUDA" if CUDA else "CPU", allow_override=True)
            yield calls
        finally:
            lib._destroy()


@pytest.fixture
def fp32_convolutions():
    """cuDNN convolutions in full float32 (see the module docstring); no effect on CPU."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _rand(gen, *shape, dtype=torch.float32, shift=0.0, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def _pos(gen, n, dtype=torch.float32):
    return (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(dtype)


def _to(device, tensors: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def _grad_out(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(99),
                       dtype=torch.float64).to(dtype)


def _compare(got: dict, ref: dict, rtol: float, bitwise=("index",), f64=("moments",)):
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        g = got[name].cpu()
        if name in bitwise:
            assert_bitwise(g, r, name)
        else:
            assert g.dtype == r.dtype, name
            assert_close(g, r, name, rtol=1e-12 if name in f64 else rtol)


# ---- bn_act_pool --------------------------------------------------------------------


def _bn(t: dict, training: bool, pool: int) -> dict:
    x, w, b = (t[k].clone().requires_grad_() for k in ("x", "w", "b"))
    rm, rv = t["rm"].clone(), t["rv"].clone()
    y = bn_act_pool(x, w, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS, pool=pool)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), _grad_out(y.shape, y.dtype).to(y.device))
    mean, invstd = (None, None) if training else (t["rm"], t["rv"].add(EPS).rsqrt())
    _, save_mean, save_invstd, index = torch.ops.scaleinv.bn_act_pool(
        t["x"], t["w"], t["b"], mean, invstd, EPS, True, pool)
    return dict(out=y.detach(), running_mean=rm, running_var=rv, grad_x=gx, grad_weight=gw,
                grad_bias=gb, save_mean=save_mean, save_invstd=save_invstd, index=index)


@pytest.mark.triton
@pytest.mark.parametrize("case", [((3, 4, 7, 5), 2, True, torch.float32),
                                  ((3, 4, 7, 5), 2, False, torch.float32),
                                  ((4, 3, 9), 0, True, torch.float32),
                                  ((2, 3, 5, 4), 2, True, torch.float64)], ids=str)
def test_bn_act_pool_on_the_cuda_code_path(case):
    """Float64 runs the CUDA kernels' torch branch (the Triton kernels are float32)."""
    shape, pool, training, dtype = case
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    t = dict(x=_rand(gen, *shape, dtype=dtype, shift=0.5, scale=2.0), w=_pos(gen, c, dtype),
             b=_rand(gen, c, dtype=dtype), rm=_rand(gen, c, dtype=dtype),
             rv=_pos(gen, c, dtype))
    ref = _bn(t, training, pool)
    with cuda_code_path("scaleinv::bn_act_pool") as calls:
        got = _bn(_to(TRITON_DEVICE, t), training, pool)
    assert calls == {"scaleinv::bn_act_pool": 2, "scaleinv::bn_act_pool_backward": 1}
    if pool == 0:
        del got["index"], ref["index"]  # [0]-shaped without pool
    _compare(got, ref, 1e-5 if dtype == torch.float32 else 1e-12)


# ---- gn_act_pool --------------------------------------------------------------------


def _gn(t: dict, groups: int, pool: int) -> dict:
    x, w, b = (t[k].clone().requires_grad_() for k in ("x", "w", "b"))
    y = gn_act_pool(x, w, b, groups, eps=EPS, pool=pool)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), _grad_out(y.shape, y.dtype).to(y.device))
    _, mean, invstd, index = torch.ops.scaleinv.gn_act_pool(t["x"], t["w"], t["b"], groups,
                                                            EPS, True, pool)
    return dict(out=y.detach(), grad_x=gx, grad_weight=gw, grad_bias=gb, save_mean=mean,
                save_invstd=invstd, index=index)


@pytest.mark.triton
@pytest.mark.parametrize("case", [((3, 6, 7, 5), 3, 2), ((2, 4, 9), 2, 0)], ids=str)
def test_gn_act_pool_on_the_cuda_code_path(case):
    shape, groups, pool = case
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    t = dict(x=_rand(gen, *shape, shift=0.5, scale=2.0), w=_pos(gen, c), b=_rand(gen, c))
    ref = _gn(t, groups, pool)
    with cuda_code_path("scaleinv::gn_act_pool") as calls:
        got = _gn(_to(TRITON_DEVICE, t), groups, pool)
    assert calls == {"scaleinv::gn_act_pool": 2, "scaleinv::gn_act_pool_backward": 1}
    if pool == 0:
        del got["index"], ref["index"]
    _compare(got, ref, 1e-5)


# ---- conv_bn_act_pool ---------------------------------------------------------------


def _conv_bn(t: dict, groups: int, padding: list[int], training: bool) -> dict:
    cw, w, b = (t[k].clone().requires_grad_() for k in ("cw", "w", "b"))
    rm, rv = t["rm"].clone(), t["rv"].clone()
    y = conv_bn_act_pool(t["x"], cw, groups, padding, w, b, rm, rv, training=training,
                         momentum=MOMENTUM, eps=EPS)
    gcw, gw, gb = torch.autograd.grad(y, (cw, w, b), _grad_out(y.shape, y.dtype).to(y.device))
    mean, invstd = (None, None) if training else (t["rm"], t["rv"].add(EPS).rsqrt())
    _, save_mean, save_invstd, index, moments = torch.ops.scaleinv.conv_bn_act_pool(
        t["x"], t["cw"], groups, padding, t["w"], t["b"], mean, invstd, EPS, True)
    return dict(out=y.detach(), running_mean=rm, running_var=rv, grad_conv_weight=gcw,
                grad_weight=gw, grad_bias=gb, save_mean=save_mean, save_invstd=save_invstd,
                index=index, moments=moments)


@pytest.mark.triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_act_pool_on_the_cuda_code_path(training, fp32_convolutions):
    """The CUDA forward materialises y (cuDNN, or oneDNN under the routing) and runs the
    Triton bn_act_pool forward on it; its backward is the torch contract."""
    gen = torch.Generator().manual_seed(21)
    n, groups, cin, cout, h, w, k = 3, 2, 1, 3, 7, 9, 3
    c = groups * cout
    t = dict(x=_rand(gen, n, groups * cin, h, w, shift=0.3),
             cw=_rand(gen, c, cin, k, k, scale=1 / 3), w=_pos(gen, c), b=_rand(gen, c),
             rm=_rand(gen, c, scale=0.2), rv=_pos(gen, c))
    ref = _conv_bn(t, groups, [1, 1], training)
    with cuda_code_path("scaleinv::conv_bn_act_pool") as calls:
        got = _conv_bn(_to(TRITON_DEVICE, t), groups, [1, 1], training)
    assert calls == {"scaleinv::conv_bn_act_pool": 2, "scaleinv::conv_bn_act_pool_backward": 1}
    _compare(got, ref, 1e-5)


# ---- direct_conv2d ------------------------------------------------------------------


def _conv(t: dict, groups: int, padding: list[int]) -> dict:
    x, w, b = (t[k].clone().requires_grad_() for k in ("x", "w", "b"))
    y = direct_conv2d(x, w, b, groups, padding)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), _grad_out(y.shape, y.dtype).to(y.device))
    return dict(out=y.detach(), grad_x=gx, grad_weight=gw, grad_bias=gb)


@pytest.mark.triton
def test_direct_conv2d_on_the_cuda_code_path(fp32_convolutions):
    """The CUDA kernels are F.conv2d and aten.convolution_backward by decision (no Triton
    kernel: see direct_conv.py); marked ``triton`` so the GPU check runs it on CUDA."""
    gen = torch.Generator().manual_seed(5)
    groups, cin, cout = 3, 1, 4
    t = dict(x=_rand(gen, 2, groups * cin, 9, 7), w=_rand(gen, groups * cout, cin, 3, 2),
             b=_rand(gen, groups * cout))
    ref = _conv(t, groups, [1, 0])
    with cuda_code_path("scaleinv::direct_conv2d") as calls:
        got = _conv(_to(TRITON_DEVICE, t), groups, [1, 0])
    assert calls == {"scaleinv::direct_conv2d": 1, "scaleinv::direct_conv2d_backward": 1}
    _compare(got, ref, 1e-5)


# ---- without triton -----------------------------------------------------------------

NO_TRITON_SCRIPT = r"""
import logging
import sys

sys.modules["triton"] = None  # `import triton` fails, as where it is not installed
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("scaleinv_kernels").addHandler(handler)

import torch

from scaleinv_kernels.ops import (bn_act_pool, conv_bn_act_pool, direct_conv2d,
                                  gn_act_pool, registry)

# each op's CUDA kernels: the plain-torch ones (the name of the function wrapped)
expected = {
    "scaleinv::bn_act_pool": "bn_act_pool_torch",
    "scaleinv::bn_act_pool_backward": "bn_act_pool_backward_torch",
    "scaleinv::gn_act_pool": "gn_act_pool_torch",
    "scaleinv::gn_act_pool_backward": "gn_act_pool_backward_torch",
    "scaleinv::conv_bn_act_pool": "conv_bn_act_pool_torch",
    "scaleinv::conv_bn_act_pool_backward": "conv_bn_act_pool_backward_torch",
    "scaleinv::direct_conv2d": "_cuda",
    "scaleinv::direct_conv2d_backward": "_cuda_backward",
}
for op, name in expected.items():
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op}: no CUDA kernel"
    assert op in registry._CUDA_KERNELS, f"{op}: not registered through register_cuda_kernel"
    fn = registry._CUDA_KERNELS[op]
    got = getattr(fn, "__wrapped__", fn).__name__
    assert got == name, f"{op}: CUDA kernel {got}, expected {name}"

# and they run: CPU tensors routed to them, against the C++ kernels
gen = torch.Generator().manual_seed(0)
x = torch.randn(3, 4, 6, 7, generator=gen)
w, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
cw = torch.randn(4, 2, 3, 3, generator=gen) / 3


def layers():
    res = []
    for fn, args in ((lambda x, w, b: bn_act_pool(x, w, b, None, None, training=True), (x, w, b)),
                     (lambda x, w, b: gn_act_pool(x, w, b, 2), (x, w, b)),
                     (lambda cw, w, b: conv_bn_act_pool(x, cw, 2, 1, w, b, None, None,
                                                        training=True), (cw, w, b)),
                     (lambda x, cw, b: direct_conv2d(x, cw, b, 2, 1), (x, cw, b))):
        leaves = [t.clone().requires_grad_() for t in args]
        y = fn(*leaves)
        res.append([y, *torch.autograd.grad(y, leaves, torch.ones_like(y))])
    return res


cpp = layers()
for _ in range(2):  # the message comes once
    with registry.cuda_code_path_on_cpu():
        fallback = layers()
    for i, (a, e) in enumerate(zip(sum(fallback, []), sum(cpp, []))):
        err = float((a - e).detach().abs().max() / e.detach().abs().max())
        assert err <= 1e-5, f"result {i}: {err}"
for op in ("bn_act_pool", "gn_act_pool", "conv_bn_act_pool"):
    said = [m for m in messages if f"scaleinv::{op} runs its plain-torch" in m]
    assert len(said) == 1 and "pip install triton" in said[0], (op, messages)
assert not any("direct_conv2d" in m for m in messages), messages  # never Triton: no news
print("ok")
"""


def test_without_triton_every_op_has_a_torch_cuda_kernel():
    """Where triton is not installed each op's CUDA kernels are its torch implementation,
    registered through register_cuda_kernel (a CUDA tensor never meets "no kernel for
    CUDA"), they match the C++ kernels, and the first call says once how to get the
    fused kernels. In a fresh process, with ``triton`` made unimportable before the
    package is imported; TRITON_INTERPRET=1 only lets cuda_code_path_on_cpu route CPU
    tensors to those (Triton-free) kernels."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SCALEINV_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "ok"
