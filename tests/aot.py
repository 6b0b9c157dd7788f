"""Ahead-of-time compilation of Triton kernels for NVIDIA GPUs, with no GPU present.

Imported by the small scripts the op tests run in a subprocess (outside the Triton
interpreter that the test process switches on): compile a kernel for sm_90/sm_80 and ask
``ptxas -v`` how many registers it uses and how many bytes it spills (a CompiledKernel
only knows those once loaded on a GPU).
"""

from __future__ import annotations

import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource


def compile_for(fn, signature: dict, constexprs: dict, arch: int, **options):
    """``triton.compile`` of ``fn`` for sm_<arch>; constexprs are added to the signature."""
    src = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constexprs}},
                    constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spilled bytes) that ``ptxas -v`` reports for ``ptx`` on sm_<arch>
    (sm_90a for arch 90)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}{'a' if arch == 90 else ''}"
        info = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name,
                               "-o", "/dev/null"], capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill", info))
    return regs, spills
