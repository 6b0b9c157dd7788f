"""One-shot GPU check of the package on a CUDA machine: builds, tests, checks, times.

    python3 benchmarks/gpu_suite.py --out DIR [--budget 450] [--dry-run]

Made for a bare machine that receives a copy of the source tree and nothing else: no
network, the package not installed, the C++ extension not built. In order:

1. build: ``scaleinv_kernels._C`` is built in place (``setup.py build_ext --inplace``,
   ninja with one job per core) unless it already loads with this python; the source tree
   is put first on ``sys.path`` and ``PYTHONPATH``, so this tree is what gets tested.
2. correctness: every optimizer variant against torch ``SGD(foreach=True)``; the fused
   ``bn_act_pool``, ``gn_act_pool``, ``direct_conv2d`` and ``conv_bn_act_pool`` against
   their references (max relative differences, each below a stated tolerance).
3. tests: ``pytest -m triton tests`` (every test that runs a Triton kernel) and the
   FusedSGDWD tests against the fresh build, in a time-limited subprocess.
4. timings: a device-to-device copy (the bandwidth ceiling), the optimizer variants on
   the two parameter sets of ``sgd_wd_cases.py`` (``triton.testing.do_bench``), the fused
   norm/activation ops against torch's ops, and one training step of M = 500 normalized
   CNNs (``ensemble_cases.py``: Ensemble + FusedSGDWD vs torch.func vmap vs an eager loop).

Every section runs within a budget for the whole command (default 450 s, so it ends
within 8 minutes); a section that would not fit is skipped with the reason recorded. The
results go to DIR/gpu_suite.json (machine, versions, per-section status and numbers) and
DIR/gpu_suite.md (the table, also printed). Exit status: 0 only when the build, the tests
and every correctness check passed; 1 otherwise; 2 at once when there is no CUDA device.

``--dry-run`` runs the same sections on CPU tensors with tiny sizes: the Triton kernels
in the interpreter (the CUDA code path on CPU), pytest only collecting, one repetition of
each timing, an M = 4 ensemble step. A CPU test runs it, so the script cannot rot
between the rare runs on a GPU. Nothing touches CUDA at import time.

Why one file of over 500 lines: it is the one command run on a machine lent for minutes,
and its sections share a budget, a result record and the dry-run switch; split into
modules, the budget and the record would have to be threaded through each of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
GPU_VARIANTS = ("sgd_foreach", "sgd_fused", "sgd_fused_norms", "fsgd_nostats", "fsgd_stats")
QUANTILES = [0.5, 0.2, 0.8]
# Largest |param difference| of a variant vs torch SGD(foreach) after 3 steps, relative to
# the largest parameter change: a few float32 ulps of the params are ~1e-4 of it, a missing
# weight-decay or momentum term is > 1e-2.
VARIANT_TOL = 1e-3
# Max relative difference of a fused op vs its reference: float32 rounding (amplified by
# BatchNorm's 1/sigma in dx) stays below 1e-5 on these shapes; a wrong kernel is >= 1e-2.
KERNEL_TOL = 1e-4
# The pytest runs (their paths are relative to the source tree). `-m triton` selects every
# test that runs a Triton kernel; the rest of tests/optim is the FusedSGDWD suite, run
# against the freshly built extension. Test modules import mlxtend only inside the tests
# that need it, so collecting `tests` works without it.
PYTEST_RUNS = {"tests_triton": ["-m", "triton", "tests"],
               "tests_optim": ["-m", "not triton", "tests/optim"]}
# A module that fails to import under that machine's versions is reported as an error but
# does not stop the other modules' tests from running.
PYTEST_BASE = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "-rfE",
               "--continue-on-collection-errors"]
# What each section may take at most (s, on a GPU): it is skipped when less is left.
GPU_COST = {"build": 60, "check": 20, "tests": 60, "copy": 10, "sgd_case": 30,
            "time_op": 15, "ensemble": 60}


# ----------------------------------------------------------------------------------
# the source tree, the build and the pytest runs (subprocesses of this python)
# ----------------------------------------------------------------------------------


def _setup_path() -> None:
    """Put this source tree (and the benchmark helpers) first on ``sys.path``: an
    installed copy of the package, editable or not, must not be the one tested."""
    for p in (str(BENCH_DIR), str(ROOT)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """The environment of a child python: this tree first on PYTHONPATH; ``None`` removes
    a variable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_child(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """(rc, stdout + stderr) of ``cmd``; rc None when it ran out of ``timeout``. The child
    runs in its own process group, killed as a whole on timeout: compiler jobs under
    ninja, or workers a test started, must not go on competing with later sections."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _tail(text: str | bytes | None, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


# Imports the package and its extension as the sections will, and says from where.
_LOAD_PROBE = ("import scaleinv_kernels, scaleinv_kernels._C as c; "
               "print(scaleinv_kernels.__file__); print(c.__file__)")


def extension_problem(timeout: float = 120.0) -> str | None:
    """None when ``scaleinv_kernels._C`` of THIS tree loads in a fresh python (same
    interpreter, this tree first on the path), else why not."""
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD_PROBE], cwd=ROOT, text=True,
                              env=subprocess_env(SCALEINV_BACKEND=None), capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"importing the extension took over {timeout:.0f} s"
    if proc.returncode != 0:
        return _tail(proc.stderr, 600).strip() or f"import failed (rc {proc.returncode})"
    paths = proc.stdout.split()[-2:]
    if len(paths) != 2 or not all(Path(p).resolve().is_relative_to(ROOT) for p in paths):
        return f"the package loaded from outside {ROOT}: {paths}"
    return None


def usable_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_build(cwd: Path, timeout: float) -> tuple[int | None, str]:
    """``setup.py build_ext --inplace`` in ``cwd`` with one ninja job per core."""
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]
    env = subprocess_env(MAX_JOBS=str(usable_cpus()), SCALEINV_BUILD_EXT="1")
    rc, out = run_child(cmd, cwd, env, timeout)
    return rc, (f"timed out after {timeout:.0f} s\n" if rc is None else "") + _tail(out)


def _build_without_pyproject(timeout: float) -> tuple[int | None, str]:
    """The same build in a scratch copy of setup.py and csrc/ only: a setuptools older
    than 77 (a distribution's python3) rejects pyproject.toml's ``license = "MIT"`` before
    it builds anything, and setup.py needs nothing from pyproject.toml."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scaleinv_build_") as tmp:
        scratch = Path(tmp)
        shutil.copy2(ROOT / "setup.py", scratch / "setup.py")
        shutil.copytree(ROOT / "csrc", scratch / "csrc")
        (scratch / "scaleinv_kernels").mkdir()
        rc, log = _run_build(scratch, timeout)
        built = sorted((scratch / "scaleinv_kernels").glob("_C*"))
        if rc == 0 and built:
            for so in built:
                shutil.copy2(so, ROOT / "scaleinv_kernels" / so.name)
        elif rc == 0:
            rc, log = 1, log + "\nthe build succeeded but produced no scaleinv_kernels/_C*"
    return rc, log


def ensure_extension(timeout: float) -> dict:
    """Build the extension in place unless it already loads; say how it went."""
    problem = extension_problem()
    if problem is None:
        return {"status": "ok", "summary": "extension already built, loads", "built": False}
    t0 = time.monotonic()
    print(f"      extension does not load ({problem.splitlines()[-1][:200]}); building "
          f"with MAX_JOBS={usable_cpus()}", flush=True)
    attempts = []
    rc, log = _run_build(ROOT, timeout)
    attempts.append({"where": "source tree", "rc": rc, "tail": log})
    if rc is not None and rc != 0:  # failed, not out of time: maybe setuptools < 77
        left = timeout - (time.monotonic() - t0)
        print(f"      in-place build failed (rc {rc}); retrying without pyproject.toml",
              flush=True)
        rc, log = _build_without_pyproject(max(left, 30.0))
        attempts.append({"where": "scratch copy of setup.py + csrc/", "rc": rc, "tail": log})
    seconds = time.monotonic() - t0
    problem_after = extension_problem() if rc == 0 else "build failed"
    ok = rc == 0 and problem_after is None
    if ok:
        summary = f"built in {seconds:.0f} s ({attempts[-1]['where']})"
    elif rc != 0:
        last = next((ln for ln in reversed(log.splitlines()) if ln.strip()), "")
        summary = f"build failed (rc {rc}) after {seconds:.0f} s: {last[:200]}"
    else:
        summary = f"built in {seconds:.0f} s but does not load: {problem_after[-200:]}"
    return {"status": "ok" if ok else "failed", "summary": summary, "built": True,
            "build_seconds": seconds, "initial_problem": problem[-600:],
            "load_problem": problem_after, "attempts": attempts}


def run_pytest(args: list[str], timeout: float, collect_only: bool, env: dict) -> dict:
    """One pytest run in a subprocess: rc, summary line, the FAILED/ERROR lines and the
    short tracebacks of the failures."""
    cmd = [sys.executable, *PYTEST_BASE, *(["--collect-only"] if collect_only else []), *args]
    t0 = time.monotonic()
    rc, out = run_child(cmd, ROOT, env, timeout)
    lines = [ln.rstrip() for ln in out.splitlines() if ln.strip()]
    keys = ("passed", "failed", "error", "skipped", "no tests ran", "deselected", "collected")
    summary = next((ln.strip("= ") for ln in reversed(lines) if any(k in ln for k in keys)),
                   lines[-1] if lines else "(no output)")
    if rc is None:
        summary = f"timed out after {timeout:.0f} s; last line: {summary}"
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    start = out.find("= FAILURES =")
    if start < 0:
        start = out.find("= ERRORS =")
    tracebacks = out[start:start + 8000] if start >= 0 else ""
    # rc 5: nothing selected, which for a marker that every Triton test carries is a fault
    ok = rc == 0
    return {"status": "ok" if ok else "failed", "summary": summary, "rc": rc,
            "command": " ".join(["python3", *cmd[1:]]), "seconds": time.monotonic() - t0,
            "failures": failures[:50], "tracebacks": tracebacks, "tail": _tail(out, 2500)}


# ----------------------------------------------------------------------------------
# timing on either device
# ----------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object], device: str, reps: int = 100) -> list[float]:
    """[median, p20, p80] ms of ``fn()``. On CUDA ``triton.testing.do_bench`` (L2 flushed
    before each call, ``reps`` ms of calls); on CPU ``reps`` calls timed one by one."""
    if device == "cuda":
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=25, rep=reps, quantiles=QUANTILES))
    fn()
    samples = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    if len(samples) == 1:
        return samples * 3
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return [statistics.median(samples), q[1], q[7]]


