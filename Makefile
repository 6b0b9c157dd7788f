# `make test` sets everything up on a fresh machine (venv, torch CPU wheel, the package
# with its compiled extension) and runs the suite; it fails if the extension is not used.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.scaleinv-installed

.PHONY: install test lint bench demo demo-stats clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install setuptools wheel ninja
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	SCALEINV_REQUIRE_EXT=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	SCALEINV_REQUIRE_EXT=1 $(PY) -m pytest -q benchmarks --benchmark-only \
		--benchmark-json=.benchmarks/latest.json -p no:cacheprovider
	$(PY) benchmarks/report.py .benchmarks/latest.json
	$(PY) benchmarks/ensemble_report.py

# Fig. 4 of the paper, quick preset: writes out/fig4-equilibrium/{figure.png,result.json}
demo: $(STAMP)
	SCALEINV_REQUIRE_EXT=1 $(PY) -m scaleinv_kernels.experiments fig4-equilibrium \
		--preset quick --out out

# the FusedSGDWD statistics demo: writes out/demo/{stats.png,result.json}
demo-stats: $(STAMP)
	SCALEINV_REQUIRE_EXT=1 $(PY) -m scaleinv_kernels.experiments.demo --out out/demo

clean:
	rm -rf build *.egg-info scaleinv_kernels/*.so .benchmarks out
