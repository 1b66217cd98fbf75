"""Dataset formats -> uniform records for sharding.

A record is ``{"id", "meta": {...json...}, "images": [path or bytes, ...]}``: ``meta`` is
what lands in the shard's ``.json`` (sharegpt ``messages`` in role/content form for chat
data), ``images`` the media in placeholder order (chat records also have ``videos``). Formats
follow LLaMA-Factory's ``dataset_info.json`` conventions (sharegpt with role/content tags, alpaca
columns).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"}


class RecordError(ValueError):
    """A record that cannot be converted; the message names the file and record."""


@dataclass
class Columns:
    """LLaMA-Factory's column mapping and sharegpt tags, with its defaults."""

    formatting: str = "sharegpt"
    messages: str = "messages"
    images: str | None = "images"
    system: str | None = "system"
    tools: str | None = "tools"
    videos: str | None = "videos"
    audios: str | None = "audios"
    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str = "history"
    role_tag: str = "role"
    content_tag: str = "content"
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dataset_info(cls, path: str, name: str) -> tuple["Columns", str]:
        """Columns and data file of entry ``name`` in a ``dataset_info.json``, read as
        LLaMA-Factory reads it: ``system``, ``tools``, ``images``, ``videos`` and ``audios``
        columns only when mapped, sharegpt tags defaulting to ``from``/``value``/``human``/``gpt``."""
        with open(path) as f:
            info = json.load(f)
        if name not in info:
            raise KeyError(f"{path}: no dataset named {name!r} (have: {', '.join(info)})")
        entry = info[name]
        if "file_name" not in entry:
            raise KeyError(f"{path}: dataset {name!r} is not a local file (hub datasets are not read)")
        values = {"formatting": entry.get("formatting", "alpaca"), **_UNMAPPED}
        if values["formatting"] == "sharegpt":
            values.update(_SHAREGPT_DEFAULTS)
        values.update(entry.get("columns", {}))
        values.update(entry.get("tags", {}))
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        data_file = os.path.join(os.path.dirname(path), entry["file_name"])
        return cls(**known), data_file


_UNMAPPED = {"system": None, "tools": None, "images": None, "videos": None, "audios": None, "history": None}
_SHAREGPT_DEFAULTS = {"messages": "conversations", "role_tag": "from", "content_tag": "value",
                      "user_tag": "human", "assistant_tag": "gpt"}


def _role(tag: str, cols: Columns) -> str:
    roles = {cols.user_tag: "user", cols.assistant_tag: "assistant", cols.system_tag: "system",
             cols.observation_tag: "observation", cols.function_tag: "function_call"}
    if tag not in roles:
        raise RecordError(f"unknown role {tag!r}")
    return roles[tag]


def sharegpt_messages(row: dict, cols: Columns) -> list[dict]:
    messages = row.get(cols.messages)
    if messages is None and "conversations" in row:
        messages, cols = row["conversations"], Columns(role_tag="from", content_tag="value",
                                                       user_tag="human", assistant_tag="gpt")
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"missing or empty {cols.messages!r} list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or cols.role_tag not in m or cols.content_tag not in m:
            raise RecordError(f"message without {cols.role_tag!r}/{cols.content_tag!r}: {m!r}")
        out.append({"role": _role(m[cols.role_tag], cols), "content": str(m[cols.content_tag])})
    return out


def alpaca_messages(row: dict, cols: Columns) -> list[dict]:
    if cols.prompt not in row or cols.response not in row:
        raise RecordError(f"alpaca record needs {cols.prompt!r} and {cols.response!r}")
    messages = []
    for old_prompt, old_response in row.get(cols.history) or []:
        messages += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_response}]
    prompt = row[cols.prompt]
    if row.get(cols.query):
        prompt = f"{prompt}\n{row[cols.query]}"
    response = row[cols.response]
    if isinstance(response, list):  # preference data: keep the first (chosen) answer
        response = response[0]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(response)}]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def chat_record(row: dict, cols: Columns, index: int) -> dict:
    """A sharegpt/alpaca row as a record with role/content messages."""
    if not isinstance(row, dict):
        raise RecordError(f"record is a {type(row).__name__}, not an object")
    fmt = cols.formatting
    if fmt == "auto":
        fmt = "sharegpt" if (cols.messages in row or "conversations" in row) else "alpaca"
    messages = sharegpt_messages(row, cols) if fmt == "sharegpt" else alpaca_messages(row, cols)
    if cols.audios and _as_list(row.get(cols.audios)):
        raise RecordError(f"has {cols.audios!r}: audio records are not supported yet")
    videos = _as_list(row.get(cols.videos)) if cols.videos else []
    if any(isinstance(v, (list, tuple)) for v in videos):
        raise RecordError("a video given as a list of frame images is not supported (give the video file)")
    meta = {"messages": messages}
    if cols.system and isinstance(row.get(cols.system), str):
        meta["system"] = row[cols.system]  # even "": templates tell an empty system from none
    if cols.tools and row.get(cols.tools):
        meta["tools"] = row[cols.tools]
    images = _as_list(row.get(cols.images, row.get("image"))) if cols.images else []
    meta["images"] = [im if isinstance(im, str) else f"<bytes:{i}>" for i, im in enumerate(images)]
    placeholders = sum(m["content"].count("<image>") for m in messages)
    if placeholders != len(images):
        raise RecordError(f"{placeholders} <image> placeholders but {len(images)} images")
    if videos:  # stored as their own members (fastload-shard: 0.mp4, 1.avi, ...)
        meta["videos"] = [v if isinstance(v, str) else f"<bytes:{i}>" for i, v in enumerate(videos)]
    video_placeholders = sum(m["content"].count("<video>") for m in messages)
    if video_placeholders != len(videos):
        raise RecordError(f"{video_placeholders} <video> placeholders but {len(videos)} videos")
    return {"id": index, "meta": meta, "images": images, "videos": videos}


