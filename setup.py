"""Builds fastload and its C++ kernel (plain CPython API: torch is not needed to build)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastload._kernels",
            sources=["csrc/kernels.cpp"],
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"],
            language="c++",
        )
    ],
)
