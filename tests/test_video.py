"""Videos end to end against transformers' Qwen2.5-VL video path.

The reference is transformers' own ``Qwen2_5_VLProcessor`` (token expansion, ``second_per_grid_ts``)
around its ``Qwen2VLVideoProcessor`` — frame sampling and patch layout compiled from the installed
transformers source, the resize done by its PIL image backend (``fastload.baseline_video``; the real
torchvision processor where torchvision loads) — fed every frame decoded by PyAV in order, with
``VideoMetadata(frames, average_rate)``, and ``do_sample_frames=True``. So the reference samples
the frames itself, from a full sequential decode, while fastload seeks to the frames it needs.
"""
from __future__ import annotations

import fractions
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

import fastload
from fastload.baseline_video import reference_video_processor
from fastload.video import (
    VideoDecodeError,
    decode_frames,
    probe,
    rgb24,
    sniff_container,
)
from fastload.video_processor import Qwen2VLVideoProcessor, VideoConfig

from .conftest import MLLM_DEMO, jpeg_bytes, need_shared, photo_like, pillow_rgb
from .test_llamafactory import unrle
from .test_packing import model  # noqa: F401  (the tiny random Qwen2.5-VL, a fixture)

MAX_PIXELS = 200_704  # images, as in test_text


def make_video(fmt: str, codec: str, width: int, height: int, frames: int, rate, options=None,
               pts=None, pix_fmt: str = "yuv420p", time_base=None) -> bytes:
    """A small video encoded by PyAV: moving blocks and a sweeping line, so frames differ."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if time_base:
            stream.codec_context.time_base = time_base
        base = np.random.default_rng(0).integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        for i in range(frames):
            img = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))[:height, :width].copy()
            img[(i * 3) % height] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


X264 = {"preset": "ultrafast", "bf": "2", "g": "8"}
SPECS = {  # several codecs, containers, sizes, rates, odd frame counts, B-frames, variable frame rate
    "h264.mp4": ("mp4", "libx264", 96, 64, 23, 24, X264),
    "mpeg4.avi": ("avi", "mpeg4", 80, 60, 31, fractions.Fraction(30000, 1001), {"bf": "2", "g": "10"}),
    "vp9.webm": ("webm", "libvpx-vp9", 64, 64, 17, 10, {"deadline": "realtime", "cpu-used": "8"}),
    "hevc.mkv": ("matroska", "libx265", 128, 72, 40, 25,
                 {"preset": "ultrafast", "x265-params": "log-level=error:bframes=3:keyint=12"}),
    "mjpeg.avi": ("avi", "mjpeg", 64, 48, 12, 15, None, None, "yuvj420p"),
    "vfr.mp4": ("mp4", "libx264", 64, 48, 20, 30, {"preset": "ultrafast"},
                [i * 33 + (i % 3) * 10 for i in range(20)], "yuv420p", fractions.Fraction(1, 1000)),
    "three_frames.mp4": ("mp4", "libx264", 56, 56, 3, 5, X264),
}


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    return {name: make_video(*spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def reference(processor_dir):
    return reference_video_processor(processor_dir, MAX_PIXELS)


def all_frames(data: bytes) -> tuple[np.ndarray, float]:
    """Every frame in order, decoded sequentially (no seeking), and the stream's average rate."""
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)]), float(stream.average_rate)


def video_sample(messages, videos: list[bytes], images=(), key="k") -> dict:
    sample = {"__key__": key, "json": json.dumps({"messages": messages}).encode()}
    for i, data in enumerate(videos):
        sample[f"{i}.{sniff_container(data).replace('ogg', 'ogv')}"] = data
    for i, data in enumerate(images):
        sample[f"{i}.jpg"] = data
    return sample


def content_list(text: str) -> list[dict]:
    out = []
    for piece in text.replace("<video>", "\0video\0").replace("<image>", "\0image\0").split("\0"):
        if piece in ("video", "image"):
            out.append({"type": piece})
        elif piece:
            out.append({"type": "text", "text": piece})
    return out


