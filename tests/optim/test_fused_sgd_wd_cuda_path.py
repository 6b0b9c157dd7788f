"""FusedSGDWD on the code path CUDA params take (its Triton branch) against its C++ branch.

With CUDA present the params live on the GPU; without it they are CPU tensors inside
``cuda_code_path_on_cpu()``, where ``select_backend`` answers "triton" and the dispatcher
sends ``scaleinv::sgd_wd_`` to the Triton kernel (in the interpreter). Either way
``step()`` runs what it runs for CUDA params: pointer, work and segment tables, one
statistics buffer per device, per-member lr/weight_decay tables, fresh momentum buffers,
``TRACK_STATS=False`` without statistics.

Exactness (see tests/ops/test_sgd_wd.py): where ``tl.fma`` rounds once (a GPU, triton >=
3.9's interpreter) params and momentum buffers equal the C++ branch's bit for bit. Where
it rounds twice (triton 3.6-3.8's interpreter) the difference from torch's fused
arithmetic is not bounded in ulps of the stored value (it is an ulp of the product lr*d
where the update cancels the weight), so there the same optimizer runs its "reference"
branch with the op replaced by ``sgd_wd_two_roundings``, the arithmetic that interpreter
performs, and params and buffers must equal that bit for bit. Statistics: the float64 sums
of the same products in another order (1e-12 relative); the float32 fields derived from
them within 1e-6 relative (a float32 rounding or two) and 1e-9 absolute (cosines).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from scaleinv_kernels import STAT_FIELDS, FusedSGDWD
from scaleinv_kernels.ops import sgd_wd as sgd_wd_module
from scaleinv_kernels.ops import sgd_wd_kernel
from scaleinv_kernels.ops.registry import cuda_code_path_on_cpu
from scaleinv_kernels.optim import mark_members
from tests.devices import CUDA, TRITON_DEVICE, triton_fma_is_fused
from tests.helpers import assert_bitwise
from tests.ops.test_sgd_wd import assert_stats_close, sgd_wd_two_roundings

pytestmark = pytest.mark.triton
CPU = torch.device("cpu")
M = 3


def triton_path() -> contextlib.AbstractContextManager:
    """The block in which params on TRITON_DEVICE take the Triton branch."""
    return contextlib.nullcontext() if CUDA else cuda_code_path_on_cpu()


@contextlib.contextmanager
def expected_path():
    """The branch, on CPU params, whose results the Triton branch must equal bit for bit
    (module doc): the C++ one, or the reference one computing the two-rounding
    arithmetic."""
    if triton_fma_is_fused():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEINV_BACKEND", "reference")
        mp.setattr(sgd_wd_module, "sgd_wd_reference", sgd_wd_two_roundings)
        yield


@contextlib.contextmanager
def count_launches():
    """The keyword arguments of every Triton launch in the block."""
    launches: list[dict] = []
    launch = sgd_wd_kernel.launch

    def spy(kernel, grid, *args, **kwargs):
        launches.append(kwargs)
        return launch(kernel, grid, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sgd_wd_kernel, "launch", spy)
        yield launches


def _model(device: torch.device):
    """Ensemble tensors with per-member lr/weight_decay, and ordinary tensors of two
    dtypes (two launches in one group) with a 0-d tensor lr, a 0-d and a zero-numel
    param, odd sizes and a transposed (non-contiguous) param; the same values on every
    device."""
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape, dtype=torch.float32: torch.nn.Parameter(
        torch.randn(shape, generator=gen).to(dtype).to(device))
    ens = [mark_members(make(M, 5, 3), M), mark_members(make(M, 7), M),
           mark_members(make(M, 0, 2), M)]
    plain = [make(), make(0), make(1023), make(33, 7), make(2000, dtype=torch.bfloat16)]
    plain.append(torch.nn.Parameter(make(9, 13).detach().t()))  # strides (1, 13)
    no_momentum = [make(17), make(40, dtype=torch.float16)]
    groups = [
        {"params": ens, "lr": torch.tensor([0.1, 0.05, 0.2], device=device),
         "weight_decay": torch.tensor([1e-2, 0.0, 5e-4], device=device), "nesterov": True},
        {"params": plain, "lr": torch.tensor(0.03, device=device), "momentum": 0.5,
         "dampening": 0.2, "weight_decay": 3e-3, "maximize": True},
        {"params": no_momentum, "lr": 0.3, "momentum": 0.0, "weight_decay": 1e-3},
    ]
    return ens + plain + no_momentum, groups


def _run(device: torch.device, steps: int, *, track_stats: bool = True):
    """Train on the given device; grads skip some params in some steps, so momentum
    buffers are created (fresh) in later steps too. Returns params, buffers, the raw
    statistics sums and the last layer_stats(), all on the CPU."""
    params, groups = _model(device)
    opt = FusedSGDWD(groups, momentum=0.9, track_stats=track_stats)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(p.dtype).to(device)
            p.grad = None if (i + step) % 4 == 0 else g
        opt.step()
    buffers = [opt.state[p].get("momentum_buffer") for p in params]
    out = dict(params=[p.detach().cpu() for p in params],
               buffers=[None if b is None else b.cpu() for b in buffers],
               backends=set(opt.backends.values()))
    if track_stats:
        out["sums"] = opt._stats[params[0].device].cpu()
        out["stats"] = {f: getattr(opt.layer_stats(), f).cpu() for f in STAT_FIELDS}
    else:
        out["stat_buffers"] = opt._stats
    return out


# Fresh momentum buffers hold whatever torch.empty_like left there; the kernel reads
# and discards it (tl.where), and the interpreter's numpy may warn about a NaN in it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_step_equals_the_cpp_branch():
    with triton_path(), count_launches() as launches:
        got = _run(TRITON_DEVICE, 3)
    with expected_path():
        want = _run(CPU, 3)
    assert got["backends"] == {"triton"}
    # one launch per (group, dtype) with grads and elements: the ensemble group (with its
    # segment table) in every step, float32/bfloat16 and float32/float16 in the others
    assert all(k["TRACK_STATS"] for k in launches)
    assert sum(k["PER_SEGMENT"] for k in launches) == 3
    assert {str(k["DTYPE"]) for k in launches} == {"fp32", "bf16", "fp16"}
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert_bitwise(a, b, f"param {i}")
    for i, (a, b) in enumerate(zip(got["buffers"], want["buffers"])):
        assert (a is None) == (b is None), f"buffer {i} presence"
        if a is not None:
            assert_bitwise(a, b, f"buffer {i}")
    assert_stats_close(got["sums"], want["sums"], 1e-12, "statistics sums")
    for f in STAT_FIELDS:
        torch.testing.assert_close(got["stats"][f], want["stats"][f], rtol=1e-6, atol=1e-9,
                                   equal_nan=True, msg=f)


def test_without_statistics_the_kernel_skips_them():
    with triton_path(), count_launches() as launches:
        got = _run(TRITON_DEVICE, 2, track_stats=False)
    with expected_path():
        want = _run(CPU, 2, track_stats=False)
    assert launches and not any(k["TRACK_STATS"] for k in launches)
    assert got["stat_buffers"] == {}  # no statistics buffer allocated on any device
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert_bitwise(a, b, f"param {i}")
    for i, (a, b) in enumerate(zip(got["buffers"], want["buffers"])):
        if a is not None:
            assert_bitwise(a, b, f"buffer {i}")


def test_invalid_per_member_value_at_step():
    """A negative per-member lr set after construction. On CPU tensors step() refuses it
    before anything is written (the check is free there). On CUDA it is not checked,
    on purpose: reading the values would make step() wait for the device; the kernel
    applies it as given (as torch.optim.SGD applies a negative lr set after
    construction)."""
    w0 = torch.randn(M, 6, generator=torch.Generator().manual_seed(2))
    g = torch.randn(M, 6, generator=torch.Generator().manual_seed(3))
    w = mark_members(torch.nn.Parameter(w0.to(TRITON_DEVICE)), M)
    opt = FusedSGDWD([{"params": [("ens", w)],
                       "lr": torch.tensor([0.1, 0.2, 0.3], device=TRITON_DEVICE)}])
    opt.param_groups[0]["lr"][1] = -0.2
    w.grad = g.to(TRITON_DEVICE)
    with triton_path():
        if TRITON_DEVICE.type == "cpu":
            with pytest.raises(ValueError, match=r"invalid per-member lr -0\.2.*member 1"):
                opt.step()
            assert_bitwise(w.detach(), w0, "param after the refused step")
        else:
            opt.step()
            lr = torch.tensor([0.1, -0.2, 0.3])[:, None]
            torch.testing.assert_close(w.detach().cpu(), w0 - lr * g, rtol=1e-6, atol=1e-6)


def test_cpu_lr_tensor_with_params_on_the_triton_device():
    """torch.optim.SGD takes a CPU 0-d lr with CUDA params; so does FusedSGDWD: it copies
    the lr to the params' device before it launches anything. On CUDA: bitwise equal to
    torch.optim.SGD(foreach=False) with the same CPU lr (tl.fma is fused on a GPU). On
    CPU tensors the lr needs no copy; the step equals the expected branch's."""
    def run(device, make_opt):
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
                  for s in [(1023,), (7, 5), ()]]
        opt = make_opt(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        return [p.detach().cpu() for p in params], opt

    hp = dict(momentum=0.9, weight_decay=1e-3, nesterov=True)
    with triton_path():
        got, opt = run(TRITON_DEVICE, lambda ps: FusedSGDWD(ps, lr=torch.tensor(0.05), **hp))
        stats = opt.layer_stats()
    assert opt.param_groups[0]["lr"].device == CPU  # the user's tensor stays where it was
    assert stats.effective_lr.device.type == TRITON_DEVICE.type
    if CUDA:
        want, _ = run(TRITON_DEVICE, lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.05),
                                                                foreach=False, **hp))
    else:
        with expected_path():
            want, _ = run(CPU, lambda ps: FusedSGDWD(ps, lr=torch.tensor(0.05), **hp))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bitwise(a, b, f"param {i}")


def test_step_and_layer_stats_do_not_synchronize():
    """layer_stats() promises no host synchronisation. With CUDA: step() + layer_stats()
    under torch.cuda.set_sync_debug_mode("error") (after a first step, which compiles the
    kernel). Without CUDA the same code path runs on CPU tensors, where there is no sync
    to detect, so the check there is that the second layer_stats() builds no tensor from
    a Python list (on CUDA each such tensor is a copy that waits)."""
    params, groups = _model(TRITON_DEVICE)
    groups[1]["lr"] = torch.tensor(0.03)  # on the CPU: copied without waiting
    opt = FusedSGDWD(groups, momentum=0.9)
    gen = torch.Generator().manual_seed(5)

    def grads():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(TRITON_DEVICE)

    with triton_path():
        grads()
        opt.step()
        opt.layer_stats()
        grads()
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
                stats = opt.layer_stats()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            opt.step()
            made = []
            real = torch.tensor
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
                stats = opt.layer_stats()
            assert made == []
    assert bool(torch.isfinite(stats.weight_norm[:3 * M]).all())
