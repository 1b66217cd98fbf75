"""A shard sample -> the tensors Qwen2.5-VL trains on: chat template, labels, image tokens.

A conversation is rendered into blocks of text, each tokenized as one string, the way the
reference tokenizes it: transformers' chat template renders the whole conversation into one
string, so a turn's role header and its content share tokens (``user\\n`` + ``\\nHi`` is one
``\\n\\n`` token); LLaMA-Factory tokenizes each message's rendered slot on its own. How the
conversation becomes blocks, and how it is truncated, is the template's business:
:class:`TransformersTemplate` (the default) or :class:`fastload.llamafactory.LlamaFactoryTemplate`.

Token counts for images come from the image headers, so a sample's length is known
before any pixel is decoded; only the images whose tokens survive truncation are
decoded, and :meth:`Qwen2VLTransform.tokenized` keeps the tokens it counted so that the
transform does not tokenize a sample twice (token-budget batching counts, then transforms).
``__call__`` returns tensors; :meth:`Qwen2VLTransform.deferred` leaves the pixels as write
requests for the loader to compute straight into the batch's shared memory
(:mod:`fastload.deferred`).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .deferred import materialize
from .errors import Skip, check_policy
from .header import ParsedImage, as_bytes, parse_image
from .tokenizer import load_tokenizer, resolve_processor
from .video import VideoInfo, probe, sample_videos
from .video_processor import make_video_processor, video_inputs
from .vision import PreResize, Qwen2VLImageProcessor, VisionConfig

log = logging.getLogger("fastload.text")

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_SLOT = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER, VIDEO_PAD = "<video>", "<|video_pad|>"
VIDEO_SLOT = VISION_START + VIDEO_PAD + VISION_END
_IMAGE_KEY = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png|webp|gif|bmp|tif|tiff|mpo)$")

#: Special tokens only the chat template places: the turn delimiters, the vision markers and
#: pads of an image or video slot, and the end-of-text/pad token. Literal in a message, a role or
#: the system prompt, the tokenizer would turn them into the real tokens, forging turn
#: boundaries or image slots (an extra ``<|image_pad|>`` has no image to fill it), so such a
#: sample is a :class:`SampleError`. The other added tokens are text Qwen2.5-VL reads and
#: writes: grounding (``<|object_ref_start|>``, ``<|box_start|>``, ``<|quad_start|>``, ...),
#: ``<tool_call>``, the ``<|fim_*|>`` tokens; they pass through as the reference tokenizes them.
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", VISION_START, VISION_END,
                   "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
_RESERVED = re.compile("|".join(map(re.escape, RESERVED_TOKENS)))

#: Qwen2.5's tool prompt (its chat template's and LLaMA-Factory's ``qwen`` tool format alike),
#: appended to the system message when a sample has ``tools``.
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)
TOOL_CALL_WORDS = ("<tool_call>", "</tool_call>")
THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")


class SampleError(ValueError):
    """A sample that cannot become a training example (the message says why)."""


class DroppedSample(SampleError):
    """A sample the reference pipeline itself leaves out (LLaMA-Factory drops it, or would
    feed the model a broken one): always a counted skip, with ``cause`` as its reason,
    whatever the error policy, since the user asked for exactly that pipeline."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


@dataclass
class Turn:
    """One chat message and how many ``<image>`` placeholders its content holds."""

    role: str
    content: str
    images: int


@dataclass
class Conversation:
    """A sample's messages as stored, with its ``system`` and ``tools`` columns (None: absent)."""

    key: str | None
    turns: list[Turn]
    system: str | None = None
    tools: str | list | None = None


@dataclass
class Block:
    """A piece of the rendered conversation that is tokenized as one string: characters from
    ``target_from`` on are a training target (None: none are)."""

    text: str
    target_from: int | None = None


@dataclass
class Encoded:
    """A block's tokens, image pads expanded: ``ids[:prompt_len]`` is prompt, the rest target;
    ``image_runs`` is (start, count) of each image's pads, in order."""

    ids: list[int]
    prompt_len: int
    image_runs: list[tuple[int, int]] = field(default_factory=list)
    video_runs: list[tuple[int, int]] = field(default_factory=list)  # the same for each video's pads

    @property
    def has_target(self) -> bool:
        return self.prompt_len < len(self.ids)


