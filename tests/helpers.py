"""Shared test helpers."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """A module of benchmarks/ (not a package: its scripts import each other as top-level
    modules, so the folder goes on sys.path, as when a script runs)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bitwise equality, the sign of zero included (any NaN equals any NaN: payloads are
    not part of the contract); on failure say where the first mismatch is."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().reshape(-1), expected.detach().reshape(-1)
    same = a == e
    if a.is_floating_point():
        same = (same & (a.signbit() == e.signbit())) | (a.isnan() & e.isnan())
    if not bool(same.all()):
        idx = int((~same).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((~same).sum())}/{a.numel()} elements differ; first at flat index "
            f"{idx}: {a[idx].item()!r} != {e[idx].item()!r}")


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
               atol: float = 0.0) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, reporting the worst."""
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    err = (a - e).abs() - (atol + rtol * e.abs())
    if a.numel() and float(err.detach().max()) > 0:
        i = int(err.argmax())
        raise AssertionError(f"{what}: worst at {i}: {a[i].item()!r} vs {e[i].item()!r} "
                             f"(rtol={rtol}, atol={atol})")


def run_experiment(tmp_path, name: str, *args: str) -> dict:
    """Run ``scaleinv <name> *args`` in-process into ``tmp_path``; check it wrote a real
    figure and removed its checkpoint; return its result.json."""
    import json

    from scaleinv_kernels.experiments import cli

    assert cli.main([name, *args, "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / name / "figure.png").stat().st_size > 10_000
    assert not (tmp_path / name / "checkpoint.pt").exists()  # removed once finished
    return json.loads((tmp_path / name / "result.json").read_text())


def assert_close(actual, expected, what, rtol=1e-5):
    """|a - e| <= rtol * max|e| (the scale of the whole tensor), reporting the worst."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
    err = (a - e).abs()
    if e.numel() and float(err.max()) > rtol * scale:
        i = int(err.reshape(-1).argmax())
        raise AssertionError(f"{what}: worst at flat index {i}: {a.reshape(-1)[i].item()!r} "
                             f"vs {e.reshape(-1)[i].item()!r} (max |expected| {scale:.3g})")


def spy_wrap_triton(monkeypatch) -> list:
    """Record every kernel handed to ``torch.library.wrap_triton`` (the launches still
    run): the list fills as the test launches kernels."""
    seen = []
    wrap = torch.library.wrap_triton

    def spy(kernel):
        seen.append(kernel)
        return wrap(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    return seen