def read_json_rows(path: str) -> Iterator[tuple[int, dict | RecordError]]:
    """Rows of a JSON array or JSONL file; a malformed line yields a RecordError in its place."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}: malformed JSON ({exc})") from exc
            yield from enumerate(rows)
            return
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                yield i, RecordError(f"malformed JSON line ({exc.msg})")


def chat_records(path: str, cols: Columns) -> Iterator[dict | RecordError]:
    for i, row in read_json_rows(path):
        if isinstance(row, RecordError):
            yield _located(row, path, i)
            continue
        try:
            yield chat_record(row, cols, i)
        except RecordError as exc:
            yield _located(exc, path, i)


def _located(exc: Exception, path: str, index: int) -> RecordError:
    return RecordError(f"{path} record {index}: {exc}")


def folder_records(root: str) -> Iterator[dict]:
    """Images under class subfolders: ``root/CLASS/x.jpg`` -> label ``CLASS``."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    index = 0
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for fname in sorted(files):
                if os.path.splitext(fname)[1].lower() in IMAGE_SUFFIXES:
                    rel = os.path.relpath(os.path.join(dirpath, fname), root)
                    yield {"id": index, "meta": {"label": name, "class_index": label, "path": rel},
                           "images": [rel]}
                    index += 1


def _image_bytes(value) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return bytes(value["bytes"])
    return None


def parquet_records(path: str, cols: Columns) -> Iterator[dict | RecordError]:
    """Rows of a Parquet file; columns holding bytes (or HF ``{"bytes": ...}``) are images."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Parquet input needs pyarrow (pip install 'fastload[parquet]')") from exc
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            images, meta = [], {}
            for key, value in row.items():
                values = value if isinstance(value, list) else [value]
                blobs = [_image_bytes(v) for v in values]
                if values and all(b is not None for b in blobs):
                    images += blobs
                else:
                    meta[key] = value
            if cols.messages in meta or "conversations" in meta or cols.prompt in meta:
                try:
                    record = chat_record({**meta, cols.images: images}, cols, index)
                except RecordError as exc:
                    yield _located(exc, path, index)
                    index += 1
                    continue
            else:
                record = {"id": index, "meta": meta, "images": images}
            yield record
            index += 1


def open_source(path: str, cols: Columns | None = None) -> Iterator[dict | RecordError]:
    """Records of any supported input, chosen by what ``path`` is."""
    cols = cols or Columns(formatting="auto")
    if os.path.isdir(path):
        return folder_records(path)
    if path.endswith(".parquet"):
        return parquet_records(path, cols)
    return chat_records(path, cols)


def dataset_names(value: str | list[str]) -> list[str]:
    """``"a,b,c"`` (LLaMA-Factory's ``dataset`` argument) -> ``["a", "b", "c"]``."""
    names = value if isinstance(value, list) else value.split(",")
    return [n.strip() for n in names if n.strip()]


def dataset_records(info_path: str, names: list[str], fmt: str | None = None) -> Iterator[dict | RecordError]:
    """The records of several ``dataset_info.json`` entries one after another, as LLaMA-Factory
    concatenates them, numbered on across datasets so that shard keys stay unique; each record
    names its ``source`` file."""
    offset = 0
    for name in names:
        cols, data_file = Columns.from_dataset_info(info_path, name)
        if fmt:
            cols.formatting = fmt
        if not os.path.exists(data_file):
            raise RecordError(f"dataset {name!r}: {data_file} does not exist")
        count = top = 0
        for record in open_source(data_file, cols):
            count += 1
            if isinstance(record, RecordError):
                yield RecordError(f"dataset {name!r}: {record}")
                continue
            top = max(top, record["id"] + 1)
            yield {**record, "id": offset + record["id"], "source": data_file}
        offset += max(count, top)
