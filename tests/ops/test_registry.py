"""ops.registry: the CUDA kernels' registration and the CUDA code path on CPU tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scaleinv_kernels.ops import registry

ROOT = Path(__file__).resolve().parents[2]


def test_every_op_has_a_registered_cuda_kernel():
    ops = {f"scaleinv::{name}" for name in (
        "sgd_wd_", "bn_act_pool", "bn_act_pool_backward", "gn_act_pool",
        "gn_act_pool_backward", "conv_bn_act_pool", "conv_bn_act_pool_backward",
        "direct_conv2d", "direct_conv2d_backward")}
    assert ops <= set(registry._CUDA_KERNELS)


NESTING = """
import torch
from scaleinv_kernels.ops.registry import cuda_code_path_active, cuda_code_path_on_cpu
from scaleinv_kernels.ops.sgd_wd import select_backend
CPU = torch.device("cpu")
x = torch.randn(4, 3, 6, 6)
assert select_backend(CPU) == "cpp" and not cuda_code_path_active()
with cuda_code_path_on_cpu():
    assert select_backend(CPU) == "triton"
    with cuda_code_path_on_cpu():  # a nested block registers nothing twice
        assert cuda_code_path_active()
    assert cuda_code_path_active()
    inside = torch.ops.scaleinv.bn_act_pool(x, None, None, None, None, 1e-5, True, 2)
assert not cuda_code_path_active() and select_backend(CPU) == "cpp"
# the C++ kernel is the CPU kernel again: the same values to rounding, from other code
outside = torch.ops.scaleinv.bn_act_pool(x, None, None, None, None, 1e-5, True, 2)
torch.testing.assert_close(inside[0], outside[0], rtol=1e-5, atol=1e-6)
assert torch.equal(inside[3], outside[3])
print("ok")
"""


def _run(script: str, **env_vars: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter (TRITON_INTERPRET must be set before triton is
    imported, so the CUDA code path on CPU is tested in a subprocess on every machine)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), **env_vars)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, cwd=ROOT)


def test_blocks_nest_and_restore_the_cpu_kernels():
    proc = _run(NESTING, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_process_wide_mode_needs_the_interpreter():
    proc = _run("import scaleinv_kernels.ops", SCALEINV_BACKEND="triton")
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr


def test_process_wide_mode_routes_cpu_tensors_to_the_cuda_kernels():
    script = """
import torch
from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.ops.registry import cuda_code_path_active
w = torch.nn.Parameter(torch.randn(5, 3))
opt = FusedSGDWD([w], lr=0.1, momentum=0.9, weight_decay=1e-2)
w.grad = torch.randn(5, 3)
opt.step()
assert cuda_code_path_active(), "mode not active"
assert opt.backend == "triton", opt.backend
print("ok")
"""
    proc = _run(script, SCALEINV_BACKEND="triton", TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
