"""Experiments: runnable scripts that train, record statistics and write figures/JSON.

Run one with ``python -m scaleinv_kernels.experiments.<name> --help``.
"""
