"""Packing and M-RoPE positions checked against the model, not against ourselves: a tiny random
Qwen2_5_VLForConditionalGeneration (transformers' own code) must give every packed sample the
logits it gives that sample alone, and transformers' get_rope_index must agree with the
positions computed in the worker, element for element."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import fastload
from fastload.mrope import IMAGE_TOKEN_ID, rope_index
from fastload.writer import ShardWriter

from .conftest import jpeg_bytes, photo_like

# get_rope_index(input_ids, mm_token_type_ids, ...) and the packed mask from 4-row positions are 5.x's
transformers = pytest.importorskip("transformers", minversion="5.0")

VISION_START, VISION_END, IM_START = 151652, 151653, 151644  # Qwen2.5-VL's special-token ids
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def model():
    """Qwen2.5-VL's architecture at toy size, random weights: nothing is downloaded."""
    config = transformers.Qwen2_5_VLConfig(
        text_config={"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2,
                         "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                           "fullatt_block_indexes": [1]},
        image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def make_example(rng: random.Random, n_images: int) -> dict:
    """A transformed sample as Qwen2VLTransform returns it: text, image runs, random patches."""
    ids, pixels, grids = [IM_START] + [rng.randrange(1000) for _ in range(rng.randrange(3, 30))], [], []
    for _ in range(n_images):
        h, w = rng.choice([2, 4, 6, 8]), rng.choice([2, 4, 6])
        ids += [VISION_START] + [IMAGE_TOKEN_ID] * (h * w // 4) + [VISION_END]
        ids += [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
        pixels.append(torch.randn(h * w, PATCH_DIM, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))))
        grids.append((1, h, w))
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    labels[: rng.randrange(1, 6)] = -100
    example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if grids:
        example.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    return example


def examples_for(seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, rng.randrange(4)) for _ in range(rng.randrange(2, 7))]


def image_kwargs(example: dict) -> dict:
    if "image_grid_thw" not in example:
        return {}
    return {"pixel_values": example["pixel_values"], "image_grid_thw": example["image_grid_thw"],
            "mm_token_type_ids": (example["input_ids"] == IMAGE_TOKEN_ID).int()[None]}


@torch.no_grad()
def alone(model, example: dict):
    """The model on one sample, computing its own positions; the loss summed over targets."""
    return model(input_ids=example["input_ids"][None], labels=example["labels"][None], num_items_in_batch=1,
                 **image_kwargs(example))


@torch.no_grad()
def packed(model, batch: dict, **kwargs):
    # The whole batch goes in as the collator made it (seq_lens and cu_seq_lens included).
    return model(**batch, num_items_in_batch=1, **{"use_cache": False, **kwargs})


def sample_spans(batch: dict) -> list[tuple[int, int]]:
    """``[a, b)`` of each packed sample in the flattened rows: the cu_seq_lens segments that are
    not a row's padding tail (every sample here starts with <|im_start|>, padding with id 0)."""
    flat, cu = batch["input_ids"].reshape(-1), batch["cu_seq_lens"].tolist()
    spans = [(a, b) for a, b in itertools.pairwise(cu) if flat[a] != 0]
    assert [b - a for a, b in spans] == batch["seq_lens"].tolist()
    return spans


def placed(examples: list[dict], batch: dict) -> list[tuple[int, int, int]]:
    """``(example index, a, b)`` for each packed sample, in row order: which example sits where."""
    flat = batch["input_ids"].reshape(-1)
    spans = sample_spans(batch)
    assert len(spans) == len(examples)
    return [(next(i for i, e in enumerate(examples) if len(e["input_ids"]) == b - a
                  and torch.equal(e["input_ids"], flat[a:b])), a, b) for a, b in spans]


def max_diff_per_sample(examples: list[dict], solo: list, batch: dict, logits: torch.Tensor) -> list[float]:
    """Each example's max |logit difference| between its place in the packed rows and ``solo``
    (its outputs alone), in the examples' order."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    diffs = {i: (flat_logits[a:b] - solo[i].logits[0]).abs().max().item() for i, a, b in placed(examples, batch)}
    return [diffs[i] for i in range(len(examples))]


# -- M-RoPE positions ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_rope_index_equals_get_rope_index(model, seed):
    for example in examples_for(seed):
        ids, grid = example["input_ids"], example.get("image_grid_thw")
        ours, delta = rope_index(ids, grid)
        if grid is None:  # get_rope_index needs an image; text alone counts up on all rows
            assert torch.equal(ours, torch.arange(len(ids)).expand(3, -1)) and delta == 0
            continue
        ref, ref_delta = model.model.get_rope_index(ids[None], (ids == IMAGE_TOKEN_ID).int()[None], grid)
        assert torch.equal(ours, ref[:, 0]) and delta == ref_delta.item()


def test_rope_collator_equals_get_rope_index_on_the_padded_batch(model):
    examples = examples_for(0) + examples_for(1)
    batch = fastload.Qwen2VLRopeCollator()(examples)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref, ref_deltas = model.model.get_rope_index(ids, (ids == IMAGE_TOKEN_ID).int(), batch["image_grid_thw"],
                                                 attention_mask=mask)
    assert torch.equal(batch["position_ids"], ref) and torch.equal(batch["rope_deltas"], ref_deltas)
    with torch.no_grad():
        theirs = model(**{k: v for k, v in batch.items() if k not in ("position_ids", "rope_deltas")},
                       mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int()).logits
        ours = model(**{k: v for k, v in batch.items() if k != "rope_deltas"}).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() == 0


def test_rope_index_rejects_grids_that_do_not_match_the_tokens():
    example = make_example(random.Random(0), 2)
    with pytest.raises(ValueError, match="image tokens"):
        rope_index(example["input_ids"], example["image_grid_thw"][:1])
    with pytest.raises(ValueError, match="needs"):
        rope_index(example["input_ids"], torch.cat([example["image_grid_thw"]] * 2))


# -- packed rows against the model ------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_packed_samples_give_their_own_logits_and_losses(model, seed):
    """2-6 samples with 0-3 images each, in one row and in rows of at most 96 tokens; each
    sample's M-RoPE rows are get_rope_index's for that sample alone."""
    examples = examples_for(seed)
    solo = [alone(model, e) for e in examples]
    for max_length in (None, max(96, *(len(e["input_ids"]) for e in examples))):
        batch = fastload.Qwen2VLPackingCollator(max_length)(examples)
        out = packed(model, batch)
        assert max(max_diff_per_sample(examples, solo, batch, out.logits)) <= 1e-4
        assert out.loss.item() == pytest.approx(sum(o.loss.item() for o in solo), rel=1e-5)
        assert_rope_rows_are_get_rope_index(model, examples, batch)


def assert_rope_rows_are_get_rope_index(model, examples: list[dict], batch: dict) -> None:
    rope = batch["position_ids"][1:].reshape(3, -1)
    for i, a, b in placed(examples, batch):
        example = examples[i]
        if "image_grid_thw" in example:
            ids = example["input_ids"][None]
            ref, _ = model.model.get_rope_index(ids, (ids == IMAGE_TOKEN_ID).int(), example["image_grid_thw"])
            assert torch.equal(rope[:, a:b], ref[:, 0])
        else:
            assert torch.equal(rope[:, a:b], torch.arange(b - a).expand(3, -1))


def test_packing_holds_with_eager_attention_too(model):
    examples = examples_for(2)
    solo = [alone(model, e) for e in examples]
    batch = fastload.Qwen2VLPackingCollator()(examples)
    model.set_attn_implementation("eager")
    try:
        assert max(max_diff_per_sample(examples, solo, batch, packed(model, batch).logits)) <= 1e-4
    finally:
        model.set_attn_implementation("sdpa")


def test_two_d_positions_or_a_kv_cache_let_packed_samples_see_each_other(model):
    """Why the 4-row form, and use_cache=False: with 2-D position_ids the model sees text
    positions only (no block mask, no M-RoPE); with its default use_cache=True it builds a KV
    cache, and transformers then ignores the packing when it builds the mask."""
    examples = examples_for(1)
    solo = [alone(model, e) for e in examples]
    batch = fastload.Qwen2VLPackingCollator()(examples)
    right = max_diff_per_sample(examples, solo, batch, packed(model, batch).logits)
    flat = max_diff_per_sample(examples, solo, batch,
                               packed(model, {**batch, "position_ids": batch["position_ids"][0]}).logits)
    cached = max_diff_per_sample(examples, solo, batch, packed(model, batch, use_cache=True).logits)
    assert max(right) <= 1e-4
    assert max(flat) > 1e-2 and max(cached) > 1e-2
    assert cached[0] <= 1e-4  # causal: the first sample of the row sees no one either way


def test_packed_batch_layout():
    examples = examples_for(4)
    lengths = [len(e["input_ids"]) for e in examples]
    batch = fastload.Qwen2VLPackingCollator(max(lengths) + 10)(examples)
    rows, width = batch["input_ids"].shape
    assert rows > 1 and width <= max(lengths) + 10 and "attention_mask" not in batch
    assert sorted(batch["seq_lens"].tolist()) == sorted(lengths)
    cu = batch["cu_seq_lens"].tolist()
    assert cu[0] == 0 and cu[-1] == rows * width and batch["cu_seq_lens"].dtype == torch.int32
    text, labels = batch["position_ids"][0].reshape(-1), batch["labels"].reshape(-1)
    for a, b in itertools.pairwise(cu):  # every sequence (sample or padding tail) starts its positions at 0
        assert torch.equal(text[a:b], torch.arange(b - a)) and labels[a] == -100
    order = placed(examples, batch)
    with_images = [examples[i] for i, _, _ in order if "image_grid_thw" in examples[i]]
    assert torch.equal(batch["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in with_images]))
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in with_images]))
    for i, a, b in order:  # the rest of each sample's labels untouched
        assert torch.equal(labels[a + 1:b], examples[i]["labels"][1:])


def test_a_sample_longer_than_max_length_is_an_error():
    examples = examples_for(2)
    longest = max(len(e["input_ids"]) for e in examples)
    with pytest.raises(fastload.SampleTooLong, match=f"{longest} tokens"):
        fastload.Qwen2VLPackingCollator(longest - 1)(examples)
    with pytest.raises(ValueError, match="multiple"):
        fastload.Qwen2VLPackingCollator(100, pad_to_multiple_of=64)


# -- the real pipeline: shards -> transform -> workers -> packed batches -> the model -------------
def write_vl_shards(tmp_path, n: int) -> str:
    rng = random.Random(5)
    writer = ShardWriter(str(tmp_path / "vl"), maxcount=5)
    for i in range(n):
        k = rng.randrange(4)
        members = {f"{j}.jpg": jpeg_bytes(photo_like(rng.randrange(40, 160), rng.randrange(40, 160), i * 4 + j))
                   for j in range(k)}
        answer = " ".join(["word"] * rng.choice([2, 30, 120]))
        meta = {"messages": [{"role": "user", "content": "<image>" * k + "What is this?"},
                             {"role": "assistant", "content": answer}]}
        writer.write(f"{i:05d}", {"json": json.dumps(meta).encode(), **members})
    shards = writer.close({})
    return str(tmp_path / f"vl-{{000000..{len(shards) - 1:06d}}}.tar")


def test_packed_batches_from_workers_match_the_model(model, processor_dir, tmp_path):
    """ShardDataset -> Qwen2VLTransform -> token-budget packing in two workers (pixels written
    into shared memory by the kernel): each sample in each packed batch, cut out with
    cu_seq_lens, gives the model the logits it gives alone, and the losses add up."""
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=160 * 160, cutoff_len=1024)
    dataset = fastload.ShardDataset(write_vl_shards(tmp_path, 10), shuffle=4, transform=transform)
    loader = fastload.DataLoader(dataset, batch_size=8, num_workers=2, max_tokens=700,
                                 collate_fn=fastload.Qwen2VLPackingCollator())
    samples = 0
    for batch in loader:
        assert batch["input_ids"].numel() <= 700
        out = packed(model, batch)
        flat_ids, flat_labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
        flat_logits = out.logits.reshape(-1, out.logits.shape[-1])
        grids = list(batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)))
        row, total = 0, 0.0
        for a, b in sample_spans(batch):
            example = {"input_ids": flat_ids[a:b], "labels": flat_labels[a:b]}
            n_images = int((example["input_ids"] == VISION_START).sum())
            if n_images:
                grid, grids = torch.stack(grids[:n_images]), grids[n_images:]
                example.update(pixel_values=batch["pixel_values"][row:row + int(grid.prod(-1).sum())],
                               image_grid_thw=grid)
                row += int(grid.prod(-1).sum())
            solo = alone(model, example)
            assert (flat_logits[a:b] - solo.logits[0]).abs().max().item() <= 1e-4
            total += solo.loss.item()
            samples += 1
        assert out.loss.item() == pytest.approx(total, rel=1e-5)
    assert samples == 10


class CountingTransform(fastload.Qwen2VLTransform):
    """Counts full tokenizations (each one renders and encodes the whole conversation)."""

    calls = 0

    def _parsed(self, sample):
        CountingTransform.calls += 1
        return super()._parsed(sample)


def test_token_budget_tokenizes_each_sample_once(processor_dir, tmp_path):
    """Planning a batch needs every sample's token count; the transform then reuses that
    tokenization instead of encoding the conversation a second time."""
    transform = CountingTransform(processor_dir, max_pixels=160 * 160, cutoff_len=1024)
    urls = write_vl_shards(tmp_path, 10)
    plain = [transform(s) for s in fastload.ShardDataset(urls)]
    CountingTransform.calls = 0
    loader = fastload.DataLoader(fastload.ShardDataset(urls, transform=transform), batch_size=8,
                                 max_tokens=700, collate_fn=fastload.Qwen2VLPackingCollator())
    batches = list(loader)
    assert CountingTransform.calls == 10
    assert sorted(int(n) for b in batches for n in b["seq_lens"]) == sorted(len(e["input_ids"]) for e in plain)
