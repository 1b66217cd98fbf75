"""The kernel's build variants (setup.py, csrc/module.cpp).

The AVX2 code lives in ``csrc/*_avx2.cpp``, compiled with its own flags for x86 only; every other
file is the portable build, which is what an aarch64 machine (GH200, say) gets. So: the portable
build must build, run and give the AVX2 build's results; its sources must hold no x86 code; and
the AVX2 objects must share no code with the portable ones through the linker (an AVX2 copy of a
shared inline function would run on CPUs without AVX2).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

import fastload
from fastload import _kernels

from .conftest import photo_like

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "csrc").glob("*.cpp"))
AVX2_SOURCES = [s for s in SOURCES if s.name.endswith("_avx2.cpp")]
PORTABLE_SOURCES = [s for s in SOURCES if s not in AVX2_SOURCES]
PYTHON_INCLUDE = sysconfig.get_paths()["include"]
X86 = sysconfig.get_platform().endswith(("x86_64", "amd64", "i686"))
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _start_build(out: Path, portable: bool) -> subprocess.Popen:
    env = {**os.environ, "FASTLOAD_PORTABLE": "1" if portable else "0"}
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "obj")]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """setup.py's two variants, built side by side into temporary folders."""
    root = tmp_path_factory.mktemp("kernel_builds")
    procs = {name: _start_build(root / name, name == "portable") for name in ("portable", "full")}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"the {name} build failed:\n{output[-5000:]}"
    return {name: root / name for name in procs}


def _load(build: Path):
    (path,) = (build / "lib" / "fastload").glob("_kernels*.so")
    loader = importlib.machinery.ExtensionFileLoader("fastload._kernels", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(loader.name, path, loader=loader))
    loader.exec_module(module)
    return module


def test_portable_build_runs_and_gives_the_avx2_builds_results(builds):
    portable = _load(builds["portable"])
    assert not portable.simd() and not portable.simd(True), "the portable build must have no AVX2 code to turn on"
    rng = np.random.default_rng(21)
    shapes = [(1, 1, 3, 5), (9, 7, 8, 6), (17, 33, 8, 40), (31, 37, 20, 37), (23, 19, 23, 41), (300, 200, 150, 600)]
    shapes += [tuple(int(v) for v in s) for s in rng.integers(1, 120, (30, 4))]
    before = _kernels.simd()
    try:
        _kernels.simd(False)  # the installed build's portable path: the same code, so the same bytes in both modes
        for h, w, th, tw in shapes:
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for exact in (True, False):
                ours, theirs = np.empty((th, tw, 3), np.uint8), np.empty((th, tw, 3), np.uint8)
                portable.resize(a, ours, th, tw, exact)
                _kernels.resize(a, theirs, th, tw, exact)
                assert np.array_equal(ours, theirs), (exact, h, w, th, tw)
            if PILLOW_13:  # Pillow 13's pass order is the kernel's: bit-identical
                portable.resize(a, ours, th, tw, True)
                pillow = np.asarray(Image.fromarray(a).resize((tw, th), Image.BICUBIC))
                assert np.array_equal(ours, pillow), (h, w, th, tw)
    finally:
        _kernels.simd(before)
    # The fused kernel, exact, against the installed build as it runs by default (AVX2 where the CPU has it):
    # exact results do not depend on the code path, so they must be equal.
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ({}, {"patch_size": 8, "merge_size": 3, "temporal_patch_size": 3}):
            proc = fastload.Qwen2VLImageProcessor(exact=True, dtype=dtype, min_pixels=64, max_pixels=200_000, **layout)
            cfg = proc.config
            for i, (h, w) in enumerate(((480, 640), (97, 331))):
                rgb = photo_like(h, w, seed=i)
                expected = proc(rgb)["pixel_values"]
                expected = expected.view(torch.int16) if dtype == torch.bfloat16 else expected
                th, tw = cfg.target_size(h, w)
                out = np.empty(tuple(expected.shape), proc._lut.dtype)  # bfloat16 travels as its uint16 bits
                portable.process(rgb, out, proc._lut, proc._norm, th, tw, cfg.patch_size, cfg.temporal_patch_size,
                                 cfg.merge_size, True)
                assert np.array_equal(out.view(np.uint8), expected.numpy().view(np.uint8)), (dtype, layout, h, w)


