"""The image pipeline against transformers' Qwen2VLImageProcessor (PIL backend, and torchvision's where installed)."""
from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import fastload
from fastload import _kernels
from fastload.decode import DecompressionBombError, ImageDecodeError, decode

from .conftest import IMAGES, jpeg_bytes, photo_like, pillow_rgb, png_claiming, shared_images

MAX_PIXELS = (12845056, 1003520)
ALL_IMAGES = ("photos", "pillow", "pillow_nonjpeg", "libjpeg-turbo")


def reference(processor_dir, max_pixels):
    return Qwen2VLImageProcessorPil.from_pretrained(processor_dir, max_pixels=max_pixels)


def run_reference(ref, rgb: np.ndarray) -> dict:
    return ref(rgb, return_tensors="np", input_data_format="channels_last")


def decodable_images():
    """(path, bytes, Pillow's RGB) for every shared image Pillow itself can decode."""
    out = []
    for path in shared_images(*ALL_IMAGES):
        data = path.read_bytes()
        try:
            rgb = pillow_rgb(data)
        except Exception:
            continue
        if rgb.shape[0] * rgb.shape[1] < 40_000_000:
            out.append((path, data, rgb))
    return out


@pytest.fixture(scope="module")
def images():
    return decodable_images()


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                fastload.smart_resize(h, w)
            continue
        for lo, hi in ((3136, 12845056), (3136, 1003520), (200_000, 400_000)):
            assert fastload.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def test_resize_kernel_is_pillow(images):
    """The resize alone, uint8 to uint8, equals PIL's Image.resize(BICUBIC) bit for bit
    (Pillow >= 13 chooses the pass order the kernel follows; older ones differ by a few levels)."""
    for path, _, rgb in images[:25]:
        h, w = rgb.shape[:2]
        for th, tw in ((max(1, h // 2), max(1, w // 3)), (max(1, h * 2 // 3), max(1, w // 2)), (h * 2, w + 7)):
            ref = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((tw, th), Image.BICUBIC))
            out = np.empty((th, tw, 3), np.uint8)
            _kernels.resize(rgb, out, th, tw)
            diff = np.abs(ref.astype(int) - out).max()
            assert diff == 0 if PILLOW_13 else diff <= 4, (path.name, (h, w, th, tw), diff)


def test_resize_kernel_random_shapes():
    rng = np.random.default_rng(5)
    for h, w, th, tw in rng.integers(1, 300, (300, 4)):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(a).resize((int(tw), int(th)), Image.BICUBIC))
        out = np.empty((th, tw, 3), np.uint8)
        _kernels.resize(a, out, int(th), int(tw))
        assert np.abs(ref.astype(int) - out).max() <= (0 if PILLOW_13 else 32), (h, w, th, tw)


@pytest.fixture(params=[True, False], ids=["simd", "portable"])
def simd(request):
    """Runs a test with the kernel's AVX2 loops and again with its portable ones."""
    before = _kernels.simd()
    if request.param and not _kernels.simd(True):
        pytest.skip("this CPU has no AVX2")
    _kernels.simd(request.param)
    yield request.param
    _kernels.simd(before)


def test_resize_both_code_paths_are_pillow(simd):
    """Shapes around the AVX2 pass's edges: groups of 8 rows, 4-pixel transposes, 32-value
    vertical steps, widths under 6, one-pixel images, one dimension only resized."""
    rng = np.random.default_rng(11)
    shapes = [(1, 1, 3, 5), (2, 5, 9, 3), (9, 7, 8, 6), (17, 33, 8, 40), (8, 6, 16, 12), (40, 13, 7, 11),
              (20, 37, 31, 37), (31, 37, 20, 37), (23, 19, 23, 41), (23, 41, 23, 19)]
    shapes += [tuple(int(v) for v in s) for s in rng.integers(1, 90, (40, 4))]
    for h, w, th, tw in shapes:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(a).resize((tw, th), Image.BICUBIC))
        out = np.empty((th, tw, 3), np.uint8)
        _kernels.resize(a, out, th, tw)
        assert np.abs(ref.astype(int) - out).max() <= (0 if PILLOW_13 else 32), (simd, h, w, th, tw)