def median_ms(step: Callable[[], object], steps: int, device: str) -> float:
    """Median ms of ``step()`` over ``steps`` calls after one warm-up call: CUDA events
    on CUDA (the GPU's own clock, no host sync inside the timed region), else the host
    clock."""
    import torch

    step()
    times = []
    for _ in range(max(1, steps)):
        if device == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            step()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _free(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


@contextlib.contextmanager
def functions_called(suffix: str = "_triton") -> Iterator[set[str]]:
    """Names of the Python functions ending in ``suffix`` called in this thread within
    the block (which kernel implementation a dispatched op really ran). The autograd
    engine runs CUDA backward passes in its own thread, so only forward calls are seen
    there."""
    called: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name.endswith(suffix):
            called.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        yield called
    finally:
        sys.setprofile(None)


@contextlib.contextmanager
def cuda_code_path(device: str) -> Iterator[None]:
    """Nothing on CUDA. On CPU tensors (the dry run): the code path CUDA tensors take,
    the ops' CUDA kernels run on CPU tensors (Triton in the interpreter) and FusedSGDWD
    picks its Triton backend (``SCALEINV_BACKEND=triton``, read at each optimizer's
    construction)."""
    if device == "cuda":
        yield
        return
    from scaleinv_kernels.ops.registry import cuda_code_path_on_cpu

    saved = os.environ.get("SCALEINV_BACKEND")
    os.environ["SCALEINV_BACKEND"] = "triton"
    try:
        with cuda_code_path_on_cpu():
            yield
    finally:
        if saved is None:
            os.environ.pop("SCALEINV_BACKEND", None)
        else:
            os.environ["SCALEINV_BACKEND"] = saved


# ----------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------


def _judge(diff: dict[str, float], tol: float, called: set[str] | None = None,
           expected: set[str] = frozenset()) -> dict:
    """Status of a comparison: every difference finite and <= tol, and the expected
    kernel functions among those called (when ``called`` is given)."""
    bad = {k: v for k, v in diff.items() if not v <= tol}
    missing = sorted(expected - called) if called is not None else []
    status = "ok" if not bad and not missing else "failed"
    worst = max(diff, key=lambda k: diff[k] if diff[k] == diff[k] else float("inf"))
    summary = f"max rel diff {diff[worst]:.1e} ({worst}), tol {tol:g}"
    if bad:
        summary += f"; over tol: {', '.join(sorted(bad))}"
    if missing:
        summary += f"; did not run {', '.join(missing)}"
    out = {"status": status, "summary": summary, "max_rel_diff": diff, "tol": tol}
    if called is not None:
        out["kernels_called"] = sorted(called)
    return out


def check_variants(device: str = "cuda") -> dict:
    """Params of every variant vs torch SGD(foreach=True) after 3 steps on a few odd
    shapes: max |diff| (``max_abs_diff``) and max |diff| / max |param change|
    (``max_rel_diff``); FusedSGDWD's backend (expected "triton" on CUDA)."""
    import torch
    from sgd_wd_cases import VARIANTS, make_variants, tiny_case

    case = tiny_case()
    init, _ = case.tensors(device)
    variants = make_variants(case, VARIANTS, device=device, prime=False)
    for _ in range(3):
        for v in variants.values():
            v()
    ref = variants["sgd_foreach"].params
    with torch.no_grad():
        change = max(float((a - b).abs().max()) for a, b in zip(ref, init, strict=True))
        diffs = {key: max(float((a - b).abs().max())
                          for a, b in zip(ref, v.params, strict=True))
                 for key, v in variants.items()}
    _synchronize(device)
    return {"max_abs_diff": diffs, "max_rel_diff": {k: d / change for k, d in diffs.items()},
            "backend": variants["fsgd_stats"].optimizer.backend}


def check_norm_act(device: str, shape: tuple[int, ...] = (8, 6, 7, 5), seed: int = 0) -> dict:
    """Fused ``bn_act_pool`` (training, affine, ReLU, 2×2 pool) against the plain-torch
    reference on ``device``: max relative differences of out, dx, dweight, dbias and the
    running statistics (relative to the reference's largest entry)."""
    import torch

    from scaleinv_kernels.ops.norm_act import bn_act_pool, bn_act_pool_reference

    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x0 = torch.randn(shape, generator=g).to(device)
    w0 = (torch.rand(c, generator=g) + 0.5).to(device)
    b0 = torch.randn(c, generator=g).to(device)
    gy = None
    results = {}
    for name, fn in (("fused", bn_act_pool), ("reference", bn_act_pool_reference)):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        out = fn(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5)
        if gy is None:
            gy = torch.randn(out.shape, generator=g).to(device)
        out.backward(gy)
        results[name] = dict(out=out, dx=x.grad, dw=w.grad, db=b.grad, rm=rm, rv=rv)
    diff = {}
    for k, ref in results["reference"].items():
        scale = float(ref.detach().abs().max()) or 1.0
        diff[k] = float((results["fused"][k].detach() - ref.detach()).abs().max()) / scale
    return diff


def check_gn_act(device: str, shape: tuple[int, ...] = (8, 6, 7, 5), groups: int = 3,
                 seed: int = 0) -> dict:
    """Fused ``gn_act_pool`` (affine, ReLU, 2×2 pool; Triton on CUDA) against
    ``F.group_norm`` → relu → max_pool2d in float64 on ``device``: max relative
    differences of out, dx, dweight and dbias."""
    import torch

    from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference

    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x0 = torch.randn(shape, generator=g).to(device)
    w0 = (torch.rand(c, generator=g) + 0.5).to(device)
    b0 = torch.randn(c, generator=g).to(device)
    gy = torch.randn(shape[0], c, shape[2] // 2, shape[3] // 2, generator=g).to(device)
    results = {}
    for name, fn, dtype in (("fused", gn_act_pool, torch.float32),
                            ("reference", gn_act_pool_reference, torch.float64)):
        x, w, b = (t.to(dtype).clone().requires_grad_() for t in (x0, w0, b0))
        out = fn(x, w, b, groups)
        out.backward(gy.to(dtype))
        results[name] = dict(out=out, dx=x.grad, dw=w.grad, db=b.grad)
    return {k: float((results["fused"][k].double() - ref).detach().abs().max())
            / (float(ref.detach().abs().max()) or 1.0)
            for k, ref in results["reference"].items()}


def check_direct_conv(device: str, seed: int = 0) -> dict:
    """``direct_conv2d`` (on CUDA: its registered reference kernel) against ``F.conv2d`` on
    ``device``, 3 members x 1 -> 4 channels, 3x3, padding 1: max relative differences of the
    output and the three gradients."""
    import torch
    import torch.nn.functional as F

    from scaleinv_kernels.ops.direct_conv import direct_conv2d

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 3, 9, 7, generator=g).to(device)
    w0 = torch.randn(12, 1, 3, 3, generator=g).to(device)
    b0 = torch.randn(12, generator=g).to(device)
    gy = torch.randn(5, 12, 9, 7, generator=g).to(device)
    results = {}
    for name, fn in (("direct", direct_conv2d),
                     ("conv2d", lambda x, w, b, groups, padding: F.conv2d(
                         x, w, b, 1, padding, 1, groups))):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = fn(x, w, b, 3, (1, 1))
        out.backward(gy)
        results[name] = dict(out=out, dx=x.grad, dw=w.grad, db=b.grad)
    return {k: float((results["direct"][k] - ref).detach().abs().max())
            / (float(ref.detach().abs().max()) or 1.0) for k, ref in results["conv2d"].items()}


def check_conv_norm_act(device: str, seed: int = 0) -> dict:
    """Fused ``conv_bn_act_pool`` (training, affine, ReLU; 3 members x 1 -> 4 channels,
    3x3, padding 1, odd 9x7 planes; on CUDA the op's torch-op implementation) against
    ``F.conv2d`` → ``bn_act_pool_reference`` in float64 on ``device``: max relative
    differences of out, the three gradients and the running statistics."""
    import torch

    from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool, conv_bn_act_pool_reference

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 3, 9, 7, generator=g).to(device)
    cw0 = torch.randn(12, 1, 3, 3, generator=g).to(device)
    w0 = (torch.rand(12, generator=g) + 0.5).to(device)
    b0 = torch.randn(12, generator=g).to(device)
    gy = torch.randn(5, 12, 4, 3, generator=g).to(device)
    results = {}
    for name, fn, dtype in (("fused", conv_bn_act_pool, torch.float32),
                            ("reference", conv_bn_act_pool_reference, torch.float64)):
        cw, w, b = (t.to(dtype).clone().requires_grad_() for t in (cw0, w0, b0))
        rm = torch.zeros(12, device=device, dtype=dtype)
        rv = torch.ones(12, device=device, dtype=dtype)
        out = fn(x0.to(dtype), cw, 3, (1, 1), w, b, rm, rv, training=True, momentum=0.1)
        out.backward(gy.to(dtype))
        results[name] = dict(out=out, dconv=cw.grad, dw=w.grad, db=b.grad, rm=rm, rv=rv)
    return {k: float((results["fused"][k].double() - ref).detach().abs().max())
            / (float(ref.detach().abs().max()) or 1.0)
            for k, ref in results["reference"].items()}


