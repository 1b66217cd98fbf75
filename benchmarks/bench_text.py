"""Processor load (cold/warm, per process), tokenization alone, and a whole sample:
Qwen2VLTransform vs transformers' Qwen2_5_VLProcessor on the same samples.

    python benchmarks/bench_text.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import fastload
from fastload.baseline import TransformersCollate

from common import MLLM_DEMO, PHOTOS, PROCESSOR, machine, median_ms, need_shared, table

LOAD_FASTLOAD = ("import fastload.tokenizer as t, sys; t.load_tokenizer(sys.argv[1]); "
                 "print(t.last_load['source'], t.last_load['seconds'])")
LOAD_TRANSFORMERS = ("import sys, time; from transformers import AutoTokenizer; s = time.perf_counter(); "
                     "AutoTokenizer.from_pretrained(sys.argv[1]); print('transformers', time.perf_counter() - s)")


def timed_process(code: str, env: dict) -> list:
    """[process wall seconds, seconds of the load call alone, where the tokenizer came from]."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(PROCESSOR)], env=env, capture_output=True, text=True,
                         check=True)
    source, seconds = out.stdout.split()
    return [time.perf_counter() - start, float(seconds), source]


def samples() -> list[dict]:
    records = json.loads((MLLM_DEMO / "mllm_demo.json").read_text())
    out = []
    for i, r in enumerate(records):
        s = {"__key__": f"demo{i}", "json": json.dumps({"messages": r["messages"]}).encode()}
        for j, p in enumerate(r["images"]):
            s[f"{j}.jpg"] = (MLLM_DEMO / p).read_bytes()
        out.append(s)
    for i, name in enumerate(["Origamis.jpg", "unireco_bird_example.jpg", "ocr_example2.jpg"]):
        msgs = [{"role": "user", "content": "<image>Describe this photo in detail."},
                {"role": "assistant", "content": "A detailed description. " * 20}]
        out.append({"__key__": f"photo{i}", "json": json.dumps({"messages": msgs}).encode(),
                    "jpg": (PHOTOS / name).read_bytes()})
    return out


def main() -> None:
    need_shared()
    torch.set_num_threads(1)
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FASTLOAD_CACHE": cache}
        rows = [["transformers AutoTokenizer.from_pretrained", *timed_process(LOAD_TRANSFORMERS, env)]]
        for label in ("fastload cold (first process ever)", "fastload warm (later process)", "fastload warm again"):
            rows.append([label, *timed_process(LOAD_FASTLOAD, env)])
    rows.append(["fastload forked worker (inherits the parent's)", 0.0, 0.0, "memory"])
    print("tokenizer load per process (process wall time includes importing torch/fastload or transformers)")
    print(table(["how", "process s", "load call s", "served from"], rows), "\n")

    data = samples()
    ours = fastload.Qwen2VLTransform(PROCESSOR, max_pixels=1003520).load()
    theirs = TransformersCollate(PROCESSOR, max_pixels=1003520)
    theirs([data[0]])  # builds the processor
    rows = []
    for s in data:
        tok_us = median_ms(lambda: ours.tokenize(s), repeat=20) * 1e3
        ours_ms = median_ms(lambda: ours(s), repeat=5)
        theirs_ms = median_ms(lambda: theirs([s]), repeat=3)
        rows.append([s["__key__"], ours.num_tokens(s), tok_us, ours_ms, theirs_ms, theirs_ms / ours_ms])
    print("per sample (max_pixels=1003520, single thread)")
    print(table(["sample", "tokens", "tokenize µs", "fastload ms", "transformers ms", "ratio"], rows))


if __name__ == "__main__":
    main()