def reference_encode(reference, messages, videos: list[bytes], images=(), **video_kwargs):
    from transformers.video_utils import VideoMetadata

    text = reference.apply_chat_template([{"role": m["role"], "content": content_list(m["content"])}
                                          for m in messages], tokenize=False)
    decoded = [all_frames(v) for v in videos]
    kwargs = {"videos": [f for f, _ in decoded],
              "video_metadata": [VideoMetadata(total_num_frames=len(f), fps=fps) for f, fps in decoded],
              "do_sample_frames": True, **(video_kwargs or {"fps": 2.0})} if videos else {}
    return reference(text=[text], images=[pillow_rgb(b) for b in images] or None, return_tensors="pt", **kwargs)


def exact_reference(reference) -> bool:
    return type(reference.video_processor).__name__ == "PilVideoProcessor"


def assert_matches(out, ref, reference):
    assert out["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(out["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(out["second_per_grid_ts"], torch.as_tensor(ref["second_per_grid_ts"], dtype=torch.float32))
    diff = float((out["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max())
    # bit for bit against the PIL-equivalent path; torchvision's bicubic is its own (RESULTS.md)
    assert diff <= (0.0 if exact_reference(reference) else 0.5), diff
    return diff


ASK = [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "Blocks move."}]


@pytest.mark.parametrize("name", list(SPECS))
def test_generated_videos_match_transformers(name, videos, processor_dir, reference):
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, exact=True)
    sample = video_sample(ASK, [videos[name]])
    out = transform(sample)
    assert_matches(out, reference_encode(reference, ASK, [videos[name]]), reference)
    assert transform.num_tokens(sample) == len(out["input_ids"])  # from metadata, before any decoding


@pytest.mark.parametrize("kwargs", [{"fps": 4.0, "max_pixels": 40 * 28 * 28}, {"num_frames": 6},
                                    {"fps": 1.0, "min_frames": 2, "max_frames": 4}])
def test_sampling_and_budget_options_match_transformers(kwargs, videos, processor_dir):
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("fps", "num_frames", "min_frames", "max_frames")}
    reference = reference_video_processor(processor_dir, MAX_PIXELS, video_max_pixels=kwargs.get("max_pixels"))
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, exact=True, video=kwargs)
    for name in ("hevc.mkv", "mpeg4.avi"):
        out = transform(video_sample(ASK, [videos[name]]))
        assert_matches(out, reference_encode(reference, ASK, [videos[name]], **ref_kwargs), reference)


def test_images_and_videos_in_one_sample(videos, processor_dir, reference):
    messages = [{"role": "user", "content": "<image>Compare with <video> and <video>."},
                {"role": "assistant", "content": "Alike."}]
    image = jpeg_bytes(photo_like(90, 120))
    clips = [videos["vp9.webm"], videos["h264.mp4"]]
    out = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, exact=True)(
        video_sample(messages, clips, [image]))
    ref = reference_encode(reference, messages, clips, [image])
    assert_matches(out, ref, reference)
    assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert float((out["pixel_values"] - ref["pixel_values"]).abs().max()) <= 0.02


def test_mllm_video_demo_matches_transformers(mllm_demo, processor_dir, reference):
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, exact=True)
    for i, record in enumerate(json.loads((mllm_demo / "mllm_video_demo.json").read_text())):
        clips = [(mllm_demo / p).read_bytes() for p in record["videos"]]
        sample = video_sample(record["messages"], clips, key=str(i))
        out = transform(sample)
        assert_matches(out, reference_encode(reference, record["messages"], clips), reference)
        assert transform.num_tokens(sample) == len(out["input_ids"])


def test_transformers_pyav_loader_reads_the_same_frames_and_metadata(mllm_demo):
    """transformers' own PyAV loader (``read_video_pyav``) on the demo's mp4/avi: the same frame
    count, rate and frames as fastload's probe and seeking decode."""
    from transformers.video_utils import load_video

    for name in ("1.mp4", "2.avi"):
        path = mllm_demo / "mllm_demo_data" / name
        frames, meta = load_video(str(path), backend="pyav")
        info = probe(path.read_bytes())
        assert (meta.total_num_frames, meta.fps, meta.width, meta.height) == (info.frames, info.fps, info.width,
                                                                               info.height)
        indices = [0, 7, 100, info.frames - 1]
        got = decode_frames(path.read_bytes(), info, indices, rgb24)
        assert all(np.array_equal(g, frames[i]) for g, i in zip(got, indices))