def section_variants(device: str, expect_triton: bool) -> dict:
    with functions_called() as called:
        res = check_variants(device)
    out = _judge(res["max_rel_diff"], VARIANT_TOL, called,
                 {"sgd_wd_triton"} if expect_triton else set())
    out.update(max_abs_diff=res["max_abs_diff"], backend=res["backend"])
    if expect_triton and res["backend"] != "triton":
        out["status"] = "failed"
        out["summary"] += f"; FusedSGDWD backend {res['backend']!r}, expected 'triton'"
    else:
        out["summary"] += f"; FusedSGDWD backend {res['backend']}"
    return out


def triton_kernel_expected(op: str, fn_name: str, device: str) -> set[str]:
    """``{fn_name}`` where the Triton kernel of ``op`` must run: always on CUDA; on CPU
    tensors where the CUDA code path routes ``op`` to its CUDA kernel."""
    if device == "cuda":
        return {fn_name}
    from scaleinv_kernels.ops import registry

    return {fn_name} if op in registry._CUDA_KERNELS else set()


def section_kernel(check: Callable[[str], dict], device: str, op: str | None = None,
                   fn_name: str = "") -> dict:
    expected = triton_kernel_expected(op, fn_name, device) if op else set()
    with functions_called() as called:
        diff = check(device)
    _synchronize(device)
    out = _judge(diff, KERNEL_TOL, called, expected)
    if op and not expected:
        out["summary"] += "; C++ kernel (the CUDA code path on CPU does not route this op)"
    return out


