"""pytest-benchmark timings of one ensemble training step (M members), three ways.

    pytest -q benchmarks/test_ensemble_bench.py --benchmark-only

Sequential cross-check; the authoritative interleaved numbers come from
``benchmarks/ensemble_report.py``. Cases and variants live in ``ensemble_cases.py``.
"""

from __future__ import annotations

import pytest
from ensemble_cases import BUILDERS, VARIANTS


@pytest.mark.parametrize("members", [8, 64])
@pytest.mark.parametrize("variant", list(BUILDERS))
def test_ensemble_step(benchmark, variant: str, members: int) -> None:
    step = BUILDERS[variant](members)
    step()  # warm-up: buffers and momentum exist
    benchmark.group = f"ensemble step, M={members}"
    benchmark.extra_info.update(variant=variant, members=members, label=VARIANTS[variant])
    benchmark.pedantic(step, warmup_rounds=0, rounds=3 if members > 8 else 7, iterations=1)
