"""M-RoPE positions with videos against the model's own ``get_rope_index``.

The reference is ``model.model.get_rope_index`` of a tiny random ``Qwen2_5_VLForConditionalGeneration``
(test_packing's): a video's temporal positions step by ``tokens_per_second * second_per_grid_t``
(float32, truncated), its spatial ones and the text after it as for images. Checked on random
grids and clip rates (where the truncation bites), on samples the transform makes from real
encoded videos mixed with images, and through the model: logits with fastload's ``position_ids``
equal the logits it computes itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

import fastload
from fastload.mrope import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, rope_index

from .conftest import jpeg_bytes, photo_like
from .test_packing import model  # noqa: F401  (the tiny random Qwen2.5-VL, a fixture)
from .test_video import SPECS, make_video, video_sample

VISION_START, VISION_END = 151652, 151653


@pytest.fixture(params=[2, 4], ids=["tps2", "tps4"])
def tokens_per_second(request, model):
    """The released checkpoints' 2 and transformers' class default 4, set on the model itself."""
    vision = model.config.vision_config
    before, vision.tokens_per_second = vision.tokens_per_second, request.param
    yield request.param
    vision.tokens_per_second = before


def token_types(ids: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` as transformers' processor makes them: text 0, image 1, video 2."""
    return (ids == IMAGE_TOKEN_ID).int() + 2 * (ids == VIDEO_TOKEN_ID).int()


def random_sample(rng: np.random.Generator) -> tuple[list[int], list, list, list]:
    """(ids, image grids, video grids, second_per_grid_ts): text runs between 0-2 images and 1-3 videos."""
    ids, images, videos, seconds = [], [], [], []
    kinds = ["video"] * int(rng.integers(1, 4)) + ["image"] * int(rng.integers(0, 3))
    for kind in rng.permutation(kinds):
        ids += rng.integers(0, 1000, int(rng.integers(0, 6))).tolist() + [VISION_START]
        grid = [int(rng.integers(1, 4)) * (2 if kind == "image" else int(rng.integers(1, 8))),
                2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))]
        grid[0] = 1 if kind == "image" else grid[0]
        (images if kind == "image" else videos).append(grid)
        if kind == "video":
            seconds.append(float(rng.choice([0.5, 1.0, 2.0, 0.7, 1 / 0.9, 2 / 2.997, float(rng.uniform(0.1, 3))])))
        pad = IMAGE_TOKEN_ID if kind == "image" else VIDEO_TOKEN_ID
        ids += [pad] * (grid[0] * grid[1] * grid[2] // 4) + [VISION_END]
    ids += rng.integers(0, 1000, int(rng.integers(1, 6))).tolist()
    return ids, images, videos, seconds


@pytest.mark.parametrize("seed", range(20))
def test_random_samples_equal_get_rope_index(model, tokens_per_second, seed):
    ids, images, videos, seconds = random_sample(np.random.default_rng(seed))
    row = torch.tensor([ids])
    grids = torch.tensor(images, dtype=torch.long).reshape(-1, 3)
    spgt = torch.tensor(seconds, dtype=torch.float32)
    ref, ref_delta = model.model.get_rope_index(row, token_types(row), grids if images else None,
                                                torch.tensor(videos), spgt)
    pos, delta = rope_index(ids, grids, videos, spgt, tokens_per_second=tokens_per_second)
    assert torch.equal(pos, ref[:, 0]) and delta == int(ref_delta)


def test_the_clock_is_float32_truncated(model, tokens_per_second):
    """A clip rate where float64 and the model's float32 arithmetic part ways: 13/11 s per temporal
    patch puts patch 11 at 11 * tokens_per_second * 13/11, an integer in float64 but just under it
    in float32, truncated one lower; the positions must say what the model says."""
    ids = [1, VISION_START] + [VIDEO_TOKEN_ID] * 12 + [VISION_END, 2]
    row, grid, spgt = torch.tensor([ids]), torch.tensor([[12, 2, 2]]), torch.tensor([13 / 11])
    ref, _ = model.model.get_rope_index(row, token_types(row), None, grid, spgt)
    pos, _ = rope_index(ids, None, grid, spgt, tokens_per_second=tokens_per_second)
    assert torch.equal(pos, ref[:, 0])
    float64 = [2 + int(k * tokens_per_second * 13 / 11) for k in range(12)]
    assert pos[0, 2:14].tolist() != float64 and pos[0, 2:13].tolist() == float64[:-1]


def test_video_tokens_need_their_grids():
    ids = [1, VISION_START] + [VIDEO_TOKEN_ID] * 4 + [VISION_END]
    with pytest.raises(ValueError, match="video tokens"):
        rope_index(ids)
    with pytest.raises(ValueError, match="needs"):
        rope_index(ids, None, [[2, 2, 2]] * 3, [1.0] * 3)  # 6 tokens for 4


def test_rope_collator_with_videos_equals_the_model(model, tokens_per_second, processor_dir):
    """Samples the transform makes from encoded videos (24 fps H.264, 29.97 fps MPEG-4, variable
    rate, HEVC) beside an image: position_ids and rope_deltas equal get_rope_index's on the padded
    batch, and the model's logits with them equal the logits it gets computing them itself."""
    clips = {name: make_video(*SPECS[name]) for name in ("h264.mp4", "mpeg4.avi", "vfr.mp4", "hevc.mkv")}
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=28 * 28 * 16, video={"max_pixels": 28 * 28 * 8})
    one = [{"role": "user", "content": "<video>What moves?"}, {"role": "assistant", "content": "Blocks."}]
    two = [{"role": "user", "content": "<image>and<video>, then<video>?"}, {"role": "assistant", "content": "Both."}]
    examples = [transform(video_sample(one, [clips["h264.mp4"]])),
                transform(video_sample(two, [clips["mpeg4.avi"], clips["vfr.mp4"]], [jpeg_bytes(photo_like(60, 80))])),
                transform(video_sample(one, [clips["hevc.mkv"]]))]
    assert len({float(s) for e in examples for s in e["second_per_grid_ts"]}) > 1
    batch = fastload.Qwen2VLRopeCollator(tokens_per_second=tokens_per_second)(examples)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref, ref_deltas = model.model.get_rope_index(ids, token_types(ids), batch["image_grid_thw"],
                                                 batch["video_grid_thw"], batch["second_per_grid_ts"],
                                                 attention_mask=mask)
    assert torch.equal(batch["position_ids"], ref) and torch.equal(batch["rope_deltas"], ref_deltas)
    with torch.no_grad():
        theirs = model(**{k: v for k, v in batch.items() if k not in ("position_ids", "rope_deltas")},
                       mm_token_type_ids=token_types(ids)).logits
        ours = model(**{k: v for k, v in batch.items() if k != "rope_deltas"}).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() == 0
