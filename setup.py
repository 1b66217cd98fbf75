"""Builds fastload and its C++ kernel (plain CPython API: torch is not needed to build).

The kernel is every ``csrc/*.cpp``. The files named ``*_avx2.cpp`` hold the AVX2 code: they are
compiled with their own target flags (AVX2_FLAGS) and only for x86, where FASTLOAD_AVX2 tells the
other files to call them when the CPU has AVX2 (csrc/cpu.cpp decides at run time). Elsewhere
(aarch64), or with FASTLOAD_PORTABLE=1 in the environment, the portable code alone is built.
"""
import os
import platform
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
AVX2_FLAGS = ["-mavx2", "-mfma"]


def with_avx2() -> bool:
    if os.environ.get("FASTLOAD_PORTABLE", "") not in ("", "0"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


class BuildExt(build_ext):
    """Builds the portable sources with the extension's flags and, for x86, each ``*_avx2.cpp``
    with AVX2_FLAGS added (and FASTLOAD_AVX2 defined for all)."""

    def build_extension(self, ext):
        avx2 = [s for s in ext.sources if s.endswith("_avx2.cpp")]
        ext.sources = [s for s in ext.sources if s not in avx2]
        if avx2 and with_avx2():
            ext.define_macros = [*ext.define_macros, ("FASTLOAD_AVX2", "1")]
            ext.depends = [*ext.depends, *avx2]  # a change there rebuilds the module
            if self.force or _stale(self.get_ext_fullpath(ext.name), [*ext.sources, *ext.depends]):
                ext.extra_objects = [*ext.extra_objects, *self.compiler.compile(
                    avx2, output_dir=self.build_temp, macros=ext.define_macros, include_dirs=ext.include_dirs,
                    debug=self.debug, extra_postargs=[*ext.extra_compile_args, *AVX2_FLAGS], depends=ext.depends)]
        super().build_extension(ext)  # skips an up-to-date module, as the check above does


def _stale(target: str, sources: list[str]) -> bool:
    return not os.path.exists(target) or any(os.path.getmtime(s) > os.path.getmtime(target) for s in sources)


setup(
    ext_modules=[
        Extension(
            "fastload._kernels",
            sources=sorted(glob("csrc/*.cpp")),
            depends=sorted(glob("csrc/*.h")),
            extra_compile_args=FLAGS,
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
