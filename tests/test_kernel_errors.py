"""C++ failures inside fastload._kernels surface as Python exceptions, never as an abort.

An exception escaping a C function ends the process (std::terminate: SIGABRT), which in a
DataLoader is a dead worker. Each case runs in a subprocess whose address space is capped
(RLIMIT_AS) just above what it already uses, so that the kernel's own allocations fail:
the subprocess must see MemoryError and carry on, not die of a signal.

Which inputs make the kernel allocate: the filter taps of an axis hold ``ksize`` weights
per output, ``ksize ~ 4 * in / out`` when shrinking, i.e. ~32 bytes (doubles, then the
fixed point) per *input* pixel of that axis whatever the output size; the AVX2 horizontal
pass adds a 24-byte column per input pixel. So a 1-pixel-tall strip a few million pixels
wide (~10 MB of input) shrunk to a few pixels makes the kernel ask for hundreds of MB.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap



# Common prologue: the pass variants, a strip whose resize needs ~0.5 GB inside the kernel,
# and a helper that runs a call under an address-space cap 64 MB above the current size,
# then lifts the cap.
PROLOGUE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import fastload
    from fastload import _kernels

    # Every pass variant: the portable loops and, where the CPU has AVX2, the AVX2 ones;
    # exact (Pillow's 32-bit weights) and fast (16/8-bit weights).
    modes = [(simd, exact) for simd in (False, True) if _kernels.simd(simd) == simd
             for exact in (True, False)]

    WIDTH = 3_000_000
    strip = np.random.default_rng(0).integers(0, 256, (1, WIDTH, 3), dtype=np.uint8)

    def vm_bytes():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    def capped(call):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (64 << 20), hard))
        try:
            call()
        except MemoryError as e:  # "... kernel": raised by the kernel's C++ (the message says so)
            return "MemoryError kernel" if "fastload._kernels" in str(e) else "MemoryError"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return "ok"
""")


def run_script(body: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", PROLOGUE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"subprocess ended with {proc.returncode} (a negative code is a signal: -6 is SIGABRT)\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}")
    return proc


def test_resize_out_of_memory_is_memory_error():
    proc = run_script("""
        for simd, exact in modes:
            _kernels.simd(simd)
            out = np.empty((1, 4, 3), np.uint8)
            print(simd, exact, capped(lambda: _kernels.resize(strip, out, 1, 4, exact)))
            # The process is intact: the same call succeeds without the cap, and so does a small one.
            _kernels.resize(strip, out, 1, 4, exact)
            small = np.full((8, 8, 3), 7, np.uint8)
            tiny = np.empty((4, 4, 3), np.uint8)
            _kernels.resize(small, tiny, 4, 4, exact)
            print(simd, exact, int(tiny.min()), int(tiny.max()))
    """)
    lines = proc.stdout.splitlines()
    assert len(lines) >= 4 and lines[0].startswith("False "), proc.stdout  # at least the portable modes
    for first, second in zip(lines[::2], lines[1::2]):
        assert first.endswith("MemoryError kernel") and second.endswith(" 7 7"), proc.stdout


def test_processor_out_of_memory_is_memory_error():
    """The fused kernel through the image processor (what a DataLoader worker runs)."""
    proc = run_script("""
        for simd, exact in modes:
            _kernels.simd(simd)
            processor = fastload.Qwen2VLImageProcessor(exact=exact)
            out = np.empty((4, processor.config.patch_dim), np.float32)  # a 28x28 target: 2x2 patches
            print(simd, exact, capped(lambda: processor.process_into(strip, (28, 28), out)))
            processor.process_into(strip, (28, 28), out)  # uncapped, it works
            pixels = processor(np.full((56, 56, 3), 128, np.uint8), return_tensors="np")["pixel_values"]
            print(simd, exact, bool(np.isfinite(out).all()), pixels.shape)
    """)
    lines = proc.stdout.splitlines()
    assert len(lines) >= 4 and lines[0].startswith("False "), proc.stdout
    for first, second in zip(lines[::2], lines[1::2]):
        assert first.endswith("MemoryError kernel") and second.endswith("True (16, 1176)"), proc.stdout


def test_empty_out_of_memory_is_memory_error():
    proc = run_script("""
        print(capped(lambda: _kernels.empty(1 << 30)))
        print(len(memoryview(_kernels.empty(1 << 20))))
    """)
    assert proc.stdout.split("\n")[:2] == ["MemoryError", str(1 << 20)], proc.stdout


def test_sizes_past_the_kernels_range_are_value_errors():
    """Sizes whose byte counts overflow (here wrapping around to exactly the buffer's size),
    or that the taps' int arithmetic cannot hold, are rejected before any work (these once
    passed the size check and wrote far past the buffer: run in a subprocess for that)."""
    proc = run_script("""
        img = np.zeros((4, 4, 3), np.uint8)
        dst = np.zeros(48, np.uint8)  # 4 * (4 + 2**62) * 3 == 48 modulo 2**64
        processor = fastload.Qwen2VLImageProcessor()
        cfg = processor.config
        calls = [lambda h=h, w=w: _kernels.resize(img, dst, h, w)
                 for h, w in [(4 + (1 << 62), 4), (4, 4 + (1 << 62)), (1, 1 << 32)]]
        # (28 * 2**58 / 14) * (28 / 14) patches of 1176 float32 values: 0 bytes modulo 2**64.
        calls.append(lambda: _kernels.process(img, np.zeros(0, np.float32), processor._lut, processor._norm,
                                              28 << 58, 28, cfg.patch_size, cfg.temporal_patch_size,
                                              cfg.merge_size))
        for call in calls:
            try:
                call()
                print("no error")
            except ValueError as e:
                print("ValueError", "too large" in str(e))
    """)
    assert proc.stdout.split("\n")[:4] == ["ValueError True"] * 4, proc.stdout