def test_fast_resize_is_close_to_pillow(simd):
    """exact=False resizes in the cheaper pass order and, with AVX2, with 16-bit weights (8-bit
    where the shrink is under 2x): not bit-identical, but within a few levels (PSNR far above
    the DCT scaling's ~39 dB)."""
    rng = np.random.default_rng(12)
    shapes = [(480, 640, 476, 644), (720, 1280, 364, 644), (300, 200, 600, 150), (9, 700, 5, 31)]
    shapes += [tuple(int(v) for v in s) for s in rng.integers(2, 160, (30, 4))]
    for i, (h, w, th, tw) in enumerate(shapes):
        a = photo_like(h, w, seed=i)
        ref = np.asarray(Image.fromarray(a).resize((tw, th), Image.BICUBIC)).astype(float)
        out = np.empty((th, tw, 3), np.uint8)
        _kernels.resize(a, out, th, tw, False)
        mse = float(np.mean((out - ref) ** 2))
        assert mse == 0 or 10 * math.log10(255**2 / mse) >= 45, (simd, h, w, th, tw, mse)


def test_fast_resize_weights_keep_flat_areas_and_never_overflow(simd):
    """The 8-bit weights sum to exactly one, so flat images stay flat; on 0/255 noise (the
    largest 16-bit sums) one-axis resizes, where only the weights differ from Pillow, stay
    within a few levels: an overflowing sum would be off by up to 255."""
    rng = np.random.default_rng(13)
    for i in range(120):
        h, w = (int(v) for v in rng.integers(2, 120, 2))
        shrink = rng.uniform(0.4, 2.2)
        th, tw = (h, max(1, int(w / shrink))) if i % 2 else (max(1, int(h / shrink)), w)
        flat = np.full((h, w, 3), rng.integers(0, 256), np.uint8)
        out = np.empty((th, tw, 3), np.uint8)
        _kernels.resize(flat, out, th, tw, False)
        assert (out == flat[0, 0, 0]).all(), (simd, h, w, th, tw)
        noise = (rng.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8)
        ref = np.asarray(Image.fromarray(noise).resize((tw, th), Image.BICUBIC)).astype(int)
        _kernels.resize(noise, out, th, tw, False)
        assert np.abs(out - ref).max() <= 16, (simd, h, w, th, tw)


LAYOUTS = [
    {},  # Qwen2.5-VL: patch 14, merge 2, temporal 2
    {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2},
    {"patch_size": 14, "merge_size": 1, "temporal_patch_size": 1},
    {"patch_size": 8, "merge_size": 3, "temporal_patch_size": 3},
    {"patch_size": 3, "merge_size": 2, "temporal_patch_size": 2},  # planes under 16 values
    {"do_normalize": False},
    {"do_rescale": False, "image_mean": [10.0, 20.0, 30.0], "image_std": [3.0, 5.0, 7.0]},
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_kernel_layouts_match_transformers(processor_dir, simd, layout):
    """Other patch, merge and temporal sizes and normalizations, in both code paths, equal to
    transformers' PIL backend with the same settings; bfloat16 is float32 rounded by torch."""
    kw = dict(layout, min_pixels=64, max_pixels=200_000)
    ref = Qwen2VLImageProcessorPil.from_pretrained(processor_dir, **kw)
    ours = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True, **kw)
    ours_bf16 = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True, dtype=torch.bfloat16, **kw)
    for i, (h, w) in enumerate(((480, 640), (97, 331), (500, 120))):
        rgb = photo_like(h, w, seed=i)
        expected = run_reference(ref, rgb)
        got = ours(rgb, return_tensors="np")
        assert_same(got, expected, (h, w))
        assert torch.equal(ours_bf16(rgb)["pixel_values"], torch.from_numpy(got["pixel_values"]).to(torch.bfloat16))


def test_kernel_follows_the_table_when_arithmetic_differs(processor_dir, simd):
    """The kernel computes values in vectors only where that reproduces the lookup table bit
    for bit; a table that is not the normalization's must be followed as given."""
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True)
    rgb = photo_like(56, 84)
    lut = proc._lut.copy()
    lut[1, 200] += 1.0
    out = np.empty((24, 1176), np.float32)
    _kernels.process(rgb, out, lut, proc._norm, 56, 84, 14, 2, 2)
    expected = proc(rgb, return_tensors="np")["pixel_values"]
    patches = out.reshape(24, 3, 2, 14, 14)
    changed = np.abs(patches - expected.reshape(24, 3, 2, 14, 14)) > 0
    assert changed.any() and not changed[:, [0, 2]].any()
    assert np.all(patches[changed] == lut[1, 200])


