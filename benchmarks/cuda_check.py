"""The CUDA path, for a machine with a GPU: pinned prefetch and device prefetch give the same
batches as the CPU path, on the right device, and the uint8 wire format expands on the GPU to
the CPU kernel's output bit for bit. Prints timings; exits non-zero on any mismatch.

    python benchmarks/cuda_check.py
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

import fastload


class Patches(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(2000, 1176, generator=g), "i": i}


def batches(**kw):
    loader = fastload.DataLoader(Patches(), batch_size=8, num_workers=2, **kw)
    start = time.perf_counter()
    out = [(b["pixel_values"], b["i"]) for b in loader]
    return out, time.perf_counter() - start


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("cuda_check: no CUDA device here")
    cpu, t_cpu = batches()
    pinned, t_pin = batches(pin_memory=True)
    on_gpu, t_gpu = batches(device="cuda", prefetch_factor=4)
    assert all(p.is_pinned() for p, _ in pinned), "pin_memory=True did not pin"
    assert all(g.device.type == "cuda" for g, _ in on_gpu), "device='cuda' left batches on the CPU"
    for (c, ci), (p, pi), (g, gi) in zip(cpu, pinned, on_gpu):
        assert torch.equal(c, p) and torch.equal(ci, pi) and torch.equal(c, g.cpu()) and torch.equal(ci, gi.cpu())
    print(f"loader 64 x (2000, 1176) f32: cpu {t_cpu:.2f}s, pinned {t_pin:.2f}s, device prefetch {t_gpu:.2f}s")

    proc = fastload.Qwen2VLImageProcessor(exact=True, max_pixels=1003520)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((480, 640), (1080, 1920))]
    wires = [proc.resized(im) for im in images]
    flat = torch.cat([torch.from_numpy(w.reshape(-1)) for w, _ in wires]).cuda()
    grid = torch.tensor([g for _, g in wires])
    direct = proc(images)["pixel_values"]
    expanded = fastload.expand_patches(flat, grid, proc.config)
    torch.cuda.synchronize()
    assert expanded.device.type == "cuda" and torch.equal(expanded.cpu(), direct), "GPU expansion differs"
    start = time.perf_counter()
    for _ in range(20):
        fastload.expand_patches(flat, grid, proc.config, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    print(f"expand_patches on GPU: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms for {direct.shape[0]} patches")
    print("cuda_check: OK")


if __name__ == "__main__":
    main()
