"""scaleinv::direct_conv2d — direct grouped convolution against ``F.conv2d``.

Output and the three gradients must equal ``F.conv2d``'s (float32: within 1e-5 of the
largest magnitude; float64: gradcheck and 1e-12), on odd sizes, every padding allowed,
several kernel sizes, 1–3 input channels per group and widths that are not multiples of
the 16-lane register blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scaleinv_kernels.ops.direct_conv import direct_conv2d, direct_conv2d_reference
from tests.helpers import assert_close

# (N, groups, C_in per group, C_out per group, H, W, kernel, padding)
CASES = [
    (2, 3, 1, 4, 7, 5, 3, 1),
    (1, 1, 1, 1, 1, 1, 1, 0),  # 1x1 everything
    (3, 2, 3, 5, 9, 11, 5, 2),
    (2, 2, 2, 3, 6, 6, 3, 0),  # no padding: output smaller than the input
    (1, 4, 1, 16, 28, 28, 3, 1),  # the ensemble's first layer (4 members)
    (2, 1, 3, 7, 4, 37, 3, 2),  # W + 2p = 41 columns: 3 register blocks, masked tail
    (1, 2, 1, 6, 3, 3, 3, 2),  # padding = kernel - 1 (the full convolution)
]


def _make(case, dtype, bias, seed=0):
    n, g, ci, co, h, w, k, p = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g * ci, h, w, generator=gen, dtype=torch.float64).to(dtype)
    wt = torch.randn(g * co, ci, k, k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(g * co, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return x, wt, b, g, (p, p)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_conv2d_float32(case, bias):
    x, w, b, groups, padding = _make(case, torch.float32, bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = direct_conv2d(x, w, b, groups, padding)
    ref = F.conv2d(x, w, b, 1, padding, 1, groups)
    assert_close(y, ref, "output")
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, leaves, go)
    want = torch.autograd.grad(ref, leaves, go)
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert_close(a, e, name)


def test_float64_gradcheck_and_tight_match():
    for case in (CASES[0], CASES[2], CASES[6]):
        x, w, b, groups, padding = _make(case, torch.float64, True)
        ref = F.conv2d(x, w, b, 1, padding, 1, groups)
        assert_close(direct_conv2d(x, w, b, groups, padding), ref, "output", rtol=1e-12)
    # gradcheck perturbs the input elements one at a time (CASES[2] has over 2 500), so it
    # checks CASES[2]'s 5x5 kernel, 3 input channels and padding 2 on a smaller batch/plane
    for case in (CASES[0], (1, 2, 3, 2, 6, 7, 5, 2), CASES[6]):
        x, w, b, groups, padding = _make(case, torch.float64, True)
        ins = tuple(t.requires_grad_() for t in (x, w, b))
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_: direct_conv2d(x_, w_, b_, groups, padding), ins)


def test_rectangular_kernel_and_padding():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 8, generator=gen, requires_grad=True)
    w = torch.randn(6, 2, 3, 5, generator=gen, requires_grad=True)
    y = direct_conv2d(x, w, None, 2, (0, 2))
    ref = F.conv2d(x, w, None, 1, (0, 2), 1, 2)
    assert_close(y, ref, "output")
    go = torch.randn(ref.shape, generator=gen)
    for a, e in zip(torch.autograd.grad(y, (x, w), go), torch.autograd.grad(ref, (x, w), go)):
        assert_close(a, e, "grad")


def test_only_weight_grad_when_input_needs_none():
    x, w, _, groups, padding = _make(CASES[4], torch.float32, False)
    w.requires_grad_()
    y = direct_conv2d(x, w, None, groups, padding)
    (gw,) = torch.autograd.grad(y.square().sum(), w)
    (gw_ref,) = torch.autograd.grad(F.conv2d(x, w, None, 1, padding, 1, groups).square().sum(), w)
    assert_close(gw, gw_ref, "grad_weight")


def test_empty_batch_and_noncontiguous_input():
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    x0 = torch.randn(0, 2, 5, 5, requires_grad=True)
    y0 = direct_conv2d(x0, w, None, 2, (1, 1))
    assert y0.shape == (0, 4, 5, 5)
    (gw,) = torch.autograd.grad(y0.sum(), w)
    assert torch.equal(gw, torch.zeros_like(w))
    # channels_last and a sliced (strided) input are read through a contiguous copy
    x = torch.randn(3, 2, 6, 7).contiguous(memory_format=torch.channels_last)
    assert_close(direct_conv2d(x, w.detach(), None, 2, (1, 1)),
                 F.conv2d(x, w.detach(), None, 1, 1, 1, 2), "channels_last")
    xs = torch.randn(3, 4, 6, 7)[:, ::2]
    assert_close(direct_conv2d(xs, w.detach(), None, 2, (1, 1)),
                 F.conv2d(xs, w.detach(), None, 1, 1, 1, 2), "strided")


def test_deterministic():
    x, w, _, groups, padding = _make(CASES[4], torch.float32, False)
    w.requires_grad_()
    go = torch.randn(1, 64, 28, 28)
    runs = [torch.autograd.grad(direct_conv2d(x, w, None, groups, padding), w, go)[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_int_padding_pads_both_dimensions_and_bad_types_raise():
    x, w, _, groups, _ = _make(CASES[0], torch.float32, False)
    assert_close(direct_conv2d(x, w, None, groups, 1), F.conv2d(x, w, None, 1, 1, 1, groups),
                 "int padding")
    with pytest.raises(TypeError, match="padding"):
        direct_conv2d(x, w, None, groups, "same")
    with pytest.raises(TypeError, match="groups"):
        direct_conv2d(x, w, None, 3.0, 1)


def test_reference_is_conv2d():
    x, w, b, groups, padding = _make(CASES[0], torch.float32, True)
    assert torch.equal(direct_conv2d_reference(x, w, b, groups, padding),
                       F.conv2d(x, w, b, 1, padding, 1, groups))


@pytest.mark.parametrize("bad, exc, msg", [
    (dict(x=torch.randn(2, 3, 5, 5)), ValueError, "groups"),  # 3 channels, groups=2, C_in 1
    (dict(w=torch.randn(5, 1, 3, 3)), ValueError, "divisible"),
    (dict(padding=(3, 1)), ValueError, "padding"),
    (dict(padding=(1,)), ValueError, "2 entries"),
    (dict(x=torch.randn(2, 2, 1, 1), padding=(0, 0)), ValueError, "smaller than the kernel"),
    (dict(x=torch.randn(2, 2, 5, 5, dtype=torch.float16)), TypeError, "float32"),
    (dict(b=torch.randn(3)), ValueError, "bias"),
    (dict(x=torch.randn(2, 2, 5)), ValueError, "N, C, H, W"),
])
def test_bad_input_raises(bad, exc, msg):
    args = dict(x=torch.randn(2, 2, 5, 5), w=torch.randn(4, 1, 3, 3), b=None, groups=2,
                padding=(1, 1))
    args.update(bad)
    with pytest.raises(exc, match=msg):
        direct_conv2d(args["x"], args["w"], args["b"], args["groups"], args["padding"])
    with pytest.raises((exc, RuntimeError)):  # the op itself checks the same things
        torch.ops.scaleinv.direct_conv2d(args["x"], args["w"], args["b"], args["groups"],
                                         list(args["padding"]))


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_opcheck_cpu(case):
    x, w, b, groups, padding = _make(case, torch.float32, True)
    torch.library.opcheck(torch.ops.scaleinv.direct_conv2d.default,
                          (x, w.requires_grad_(), b, groups, list(padding)))
    go = torch.randn(F.conv2d(x, w, b, 1, padding, 1, groups).shape)
    torch.library.opcheck(torch.ops.scaleinv.direct_conv2d_backward.default,
                          (go, x, w.detach(), groups, list(padding), [True, True, True]))


# Runs in a fresh process, where ATEN_CPU_CAPABILITY picks the kernel build (read once):
# "default" is the portable build (no FMA), "avx2" the AVX2 one.
BUILD_SCRIPT = """
import torch, torch.nn.functional as F
from scaleinv_kernels.ops.direct_conv import direct_conv2d
torch.manual_seed(0)
worst = 0.0
for n, g, ci, co, h, w, k, p in [(2, 3, 1, 6, 7, 5, 3, 1), (1, 2, 3, 5, 9, 33, 5, 2)]:
    x = torch.randn(n, g * ci, h, w, requires_grad=True)
    wt = torch.randn(g * co, ci, k, k, requires_grad=True)
    y, ref = direct_conv2d(x, wt, None, g, (p, p)), F.conv2d(x, wt, None, 1, p, 1, g)
    go = torch.randn_like(ref)
    pairs = [(y, ref)] + list(zip(torch.autograd.grad(y, (x, wt), go),
                                  torch.autograd.grad(ref, (x, wt), go)))
    for a, e in pairs:
        worst = max(worst, float((a - e).abs().max() / e.abs().max()))
print(torch.backends.cpu.get_cpu_capability(), worst)
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_other_instruction_set_builds_match_conv2d(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    run = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    used, worst = run.stdout.strip().splitlines()[-1].split()
    assert used.lower() == capability.lower()
    assert float(worst) <= 1e-5