@pytest.mark.parametrize("layout", LAYOUTS[:1] + LAYOUTS[-2:], ids=["default", "no-normalize", "custom"])
def test_kernel_computes_transformers_table(processor_dir, layout):
    """The vector arithmetic (no division, no double precision) reproduces transformers' values
    for real configurations, so the kernel never falls back to table lookups for them."""
    if not _kernels.simd():
        pytest.skip("this CPU has no AVX2")
    cfg = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, **layout).config
    for dtype in (torch.float32, torch.bfloat16):
        assert _kernels.computes_table(cfg.lut(dtype), cfg.normalization()), dtype
    assert not _kernels.computes_table(cfg.lut() + 1e-6, cfg.normalization())


def test_fresh_outputs_reuse_memory_only_once_unreferenced(processor_dir):
    """Outputs without out= come from a one-block pool; a block is handed out again only
    after every array and tensor viewing it is gone, and only to an output at least half its
    size. Run in a fresh process: the pool's state is whatever earlier tests left."""
    code = f"import tests.test_vision as t; t.pool_scenario({str(processor_dir)!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def pool_scenario(processor_dir: str) -> None:
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True)
    data = jpeg_bytes(photo_like(480, 640))
    first = proc(data)["pixel_values"]
    expected, first_ptr = first.clone(), first.data_ptr()
    view = first[3:7]
    del first
    second = proc(data)["pixel_values"]
    assert second.data_ptr() != first_ptr and torch.equal(view, expected[3:7])
    second_ptr = second.data_ptr()
    del view, second  # both blocks are free; one is kept
    third = proc(data, return_tensors="np")["pixel_values"]
    assert third.ctypes.data in (first_ptr, second_ptr) and np.array_equal(third, expected.numpy())
    third_ptr = third.ctypes.data
    del third
    half = proc(jpeg_bytes(photo_like(400, 560)))["pixel_values"]  # at least half the block: reused
    assert half.data_ptr() == third_ptr and half.numel() < expected.numel()
    del half
    small = proc(jpeg_bytes(photo_like(56, 56)))["pixel_values"]  # much smaller: left for the next large one
    assert small.data_ptr() != third_ptr
    assert proc(data)["pixel_values"].data_ptr() == third_ptr


def test_kernels_reject_non_contiguous_views():
    view = photo_like(90, 130).transpose(1, 0, 2)
    with pytest.raises((ValueError, BufferError)):
        _kernels.resize(view, np.empty((60, 40, 3), np.uint8), 60, 40)


def has_alpha(im: Image.Image) -> bool:
    """What transformers' ``convert_to_rgb`` composites onto white (its own test, restated)."""
    return "A" in im.getbands() or im.info.get("transparency") is not None


def assert_same(got: dict, expected: dict, what) -> None:
    assert np.array_equal(got["image_grid_thw"], expected["image_grid_thw"]), what
    assert got["pixel_values"].dtype == expected["pixel_values"].dtype == np.float32, what
    assert np.array_equal(got["pixel_values"], expected["pixel_values"]), what


@pytest.mark.parametrize("max_pixels", MAX_PIXELS)
def test_exact_is_transformers_pil_backend_bit_for_bit(processor_dir, images, max_pixels):
    """exact=True equals transformers' PIL backend bit for bit, given what transformers is given.

    An image as Pillow opens it: transformers composites alpha onto white and applies no EXIF
    orientation, and so does fastload. A file (its path, or its bytes for fastload's own
    decoders): transformers' ``load_image`` applies EXIF orientation, then ``convert("RGB")``,
    which drops alpha instead of compositing it; fastload orients the same way but composites
    as for an opened image, so for images with alpha the reference is the oriented image as
    Pillow opens it (README, "The image processor on its own")."""
    ref = reference(processor_dir, max_pixels)
    ours = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=max_pixels, exact=True)
    for path, data, _ in images:
        with Image.open(path) as mine, Image.open(path) as theirs:
            assert_same(ours(mine, return_tensors="np"), ref(theirs, return_tensors="np"), (path.name, "opened"))
        with Image.open(path) as im:
            expected = (ref(ImageOps.exif_transpose(im), return_tensors="np") if has_alpha(im)
                        else ref(str(path), return_tensors="np"))
        for source in (data, str(path)):
            assert_same(ours(source, return_tensors="np"), expected, (path.name, type(source).__name__))