@pytest.mark.parametrize("name", list(SPECS))
def test_seeking_decode_equals_sequential_decode(name, videos):
    data = videos[name]
    frames, _ = all_frames(data)
    info = probe(data)
    assert info.frames == len(frames)  # the packet count is the decoded count (WebM/Matroska: no header count)
    rng = np.random.default_rng(1)
    for indices in ([info.frames - 1, 0], sorted(rng.choice(info.frames, min(5, info.frames), replace=False)),
                    list(range(0, info.frames, 3))):
        got = decode_frames(data, info, indices, rgb24)
        assert all(np.array_equal(g, frames[i]) for g, i in zip(got, indices)), indices


def test_fast_mode_is_close_to_exact(videos, processor_dir):
    config = VideoConfig.from_pretrained(processor_dir, max_pixels=32 * 28 * 28)
    exact = Qwen2VLVideoProcessor(config, exact=True)(videos["hevc.mkv"])
    fast = Qwen2VLVideoProcessor(config)(videos["hevc.mkv"])
    assert torch.equal(exact["video_grid_thw"], fast["video_grid_thw"])
    assert float((exact["pixel_values_videos"] - fast["pixel_values_videos"]).abs().max()) < 0.2


def test_bfloat16_and_out_buffer(videos, processor_dir):
    proc = Qwen2VLVideoProcessor(VideoConfig.from_pretrained(processor_dir), exact=True, dtype=torch.bfloat16)
    pending = proc.prepare([videos["h264.mp4"], videos["mjpeg.avi"]])
    out = torch.empty(pending.shape, dtype=torch.bfloat16)
    pending.write_into(out)
    full = Qwen2VLVideoProcessor(VideoConfig.from_pretrained(processor_dir), exact=True)(
        [videos["h264.mp4"], videos["mjpeg.avi"]])
    assert torch.equal(out, full["pixel_values_videos"].to(torch.bfloat16))


def test_sniffed_containers(videos):
    assert {name: sniff_container(v) for name, v in videos.items()} == {
        "h264.mp4": "mp4", "mpeg4.avi": "avi", "vp9.webm": "webm", "hevc.mkv": "mkv", "mjpeg.avi": "avi",
        "vfr.mp4": "mp4", "three_frames.mp4": "mp4"}
    assert sniff_container(jpeg_bytes(photo_like(8, 8))) is None


# -- bad input --------------------------------------------------------------------------------------
def audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def unknown_codec(data: bytes) -> bytes:
    """An AVI whose stream names a codec no decoder knows (its FourCC overwritten)."""
    return data.replace(b"FMP4", b"QQQQ").replace(b"XVID", b"QQQQ").replace(b"DIVX", b"QQQQ")


