"""Build script: the C++ CPU kernels in csrc/ become scaleinv_kernels._C.

Environment variables:

* ``SCALEINV_BUILD_EXT=0``: a pure-Python install (the ops then run their plain-torch
  references on CPU and say so once in the log).
* ``SCALEINV_DEBUG_INFO=1``: keep debug information in ``_C``. By default the extension is
  built with ``-g0``, because Python's own CFLAGS (``-DNDEBUG -g -fwrapv -O3``), which
  setuptools passes to every extension, add ``-g`` and with it DWARF data many times the
  size of the code itself (the machine code is the same either way).

Nothing here probes the hardware: the kernels carry their own AVX2/AVX-512 builds and
pick one at run time, so the wheel runs on any x86-64 machine.
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("SCALEINV_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="scaleinv_kernels._C",
            sources=sorted(os.path.join("csrc", f) for f in os.listdir("csrc")
                           if f.endswith(".cpp")),
            depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc")
                           if f.endswith(".h")),
            extra_compile_args=[
                "-O3",
                # no -std flag: torch's BuildExtension adds the standard its headers need
                # (C++17 in torch 2.11, C++20 in 2.13 and later; 2.14 headers need C++20)
                # ATen's vector kernels decide where torch fuses a*b+c; we must fuse in
                # exactly the same places and nowhere else (bitwise equality with SGD).
                "-ffp-contract=off",
                "-fno-math-errno",
                "-fopenmp",
                # after Python's CFLAGS on the command line, so it overrides their -g
                *([] if os.environ.get("SCALEINV_DEBUG_INFO") == "1" else ["-g0"]),
            ],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