def test_torchvision_backend_report(processor_dir, images):
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("torchvision is not installed: transformers' default backend is unavailable")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    ref = Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=1003520)
    ours = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=1003520, exact=True)
    worst = 0.0
    for path, _, rgb in images:
        expected = ref(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), return_tensors="np")
        got = ours(rgb, return_tensors="np")
        assert np.array_equal(got["image_grid_thw"], expected["image_grid_thw"]), path.name
        worst = max(worst, float(np.abs(got["pixel_values"] - expected["pixel_values"]).max()))
    print(f"\nexact vs transformers torchvision backend: max |diff| = {worst:.3f}")
    assert worst < 0.5


def test_header_sizes_and_token_counts_agree_with_grid(processor_dir, images):
    ref = reference(processor_dir, 1003520)
    cfg = fastload.VisionConfig.from_pretrained(processor_dir, max_pixels=1003520)
    for path, data, rgb in images:
        assert fastload.image_size(data) == (rgb.shape[1], rgb.shape[0]), path.name
        t, h, w = run_reference(ref, rgb)["image_grid_thw"][0]
        assert fastload.num_image_tokens(rgb.shape[1], rgb.shape[0], cfg) == t * h * w // 4


def test_fast_mode_psnr_and_dct_scaling(processor_dir):
    """exact=False decodes fewer pixels; quality against the exact output stays high."""
    exact = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=1003520, exact=True)
    fast = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=1003520)
    errors, scaled = [], 0
    for path in shared_images("photos"):
        data = path.read_bytes()
        a, b = exact(data, return_tensors="np"), fast(data, return_tensors="np")
        assert np.array_equal(a["image_grid_thw"], b["image_grid_thw"])
        ua, _ = exact.resized(data)
        ub, _ = fast.resized(data)
        errors.append(np.mean((ua.astype(np.float64) - ub) ** 2))
        scaled += fast.rgb(data)[0].shape != exact.rgb(data)[0].shape
    psnr = 10 * math.log10(255 ** 2 / max(np.mean(errors), 1e-12))
    print(f"\nfast vs exact over {len(errors)} photos: PSNR {psnr:.1f} dB, {scaled} DCT-scaled")
    assert scaled >= 3
    assert psnr >= 35


def test_fast_decode_is_close_to_the_accurate_one():
    """fast=True (libjpeg-turbo's fast IDCT and chroma upsampling) changes pixels by little:
    42-56 dB on real photos; these synthetic blocks of random colour, all edges, are a worst case."""
    for i, (h, w) in enumerate(((480, 640), (333, 517), (1080, 720))):
        data = jpeg_bytes(photo_like(h, w, seed=i))
        accurate, fast = decode(data), decode(data, fast=True)
        assert fast.shape == accurate.shape
        mse = np.mean((fast.astype(np.float64) - accurate) ** 2)
        assert 0 < mse and 10 * math.log10(255 ** 2 / mse) >= 32


def test_dct_scale_never_undershoots_target():
    cfg = fastload.VisionConfig(max_pixels=200_000)
    for h, w in ((3000, 4000), (1080, 1920), (600, 800), (4000, 30)):
        data = jpeg_bytes(photo_like(h, w))
        rgb = decode(data, target_hw=cfg.target_size(h, w))
        th, tw = cfg.target_size(h, w)
        assert rgb.shape[0] >= min(th, h) and rgb.shape[1] >= min(tw, w)
        if h >= 2 * th and w >= 2 * tw:
            assert rgb.shape[0] < h, "a 2x smaller target must decode DCT-scaled"


def test_bfloat16_and_out_buffer(processor_dir):
    data = jpeg_bytes(photo_like(480, 640))
    f32 = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True)
    bf16 = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True, dtype=torch.bfloat16)
    a = f32(data)["pixel_values"]
    b = bf16(data)["pixel_values"]
    assert b.dtype == torch.bfloat16 and torch.equal(b, a.to(torch.bfloat16))
    out = torch.empty_like(a)
    result = f32([data], out=out)
    assert result["pixel_values"].data_ptr() == out.data_ptr() and torch.equal(out, a)
    with pytest.raises(ValueError):
        f32(data, out=torch.empty(3, 3))


def test_uint8_wire_format_expands_to_the_direct_output(processor_dir):
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=1003520, exact=True)
    datas = [jpeg_bytes(photo_like(300, 500, 1)), jpeg_bytes(photo_like(1000, 200, 2))]
    wires = [proc.resized(d) for d in datas]
    flat = torch.cat([torch.from_numpy(w.reshape(-1)) for w, _ in wires])
    grid = torch.tensor([g for _, g in wires])
    direct = proc(datas)
    assert torch.equal(grid, direct["image_grid_thw"])
    assert torch.equal(fastload.expand_patches(flat, grid, proc.config), direct["pixel_values"])
    bf = fastload.expand_patches(flat, grid, proc.config, dtype=torch.bfloat16)
    assert torch.equal(bf, direct["pixel_values"].to(torch.bfloat16))


