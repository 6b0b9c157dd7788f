"""pytest configuration of the benchmarks: create the directory of --benchmark-json
(pytest-benchmark writes the file but does not create its parent)."""

from __future__ import annotations

from pathlib import Path


def pytest_configure(config) -> None:
    path = config.getoption("benchmark_json", default=None)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