class Tokenized(dict):
    """A raw sample (its keys unchanged) with the transform's tokenization attached: what
    :meth:`Qwen2VLTransform.tokenized` counted, so that transforming it does not tokenize again.
    ``images`` (headers parsed, :class:`~fastload.header.ParsedImage`) and ``videos`` (probed) are
    the media whose tokens survived truncation."""

    def __init__(self, sample: dict, ids: list[int], labels: list[int], images: list, videos: list):
        super().__init__(sample)
        self.ids, self.labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        self.images, self.videos = images, videos

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def sample_images(sample: dict) -> list[bytes]:
    """Image members of a shard sample in placeholder order (``jpg``, or ``0.jpg``, ``1.png``, ...)."""
    found = []
    for key, value in sample.items():
        m = _IMAGE_KEY.match(key)
        if m:
            found.append((int(m.group(1) or 0), value))
    return [v for _, v in sorted(found, key=lambda kv: kv[0])]


def sample_meta(sample: dict) -> dict:
    """The sample's ``.json`` record (``messages`` or ``conversations``, ``system``, ``tools``)."""
    if "json" not in sample:
        raise SampleError(f"sample {sample.get('__key__')!r} has no .json record")
    meta = json.loads(sample["json"]) if isinstance(sample["json"], (bytes, str)) else sample["json"]
    if not (meta.get("messages") or meta.get("conversations")):
        raise SampleError(f"sample {sample.get('__key__')!r} has no messages")
    return meta


def sample_messages(sample: dict) -> tuple[list[dict], str | None]:
    meta = sample_meta(sample)
    return meta.get("messages") or meta.get("conversations"), meta.get("system")


def tool_prompt(tools: str | list | None) -> str:
    """The tool definitions as Qwen2.5 puts them into the system message ("" without tools)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools else []
        except json.JSONDecodeError as exc:
            raise SampleError(f"tools are not valid JSON: {exc}") from exc
    if not tools:
        return ""
    wrapped = (t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools)
    return QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + json.dumps(t, ensure_ascii=False) for t in wrapped))


def _tool_calls(text: str) -> str:
    """``{"name", "arguments"}`` JSON (one call or a list) -> Qwen's ``<tool_call>`` blocks."""
    try:
        calls = json.loads(text)
        calls = calls if isinstance(calls, list) else [calls]
        calls = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SampleError(f"function_call content is not a JSON tool call: {text[:80]!r}") from exc
    dumped = (json.dumps({"name": name, "arguments": json.loads(args)}, ensure_ascii=False) for name, args in calls)
    return "\n".join(f"<tool_call>\n{d}\n</tool_call>" for d in dumped)


def tool_call_text(content: str) -> str:
    """A ``function_call`` message as the model writes it, exactly as LLaMA-Factory's qwen
    FunctionFormatter renders it: a ``<tool_call>…</tool_call>`` found in the content is parsed
    and re-rendered (the rest kept in front as thought), else the whole content (less a
    ``<think>`` block, kept in front) is the call's JSON."""
    match = re.search(rf"{re.escape(TOOL_CALL_WORDS[0])}(.*?){re.escape(TOOL_CALL_WORDS[1])}", content, re.DOTALL)
    if match:
        return content.replace(match.group(0), "") + _tool_calls(match.group(1))
    thought = re.search(rf"{re.escape(THOUGHT_WORDS[0])}(.*?){re.escape(THOUGHT_WORDS[1])}", content, re.DOTALL)
    if thought:
        return thought.group(0) + _tool_calls(content.replace(thought.group(0), ""))
    return _tool_calls(content)


def with_image_slots(content: str) -> str:
    """``<image>``/``<video>`` -> their one-pad slots (each pad expanded when tokenized)."""
    return content.replace(IMAGE_PLACEHOLDER, IMAGE_SLOT).replace(VIDEO_PLACEHOLDER, VIDEO_SLOT)


