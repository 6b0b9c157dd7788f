#!/usr/bin/env bash
# One leg of the version matrix: a fresh venv with the given Python and pins, a copy of
# the committed tree (so its compiled extension never mixes with the default venv's),
# `pip install --no-build-isolation -e .`, an import check that the extension loaded,
# then pytest on the given selection.
#
#   .ci/leg.sh NAME PYTHON "PIP PINS" PYTEST-ARGS...
#   e.g. .ci/leg.sh oldest python3.12 "torch==2.11.0 triton==3.6.0 numpy<2" -m "not slow"
#
# Everything lives under .matrix/NAME (ignored by git); a second run reuses the venv when
# its pins are unchanged and rebuilds the copy.
#
# Disk: torch from PyPI is the CUDA build, so a leg's venv takes 5-6 GB (nvidia-* 3.2 GB,
# torch 1.2 GB, triton 0.9 GB); no CPU wheel index is reachable for these versions (the
# default leg's 2.13.0+cpu comes from the machine's local wheels). pip keeps no
# cache of those wheels here, and LEG_DROP_VENV=1 (set by .ci/run) removes .matrix/NAME when
# the leg ends, so a machine holds one leg's torch at a time.
set -euo pipefail
name=$1; python=$2; pins=$3; shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/.matrix/$name
venv=$dir/venv
src=$dir/src
export PIP_NO_CACHE_DIR=1
if [ "${LEG_DROP_VENV:-0}" = 1 ]; then
  trap 'rm -rf "$dir"' EXIT
fi
mkdir -p "$dir"
if ! "$python" -c "" 2>/dev/null; then  # e.g. a pyenv shim without that version selected
  ver=${python#python}
  python=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$ver"*/bin/python"$ver" 2>/dev/null \
    | sort -V | tail -1)
  [ -n "$python" ] || { echo "leg $name: no $2 on this machine" >&2; exit 1; }
fi
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$dir/pins" 2>/dev/null)" != "$pins" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # a fresh venv's setuptools (65) cannot read pyproject's `license = "MIT"`
  "$venv/bin/pip" install -q -U pip "setuptools>=77" wheel ninja
  # shellcheck disable=SC2086  # the pins are words
  "$venv/bin/pip" install -q $pins
  echo "$pins" > "$dir/pins"
fi
rm -rf "$src"
mkdir -p "$src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | \
  xargs -0 -I{} cp --parents {} "$src/" 2>/dev/null || true)
cd "$src"
# the pins win: pip must not replace the leg's torch/triton/numpy with other releases
"$venv/bin/pip" install -q --no-build-isolation -e ".[test]" $pins
"$venv/bin/python" - <<'EOF'
import torch
from scaleinv_kernels._extension import extension_loaded
import triton
import numpy
assert extension_loaded(), "the C++ extension did not load"
print(f"leg: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, "
      f"triton {triton.__version__}, numpy {numpy.__version__}, "
      f"ISA {torch.backends.cpu.get_cpu_capability()}, extension loaded")
EOF
SCALEINV_REQUIRE_EXT=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