# ----------------------------------------------------------------------------------
# timings
# ----------------------------------------------------------------------------------


def copy_bandwidth(gib: float, device: str) -> dict:
    """``dst.copy_(src)`` over ``gib`` GiB on ``device``; bytes = read + write."""
    import torch

    n = int(gib * 2**30) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    q = bench_ms(lambda: dst.copy_(src), device, reps=200 if device == "cuda" else 3)
    moved = 2 * src.nbytes
    gbps = moved / (q[0] * 1e-3) / 1e9
    return {"status": "ok", "summary": f"{gbps:.0f} GB/s over {gib * 1024:g} MiB "
                                       "(read + write counted)",
            "bytes": moved, "ms": q, "gbps": gbps}


def bench_case(case, rounds: int, deadline: float, device: str = "cuda") -> dict:
    """Quantiles of every GPU variant on ``case`` (``bench_ms``), ``rounds`` round-robin
    rounds; per variant the median over rounds of each quantile."""
    from sgd_wd_cases import make_variants

    variants = make_variants(case, GPU_VARIANTS, device=device)
    per: dict[str, list[list[float]]] = {k: [] for k in variants}
    keys = list(variants)
    errors: dict[str, str] = {}
    reps = 100 if device == "cuda" else 1
    for r in range(rounds):
        if r and time.monotonic() > deadline:
            break
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if k in errors:
                continue
            try:
                per[k].append(bench_ms(variants[k], device, reps=reps))
            except Exception as err:  # keep timing the other variants; report this one
                errors[k] = f"{type(err).__name__}: {str(err)[:300]}"
                print(f"      {case.key}/{k} failed: {errors[k]}", flush=True)
    _synchronize(device)
    nan = float("nan")
    result = {k: ([statistics.median(q[i] for q in qs) for i in range(3)] if qs
                  else [nan, nan, nan]) for k, qs in per.items()}
    del variants
    _free(device)
    fsgd, fused = result["fsgd_stats"][0], result["sgd_fused_norms"][0]
    return {"status": "error" if errors else "ok",
            "summary": (f"FusedSGDWD+stats {fsgd * 1e3:.1f} us, "
                        f"{fused / fsgd:.2f}x torch fused+norms"
                        + (f"; errors: {', '.join(errors)}" if errors else "")),
            "case": case.title, "numel": case.numel, "n_tensors": case.n_tensors,
            "bytes_per_step": case.bytes_per_step,
            "rounds": max(len(qs) for qs in per.values()), "ms": result, "errors": errors}