class TransformersTemplate:
    """Qwen2.5-VL's own chat template: the conversation rendered into one string, a system
    message first (the sample's ``system`` if present, even empty, else the default), every
    message rendered (a trailing user turn too, untrained), tool definitions in the system
    message, ``function_call`` as an assistant ``<tool_call>`` turn and ``observation`` as a
    user ``<tool_response>`` turn (Qwen2.5's tool format). Truncation keeps whole exchanges:
    the first ones, or with ``mask_history`` the last ones (the trained one among them)."""

    name = "transformers"

    def blocks(self, conv: Conversation, default_system: str) -> list[Block]:
        turns = list(conv.turns)
        if not turns or turns[0].role != "system":
            turns.insert(0, Turn("system", default_system if conv.system is None else conv.system, 0))
        tools = tool_prompt(conv.tools)
        if tools:
            turns[0] = Turn("system", turns[0].content + tools, turns[0].images)
        return [self._block(t.role, t.content) for t in turns]

    @staticmethod
    def _block(role: str, content: str) -> Block:
        if role == "function_call":
            role, content = "assistant", tool_call_text(content)
        elif role == "observation":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        header = f"<|im_start|>{role}\n"
        return Block(header + with_image_slots(content) + "<|im_end|>\n",
                     len(header) if role == "assistant" else None)

    def truncate(self, encoded: list[Encoded], cutoff_len: int, mask_history: bool, key) -> list[int]:
        """Kept length per block: the system block, then whole exchanges (turns up to an
        answer; a trailing unanswered turn is one more) that fit ``cutoff_len``."""
        units, start = [], 1
        for i, enc in enumerate(encoded[1:], 1):
            if enc.has_target or i == len(encoded) - 1:
                units.append(range(start, i + 1))
                start = i + 1
        sizes = [sum(len(encoded[i].ids) for i in unit) for unit in units]
        budget = cutoff_len - len(encoded[0].ids)
        order = list(reversed(range(len(units)))) if mask_history else list(range(len(units)))
        kept = []
        for u in order:
            if sizes[u] > budget:
                break
            budget -= sizes[u]
            kept.append(u)
        if units and not kept:
            which = "last" if mask_history else "first"
            raise SampleError(f"sample {key!r}: the {which} exchange alone is "
                              f"{len(encoded[0].ids) + sizes[order[0]]} tokens, over cutoff_len={cutoff_len}")
        lengths = [len(encoded[0].ids)] + [0] * (len(encoded) - 1)
        for u in kept:
            for i in units[u]:
                lengths[i] = len(encoded[i].ids)
        return lengths


def _template(template) -> object:
    if not isinstance(template, str):
        return template
    if template == "transformers":
        return TransformersTemplate()
    if template in ("llamafactory", "qwen2_vl"):
        from .llamafactory import LlamaFactoryTemplate

        return LlamaFactoryTemplate()
    raise ValueError(f"template must be 'transformers' or 'llamafactory', got {template!r}")


