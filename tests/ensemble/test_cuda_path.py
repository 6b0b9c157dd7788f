"""One whole training step of an Ensemble + FusedSGDWD on the code path CUDA tensors take.

With CUDA present the step runs on CUDA tensors; without it, on CPU tensors inside
``cuda_code_path_on_cpu()`` (the Triton kernels in the interpreter, every CPU-only choice
of the ensemble's layers switched off). Either way it is compared with the C++ CPU path
from the same weights and data.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.ensemble import Ensemble
from scaleinv_kernels.ops import registry
from scaleinv_kernels.ops.registry import cuda_code_path_on_cpu
from scaleinv_kernels.scale_invariance import normalized_cnn
from tests.devices import CUDA, TRITON_DEVICE

# small: the interpreter runs one Python program per (sample, channel) plane
M, BATCH, HW = 2, 4, 8
NET = functools.partial(normalized_cnn, channels=(4, 4, 8))
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _train(device: torch.device, steps: int, x: torch.Tensor, y: torch.Tensor):
    ens = Ensemble(NET, M, init="independent", seed=3).to(device)
    opt = FusedSGDWD(ens.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = x.to(device), y.to(device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = ens(x)
        F.cross_entropy(out.reshape(-1, 10), y.reshape(-1), reduction="none").view(
            M, BATCH).mean(1).sum().backward()
        opt.step()
    stats = opt.layer_stats()
    params = {k: v.detach().cpu() for k, v in ens.net.named_parameters()}
    buffers = {k: v.detach().cpu() for k, v in ens.net.named_buffers()}
    return params, buffers, stats, opt.backend


@pytest.mark.triton
def test_ensemble_step_on_the_cuda_code_path_matches_the_cpu_path():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, BATCH, 1, HW, HW, generator=gen)
    y = torch.randint(0, 10, (M, BATCH), generator=gen)
    init = {k: v.detach().clone() for k, v in
            Ensemble(NET, M, init="independent", seed=3).net.named_parameters()}
    ref_p, ref_b, ref_s, ref_backend = _train(torch.device("cpu"), 2, x, y)
    assert ref_backend == "cpp"

    called: set[str] = set()
    if CUDA:
        block = contextlib.nullcontext()
    else:
        # count the ops that reach the CUDA kernels (the block reads the registry on entry)
        def spy(op, fn):
            def kernel(*args):
                called.add(op)
                return fn(*args)
            return kernel

        spies = {op: spy(op, fn) for op, fn in registry._CUDA_KERNELS.items()}
        block = contextlib.ExitStack()
        block.enter_context(mock.patch.dict(registry._CUDA_KERNELS, spies))
        block.enter_context(cuda_code_path_on_cpu())
    with block:
        got_p, got_b, got_s, backend = _train(TRITON_DEVICE, 2, x, y)
    assert backend == "triton"
    if not CUDA:  # on CUDA the tensors' device is the proof
        # the fused BatchNorm forward, its backward through the C++ autograd, and the
        # optimizer's launch all reached the kernels registered for CUDA
        assert {"scaleinv::bn_act_pool", "scaleinv::bn_act_pool_backward",
                "scaleinv::sgd_wd_"} <= called, called
    # The two paths differ in convolution algorithm (grouped vs direct / fused input
    # layer) and reduction order, so the gradients agree to float32 rounding amplified
    # by BatchNorm's 1/sigma, not bitwise; judge the UPDATE w_new - w_init, whose size
    # is lr * |g| (~1e-2 relative to w), to 1e-3 of its own norm.
    for name, w0 in init.items():
        if not ref_p[name].requires_grad and torch.equal(ref_p[name], w0):
            assert torch.equal(got_p[name], w0), name  # frozen layers stay untouched
            continue
        d_ref, d_got = ref_p[name] - w0, got_p[name] - w0
        err = float((d_got - d_ref).norm() / d_ref.norm())
        assert err < 1e-3, f"{name}: update differs by {err:.2e} of its norm"
    for name, b in ref_b.items():
        if b.dtype.is_floating_point:
            torch.testing.assert_close(got_b[name], b, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(got_b[name], b), name
    # statistics of the last step, per (member, tensor): the same quantities within the
    # update's tolerance
    for field in ("weight_norm", "grad_norm", "update_norm"):
        a = getattr(ref_s, field).cpu()
        b = getattr(got_s, field).cpu()
        torch.testing.assert_close(b, a, rtol=2e-3, atol=0, equal_nan=True, msg=field)
