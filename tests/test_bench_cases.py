"""Quick checks of the benchmark helpers in benchmarks/ (case builders, variants, the
GPU suite's CPU-side pieces), so that `make bench` and the GPU suite cannot rot."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import benchmark_module as _bench_module


@pytest.fixture(scope="module")
def cases():
    return _bench_module("sgd_wd_cases")


def test_resnet18_cifar_shapes(cases) -> None:
    case = cases.resnet18_case()
    assert case.n_tensors == 62
    assert case.numel == 11_173_962  # the well-known 11.17 M of CIFAR ResNet-18
    names = [n for n, _ in case.shapes]
    assert len(set(names)) == 62
    assert sum(n.endswith(".weight") and len(s) == 4 for n, s in case.shapes) == 20  # convs
    assert sum("shortcut.0" in n for n in names) == 3
    assert dict(case.shapes)["linear.weight"] == (10, 512)
    assert case.bytes_per_step == 20 * case.numel


def test_many_tensors_shapes(cases) -> None:
    case = cases.many_tensors_case()
    sizes = [math.prod(s) for _, s in case.shapes]
    assert case.n_tensors == 2000
    assert all(1 <= n <= 4096 for n in sizes)
    assert all(len(s) == 1 for _, s in case.shapes)
    assert 1500 * 2000 < sum(sizes) < 2600 * 2000  # uniform on 1..4096: mean ~2048
    assert cases.many_tensors_case().shapes == case.shapes  # fixed seed


def test_tensors_are_separate_and_deterministic(cases) -> None:
    case = cases.tiny_case()
    params, grads = case.tensors()
    again, _ = case.tensors()
    assert [p.shape for p in params] == [torch.Size(s) for _, s in case.shapes]
    assert len({p.untyped_storage().data_ptr() for p in params + grads}) == 2 * len(params)
    assert all(torch.equal(a, b) for a, b in zip(params, again, strict=True))


def test_every_variant_matches_torch_sgd(cases) -> None:
    """Two steps (fresh then existing momentum buffers) on odd shapes: every variant
    leaves the same params as SGD(foreach=False), bitwise in fp32; FusedSGDWD also the
    same momentum buffers. (torch's own fused CPU SGD leaves 1-ulp differences in the
    buffers of the elements past its last full SIMD vector, so its buffers are not
    compared.)"""
    case = cases.tiny_case()
    params, grads = case.tensors()
    ref = [p.clone().requires_grad_(True) for p in params]
    for p, g in zip(ref, grads, strict=True):
        p.grad = g.clone()
    opt = torch.optim.SGD(ref, lr=cases.LR, momentum=cases.MOMENTUM,
                          weight_decay=cases.WEIGHT_DECAY, foreach=False)
    variants = cases.make_variants(case, prime=False)
    assert set(variants) == set(cases.VARIANTS)
    for _ in range(2):
        opt.step()
        for v in variants.values():
            v()
    for key, v in variants.items():
        for i, (a, b) in enumerate(zip(ref, v.params, strict=True)):
            assert torch.equal(a, b), f"{key}: param {i} differs from SGD(foreach=False)"
            if key in ("sgd_fused", "sgd_fused_norms"):
                continue
            buf = v.optimizer.state[v.params[i]]["momentum_buffer"]
            assert torch.equal(opt.state[a]["momentum_buffer"], buf), f"{key}: buffer {i}"
    assert variants["fsgd_stats"].optimizer.backend in ("cpp", "reference")
    norms = variants["sgd_fused_norms"].norms
    assert norms is not None and len(norms[0]) == len(norms[1]) == case.n_tensors


def test_interleaved_timer_and_tables(cases) -> None:
    order: list[str] = []
    entries = {k: (lambda k=k: order.append(k)) for k in ("x", "y", "z")}
    timings = cases.interleaved(entries, repeats=5, min_time=0.0, warmup=0)
    assert all(len(t.samples) == 5 and t.median >= 0 for t in timings.values())
    assert order[3:6] == ["x", "y", "z"] and order[6:9] == ["y", "z", "x"]  # rotation
    order.clear()
    cold = cases.interleaved(entries, repeats=5, min_time=0.0, warmup=0,
                             flush=lambda: order.append("flush"))
    assert all(len(t.samples) == 5 for t in cold.values())
    assert order[:4] == ["flush", "x", "flush", "y"]  # a flush before every timed call
    case = cases.tiny_case()
    fake = {k: cases.Timing(k, [1e-3 * (i + 1)] * 5, 1) for i, k in enumerate(cases.VARIANTS)}
    ceiling = cases.Timing("t", [1.0], 0)
    result = cases.SuiteResult("warm", [cases.CaseResult(case, fake)], ceiling, ceiling,
                               int(40e9))
    table = cases.format_case_table(result.cases[0], result.triad_gbps)
    assert table.count("\n| ") == len(cases.VARIANTS) + 1 and "triad floor" in table
    assert "triad floor" not in cases.format_case_table(result.cases[0], None)
    assert cases.check_targets(result) == []  # targets exist for the two real cases only
    target = cases.Target("t", 2.5, 2.0, True)
    assert "PASS" in cases.format_targets({"cold": [target], "warm": [target]})


def test_triad_counts_bytes(cases) -> None:
    triad = cases.Triad.__new__(cases.Triad)
    triad.a, triad.b, triad.c = torch.zeros(8), torch.ones(8), torch.full((8,), 2.0)
    triad()
    assert torch.equal(triad.a, torch.full((8,), 2.0))  # 1 + 0.5 * 2


def test_paired_ratio_divides_within_rounds(cases) -> None:
    """A slow spell that hits both entries of one round leaves that round's ratio alone."""
    slow = cases.Timing("slow", [2.0, 4.0, 20.0, 2.0, 2.0], 1)
    fast = cases.Timing("fast", [1.0, 2.0, 10.0, 1.0, 0.5], 1)
    med, lo, hi = cases.paired_ratio(slow, fast)
    assert (med, lo, hi) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="rounds"):
        cases.paired_ratio(slow, cases.Timing("short", [1.0], 1))
    with pytest.raises(ValueError, match="quartiles"):
        cases.paired_ratio(slow, cases.Timing("q", [], 1, quartiles=(1.0, 2.0, 3.0)))