BAD = {
    "truncated": lambda v: v["h264.mp4"][: len(v["h264.mp4"]) // 2],
    "garbage": lambda v: b"\x00\x00\x00\x18ftypmp42" + bytes(200),
    "empty": lambda v: b"",
    "no video stream": lambda v: audio_only(),
    "one frame": lambda v: make_video("mp4", "libx264", 32, 32, 1, 10, X264),
    "unknown codec": lambda v: unknown_codec(v["mpeg4.avi"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_videos_are_clear_errors(case, videos, processor_dir):
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS)
    data = BAD[case](videos)
    sample = {"__key__": case, "json": json.dumps({"messages": ASK}).encode(), "0.mp4": data}
    with pytest.raises(VideoDecodeError):
        transform(sample)


def test_a_header_claiming_a_billion_frames_is_not_believed(videos, processor_dir):
    """AVI headers claiming 10^9 frames (transformers' PyAV loader would plan on them): the frame
    count is the demuxer's packets, so tokens and sampling follow the 31 frames really there."""
    import struct

    data = bytearray(videos["mpeg4.avi"])
    struct.pack_into("<I", data, data.index(b"avih") + 8 + 16, 10**9)  # dwTotalFrames
    struct.pack_into("<I", data, data.index(b"strh") + 8 + 32, 10**9)  # dwLength
    with av.open(io.BytesIO(bytes(data))) as c:
        assert c.streams.video[0].frames == 10**9
    assert probe(bytes(data)).frames == 31
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS)
    out = transform(video_sample(ASK, [bytes(data)]))
    assert torch.equal(out["video_grid_thw"], transform(video_sample(ASK, [videos["mpeg4.avi"]]))["video_grid_thw"])


def test_budget_and_time_limits_apply_before_and_during_decoding(videos, processor_dir):
    config = VideoConfig.from_pretrained(processor_dir)
    info = probe(videos["hevc.mkv"])
    with pytest.raises(VideoDecodeError, match="budget"):
        Qwen2VLVideoProcessor(config, max_video_bytes=1 << 16).plan(info)
    with pytest.raises(VideoDecodeError, match="pixel limit"):
        Qwen2VLVideoProcessor(config, max_frame_pixels=1000).plan(info)
    with pytest.raises(VideoDecodeError, match="longer than"):
        Qwen2VLVideoProcessor(config, timeout=0.0)(videos["hevc.mkv"])


# -- shards and the loader ---------------------------------------------------------------------------
def run_shard(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastload.cli.shard", *map(str, args), "--quiet"],
                          check=False, capture_output=True, text=True)


def test_shard_and_load_with_workers(videos, processor_dir, tmp_path):
    """fastload-shard stores the videos' bytes (0.mp4, ...) with their statistics and refuses one
    it cannot probe; a loader with workers gives what the transform gives in process, and a
    broken video that reached a shard is a counted skip."""
    from fastload.writer import ShardWriter

    for name in ("h264.mp4", "vp9.webm", "mpeg4.avi"):
        (tmp_path / name).write_bytes(videos[name])
    (tmp_path / "bad.mp4").write_bytes(videos["h264.mp4"][:3000])
    (tmp_path / "img.jpg").write_bytes(jpeg_bytes(photo_like(60, 80)))
    two = [{"role": "user", "content": "<image><video>and<video>?"}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": ASK, "videos": ["h264.mp4"]}, {"messages": two, "images": ["img.jpg"],
                                                         "videos": ["vp9.webm", "mpeg4.avi"]},
            {"messages": ASK, "videos": ["bad.mp4"]}, {"messages": ASK, "videos": ["missing.mp4"]}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    done = run_shard(tmp_path / "data.json", tmp_path / "v", "--validate")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "v.manifest.json").read_text())
    assert manifest["total"] == 2 and manifest["skipped"] == 2 and "bad.mp4" in manifest["errors"][0]
    assert manifest["videos"]["count"] == 3 and manifest["videos"]["formats"] == {"mp4": 1, "webm": 1, "avi": 1}
    assert manifest["videos"]["frames"]["max"] == 31

    writer = ShardWriter(str(tmp_path / "broken"))  # what a shard written without fastload-shard may hold
    writer.write("x", {"json": json.dumps({"messages": ASK}).encode(), "0.mp4": videos["h264.mp4"][:3000]})
    writer.close()
    urls = [str(tmp_path / "v-000000.tar"), str(tmp_path / "broken-000000.tar")]
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS)
    loader = fastload.DataLoader(fastload.ShardDataset(urls, transform=transform), batch_size=3, num_workers=2,
                                 on_error="skip", collate_fn=fastload.Qwen2VLCollator())
    batches = list(loader)
    assert loader.stats["skipped"] == 1 and loader.stats["by_cause"] == {"VideoDecodeError": 1}
    assert sum(len(b["input_ids"]) for b in batches) == 2
    expected = [transform(s) for s in fastload.ShardDataset(urls[0])]
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values"):
        assert torch.equal(torch.cat([b[key] for b in batches]), torch.cat([e[key] for e in expected if key in e]))


