"""pytest-benchmark timings of each optimizer variant on each parameter set.

    pytest -q benchmarks --benchmark-only

These run one variant after another (pytest-benchmark's own calibration), so they are a
cross-check; the authoritative numbers come from the interleaved suite in
``benchmarks/report.py``. The variants and parameter sets live in ``sgd_wd_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from sgd_wd_cases import CASES, VARIANTS, Case, Variant


@pytest.fixture(scope="module", params=list(CASES))
def case_tensors(request) -> tuple[Case, list[torch.Tensor], list[torch.Tensor]]:
    case = CASES[request.param]()
    params, grads = case.tensors()
    return case, params, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sgd_wd_step(benchmark, case_tensors, variant: str) -> None:
    case, params, grads = case_tensors
    step = Variant(variant, params, grads)  # primed: buffers exist, steady state
    benchmark.group = case.title
    benchmark.extra_info.update(case=case.key, variant=variant, n_tensors=case.n_tensors,
                                numel=case.numel, bytes_per_step=case.bytes_per_step,
                                threads=torch.get_num_threads(), label=VARIANTS[variant])
    benchmark.pedantic(step, warmup_rounds=1, rounds=15, iterations=1)
    assert all(torch.isfinite(p).all() for p in step.params[:4])