def test_input_types_agree(processor_dir, tmp_path):
    rgb = photo_like(200, 300)
    data = jpeg_bytes(rgb)
    path = tmp_path / "x.png"  # the wrong extension on purpose: the bytes decide
    path.write_bytes(data)
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True)
    decoded = pillow_rgb(data)
    outs = [proc(x)["pixel_values"] for x in (data, str(path), Image.fromarray(decoded), decoded)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_generated_extreme_aspect_ratios(processor_dir):
    ref = reference(processor_dir, 1003520)
    ours = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=1003520, exact=True)
    for h, w in ((1, 150), (199, 1), (28, 5000), (3000, 20), (1, 1), (4, 4)):
        rgb = photo_like(h, w) if min(h, w) > 1 else np.full((h, w, 3), 77, np.uint8)
        expected = run_reference(ref, rgb)
        got = ours(jpeg_bytes(rgb))
        got_rgb = ours(pillow_rgb(jpeg_bytes(rgb)), return_tensors="np")
        assert np.array_equal(got["image_grid_thw"].numpy(), expected["image_grid_thw"])
        assert np.array_equal(got_rgb["image_grid_thw"], expected["image_grid_thw"])
    with pytest.raises(ValueError, match="aspect ratio"):
        ours(jpeg_bytes(photo_like(2, 500)))


def test_config_from_pretrained_and_overrides(processor_dir):
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir)
    assert proc.config.max_pixels == 12845056 and proc.config.min_pixels == 3136
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, size={"shortest_edge": 100, "longest_edge": 5000})
    assert (proc.config.min_pixels, proc.config.max_pixels) == (100, 5000)
    cfg = fastload.VisionConfig.from_dict({"size": {"shortest_edge": 10, "longest_edge": 20}, "patch_size": 16})
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == (10, 20, 16)


# -- bad input ----------------------------------------------------------------------------
def test_corrupt_inputs_raise_clear_errors():
    need = [IMAGES / "pillow" / "truncated_jpeg.jpg", IMAGES / "libjpeg-turbo" / "monkey12.jpg",
            IMAGES / "pillow_nonjpeg" / "decompression_bomb.gif"]
    for p in need:
        if not p.exists():
            pytest.skip(f"{p} is absent")
    proc = fastload.Qwen2VLImageProcessor()
    with pytest.raises(ImageDecodeError, match="(?i)premature|truncat|corrupt"):
        proc(need[0].read_bytes())
    with pytest.raises(ImageDecodeError, match="precision 12"):
        proc(need[1].read_bytes())
    with pytest.raises(DecompressionBombError, match="decompression bomb"):
        proc(need[2].read_bytes())


def test_generated_corruptions_raise():
    data = jpeg_bytes(photo_like(64, 64))
    proc = fastload.Qwen2VLImageProcessor()
    for bad in (data[: len(data) // 2], b"\xff\xd8\xff" + b"\x00" * 50, b"not an image at all", b"",
                data[:2] + b"junk" * 10 + data[2:100]):
        with pytest.raises(ImageDecodeError):
            proc(bad)


def test_bomb_limit_is_configurable_and_checked_before_decoding():
    big = jpeg_bytes(photo_like(400, 400))
    with pytest.raises(DecompressionBombError):
        fastload.Qwen2VLImageProcessor(max_image_pixels=100_000)(big)
    bomb = png_claiming(20000, 20000)  # its pixels are not there: decoding it would fail otherwise
    with pytest.raises(DecompressionBombError, match="over the limit"):
        fastload.Qwen2VLImageProcessor()(bomb)
    with pytest.raises(DecompressionBombError, match="per-image budget"):
        fastload.Qwen2VLImageProcessor()(png_claiming(9000, 9900))  # under the pixel limit


def test_exif_orientation_matches_pillow():
    for n in range(2, 9):
        path = IMAGES / "pillow" / f"hopper_orientation_{n}.jpg"
        if not path.exists():
            pytest.skip("../shared images absent")
        data = path.read_bytes()
        assert np.array_equal(decode(data), pillow_rgb(data)), n