def test_mllm_video_demo_shards(mllm_demo, tmp_path):
    done = run_shard("--dataset-info", mllm_demo / "dataset_info.json", "--dataset", "mllm_video_demo",
                     tmp_path / "v", "--validate")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "v.manifest.json").read_text())
    assert manifest["total"] == 3 and manifest["videos"]["formats"] == {"mp4": 2, "avi": 1}
    import tarfile

    with tarfile.open(tmp_path / "v-000000.tar") as tar:
        names = tar.getnames()
        assert "000000001.0.avi" in names
        assert tar.extractfile("000000000.0.mp4").read() == (mllm_demo / "mllm_demo_data" / "1.mp4").read_bytes()


def test_a_batch_with_videos_trains_a_tiny_qwen2_5_vl(model, videos, processor_dir):
    """Qwen2.5-VL's architecture at toy size (test_packing's): a collated batch mixing videos and an
    image passes forward and backward, the vision tower receiving gradients through the video patches."""
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=28 * 28 * 16, video={"max_pixels": 28 * 28 * 8})
    two = [{"role": "user", "content": "<image>and<video>?"}, {"role": "assistant", "content": "Both move."}]
    batch = fastload.Qwen2VLCollator()([
        transform(video_sample(ASK, [videos["hevc.mkv"]])),
        transform(video_sample(two, [videos["vfr.mp4"]], [jpeg_bytes(photo_like(60, 80))]))])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_packed_samples_with_videos_give_their_own_logits(model, videos, processor_dir):
    """Videos, an image and text packed into one row: each sample's logits in the row equal its
    logits alone (where the model computes its own M-RoPE positions), and the losses add up."""
    from .test_mrope_video import token_types
    from .test_packing import max_diff_per_sample, packed

    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=28 * 28 * 16, video={"max_pixels": 28 * 28 * 8})
    two = [{"role": "user", "content": "<image>and<video>?"}, {"role": "assistant", "content": "Both move."}]
    text = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]
    examples = [transform(video_sample(ASK, [videos["hevc.mkv"]])), transform(video_sample(text, [])),
                transform(video_sample(two, [videos["vfr.mp4"]], [jpeg_bytes(photo_like(60, 80))]))]
    collate = fastload.Qwen2VLPackingCollator(tokens_per_second=model.config.vision_config.tokens_per_second)
    batch = collate(examples)
    assert batch["input_ids"].shape[0] == 1 and "pixel_values_videos" in batch
    model.eval()
    solo = [model(**{k: v[None] if k in ("input_ids", "labels") else v for k, v in e.items()
                     if k != "attention_mask"}, mm_token_type_ids=token_types(e["input_ids"][None]),
                  num_items_in_batch=1) for e in examples]
    out = packed(model, batch)
    assert max(max_diff_per_sample(examples, solo, batch, out.logits)) <= 1e-4
    assert out.loss.item() == pytest.approx(sum(s.loss.item() for s in solo), rel=1e-5)


# -- the LLaMA-Factory preset ------------------------------------------------------------------------
LF_GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
LF_SETTINGS = {"default": {}, "fps1_maxlen4": {"video_fps": 1.0, "video_maxlen": 4},
               "pixels_16k_4k": {"video_max_pixels": 128 * 128, "video_min_pixels": 64 * 64}, "fps5": {"video_fps": 5.0}}
LF_VIDEOS = ["odd.mp4", "ntsc.avi", "tiny.mp4", "wide.mp4", "rotated.mp4", "demo1.mp4", "demo2.avi", "demo3.mp4"]


@pytest.fixture(scope="module")
def lf_golden() -> dict:
    return json.loads((LF_GOLDEN_DIR / "llamafactory_video_golden.json").read_text())["settings"]


