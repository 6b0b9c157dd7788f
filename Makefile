# `make test` sets everything up on a fresh machine (venv, torch CPU wheel, the package
# with its compiled extension) and runs the suite; it fails if the extension is not used.
# `make test-matrix` builds and tests the oldest and newest supported torch/triton in
# fresh venvs of their own (.matrix/, see .ci/leg.sh); `.ci/run` runs both.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.scaleinv-installed

.PHONY: install test test-matrix test-oldest test-newest gpu-check lint bench bench-report \
	demo demo-stats clean

# The matrix legs run the whole suite too (a few minutes each on 2 cores): every bitwise
# promise, the Triton kernels under that leg's interpreter, the ensemble and experiments.
LEG_TESTS := tests

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	# -U: a fresh venv's setuptools (65) cannot read pyproject's `license = "MIT"`
	$(PIP) install -U pip "setuptools>=77" wheel ninja
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	SCALEINV_REQUIRE_EXT=1 $(PY) -m pytest -q tests

test-matrix: test-oldest test-newest

# the GPU image's versions: torch 2.11.0 + triton 3.6.0 on Python 3.12 (triton 3.6's
# interpreter needs numpy < 2)
test-oldest:
	bash .ci/leg.sh oldest python3.12 "torch==2.11.0 triton==3.6.0 numpy<2" $(LEG_TESTS)

# the newest torch pip installs here, on the oldest supported Python, with torchvision
# (which cannot load beside the default leg's 2.13.0+cpu wheel): the real classifiers
test-newest:
	bash .ci/leg.sh newest python3.10 "torch==2.14.1 triton==3.8.0 torchvision==0.29.1" \
		$(LEG_TESTS)

# On a lent GPU machine, with its own python3 and nothing installed: builds the extension
# in place, runs the Triton tests on CUDA tensors, the correctness and timing sections
# and the M=500 ensemble step; writes out/gpu/gpu_suite.{json,md}.
gpu-check:
	python3 benchmarks/gpu_suite.py --out out/gpu

bench: $(STAMP)
	SCALEINV_REQUIRE_EXT=1 $(PY) -m pytest -q benchmarks --benchmark-only \
		--benchmark-json=.benchmarks/latest.json -p no:cacheprovider
	$(PY) benchmarks/report.py .benchmarks/latest.json
	$(PY) benchmarks/ensemble_report.py
	$(PY) benchmarks/ensemble_report.py --model resnet20 --members 16 \
		--json benchmarks/results/ensemble_report_resnet20.json
	$(MAKE) bench-report

# docs/benchmarks.md (and the README's benchmark table) from benchmarks/results/*.json,
# which the benchmark scripts write; never edited by hand
bench-report: $(STAMP)
	$(PY) benchmarks/bench_report.py --readme README.md

# Fig. 4 of the paper, quick preset: writes out/fig4-equilibrium/{figure.png,result.json}
demo: $(STAMP)
	SCALEINV_REQUIRE_EXT=1 $(PY) -m scaleinv_kernels.experiments fig4-equilibrium \
		--preset quick --out out

# the FusedSGDWD statistics demo: writes out/demo/{stats.png,result.json}
demo-stats: $(STAMP)
	SCALEINV_REQUIRE_EXT=1 $(PY) -m scaleinv_kernels.experiments.demo --out out/demo

clean:
	rm -rf build *.egg-info scaleinv_kernels/*.so .benchmarks out .matrix
