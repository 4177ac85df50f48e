"""Declares the compiled core only; all other metadata lives in pyproject.toml.

Set ``SCFM_FAST_NO_EXT=1`` to install without the C++ core (the Numba path is used instead).
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _csrc(pattern: str) -> list[str]:
    """Files of csrc/ matching ``pattern``, relative to this file (as setuptools wants), sorted."""
    return sorted(p.relative_to(HERE).as_posix() for p in (HERE / "csrc").glob(pattern))


ext_modules = []
cmdclass = {}
if os.environ.get("SCFM_FAST_NO_EXT", "0") != "1":
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules = [
        Pybind11Extension(
            "scfm_fast._core",
            # every pure C++ file of the core plus the single binding file (sorted: reproducible builds)
            sources=_csrc("*.cpp"),
            include_dirs=["csrc"],
            depends=_csrc("*.hpp"),
            cxx_std=17,
            # -ffp-contract=off: no fused multiply-add, so floating results are bit-identical
            # to the NumPy and Numba paths (token ids must never depend on the compiler).
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