def format_table(cases: list[dict], copy_gbps: float) -> str:
    from sgd_wd_cases import REF_FUSED, REF_NORMS, VARIANTS

    lines = []
    for c in cases:
        floor_ms = c["bytes_per_step"] / (copy_gbps * 1e9) * 1e3
        lines += [f"{c['case']}: {c['numel'] / 1e6:.2f} M params, {c['n_tensors']} tensors, "
                  f"copy floor {floor_ms * 1e3:.1f} us, {c['rounds']} rounds",
                  f"  {'variant':52s} {'median us':>10s} {'p20-p80 us':>15s} {'x norms':>8s} "
                  f"{'x fused':>8s} {'GB/s':>7s} {'/floor':>7s}"]
        ms = c["ms"]
        for k, (med, p20, p80) in ms.items():
            x_norms = ms[REF_NORMS][0] / med if REF_NORMS in ms else float("nan")
            x_fused = ms[REF_FUSED][0] / med if REF_FUSED in ms else float("nan")
            gbps = c["bytes_per_step"] / (med * 1e-3) / 1e9
            lines.append(f"  {VARIANTS[k]:52s} {med * 1e3:10.1f} "
                         f"{f'{p20 * 1e3:.1f}-{p80 * 1e3:.1f}':>15s} {x_norms:8.2f} "
                         f"{x_fused:8.2f} {gbps:7.0f} {med / floor_ms:7.2f}")
        lines.append("")
    return "\n".join(lines)


def _timed_pair(name: str, steps: dict[str, Callable[[], None]], n: int, device: str) -> dict:
    ms = {k: median_ms(step, n, device) for k, step in steps.items()}
    _free(device)
    return {"status": "ok", "ms": ms,
            "summary": f"{name}: fused {ms['fused']:.2f} ms, torch {ms['torch']:.2f} ms "
                       f"({ms['torch'] / ms['fused']:.2f}x)"}