@pytest.mark.parametrize("setting", list(LF_SETTINGS))
@pytest.mark.parametrize("name", LF_VIDEOS)
def test_llamafactory_preset_samples_videos_as_llamafactory(setting, name, lf_golden, processor_dir):
    """``from_llamafactory`` against LLaMA-Factory 0.9.5 itself on one-video conversations
    (recorded by ``benchmarks/parity_llamafactory_video.py``): its sampling by ``video_fps`` over
    the header's duration, ``video_maxlen``, the ``video_max_pixels``/``video_min_pixels``
    pre-resize and 28-pixel fixes, odd counts padded, no display rotation; input_ids, trained positions, grids and
    second_per_grid_ts identical, pixels within LLaMA-Factory's torchvision backend noise."""
    expected = lf_golden[setting][LF_VIDEOS.index(name)]
    path = (need_shared(MLLM_DEMO) / "mllm_demo_data" / name[4:] if name.startswith("demo")
            else LF_GOLDEN_DIR / "llamafactory_videos" / name)
    transform = fastload.Qwen2VLTransform.from_llamafactory(
        {"model_name_or_path": processor_dir, "template": "qwen2_vl", **LF_SETTINGS[setting]})
    messages = [{"role": "user", "content": "<video>What happens in this video?"},
                {"role": "assistant", "content": "Things move."}]
    sample = video_sample(messages, [path.read_bytes()])
    out = transform(sample)
    ids = unrle(expected["input_ids"])
    assert out["input_ids"].tolist() == ids
    assert [int(label != -100) for label in out["labels"].tolist()] == unrle(expected["trained"])
    assert out["video_grid_thw"].tolist() == expected["video_grid_thw"]
    assert out["second_per_grid_ts"].tolist() == pytest.approx(expected["second_per_grid_ts"], rel=1e-6)
    assert transform.num_tokens(sample) == len(ids)
    assert list(out["pixel_values_videos"].shape) == expected["shape"]
    pixels = out["pixel_values_videos"].reshape(-1)
    picks = [j * (pixels.numel() - 1) // 63 for j in range(64)]
    assert max(abs(float(pixels[i]) - v) for i, v in zip(picks, expected["pixels"])) <= 0.3


def test_llamafactory_preset_refuses_a_video_without_header_counts(videos, processor_dir):
    """A WebM carries no frame count in its header: LLaMA-Factory would sample ``video_maxlen``
    frames of it whatever its length; the preset says why it cannot follow."""
    assert av.open(io.BytesIO(videos["vp9.webm"])).streams.video[0].frames == 0
    transform = fastload.Qwen2VLTransform.from_llamafactory({"model_name_or_path": processor_dir,
                                                              "template": "qwen2_vl"})
    with pytest.raises(VideoDecodeError, match="header"):
        transform(video_sample(ASK, [videos["vp9.webm"]]))


# -- rotation metadata -------------------------------------------------------------------------------
def rotated_video(degrees: int) -> bytes:
    """An H.264 MP4 whose display matrix turns its 96x64 frames ``degrees`` counter-clockwise
    (PyAV's ``set_display_rotation``: what phones write for portrait video)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10, options=X264)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(degrees)
        base = np.random.default_rng(2).integers(0, 255, (9, 13, 3), dtype=np.uint8)
        for i in range(14):
            img = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))[:64, :96].copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("degrees", [90, 180, -90])
def test_rotated_videos_are_shown_upright(degrees, processor_dir, reference):
    """The display matrix is applied, as transformers' default loader (torchcodec >= 0.11) does:
    transformers' processor fed the stored frames (its PyAV loader's, which ignores rotation)
    turned counter-clockwise by the matrix's angle gives the same tokens, grid and pixels; the
    token count from metadata follows the turned size."""
    from transformers.video_utils import VideoMetadata

    data = rotated_video(degrees)
    stored, fps = all_frames(data)
    assert stored.shape[1:3] == (64, 96)  # PyAV (and transformers' PyAV loader) hand out the stored frames
    assert probe(data).rotation == degrees % 360
    upright = np.rot90(stored, degrees // 90 % 4, axes=(1, 2))
    text = reference.apply_chat_template([{"role": m["role"], "content": content_list(m["content"])} for m in ASK],
                                         tokenize=False)
    ref = reference(text=[text], videos=[upright], return_tensors="pt", do_sample_frames=True, fps=2.0,
                    video_metadata=[VideoMetadata(total_num_frames=len(upright), fps=fps)])
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=MAX_PIXELS, exact=True)
    sample = video_sample(ASK, [data])
    out = transform(sample)
    assert_matches(out, ref, reference)
    assert transform.num_tokens(sample) == len(out["input_ids"])
