"""Every CPU op on every instruction-set build this machine can run, compared pairwise.

The C++ kernels are compiled three times (portable: SSE2/NEON, AVX2, AVX-512; csrc/cpu_isa.h)
and pick a build from ATen's CPU capability, which ``ATEN_CPU_CAPABILITY`` forces at process
start. For each capability up to the native one (a higher one cannot be forced: the process
would execute instructions the CPU lacks) and, on AVX-512 machines, the AVX-512 build with
``SCALEINV_NO_AVX512=1`` (its portable vector kernels instead of the intrinsics), one child
process computes the outputs and gradients of every CPU op on fixed-seed inputs (odd plane
sizes, output rows narrower and wider than every lane count, ties and NaNs in windows) and
saves them; the parent compares every pair of paths.

Bitwise promises across builds (the kernels do the same rounded operations per element, in
any lane count):
  * bn_act_pool eval mode: out, the window index and dx (the coefficients are per channel
    scalars, the windows elementwise);
  * bn_act_pool training: out and the index whenever the batch statistics came out equal
    (they are fp64 sums whose lane order follows the vector width, so they may differ in
    the last bit of their float32 rounding);
  * FusedSGDWD: bitwise equal to torch.optim.SGD(foreach=False) under each capability
    (checked inside each path; across paths both fuse where ATen's kernels do, so they
    differ where the builds' FMA use differs).
Everything else goes through fp64 sums whose order changes with the lane count (statistics,
grad_weight/grad_bias, training dx) or through FMA in some builds only (the convolutions):
RTOL of the tensor's largest magnitude, per dtype.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_bitwise, assert_close

REPO = Path(__file__).resolve().parents[2]
CAPABILITIES = ["default", "avx2", "avx512"]  # ATen's x86 capabilities, lowest first
# Differences across builds are reorderings of fp64 sums (rounded to the dtype) or one
# rounding more or less per multiply-add; both stay within a few ulp of the tensor's scale.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ---- the child: every op on fixed inputs -------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _plane_input(shape, dtype, seed: int, nans: bool) -> torch.Tensor:
    """x with ties in some windows (top-right = top-left) and, if nans, a NaN in a few."""
    x = _randn(shape, dtype, seed) * 2 + 0.5
    if len(shape) == 4 and shape[2] >= 2 and shape[3] >= 2:
        # channel 0: every window's top-right corner ties with its top-left one
        x[:, 0, 0::2, 1::2] = x[:, 0, 0::2, 0::2][..., : shape[3] // 2]
        x[0, 1, 1, 1] = x[0, 1, 0, 0]  # a tie between a window's first and last corner
        if nans:
            x[0, -1, -2, -2] = float("nan")
            x[-1, 0, 1, shape[3] - 1] = float("nan")
    return x


NORM_POOL_SHAPES = [(3, 4, 7, 7), (2, 3, 14, 14), (2, 3, 13, 15), (2, 2, 6, 37), (2, 3, 5, 40)]
NORM_PLAIN_SHAPES = [(3, 4, 7, 7), (4, 5, 3, 3), (5, 6)]


def _bn_cases(res: dict) -> None:
    from scaleinv_kernels.ops.norm_act import bn_act_pool

    cases = [(s, 2) for s in NORM_POOL_SHAPES] + [(s, 0) for s in NORM_PLAIN_SHAPES]
    for dtype in (torch.float32, torch.float64):
        for i, (shape, pool) in enumerate(cases):
            for training, relu in itertools.product((True, False), (True, False)):
                c = shape[1]
                x = _plane_input(shape, dtype, 10 + i, nans=not training).requires_grad_()
                w = (torch.rand(c, generator=_gen(20 + i), dtype=dtype) + 0.5).requires_grad_()
                b = _randn(c, dtype, 30 + i).requires_grad_()
                rm, rv = _randn(c, dtype, 40 + i), torch.rand(c, generator=_gen(50 + i),
                                                               dtype=dtype) + 0.5
                out = bn_act_pool(x, w, b, rm, rv, training=training, relu=relu, pool=pool)
                out.backward(_randn(out.shape, dtype, 60 + i))
                key = f"bn/{'train' if training else 'eval'}/{dtype}/{shape}/pool{pool}/relu{relu}"
                ops = torch.ops.scaleinv
                mean = None if training else rm
                invstd = None if training else (rv + 1e-5).rsqrt()
                raw = ops.bn_act_pool(x.detach(), w.detach(), b.detach(), mean, invstd, 1e-5,
                                      relu, pool)
                res[f"{key}/out"] = out.detach()
                res[f"{key}/save_mean"], res[f"{key}/save_invstd"] = raw[1], raw[2]
                if pool == 2:
                    res[f"{key}/index"] = raw[3]
                res[f"{key}/dx"] = x.grad
                res[f"{key}/gw"], res[f"{key}/gb"] = w.grad, b.grad


GN_CASES = [((2, 4, 14, 14), 2, 2), ((3, 6, 13, 15), 3, 2), ((2, 4, 6, 37), 4, 2),
            ((3, 4, 7, 7), 2, 0)]


def _gn_cases(res: dict) -> None:
    from scaleinv_kernels.ops.gn_act import gn_act_pool

    for dtype in (torch.float32, torch.float64):
        for i, (shape, groups, pool) in enumerate(GN_CASES):
            for relu in (True, False):
                c = shape[1]
                x = _plane_input(shape, dtype, 70 + i, nans=False).requires_grad_()
                w = (torch.rand(c, generator=_gen(80 + i), dtype=dtype) + 0.5).requires_grad_()
                b = _randn(c, dtype, 90 + i).requires_grad_()
                out = gn_act_pool(x, w, b, groups, relu=relu, pool=pool)
                out.backward(_randn(out.shape, dtype, 100 + i))
                key = f"gn/{dtype}/{shape}/g{groups}/pool{pool}/relu{relu}"
                res[f"{key}/out"], res[f"{key}/dx"] = out.detach(), x.grad
                res[f"{key}/gw"], res[f"{key}/gb"] = w.grad, b.grad


CONV_BN_CASES = [((4, 3, 14, 14), (8, 3, 3, 3), 1), ((2, 1, 13, 15), (4, 1, 3, 3), 1),
                 ((3, 1, 9, 20), (6, 1, 5, 5), 2)]


def _conv_bn_cases(res: dict) -> None:
    from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool

    for dtype in (torch.float32, torch.float64):
        for i, (xs, ws, pad) in enumerate(CONV_BN_CASES):
            for training, relu in itertools.product((True, False), (True, False)):
                c = ws[0]
                x = _randn(xs, dtype, 110 + i)
                cw = (_randn(ws, dtype, 120 + i) * 0.3).requires_grad_()
                w = (torch.rand(c, generator=_gen(130 + i), dtype=dtype) + 0.5).requires_grad_()
                b = _randn(c, dtype, 140 + i).requires_grad_()
                rm, rv = _randn(c, dtype, 150 + i), torch.rand(c, generator=_gen(160 + i),
                                                                dtype=dtype) + 0.5
                out = conv_bn_act_pool(x, cw, 1, pad, w, b, rm, rv, training=training,
                                       relu=relu)
                out.backward(_randn(out.shape, dtype, 170 + i))
                key = f"cbn/{'train' if training else 'eval'}/{dtype}/{xs}/relu{relu}"
                res[f"{key}/out"], res[f"{key}/dcw"] = out.detach(), cw.grad
                res[f"{key}/gw"], res[f"{key}/gb"] = w.grad, b.grad


CONV_CASES = [((3, 4, 9, 11), (6, 4, 3, 3), 1, 1), ((2, 4, 7, 7), (4, 2, 3, 3), 2, 1),
              ((2, 3, 14, 13), (5, 3, 5, 5), 1, 2)]


def _conv_cases(res: dict) -> None:
    from scaleinv_kernels.ops.direct_conv import direct_conv2d

    for dtype in (torch.float32, torch.float64):
        for i, (xs, ws, groups, pad) in enumerate(CONV_CASES):
            x = _randn(xs, dtype, 180 + i).requires_grad_()
            w = (_randn(ws, dtype, 190 + i) * 0.3).requires_grad_()
            b = _randn(ws[0], dtype, 200 + i).requires_grad_()
            out = direct_conv2d(x, w, b, groups, pad)
            out.backward(_randn(out.shape, dtype, 210 + i))
            key = f"conv/{dtype}/{xs}/g{groups}"
            res[f"{key}/out"], res[f"{key}/dx"] = out.detach(), x.grad
            res[f"{key}/dw"], res[f"{key}/db"] = w.grad, b.grad


SGD_SHAPES = [(7,), (33, 7), (1023,)]


def _sgd_cases(res: dict) -> None:
    from scaleinv_kernels import FusedSGDWD

    for dtype in (torch.float32, torch.float64):
        for nesterov in (False, True):
            params = [_randn(s, dtype, 220 + i) for i, s in enumerate(SGD_SHAPES)]
            ours = [p.clone().requires_grad_() for p in params]
            ref = [p.clone().requires_grad_() for p in params]
            hp = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
            opt, ref_opt = FusedSGDWD(ours, **hp), torch.optim.SGD(ref, foreach=False, **hp)
            for step in range(3):
                for i, (p, q) in enumerate(zip(ours, ref)):
                    p.grad = _randn(p.shape, dtype, 300 + 10 * step + i)
                    q.grad = p.grad.clone()
                opt.step()
                ref_opt.step()
            key = f"sgd/{dtype}/nesterov{nesterov}"
            for i, (p, q) in enumerate(zip(ours, ref)):
                res[f"{key}/p{i}"], res[f"{key}/torch_p{i}"] = p.detach(), q.detach()


def compute() -> dict[str, torch.Tensor]:
    """Outputs and gradients of every CPU op, keyed by op/case/tensor."""
    res: dict[str, torch.Tensor] = {}
    for cases in (_bn_cases, _gn_cases, _conv_bn_cases, _conv_cases, _sgd_cases):
        cases(res)
    return res


# ---- the parent: one child per path, compared pairwise -------------------------------

def _paths() -> list[tuple[str, dict[str, str]]]:
    """(name, environment) of each path: the capabilities up to the native one, and on
    AVX-512 machines the AVX-512 build without its intrinsics kernels."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    caps = CAPABILITIES[: CAPABILITIES.index(native) + 1] if native in CAPABILITIES else [
        "default", native]  # another architecture: its portable build and its native one
    paths = [(c, {"ATEN_CPU_CAPABILITY": c}) for c in dict.fromkeys(caps)]
    if "avx512" in caps:
        paths.append(("avx512-portable",
                      {"ATEN_CPU_CAPABILITY": "avx512", "SCALEINV_NO_AVX512": "1"}))
    return paths


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("isa_paths")
    procs = {}
    for name, env in _paths():
        out = tmp / f"{name}.pt"
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("ATEN_CPU_CAPABILITY", "SCALEINV_NO_AVX512")}
        procs[name] = (out, env, subprocess.Popen(
            [sys.executable, "-m", "tests.ops.test_isa_paths", str(out)], cwd=REPO,
            env={**child_env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    loaded = {}
    for name, (out, env, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        # the capability the child's ATen actually ran (the forced one took effect)
        assert stdout.split() == [env["ATEN_CPU_CAPABILITY"].upper()], (name, stdout)
        loaded[name] = torch.load(out)
    return loaded


def _kind(key: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """'bitwise' or 'close' for key, by the module docstring's promises."""
    op, *_, tensor = key.split("/")
    if op == "bn" and "/eval/" in key and tensor in ("out", "index", "dx", "save_mean",
                                                    "save_invstd"):
        return "bitwise"
    if op == "bn" and tensor in ("out", "index"):
        stats = key.rsplit("/", 1)[0]
        same = all(torch.equal(a[f"{stats}/{s}"], b[f"{stats}/{s}"])
                   for s in ("save_mean", "save_invstd"))
        return "bitwise" if same else ("skip-index" if tensor == "index" else "close")
    return "close"


def _assert_close_nan(x: torch.Tensor, y: torch.Tensor, rtol: float, what: str) -> None:
    """NaN at the same positions, the rest within rtol of the largest magnitude."""
    assert torch.equal(x.isnan(), y.isnan()), f"{what}: NaN positions differ"
    keep = ~x.isnan()
    assert_close(x[keep], y[keep], what, rtol=rtol)


def test_paths_ran_with_their_capability(results):
    """Each path's child reported its forced capability (checked in the fixture) and
    computed the same set of tensors, with the shapes and dtypes of the first path's."""
    names = list(results)
    assert names[0] == "default"
    first = results[names[0]]
    assert any(k.startswith("conv/") for k in first) and any(k.startswith("sgd/") for k in first)
    for name in names[1:]:
        assert results[name].keys() == first.keys(), name


def test_fused_sgd_equals_torch_sgd_on_every_path(results):
    for name, res in results.items():
        for key in res:
            if key.startswith("sgd/") and "/torch_" not in key:
                ref = key.rsplit("/", 1)[0] + "/torch_" + key.rsplit("/", 1)[1]
                assert_bitwise(res[key], res[ref], f"{name}: {key}")


def test_paths_agree_pairwise(results):
    checked = {"bitwise": 0, "close": 0}
    for (na, a), (nb, b) in itertools.combinations(results.items(), 2):
        for key in a:
            if "/torch_" in key:
                continue
            kind = _kind(key, a, b)
            what = f"{na} vs {nb}: {key}"
            if kind == "bitwise":
                assert_bitwise(a[key], b[key], what)
            elif kind == "close":
                _assert_close_nan(a[key], b[key], RTOL[a[key].dtype], what)
            else:  # index after unequal statistics: same shape, values are window corners
                assert a[key].shape == b[key].shape and int(a[key].max()) <= 3, what
            checked[kind if kind != "skip-index" else "close"] += 1
    # the bitwise promises were exercised (eval mode always is)
    assert len(results) < 2 or checked["bitwise"] > 0


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.save(compute(), sys.argv[1])
    print(torch.backends.cpu.get_cpu_capability())