def time_norm_act(shape: tuple[int, ...] = (64, 64 * 16, 28, 28), steps: int = 5,
                  device: str = "cuda") -> dict:
    """ms per forward+backward (median) of fused ``bn_act_pool`` and of torch's
    batch_norm → relu → max_pool2d on a 64-member activation."""
    import torch

    from scaleinv_kernels.ops.norm_act import bn_act_pool, bn_act_pool_reference

    x = torch.randn(shape, device=device, requires_grad=True)
    c = shape[1]
    gy = torch.randn(shape[0], c, shape[2] // 2, shape[3] // 2, device=device)
    fns = {}
    for name, fn in (("fused", bn_act_pool), ("torch", bn_act_pool_reference)):
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

        def step(fn=fn, rm=rm, rv=rv):
            fn(x, None, None, rm, rv, training=True).backward(gy)

        fns[name] = step
    return _timed_pair(f"bn_act_pool {list(shape)}", fns, steps, device)


def time_gn_act(shape: tuple[int, ...] = (64, 64 * 16, 28, 28), groups: int = 64 * 4,
                steps: int = 5, device: str = "cuda") -> dict:
    """ms per forward+backward (median) of fused ``gn_act_pool`` and of torch's
    group_norm → relu → max_pool2d on a 64-member activation (4 groups per member)."""
    import torch

    from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference

    x = torch.randn(shape, device=device, requires_grad=True)
    gy = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)
    fns = {}
    for name, fn in (("fused", gn_act_pool), ("torch", gn_act_pool_reference)):
        def step(fn=fn):
            fn(x, None, None, groups).backward(gy)

        fns[name] = step
    return _timed_pair(f"gn_act_pool {list(shape)}, {groups} groups", fns, steps, device)


def time_conv_norm_act(members: int = 64, batch: int = 64, hw: int = 28, steps: int = 5,
                       device: str = "cuda") -> dict:
    """ms per forward+backward (median) of ``conv_bn_act_pool`` and of ``F.conv2d`` →
    torch's batch_norm → relu → max_pool2d: the input layer of ``members`` grey CNNs
    (1 -> 16 channels each, 3x3), weight gradient only."""
    import torch
    import torch.nn.functional as F

    from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool
    from scaleinv_kernels.ops.norm_act import bn_act_pool_reference

    x = torch.randn(batch, members, hw, hw, device=device)
    cw = torch.randn(members * 16, 1, 3, 3, device=device, requires_grad=True)
    gy = torch.randn(batch, members * 16, hw // 2, hw // 2, device=device)

    def unfused(x, cw, groups, padding, weight, bias, rm, rv, *, training):
        y = F.conv2d(x, cw, None, 1, padding, 1, groups)
        return bn_act_pool_reference(y, weight, bias, rm, rv, training=training)

    fns = {}
    for name, fn in (("fused", conv_bn_act_pool), ("torch", unfused)):
        rm = torch.zeros(members * 16, device=device)
        rv = torch.ones(members * 16, device=device)

        def step(fn=fn, rm=rm, rv=rv):
            fn(x, cw, members, (1, 1), None, None, rm, rv, training=True).backward(gy)

        fns[name] = step
    return _timed_pair(f"conv_bn_act_pool {members} members, [{batch}, {members}, {hw}, {hw}]",
                       fns, steps, device)


def bench_ensemble(members: int, deadline: float, steps: int = 3,
                   device: str = "cuda") -> dict:
    """ms per training step of each ensemble variant (median of ``steps`` after one
    warm-up step); a variant that fails, or would start past ``deadline``, is recorded
    with its reason."""
    from ensemble_cases import BUILDERS

    ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    for key in ("ensemble", "vmap", "eager_loop"):
        if time.monotonic() > deadline:
            errors[key] = "skipped: budget spent"
            continue
        try:
            step = BUILDERS[key](members, device=device)
            ms[key] = median_ms(step, steps, device)
            del step
        except Exception as err:  # report and go on: the other variants still count
            errors[key] = f"{type(err).__name__}: {err}"[:300]
        _free(device)
    summary = ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
    if errors:
        summary += "; not timed: " + ", ".join(errors)
    failed = any(not e.startswith("skipped") for e in errors.values())
    return {"status": "error" if failed else "ok", "summary": summary, "members": members,
            "ms": ms, "errors": errors}


def format_ensemble(res: dict, members: int) -> str:
    lines = [f"ensemble step, M={members} normalized CNNs, batch 64 each (ms/step, "
             "speed-up of the ensemble):"]
    ens = res["ms"].get("ensemble")
    for key, ms in res["ms"].items():
        ratio = f"  ensemble is {ms / ens:.2f}x faster" if ens and key != "ensemble" else ""
        lines.append(f"  {key:12s} {ms:10.1f} ms  ({members / ms * 1e3:.0f} member-steps/s)"
                     f"{ratio}")
    for key, msg in res["errors"].items():
        lines.append(f"  {key:12s} error: {msg}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# the run: sections within a budget, the machine, the report
# ----------------------------------------------------------------------------------


@dataclass
class Suite:
    """Runs sections in order within ``budget`` seconds and keeps their results."""

    budget: float
    start: float
    sections: dict
    after: Callable[[], None] = lambda: None  # called after every section

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, fn: Callable[[], dict], cost: float, gate: bool,
            context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
            ) -> dict:
        """Run ``fn`` unless less than ``cost`` seconds are left; ``gate``: its failure
        makes the suite fail. An exception is recorded as the section's error."""
        print(f"[{name}] ", end="", flush=True)
        left = self.left()
        if left < cost or left <= 0:
            res = {"status": "skipped",
                   "summary": (f"budget of {self.budget:.0f} s spent" if left <= 0 else
                               f"{left:.0f} s of the budget left, it may need {cost:.0f} s"),
                   "seconds": 0.0}
        else:
            t0 = time.monotonic()
            try:
                with context():
                    res = fn()
            except Exception as err:  # record it and go on with the other sections
                res = {"status": "error", "summary": f"{type(err).__name__}: {err}"[:400],
                       "traceback": traceback.format_exc()[-3000:]}
            res["seconds"] = time.monotonic() - t0
        res["gate"] = gate
        self.sections[name] = res
        print(f"{res['status']}: {res['summary']}", flush=True)
        self.after()
        return res


def machine_info(device: str) -> dict:
    import numpy
    import torch
    import triton

    info = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "cpu_count": usable_cpus(),
            "python": sys.version.split()[0], "python_executable": sys.executable,
            "torch": torch.__version__, "triton": triton.__version__,
            "numpy": numpy.__version__, "cuda": torch.version.cuda, "device": device,
            "source_tree": str(ROOT)}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count)
    else:
        info.update(gpu=None, capability=None, gpu_memory_gib=None,
                    triton_interpret=os.environ.get("TRITON_INTERPRET"))
    return info


