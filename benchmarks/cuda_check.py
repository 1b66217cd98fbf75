"""The CUDA path, for a machine with a GPU: pinned prefetch and device prefetch give the same
batches as the CPU path, on the right device, and the uint8 wire format expands on the GPU to
the CPU kernel's output bit for bit; a trainer that drops each batch while its kernels are
still queued reads every batch intact, over persistent epochs and an early break. Prints
timings; exits non-zero on any mismatch.

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


# Epochs as a trainer runs them: full, broken off early, full again (persistent workers).
PLAN = (None, 3, None)


def checksums(device, trainer_stream=None):
    """Consumes batches as a trainer does: queues work on its (current) stream that reads the
    batch, drops the batch at once and never synchronizes until the end. The queued work is
    held back (``torch.cuda._sleep``) so the prefetch thread runs ahead: if a dropped batch's
    memory were handed to the next prefetched batch while that work still reads it (a missing
    ``record_stream``), the checksums would differ from the synchronous reference's."""
    loader = fastload.DataLoader(Patches(), batch_size=8, num_workers=2, persistent_workers=True,
                                 pin_memory=True, device=device, prefetch_factor=2)
    sums = []
    with torch.cuda.stream(trainer_stream or torch.cuda.current_stream()):
        for k in PLAN:
            for n, batch in enumerate(loader, 1):
                pixels, ids = batch["pixel_values"], batch["i"]
                if device is None:  # the reference: synchronous copies, nothing in flight
                    pixels, ids = pixels.cuda(), ids.cuda()
                    torch.cuda.synchronize()
                elif hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(20_000_000)  # the trainer's stream falls behind
                sums.append(torch.stack([pixels.sum(dtype=torch.float64), ids.sum().double()]))
                del batch, pixels, ids  # as a training step does: nothing keeps the batch
                if k is not None and n == k:
                    break
    torch.cuda.synchronize()
    return torch.stack(sums).cpu()


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
    del cpu, pinned, on_gpu

    reference = checksums(None)
    assert len(reference) == 8 + 3 + 8
    for label, stream in (("default stream", None), ("side stream", torch.cuda.Stream())):
        got = checksums("cuda", stream)
        assert torch.equal(got, reference), f"a dropped batch was overwritten while in use ({label})"
    print(f"trainer dropping batches: {len(reference)} batches over {len(PLAN)} persistent epochs intact")

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
