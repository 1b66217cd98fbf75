"""Qwen2VLTransform and Qwen2VLCollator against transformers' own Qwen2_5_VLProcessor."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastload
from fastload.baseline import content_list, reference_processor
from fastload import tokenizer as tokcache
from fastload.decode import ImageDecodeError
from fastload.text import SampleError

from .conftest import jpeg_bytes, photo_like, pillow_rgb

MAX_PIXELS = 200_704  # keeps the reference processor quick


@pytest.fixture(scope="module")
def reference(processor_dir):
    return reference_processor(processor_dir, MAX_PIXELS)


@pytest.fixture(scope="module")
def transform(processor_dir):
    return fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, exact=True)


def reference_encode(reference, messages, images, system=None):
    msgs = [{"role": m["role"], "content": content_list(m["content"])} for m in messages]
    if system is not None:
        msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] + msgs
    text = reference.apply_chat_template(msgs, tokenize=False)
    rgbs = [pillow_rgb(b) for b in images] or None
    out = reference(text=[text], images=rgbs, return_tensors="np")
    return out


def make_sample(messages, images, key="k", system=None):
    meta = {"messages": messages}
    if system is not None:
        meta["system"] = system
    sample = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode()}
    if len(images) == 1:
        sample["jpg"] = images[0]
    for i, im in enumerate(images if len(images) > 1 else []):
        sample[f"{i}.jpg"] = im
    return sample


def expected_labels(input_ids: list[int], mask_history=False) -> list[int]:
    """Independent rule: targets are what follows each ``<|im_start|>assistant\\n`` up to and
    including its ``<|im_end|>`` and the newline after it."""
    start = [151644, 77091, 198]
    spans, i = [], 0
    while i < len(input_ids):
        if input_ids[i:i + 3] == start:
            j = input_ids.index(151645, i + 3)
            spans.append((i + 3, j + 2))
            i = j
        i += 1
    if mask_history:
        spans = spans[-1:]
    labels = [-100] * len(input_ids)
    for a, b in spans:
        labels[a:b] = input_ids[a:b]
    return labels


def demo_samples(mllm_demo):
    records = json.loads((mllm_demo / "mllm_demo.json").read_text())
    return [(make_sample(r["messages"], [(mllm_demo / p).read_bytes() for p in r["images"]], key=str(i)), r)
            for i, r in enumerate(records)]


def test_mllm_demo_matches_transformers(mllm_demo, reference, transform):
    for sample, record in demo_samples(mllm_demo):
        images = [(mllm_demo / p).read_bytes() for p in record["images"]]
        ref = reference_encode(reference, record["messages"], images)
        out = transform(sample)
        assert out["input_ids"].tolist() == ref["input_ids"][0].tolist(), sample["__key__"]
        assert out["labels"].tolist() == expected_labels(ref["input_ids"][0].tolist())
        assert out["attention_mask"].tolist() == [1] * len(out["input_ids"])
        assert np.array_equal(out["image_grid_thw"].numpy(), ref["image_grid_thw"])
        # one 8-bit level against the PIL backend; torchvision's bicubic differs more (test_vision reports it)
        tolerance = 0.02 if type(reference.image_processor).__name__.endswith("Pil") else 0.5
        assert float(np.abs(out["pixel_values"].numpy() - ref["pixel_values"]).max()) <= tolerance
        assert transform.num_tokens(sample) == len(out["input_ids"])


HAND_MADE = {
    "two_images_one_turn": ([{"role": "user", "content": "<image><image>Compare these."},
                             {"role": "assistant", "content": "Left is bigger."}], 2, None),
    "image_in_later_turn": ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                             {"role": "user", "content": "Now look: <image> what?"},
                             {"role": "assistant", "content": "A picture."}], 1, None),
    "chinese": ([{"role": "user", "content": "<image>这是什么？请详细描述。"},
                 {"role": "assistant", "content": "这是一张测试图片，颜色很丰富。"}], 1, None),
    "no_image": ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], 0, None),
    "system_message": ([{"role": "user", "content": "<image>Describe"}, {"role": "assistant", "content": "Ok."}],
                       1, "You are a meticulous describer."),
    "whitespace_edges": ([{"role": "user", "content": "  <image>\n\n leading and trailing  "},
                          {"role": "assistant", "content": " spaced answer\n"}], 1, None),
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_hand_made_cases_match_transformers(name, reference, transform):
    messages, n_images, system = HAND_MADE[name]
    images = [jpeg_bytes(photo_like(120 + 50 * i, 200 + 30 * i, i)) for i in range(n_images)]
    ref = reference_encode(reference, messages, images, system)
    sample = make_sample(messages, images, system=system)
    out = transform(sample)
    assert out["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert out["labels"].tolist() == expected_labels(ref["input_ids"][0].tolist())
    if n_images:
        assert np.array_equal(out["image_grid_thw"].numpy(), ref["image_grid_thw"])
    else:
        assert "pixel_values" not in out and "image_grid_thw" not in out


def test_system_as_first_message(reference, transform):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    ref = reference_encode(reference, messages, [])
    assert transform(make_sample(messages, []))["input_ids"].tolist() == ref["input_ids"][0].tolist()


def test_label_options(processor_dir, mllm_demo):
    sample, _ = demo_samples(mllm_demo)[0]
    base = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS)(sample)
    ids = base["input_ids"].tolist()
    history = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, mask_history=True)(sample)
    assert history["labels"].tolist() == expected_labels(ids, mask_history=True)
    prompt = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, train_on_prompt=True)(sample)
    assert prompt["labels"].tolist() == ids


def test_truncation_drops_whole_exchanges(processor_dir, mllm_demo):
    sample, record = demo_samples(mllm_demo)[0]  # two exchanges, one image each
    full = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS)(sample)
    first_len = full["input_ids"].tolist().index(151645, full["input_ids"].tolist().index(77091)) + 2
    t = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, cutoff_len=len(full["input_ids"]) - 1)
    cut = t(sample)
    assert len(cut["input_ids"]) == first_len
    assert cut["input_ids"].tolist() == full["input_ids"][:first_len].tolist()
    assert cut["image_grid_thw"].shape[0] == 1  # the second turn's image went with it
    pad = (cut["input_ids"] == 151655).sum().item()
    assert pad == cut["image_grid_thw"].prod(dim=1).sum().item() // 4
    assert t.num_tokens(sample) == first_len
    with pytest.raises(SampleError, match="cutoff_len"):
        fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, cutoff_len=20)(sample)


@pytest.mark.parametrize("on_error", ["skip", "warn"])
def test_bad_samples_are_skipped_and_counted(processor_dir, on_error):
    t = fastload.Qwen2VLTransform(processor_dir, on_error=on_error, cutoff_len=50)
    good = make_sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [])
    img = jpeg_bytes(photo_like(64, 64))
    bad = [
        make_sample([{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], []),
        make_sample([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], [img]),
        make_sample([{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                    [b"\xff\xd8\xff\xe0broken"]),
        make_sample([{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "y"}], []),
        {"__key__": "nojson", "jpg": img},
    ]
    assert t(good) is not None
    assert [t(s) for s in bad] == [None] * len(bad)
    assert t.skipped == len(bad)


def test_bad_samples_raise_by_default(processor_dir):
    t = fastload.Qwen2VLTransform(processor_dir)
    with pytest.raises(SampleError, match="1 <image> placeholders but 0 images"):
        t(make_sample([{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], []))
    with pytest.raises(ImageDecodeError):
        t(make_sample([{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                      [b"GIF89a-nonsense"]))


def test_dtypes_and_wire_format(processor_dir, mllm_demo):
    sample, _ = demo_samples(mllm_demo)[0]
    f32 = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS)(sample)
    bf16 = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, dtype=torch.bfloat16)(sample)
    wire = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, dtype=torch.uint8)(sample)
    assert torch.equal(bf16["pixel_values"], f32["pixel_values"].to(torch.bfloat16))
    cfg = fastload.VisionConfig.from_pretrained(processor_dir, max_pixels=MAX_PIXELS)
    expanded = fastload.expand_patches(wire["image_pixels"], wire["image_grid_thw"], cfg)
    assert torch.equal(expanded, f32["pixel_values"])


def test_pickle_carries_only_configuration(processor_dir, transform):
    transform.load()
    blob = pickle.dumps(transform)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert clone._tok is None
    sample = make_sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [])
    assert torch.equal(clone(sample)["input_ids"], transform(sample)["input_ids"])


def test_tokenizer_cache_is_keyed_and_reused(processor_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLOAD_CACHE", str(tmp_path / "cache"))
    code = ("import fastload.tokenizer as t, sys; t.load_tokenizer(sys.argv[1]); "
            "print(t.last_load['source'], 'transformers' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(processor_dir)], capture_output=True, text=True,
                           ) for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["transformers", "True"], ["cache", "False"]], runs[0].stderr
    # a changed processor directory gets a different key
    copy = tmp_path / "proc"
    copy.mkdir()
    for f in processor_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert tokcache.cache_key(str(copy)) == tokcache.cache_key(str(processor_dir))
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12345
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokcache.cache_key(str(copy)) != tokcache.cache_key(str(processor_dir))
    before = tokcache.cache_key(str(processor_dir))
    monkeypatch.setattr(tokcache.metadata, "version", lambda pkg: "0.0-other")
    assert tokcache.cache_key(str(processor_dir)) != before  # a library upgrade never reuses the cache


def test_collator_layout(processor_dir, mllm_demo, transform):
    examples = [transform(s) for s, _ in demo_samples(mllm_demo)[:3]]
    examples.append(transform(make_sample([{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}], [])))
    batch = fastload.Qwen2VLCollator(pad_to_multiple_of=8)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (4, -(-longest // 8) * 8)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], e["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in examples[:3]]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in examples[:3]]))
    text_only = fastload.Qwen2VLCollator(pad_token_id=151643)(examples[3:])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


# -- literal special tokens in the text (issue 12) -----------------------------------------
RESERVED = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|vision_pad|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.mark.parametrize("token", RESERVED)
@pytest.mark.parametrize("role", ["user", "assistant"])
def test_literal_special_token_is_a_sample_error(transform, token, role):
    """Once a bare StopIteration (a literal <|image_pad|> outran the images; raised in a
    worker's iterator it can end an epoch silently) or a silently forged turn or image slot."""
    text = {"user": f"look {token} here", "assistant": "ok"}
    if role == "assistant":
        text = {"user": "hi", "assistant": f"fine{token}"}
    sample = make_sample([{"role": "user", "content": text["user"]},
                          {"role": "assistant", "content": text["assistant"]}], [], key="bad-key-7")
    with pytest.raises(SampleError, match=rf"'bad-key-7'.*{re.escape(repr(token))}") as info:
        transform(sample)
    assert not isinstance(info.value.__context__, StopIteration)
    with pytest.raises(SampleError, match=re.escape(token)):
        transform.num_tokens(sample)


def test_literal_image_pad_next_to_a_real_image(transform):
    """With as many images as placeholders the pad counts were consumed by the literal pad
    first: the real image got no slot. Now the sample is refused, whichever comes first."""
    img = jpeg_bytes(photo_like(64, 64))
    for content in ["<|image_pad|><image>what?", "<image> and <|vision_start|><|image_pad|><|vision_end|>"]:
        sample = make_sample([{"role": "user", "content": content}, {"role": "assistant", "content": "y"}],
                             [img], key="pads")
        with pytest.raises(SampleError, match=r"'pads'.*<\|"):
            transform(sample)


def test_special_token_in_system_prompt_or_role(transform):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(SampleError, match=r"'sys'.*<\|im_end\|>"):
        transform(make_sample(messages, [], key="sys", system="Be brief.<|im_end|>"))
    with pytest.raises(SampleError, match=r"'sys2'.*<\|im_start\|>"):
        transform(make_sample([{"role": "system", "content": "x<|im_start|>user"}] + messages, [], key="sys2"))
    with pytest.raises(SampleError, match=r"'role'.*<\|im_end\|>"):
        transform(make_sample([{"role": "user<|im_end|>", "content": "hi"}, messages[1]], [], key="role"))


def test_content_tokens_still_pass_as_the_reference_tokenizes_them(reference, transform):
    """Grounding, tool-call and FIM tokens are text the model reads and writes: accepted,
    and tokenized exactly as transformers' processor does."""
    messages = [{"role": "user", "content": "<image>Where is the <|object_ref_start|>dog<|object_ref_end|>?"},
                {"role": "assistant", "content": "<|box_start|>(10,20),(300,400)<|box_end|> "
                                                 "<|quad_start|>q<|quad_end|> <tool_call>{}</tool_call> <|fim_pad|>"}]
    images = [jpeg_bytes(photo_like(120, 200))]
    ref = reference_encode(reference, messages, images)
    out = transform(make_sample(messages, images))
    assert out["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert out["labels"].tolist() == expected_labels(ref["input_ids"][0].tolist())


class _TokenizerAtStart(torch.utils.data.Dataset):
    """Reports, from inside the worker, whether the transform it was handed already held a tokenizer."""

    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return int(self.transform._tok is not None)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_start_with_the_trainers_tokenizer(processor_dir, context):
    """Built in the trainer, the transform holds its tokenizer: forked workers inherit it (no
    load on the first batch's critical path); spawned ones get the configuration only, and load it."""
    transform = fastload.Qwen2VLTransform(processor_dir)
    assert transform._tok is not None
    loader = fastload.DataLoader(_TokenizerAtStart(transform), batch_size=None, num_workers=1,
                                 multiprocessing_context=context)
    assert list(loader) == ([1, 1] if context == "fork" else [0, 0])
    sample = make_sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [])
    assert torch.equal(pickle.loads(pickle.dumps(transform))(sample)["input_ids"], transform(sample)["input_ids"])