def package_info() -> dict:
    import scaleinv_kernels
    from scaleinv_kernels._extension import extension_loaded

    loaded = extension_loaded()
    ext = None
    if loaded:
        from scaleinv_kernels import _C

        ext = _C.__file__
    return {"scaleinv_kernels": scaleinv_kernels.__file__, "extension_loaded": loaded,
            "extension": ext}


def format_report(out: dict) -> str:
    m = out["machine"]
    where = (f"{m['gpu']} (sm_{m['capability'].replace('.', '')}, {m['gpu_memory_gib']} GiB)"
             if m.get("gpu") else "CPU, dry run (Triton interpreter)")
    lines = [f"## gpu_suite on {where}",
             "",
             f"{m['date_utc']}, python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), "
             f"triton {m['triton']}, numpy {m['numpy']}, {m['cpu_count']} CPUs; "
             f"{out['suite']['seconds']:.0f} s of a {out['suite']['budget_s']:.0f} s budget; "
             f"**{out['suite']['status']}** (exit {out['suite']['exit_code']})",
             "",
             "| section | status | s | result |",
             "|---|---|---:|---|"]
    for name, res in out["sections"].items():
        gate = "" if res["gate"] else " (timing)"
        summary = str(res["summary"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name}{gate} | {res['status']} | {res.get('seconds', 0):.1f} | "
                     f"{summary} |")
    details = []
    cases = [r for k, r in out["sections"].items() if k.startswith("sgd_") and "ms" in r]
    copy = out["sections"].get("copy", {})
    if cases and "gbps" in copy:
        details.append("FusedSGDWD vs torch SGD (fp32, lr 0.01, momentum 0.9, wd 5e-4; x = "
                       "speed-up vs torch fused+norms / fused; /floor = time / (20 B/param at "
                       "copy bandwidth)):\n" + format_table(cases, copy["gbps"]))
    ens = out["sections"].get("ensemble", {})
    if "ms" in ens:
        details.append(format_ensemble(ens, ens["members"]))
    for name, res in out["sections"].items():
        for line in res.get("failures", []):
            details.append(f"{name}: {line}")
    if details:
        lines += ["", "```", *details, "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu"),
                        help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors, tiny sizes, Triton interpreter: checks the script")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole command; sections past it are skipped "
                             "(default 450; 900 in the dry run, where the build of the "
                             "extension alone may take minutes on a few CPU cores)")
    parser.add_argument("--skip-tests", action="store_true", help="skip the pytest runs")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds per case")
    parser.add_argument("--copy-gib", type=float, default=1.0)
    parser.add_argument("--members", type=int, default=None,
                        help="ensemble size (default 500; 4 in the dry run)")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 900.0 if args.dry_run else 450.0
    if not args.dry_run and args.copy_gib < 1.0:
        parser.error("--copy-gib must be >= 1 (the copy ceiling must not fit in L2)")
    return args