POISON = "#pragma GCC poison __m128 __m128i __m128d __m256 __m256i __m256d __builtin_cpu_supports __builtin_cpu_init\n"


def _compiler() -> str:
    return (sysconfig.get_config_var("CXX") or "c++").split()[0]


def test_portable_sources_hold_no_x86_code(tmp_path):
    """Every file but the *_avx2.cpp ones compiles with x86's vector types and CPU builtins
    poisoned (any intrinsics header names them); the AVX2 files do not, so the check bites."""
    poison = tmp_path / "poison.h"
    poison.write_text(POISON)

    def compile_(source: Path, *flags: str) -> subprocess.CompletedProcess:
        cmd = [_compiler(), "-fsyntax-only", "-std=c++17", "-include", str(poison), "-I", PYTHON_INCLUDE, *flags,
               str(source)]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)

    assert PORTABLE_SOURCES and AVX2_SOURCES
    for source in PORTABLE_SOURCES:
        result = compile_(source)
        assert result.returncode == 0, f"{source.name} uses x86 code outside the AVX2 files:\n{result.stderr[-3000:]}"
    for source in AVX2_SOURCES:
        assert "poisoned" in compile_(source, "-DFASTLOAD_AVX2").stderr, source.name
    assert "poisoned" in compile_(REPO / "csrc" / "cpu.cpp", "-DFASTLOAD_AVX2").stderr


def _aarch64_compiler(tmp_path: Path) -> list[str] | None:
    """A command compiling one C++ file for aarch64 Linux: Debian's cross compiler, or zig's
    clang (the `ziglang` wheel), whichever is installed."""
    if shutil.which("aarch64-linux-gnu-g++"):
        return ["aarch64-linux-gnu-g++", "-fsyntax-only"]
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-gnu", "-c", "-o",
                str(tmp_path / "out.o")]
    return None


def test_portable_sources_compile_for_aarch64(tmp_path):
    cmd = _aarch64_compiler(tmp_path)
    if cmd is None:
        pytest.skip("no aarch64 compiler here (apt-get install g++-aarch64-linux-gnu, or pip install ziglang); "
                    "test_portable_sources_hold_no_x86_code checks the same on this machine's compiler")

    def compile_(source: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, "-std=c++17", "-I", PYTHON_INCLUDE, *flags, str(source)],
                              check=False, capture_output=True, text=True, timeout=600)

    for source in PORTABLE_SOURCES:
        result = compile_(source)
        assert result.returncode == 0, f"{source.name} does not build for aarch64:\n{result.stderr[-3000:]}"
    # The compiler really targets another CPU: x86's CPU builtins are refused.
    assert compile_(REPO / "csrc" / "cpu.cpp", "-DFASTLOAD_AVX2").returncode != 0


@pytest.mark.skipif(not X86, reason="the AVX2 files are built only for x86")
def test_avx2_objects_share_no_code_with_the_portable_ones(builds):
    """Each *_avx2.o, compiled with -mavx2 -mfma, defines external (or weak) symbols only in
    namespace fastload::avx2: no standard-library or shared inline function, whose one kept
    copy the linker might take from the AVX2 object for the whole module."""
    objects = sorted((builds["full"] / "obj").rglob("*_avx2.o"))
    assert [o.stem for o in objects] == [s.stem for s in AVX2_SOURCES]
    for obj in objects:
        listing = subprocess.run(["nm", "--defined-only", "--extern-only", str(obj)], capture_output=True, text=True,
                                 check=True).stdout
        names = [line.split()[-1] for line in listing.splitlines() if line.strip()]
        assert names, obj.name
        stray = [n for n in names if not n.startswith("_ZN8fastload4avx2") and n != "DW.ref.__gxx_personality_v0"]
        assert not stray, (obj.name, stray)
