"""``python -m scaleinv_kernels.experiments <experiment> ...`` (same as ``scaleinv``)."""

import sys

from scaleinv_kernels.experiments.cli import main

sys.exit(main())