def cuda_problem() -> str | None:
    """None when a CUDA device and Triton are usable, else why not."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a hard dependency
        return f"torch is not importable ({err})"
    if not torch.cuda.is_available():
        return (f"no CUDA device visible to torch {torch.__version__} "
                f"(torch.version.cuda={torch.version.cuda}); this suite needs a GPU "
                "(or --dry-run)")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not importable ({err})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    dry = args.dry_run
    if dry:
        # The interpreter must be on before triton is first imported (it decides then).
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_suite --dry-run: triton was imported before TRITON_INTERPRET=1 "
                  "could be set; run the script in a fresh python", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        problem = cuda_problem()
        if problem is not None:
            print(f"gpu_suite: {problem}. Nothing was run.", file=sys.stderr)
            return 2
    # The suite picks the backends itself: a forced one (SCALEINV_BACKEND=reference, or
    # =triton, which would send the whole dry run through the interpreter) is dropped.
    forced_backend = os.environ.pop("SCALEINV_BACKEND", None)
    device = "cpu" if dry else "cuda"
    members = args.members or (4 if dry else 500)
    _setup_path()
    cost = {k: 0.0 for k in GPU_COST} if dry else GPU_COST
    print(f"gpu_suite{' --dry-run' if dry else ''}: source tree {ROOT}, python "
          f"{sys.executable}, budget {args.budget:.0f} s", flush=True)
    out: dict = {"machine": machine_info(device), "dropped_env": (
        {"SCALEINV_BACKEND": forced_backend} if forced_backend else {})}

    def save(final: bool) -> int:
        """Write the results (after every section too: a run killed from outside still
        leaves what it had measured); the exit status."""
        failed = [k for k, r in suite.sections.items() if r["gate"] and r["status"] != "ok"]
        exit_code = 1 if failed else 0
        out["suite"] = {"mode": "dry-run" if dry else "gpu",
                        "status": ("failed" if failed else "ok") if final else "incomplete",
                        "failed_sections": failed, "exit_code": exit_code if final else None,
                        "seconds": time.monotonic() - start, "budget_s": args.budget,
                        "command": " ".join(["python3", *sys.argv])}
        out["sections"] = suite.sections
        out["tolerances"] = {"variants_rel": VARIANT_TOL, "kernels_rel": KERNEL_TOL}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_suite.json").write_text(json.dumps(out, indent=2, default=str))
        if final:
            report = format_report(out)
            (args.out / "gpu_suite.md").write_text(report)
            print()
            print(report)
            print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
        return exit_code

    suite = Suite(args.budget, start, {}, after=lambda: save(final=False))
    build = suite.run("build", lambda: ensure_extension(max(suite.left() - 150, 60)),
                      cost["build"], gate=True)
    if build["status"] == "ok":
        # no silent fallback to the reference kernels from here on, here and in pytest
        os.environ["SCALEINV_REQUIRE_EXT"] = "1"
    try:
        out["package"] = package_info()
    except Exception as err:  # a broken import shows up in every section too
        out["package"] = {"error": f"{type(err).__name__}: {err}"[:400]}
    pkg_file = out["package"].get("scaleinv_kernels") or ""
    outside = [f for f in (pkg_file, out["package"].get("extension"))
               if f and not Path(f).resolve().is_relative_to(ROOT)]
    if outside:  # another copy of the package would be the one checked below
        build.update(status="failed", summary=f"{build['summary']}; but the package was "
                                              f"imported from {outside}")
    m = out["machine"]
    print(f"      {m['gpu'] or 'CPU'}, torch {m['torch']} (CUDA {m['cuda']}), triton "
          f"{m['triton']}, package {pkg_file}", flush=True)

    path = (lambda: cuda_code_path(device))
    suite.run("check_variants", lambda: section_variants(device, expect_triton=True),
              cost["check"], gate=True, context=path)
    suite.run("check_bn_act_pool", lambda: section_kernel(
        check_norm_act, device, "scaleinv::bn_act_pool", "bn_act_pool_triton"),
        cost["check"], gate=True, context=path)
    suite.run("check_gn_act_pool", lambda: section_kernel(
        check_gn_act, device, "scaleinv::gn_act_pool", "gn_act_pool_triton"),
        cost["check"], gate=True, context=path)
    suite.run("check_direct_conv2d", lambda: section_kernel(check_direct_conv, device),
              cost["check"], gate=True, context=path)
    suite.run("check_conv_bn_act_pool", lambda: section_kernel(check_conv_norm_act, device),
              cost["check"], gate=True, context=path)

    if not args.skip_tests:
        # the compiled kernels on CUDA; the dry run only proves the selection collects
        env = subprocess_env(SCALEINV_BACKEND=None,
                             TRITON_INTERPRET="1" if dry else None,
                             SCALEINV_REQUIRE_EXT="1" if build["status"] == "ok" else None)
        for name, pytest_args in PYTEST_RUNS.items():
            reserve = 0 if dry else 150  # what the timings after the tests need
            suite.run(name, lambda a=pytest_args: run_pytest(
                a, min(240, max(suite.left() - reserve, 30)), collect_only=dry, env=env),
                cost["tests"], gate=True)

    deadline = start + args.budget - (0 if dry else 60)
    suite.run("copy", lambda: copy_bandwidth(args.copy_gib if not dry else 1 / 64, device),
              cost["copy"], gate=False)
    from sgd_wd_cases import CASES, tiny_case

    cases = {"sgd_tiny": tiny_case} if dry else {f"sgd_{k}": v for k, v in CASES.items()}
    for name, make_case in cases.items():
        suite.run(name, lambda mc=make_case: bench_case(
            mc(), 1 if dry else args.rounds, deadline, device),
            cost["sgd_case"], gate=False, context=path)
    # From here on the dry run takes the C++ CPU path: the interpreted Triton kernels
    # (checked above) need seconds per call even at these sizes, minutes for the M=4
    # ensemble step at batch 64 of 28x28 planes.
    steps = 1 if dry else 5
    suite.run("time_bn_act_pool", lambda: time_norm_act(
        (4, 8, 8, 8) if dry else (64, 64 * 16, 28, 28), steps, device),
        cost["time_op"], gate=False)
    suite.run("time_gn_act_pool", lambda: time_gn_act(
        (4, 8, 8, 8) if dry else (64, 64 * 16, 28, 28), 8 if dry else 64 * 4, steps, device),
        cost["time_op"], gate=False)
    suite.run("time_conv_bn_act_pool", lambda: time_conv_norm_act(
        *((2, 4, 8) if dry else (64, 64, 28)), steps, device),
        cost["time_op"], gate=False)
    suite.run("ensemble", lambda: bench_ensemble(
        members, start + args.budget - 40, 1 if dry else 3, device),
        cost["ensemble"], gate=False)

    return save(final=True)


if __name__ == "__main__":
    sys.exit(main())