def test_gpu_suite_without_cuda(capsys) -> None:
    gpu = _bench_module("gpu_suite")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the fail-fast path is not reachable")
    assert gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    check = gpu.check_variants(device="cpu")
    assert max(check["max_abs_diff"].values()) == 0.0
    table = gpu.format_table([{"case": "c", "numel": 10, "n_tensors": 2, "bytes_per_step": 200,
                               "rounds": 3,
                               "ms": {k: [1.0, 0.9, 1.1] for k in gpu.GPU_VARIANTS}}], 100.0)
    assert table.count("\n") >= len(gpu.GPU_VARIANTS) + 2


def test_gpu_suite_norm_act_check_runs_on_cpu() -> None:
    """The GPU suite's bn_act_pool comparison, run on the CPU kernel: tiny differences."""
    suite = _bench_module("gpu_suite")
    diff = suite.check_norm_act("cpu")
    assert set(diff) == {"out", "dx", "dw", "db", "rm", "rv"}
    assert all(d <= 1e-5 for d in diff.values()), diff


def test_gpu_suite_gn_act_check_runs_on_cpu() -> None:
    """The GPU suite's gn_act_pool comparison, run on the CPU kernel: tiny differences."""
    suite = _bench_module("gpu_suite")
    diff = suite.check_gn_act("cpu")
    assert set(diff) == {"out", "dx", "dw", "db"}
    assert all(d <= 1e-5 for d in diff.values()), diff


def test_gpu_suite_direct_conv_check_runs_on_cpu() -> None:
    """The GPU suite's direct_conv2d comparison, run on the C++ kernel: tiny differences."""
    suite = _bench_module("gpu_suite")
    diff = suite.check_direct_conv("cpu")
    assert set(diff) == {"out", "dx", "dw", "db"}
    assert all(d <= 1e-5 for d in diff.values()), diff


def test_gpu_suite_conv_norm_act_check_runs_on_cpu() -> None:
    """The GPU suite's conv_bn_act_pool comparison, run on the C++ kernel: float32 against
    the float64 reference, tiny differences."""
    suite = _bench_module("gpu_suite")
    diff = suite.check_conv_norm_act("cpu")
    assert set(diff) == {"out", "dconv", "dw", "db", "rm", "rv"}
    assert all(d <= 1e-5 for d in diff.values()), diff


def test_ensemble_cases_every_variant_steps_and_matches_the_loop() -> None:
    """Every variant of the ensemble benchmark runs a training step (M=2, one of them in
    chunks of 1 with direct_grads), and one ensemble step equals the eager loop's."""
    ens_cases = _bench_module("ensemble_cases")
    for build in ens_cases.BUILDERS.values():
        build(2)()  # builds and steps without error
        build(2, norm="group")()  # the GroupNorm CNN (ensemble_report.py --norm group)
    ens_cases.ensemble_step(2, chunk=1)()
    assert ens_cases.check_same_update(2) <= 1e-5