class Qwen2VLTransform:
    """Maps a raw shard sample to ``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values`` and ``image_grid_thw``, as transformers' Qwen2.5-VL chat template and
    processor do (``template="transformers"``); :meth:`from_llamafactory` reproduces
    LLaMA-Factory's ``qwen2_vl`` pipeline instead.

    ``processor_dir`` is a folder or a hub id in the local Hugging Face cache. The tokenizer is
    loaded when the transform is built, in the trainer's process, so forked DataLoader workers
    inherit it rather than each loading it on the first batch's critical path. Picklable: only
    the configuration travels (a spawned worker loads the tokenizer once, from the disk cache). ``dtype=torch.uint8``
    returns the compact wire format (``image_pixels``, the resized uint8 images) for
    :func:`fastload.expand_patches` to expand on the device.

    ``<video>`` placeholders take the sample's videos (``mp4``, ``0.mp4``, ``1.avi``, ...):
    ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` as transformers'
    ``Qwen2_5_VLProcessor`` gives them (see :mod:`fastload.video_processor`); ``video`` is a
    :class:`~fastload.video_processor.VideoConfig` or a dict overriding the processor folder's
    (``fps``, ``max_pixels``, ``min_frames``, ``max_frames``, ...). Videos always come as
    float (``dtype=torch.uint8`` applies to images).
    """

    def __init__(self, processor_dir, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 cutoff_len: int = 4096, train_on_prompt: bool = False, mask_history: bool = False,
                 default_system: str | None = None, dtype: torch.dtype = torch.float32,
                 on_error: str | None = None, exact: bool = False, template="transformers",
                 pre_resize: PreResize | None = None, video=None):
        self.processor_dir = resolve_processor(processor_dir)
        self.cutoff_len, self.train_on_prompt, self.mask_history = cutoff_len, train_on_prompt, mask_history
        self.default_system = DEFAULT_SYSTEM if default_system is None else default_system
        self.template = _template(template)
        self.dtype, self.on_error = dtype, check_policy(on_error)
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.vision_config = VisionConfig.from_pretrained(self.processor_dir, **overrides)
        self.image_processor = Qwen2VLImageProcessor(
            self.vision_config, exact=exact, dtype=torch.float32 if dtype == torch.uint8 else dtype,
            pre_resize=pre_resize)
        self.video_processor = make_video_processor(  # video: a VideoConfig, or overrides of the folder's
            self.processor_dir, video, exact=exact, dtype=torch.float32 if dtype == torch.uint8 else dtype)
        self.skipped = 0
        self._tok = None
        self.load()

    @classmethod
    def from_llamafactory(cls, config, **overrides) -> "Qwen2VLTransform":
        """The transform LLaMA-Factory's ``qwen2_vl`` pipeline amounts to, from its training
        YAML (a path) or its arguments (a dict); see :mod:`fastload.llamafactory`."""
        from .llamafactory import transform_kwargs

        return cls(**{**transform_kwargs(config), **overrides})

    # -- process-local state ---------------------------------------------------------------
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = None

    def load(self) -> "Qwen2VLTransform":
        """Loads the tokenizer if this process has not (after unpickling, it has not)."""
        if self._tok is None:
            self._tok = load_tokenizer(self.processor_dir)
            self._ids = {t: self._tok.token_to_id(t) for t in (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)}
            self._prefixes = {}
        return self

    def encode(self, text: str) -> list[int]:
        return self.load()._tok.encode(text, add_special_tokens=False).ids

    # -- text ------------------------------------------------------------------------------
    def conversation(self, sample: dict) -> Conversation:
        """The sample's messages, checked: role/content present, no literal special token,
        as many images as ``<image>`` placeholders."""
        meta, key = sample_meta(sample), sample.get("__key__")
        turns = []
        for m in meta.get("messages") or meta.get("conversations"):
            content = m.get("content")
            if not isinstance(content, str) or "role" not in m:
                raise SampleError(f"message without role/content in sample {key!r}")
            turns.append(Turn(m["role"], content, content.count(IMAGE_PLACEHOLDER)))
        conv = Conversation(key, turns, meta.get("system"), meta.get("tools"))
        tools = conv.tools if isinstance(conv.tools, str) else json.dumps(conv.tools or "")
        texts = [(t.role, t.role) for t in turns] + [(t.role, t.content) for t in turns]
        texts += [("system", conv.system or ""), ("tools", tools)]
        for role, text in texts:
            found = _RESERVED.search(text) if isinstance(text, str) else None
            if found:
                raise SampleError(f"sample {key!r}: a {role!r} message holds the special token "
                                  f"{found.group()!r}, which only the chat template may place")
        return conv

    def _parsed(self, sample: dict) -> tuple[Conversation, list[bytes]]:
        conv = self.conversation(sample)
        images = sample_images(sample)
        placeholders = sum(t.images for t in conv.turns)
        if placeholders != len(images):
            raise SampleError(f"sample {conv.key!r}: {placeholders} <image> placeholders "
                              f"but {len(images)} images")
        return conv, images

    def turns(self, sample: dict) -> tuple[list[Turn], list[bytes]]:
        """The sample's messages and its images, checked against each other."""
        conv, images = self._parsed(sample)
        return conv.turns, images

    def image_tokens(self, images: list[ParsedImage]) -> list[int]:
        """``<|image_pad|>`` count per image, from headers alone."""
        return [self.image_processor.num_tokens(image.header) for image in images]

    def _prompt_len(self, ids: list[int], prefix: str) -> int:
        """Tokens of ``ids`` that are wholly prompt: those shared with the prompt text alone
        (a token spanning the boundary, like ``\\n\\n`` after a role header, is a target)."""
        if prefix not in self._prefixes:
            self._prefixes[prefix] = self.encode(prefix)
        head = self._prefixes[prefix]
        n = 0
        while n < len(head) and n < len(ids) and ids[n] == head[n]:
            n += 1
        return n

    def _encode_block(self, block: Block, pad_counts, key, video_counts=None) -> Encoded:
        """A block's ids with each image's (and video's) pad run expanded to its token count."""
        raw = self.encode(block.text)
        prompt = len(raw) if block.target_from is None else self._prompt_len(raw, block.text[:block.target_from])
        ids, runs, video_runs, prompt_len = [], [], [], None
        for i, token in enumerate(raw):
            if i == prompt:
                prompt_len = len(ids)
            if token == self._ids[VIDEO_PAD]:
                count = next(video_counts, None) if video_counts is not None else None
                if count is None:
                    raise SampleError(f"sample {key!r}: more {VIDEO_PAD!r} tokens than videos")
                video_runs.append((len(ids), count))
                ids.extend([token] * count)
                continue
            if token != self._ids[IMAGE_PAD]:
                ids.append(token)
                continue
            count = next(pad_counts, None)  # never a bare StopIteration: it could end a loader's epoch
            if count is None:
                raise SampleError(f"sample {key!r}: more {IMAGE_PAD!r} tokens than images")
            runs.append((len(ids), count))
            ids.extend([token] * count)
        return Encoded(ids, len(ids) if prompt_len is None else prompt_len, runs, video_runs)

    def _labels(self, kept: list[tuple[Encoded, int]]) -> list[int]:
        """Targets are answer tokens; ``train_on_prompt`` adds every prompt token, and
        ``mask_history`` keeps only the last kept answer."""
        last = max((i for i, (enc, n) in enumerate(kept) if enc.has_target and n > enc.prompt_len), default=-1)
        labels = []
        for i, (enc, n) in enumerate(kept):
            cut = min(enc.prompt_len, n)
            labels += enc.ids[:cut] if self.train_on_prompt else [IGNORE_INDEX] * cut
            trained = not self.mask_history or i == last
            labels += enc.ids[cut:n] if trained else [IGNORE_INDEX] * (n - cut)
        return labels

    @staticmethod
    def _kept_images(kept: list[tuple[Encoded, int]], key, cutoff_len: int, what: str = "image") -> list[int]:
        """Indexes of the images (``what="video"``: videos) whose tokens survive truncation
        (``kept``: every block with its kept length, 0 for a dropped one). An image's pads are never
        cut: a cut through them is a :class:`DroppedSample` (the model would fail on it)."""
        out, index = [], 0
        for enc, n in kept:
            for start, count in getattr(enc, f"{what}_runs"):
                if start + count <= n:
                    out.append(index)
                elif start < n:
                    raise DroppedSample(f"cutoff_len cuts an {what}'s tokens" if what == "image"
                                        else f"cutoff_len cuts a {what}'s tokens",
                                        f"sample {key!r}: cutoff_len={cutoff_len} would cut {what} {index}'s "
                                        f"{count} tokens after {n - start}")
                index += 1
        return out

    def tokenize(self, sample: dict) -> tuple[list[int], list[int], list[bytes]]:
        """(input_ids, labels, images kept) for a sample, truncated as the template says."""
        tokens = self.tokenized(sample)
        return tokens.ids.tolist(), tokens.labels.tolist(), [image.data for image in tokens.images]

    def _videos(self, conv: Conversation, sample: dict) -> list[tuple[bytes, VideoInfo]]:
        """The sample's videos with their container metadata (probed, nothing decoded),
        as many as ``<video>`` placeholders."""
        videos = [as_bytes(v) for v in sample_videos(sample)]
        placeholders = sum(t.content.count(VIDEO_PLACEHOLDER) for t in conv.turns)
        if placeholders != len(videos):
            raise SampleError(f"sample {conv.key!r}: {placeholders} <video> placeholders but {len(videos)} videos")
        return [(data, probe(data)) for data in videos]

    def tokenized(self, sample: dict) -> Tokenized:
        """The sample with its tokens, labels and kept media attached (nothing decoded):
        ``num_tokens`` for planning batches, and what ``__call__`` finishes without tokenizing
        again when given it instead of the raw sample."""
        if isinstance(sample, Tokenized):
            return sample
        conv, images = self._parsed(sample)
        videos = self._videos(conv, sample)
        self.load()
        images = [parse_image(data, self.image_processor.max_image_pixels) for data in images]
        pad_counts = iter(self.image_tokens(images))
        video_counts = iter([self.video_processor.num_tokens(info) for _, info in videos])
        blocks = self.template.blocks(conv, self.default_system)
        encoded = [self._encode_block(b, pad_counts, conv.key, video_counts) for b in blocks]
        lengths = self.template.truncate(encoded, self.cutoff_len, self.mask_history, conv.key)
        kept = list(zip(encoded, lengths))
        ids = [tok for enc, n in kept for tok in enc.ids[:n]]
        keep_images = self._kept_images(kept, conv.key, self.cutoff_len)
        keep_videos = self._kept_images(kept, conv.key, self.cutoff_len, "video")
        return Tokenized(sample, ids, self._labels(kept), [images[i] for i in keep_images],
                         [videos[i] for i in keep_videos])

    def num_tokens(self, sample: dict) -> int:
        """Token length of the sample after truncation, without decoding a pixel."""
        return self.tokenized(sample).num_tokens

    # -- pixels ----------------------------------------------------------------------------
    def _pixels(self, images: list[ParsedImage]) -> dict:
        if not images:
            return {}
        proc = self.image_processor
        if self.dtype == torch.uint8:
            wires = [proc.resized(im) for im in images]
            return {"image_pixels": torch.from_numpy(np.concatenate([w.reshape(-1) for w, _ in wires])),
                    "image_grid_thw": torch.tensor([g for _, g in wires], dtype=torch.long)}
        pending = proc.prepare(images)
        return {"pixel_values": pending, "image_grid_thw": pending.grid_thw}

    def __call__(self, sample: dict) -> dict | Skip | None:
        """The model's inputs for ``sample`` (a raw sample, or its :meth:`tokenized` form)."""
        return self._transform(sample, defer=False)

    def deferred(self, sample: dict) -> dict | Skip | None:
        """Like ``__call__``, but ``pixel_values``/``pixel_values_videos`` are write requests
        (:class:`~fastload.vision.PendingPatches`): decoded, not yet patched, so a collator's
        ``collate_deferred`` and fastload's loader can have the kernel write them straight into
        the batch's shared memory. Call ``.tensor()`` on them, or :func:`fastload.deferred.materialize`."""
        return self._transform(sample, defer=True)

    def _transform(self, sample: dict, defer: bool) -> dict | Skip | None:
        try:
            tokens = self.tokenized(sample)
            pixels = {**self._pixels(tokens.images), **video_inputs(self.video_processor, tokens.videos)}
            if not defer:
                pixels = materialize(pixels)
        except DroppedSample as exc:
            self.skipped += 1
            log.info("skipping sample %r (%s): %s", sample.get("__key__"), exc.cause, exc)
            return Skip(exc.cause, sample.get("__url__"), str(exc))
        except Exception as exc:
            if self.on_error in (None, "raise"):
                raise  # None: the dataset's or loader's policy decides, and counts the cause
            self.skipped += 1
            if self.on_error == "warn":
                log.warning("skipping sample %r: %s", sample.get("__key__"), exc)
            return None
        input_ids = torch.from_numpy(tokens.ids)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "labels": torch.from_numpy(tokens.labels), **pixels}
