"""Loading the Qwen2 tokenizer once per process, and faster on every later run.

``import transformers`` alone costs ~2 s, more than building the tokenizer. So the first
load goes through transformers and saves the resulting Rust tokenizer to a cache keyed by
a hash of the source files and library versions; later processes load that file with
the light ``tokenizers`` package and never import transformers. Within a process the
tokenizer is memoised, so forked DataLoader workers inherit a parent's copy for free.
"""
from __future__ import annotations

import hashlib
import os
import time
from importlib import metadata

import tokenizers

_SOURCE_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json")
_LOADED: dict[str, tokenizers.Tokenizer] = {}

#: How the last load in this process was served ("memory", "cache" or "transformers") and its seconds.
last_load: dict = {}


def cache_dir() -> str:
    root = os.environ.get("FASTLOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastload")
    return os.path.join(root, "tokenizers")


def cache_key(processor_dir: str) -> str:
    """Hash of the tokenizer's source files and the library versions that interpret them."""
    h = hashlib.sha256()
    for name in _SOURCE_FILES:
        path = os.path.join(processor_dir, name)
        if os.path.exists(path):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    for package in ("transformers", "tokenizers"):
        try:
            h.update(f"{package}=={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{package}==none".encode())
    return h.hexdigest()[:32]


def _build_with_transformers(processor_dir: str) -> tokenizers.Tokenizer:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(processor_dir).backend_tokenizer


def load_tokenizer(processor_dir: str | os.PathLike) -> tokenizers.Tokenizer:
    """The processor directory's tokenizer, from memory, the disk cache, or transformers."""
    processor_dir = os.path.realpath(processor_dir)
    start = time.perf_counter()
    if processor_dir in _LOADED:
        last_load.update(source="memory", seconds=time.perf_counter() - start)
        return _LOADED[processor_dir]
    path = os.path.join(cache_dir(), cache_key(processor_dir) + ".json")
    if os.path.exists(path):
        tok, source = tokenizers.Tokenizer.from_file(path), "cache"
    else:
        tok, source = _build_with_transformers(processor_dir), "transformers"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        tok.save(tmp)
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    _LOADED[processor_dir] = tok
    last_load.update(source=source, seconds=time.perf_counter() - start)
    return tok
