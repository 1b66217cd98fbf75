"""Loading the Qwen2 tokenizer once per process, and faster on every later run.

``import transformers`` alone costs ~2 s, more than building the tokenizer. So the first
load goes through transformers and saves the resulting Rust tokenizer to a cache keyed by
a hash of the source files and library versions; later processes load that file with
the light ``tokenizers`` package and never import transformers. Within a process the
tokenizer is memoised, so forked DataLoader workers inherit a parent's copy for free.

A processor is named as ``from_pretrained`` names it: a local folder, or a hub id
(``Qwen/Qwen2.5-VL-7B-Instruct``) found in the local Hugging Face cache. Nothing is downloaded:
training machines are often offline, and a silent download inside a DataLoader worker is
worse than a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata

import tokenizers

_SOURCE_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json")
_LOADED: dict[str, tokenizers.Tokenizer] = {}

#: How the last load in this process was served ("memory", "cache" or "transformers") and its seconds.
last_load: dict = {}


def hf_hub_cache() -> str:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub
    resolves it: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(home, "hub")


def _cached_snapshot(repo_id: str, revision: str, hub: str) -> str | None:
    """The snapshot folder of ``repo_id`` at ``revision`` (a branch/tag under ``refs/`` or a
    commit hash) in the hub cache layout ``models--ORG--NAME/snapshots/COMMIT``."""
    repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(repo, "refs", revision)
    commit = revision
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    snapshot = os.path.join(repo, "snapshots", commit)
    return snapshot if os.path.isdir(snapshot) else None


def resolve_processor(name: str | os.PathLike, revision: str = "main") -> str:
    """A processor folder from a local path or a hub id in the local Hugging Face cache.

    A bare model name (``Qwen2.5-VL-7B-Instruct``) also matches a single cached
    ``models--*--Qwen2.5-VL-7B-Instruct``, since that is how people shorten the id. Raises
    FileNotFoundError naming both places looked in."""
    name = os.fspath(name)
    if os.path.isdir(name):
        return name
    hub = hf_hub_cache()
    candidates = [name] if "/" in name.strip("/") else []
    if not candidates and os.path.isdir(hub):
        candidates = sorted(d[len("models--"):].replace("--", "/") for d in os.listdir(hub)
                            if d.startswith("models--") and d.endswith("--" + name))
    found = [s for s in (_cached_snapshot(c, revision, hub) for c in candidates) if s]
    if len(found) == 1:
        return found[0]
    where = (f"not a local folder ({os.path.abspath(name)}) and not in the Hugging Face cache "
             f"({os.path.join(hub, 'models--' + name.replace('/', '--'))}, revision {revision!r})")
    if len(found) > 1:
        where = f"ambiguous: several cached models match ({', '.join(candidates)}); give the full hub id"
    raise FileNotFoundError(f"processor {name!r}: {where}. Pass a folder holding preprocessor_config.json "
                            f"and the tokenizer files, or download it first (huggingface-cli download ORG/NAME).")


def special_token_id(processor_dir: str | os.PathLike, name: str) -> int | None:
    """The id of ``tokenizer_config.json``'s ``name`` (``"pad_token"``, ``"eos_token"``), or None."""
    path = os.path.join(resolve_processor(processor_dir), "tokenizer_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        token = json.load(f).get(name)
    if isinstance(token, dict):
        token = token.get("content")
    return load_tokenizer(processor_dir).token_to_id(token) if token else None


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
    processor_dir = os.path.realpath(resolve_processor(processor_dir))
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
