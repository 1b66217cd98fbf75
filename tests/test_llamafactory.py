"""The LLaMA-Factory preset against outputs recorded from LLaMA-Factory 0.9.5 itself
(``benchmarks/parity_llamafactory.py --write-golden``; the package is not needed here), and the
pieces it rests on: the two-step resize, the template in both modes, processors by name, the
collator's padding, and ``fastload-shard --dataset a,b``."""
from __future__ import annotations

import io
import json
import math
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fastload
from fastload.baseline import content_list, reference_processor
from fastload.cli.shard import main as shard_main
from fastload.header import read_header
from fastload.errors import Skip
from fastload.llamafactory import LlamaFactoryImages, load_config
from fastload.shards import ShardDataset
from fastload.text import DroppedSample, SampleError
from fastload.tokenizer import resolve_processor

from .conftest import SHARED, jpeg_bytes, need_shared, photo_like

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "llamafactory_golden.json").read_text())
GOLDEN_IMAGES = GOLDEN_DIR / "llamafactory_images"
IMAGE_PAD = 151655
#: Pixels: fastload equals transformers' PIL backend under the Pillow it runs with; the golden
#: values come from LLaMA-Factory's venv (torchvision backend, Pillow 11.3), whose resize differs
#: from Pillow 13's at hard edges of one image (README: the LLaMA-Factory preset).
PIXEL_MAX, PIXEL_MEAN = 0.3, 0.01


def unrle(pairs: list[list[int]]) -> list[int]:
    return [value for value, count in pairs for _ in range(count)]


def golden_tokens(expected: dict) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's (input_ids, labels) of a recorded record."""
    ids = unrle(GOLDEN["token_lists"][expected["input_ids"]])
    return ids, [t if trained else -100 for t, trained in zip(ids, unrle(expected["trained"]))]


def run_shard(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        shard_main([str(a) for a in args] + ["--quiet"])
    return exc.value.code


def shard_samples(prefix: pathlib.Path) -> dict[int, dict]:
    tars = sorted(str(p) for p in prefix.parent.glob(prefix.name + "-*.tar"))
    return {int(s["__key__"]): s for s in ShardDataset(tars)}


@pytest.fixture(scope="module")
def case(tmp_path_factory, processor_dir):
    """The recorded datasets laid out as LLaMA-Factory read them, sharded by fastload-shard."""
    root = tmp_path_factory.mktemp("lf_case")
    shutil.copytree(GOLDEN_IMAGES, root / "gen")
    (root / "shared").mkdir()
    for name, rel in GOLDEN["shared_images"].items():
        shutil.copy(need_shared(SHARED / rel), root / "shared" / name)
    for name, entry in GOLDEN["dataset_info"].items():
        (root / entry["file_name"]).write_text(json.dumps(GOLDEN["rows"][name], ensure_ascii=False))
    (root / "dataset_info.json").write_text(json.dumps(GOLDEN["dataset_info"]))
    samples = {}
    for name in GOLDEN["dataset_info"]:
        assert run_shard("--dataset-info", root / "dataset_info.json", "--dataset", name, root / name) == 0
        samples[name] = shard_samples(root / name)
    return root, samples


def preset_config(processor_dir, **args) -> dict:
    return {"model_name_or_path": str(processor_dir), "template": "qwen2_vl", **args}


def pad_runs_match_grids(ids: list[int], grids: list[list[int]]) -> bool:
    return ids.count(IMAGE_PAD) == sum(t * h * w // 4 for t, h, w in grids)


def check_pixels(out: dict, expected: dict) -> None:
    flat = out["pixel_values"].reshape(-1)
    n = len(expected["pixel_lf"])  # evenly spread, as benchmarks/parity_llamafactory.py samples them
    ours = flat[[j * (flat.numel() - 1) // (n - 1) for j in range(n)]].numpy()
    for key in ("pixel_pil", "pixel_lf"):
        diff = np.abs(ours - np.array(expected[key]))
        assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN, (key, diff.max(), diff.mean())


def check_record(transform, sample: dict | None, expected: dict, full: bool, where: str) -> None:
    """fastload's preset against LLaMA-Factory's recorded output for one record."""
    verdict = expected["fastload"]
    if verdict == "same drop":
        assert sample is None or isinstance(transform(sample), Skip), where
        return
    if verdict == "image cut":
        lf_ids, _ = golden_tokens(expected)
        assert not pad_runs_match_grids(lf_ids, expected["image_grid_thw"]), "LLaMA-Factory's sample is whole"
        skip = transform(sample)
        assert isinstance(skip, Skip) and skip.cause == "cutoff_len cuts an image's tokens", where
        return
    assert verdict in ("identical", "images left out"), (where, verdict)
    if full:
        out = transform(sample)
        ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
        grids = out["image_grid_thw"].tolist() if "image_grid_thw" in out else []
    else:
        ids, labels, images = transform.tokenize(sample)
        grids = [list(transform.vision_config.grid(*transform.image_processor.input_size(read_header(im))[::-1]))
                 for im in images]
    assert (ids, labels) == golden_tokens(expected), where
    assert pad_runs_match_grids(ids, grids), where
    if verdict == "identical":
        assert grids == expected.get("image_grid_thw", []), where
        if full and grids:
            check_pixels(out, expected)
    else:  # truncation removed some images' tokens whole: their pixels are left out
        assert len(grids) < len(expected["image_grid_thw"]), where


@pytest.mark.parametrize("setting", GOLDEN["settings"], ids=lambda s: s["name"])
def test_preset_matches_llamafactory(setting, case, processor_dir):
    _, samples = case
    transform = fastload.Qwen2VLTransform.from_llamafactory(preset_config(processor_dir, **setting["args"]))
    for dataset in setting["datasets"].split(","):
        key = f"{setting['name']}/{dataset}"
        for i, expected in enumerate(GOLDEN["records"][key]):
            check_record(transform, samples[dataset].get(i), expected, setting["name"] == "default", f"{key} {i}")


def test_collated_batches_match_llamafactory(case, processor_dir):
    """Pad id, a multiple of 8, and LLaMA-Factory's dummy image in a text-only batch."""
    _, samples = case
    config = preset_config(processor_dir)
    transform = fastload.Qwen2VLTransform.from_llamafactory(config)
    collator = fastload.Qwen2VLCollator.from_llamafactory(config)
    for group, expected in zip(GOLDEN["batches"]["groups"], GOLDEN["batches"]["default/kinds"]):
        batch = collator([transform(samples["kinds"][i]) for i in group])
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key].tolist() == [unrle(row) for row in expected[key]], (group, key)
        assert batch["image_grid_thw"].tolist() == expected["image_grid_thw"]
        assert batch["pixel_values"].shape[0] == sum(t * h * w for t, h, w in expected["image_grid_thw"])


# -- the two-step resize ------------------------------------------------------------------------
def llamafactory_regularize(image: Image.Image, max_pixels: int, min_pixels: int) -> Image.Image:
    """LLaMA-Factory 0.9.5's ``Qwen2VLPlugin._preprocess_image`` (mm_plugin.py), verbatim in effect."""
    for bound, over in ((max_pixels, True), (min_pixels, False)):
        if (image.width * image.height > bound) if over else (image.width * image.height < bound):
            factor = math.sqrt(bound / (image.width * image.height))
            image = image.resize((int(image.width * factor), int(image.height * factor)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


def resize_cases() -> list[tuple[str, bytes]]:
    cases = [(p.name, p.read_bytes()) for p in sorted(GOLDEN_IMAGES.iterdir())]
    tiny = io.BytesIO()
    Image.fromarray(photo_like(6, 1500, 3)).save(tiny, format="PNG")  # aspect > 200 after the 28 rule
    return cases + [("wide_1500x6.png", tiny.getvalue()), ("big_3000x2000.jpg", jpeg_bytes(photo_like(2000, 3000)))]


@pytest.mark.parametrize("bounds", [(768 * 768, 32 * 32), (262144, 65536)])
def test_two_step_resize_is_pillows_bit_for_bit(bounds):
    """The kernel's pre-resize chain equals LLaMA-Factory's Pillow calls, and the size the
    header predicts is the size the pixels have (so token counts need no decode)."""
    images = LlamaFactoryImages(*bounds)
    for name, data in resize_cases():
        expected = np.asarray(llamafactory_regularize(Image.open(io.BytesIO(data)), *bounds))
        header = read_header(data)
        ours = images.rgb(data, header, exact=True, max_pixels=None)
        assert ours.shape == expected.shape and images.size(header) == (ours.shape[1], ours.shape[0]), name
        assert np.array_equal(ours, expected), (name, np.abs(ours.astype(int) - expected).max())
        fast = images.rgb(data, header, exact=False, max_pixels=None)  # DCT-scaled decode: same size
        assert fast.shape == expected.shape and np.abs(fast.astype(int) - expected).mean() < 3, name


def test_preset_ignores_exif_orientation(processor_dir):
    """LLaMA-Factory never calls exif_transpose: an Orientation=6 photo keeps its stored layout."""
    data = (GOLDEN_IMAGES / "exif6_1000x700.jpg").read_bytes()
    preset = fastload.Qwen2VLTransform.from_llamafactory(preset_config(processor_dir)).image_processor
    plain = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, exact=True)
    (_, h, w), = preset(data)["image_grid_thw"].tolist()
    assert w > h  # 1000 wide, 700 high, as stored
    (_, h, w), = plain(data)["image_grid_thw"].tolist()
    assert h > w  # transformers' load_image (and fastload's default) turn it upright


# -- the config ---------------------------------------------------------------------------------
def test_config_from_yaml_with_defaults(tmp_path, processor_dir):
    (tmp_path / "train.yaml").write_text(f"model_name_or_path: {processor_dir}\ntemplate: qwen2_vl\n"
                                         "cutoff_len: 1024\ntokenized_path: cache/x\ndataset: a, b\n")
    transform = fastload.Qwen2VLTransform.from_llamafactory(tmp_path / "train.yaml")
    assert transform.cutoff_len == 1024 and transform.image_processor.exact
    assert transform.image_processor.pre_resize == LlamaFactoryImages(768 * 768, 32 * 32)
    collator = fastload.Qwen2VLCollator.from_llamafactory(tmp_path / "train.yaml")
    assert collator.pad_values["input_ids"] == 151643 and collator.pad_to_multiple_of == 8
    with pytest.raises(ValueError, match="qwen2_vl"):
        load_config({"model_name_or_path": str(processor_dir), "template": "qwen"})
    with pytest.raises(ValueError, match="incompatible"):
        load_config(preset_config(processor_dir, mask_history=True, train_on_prompt=True))


# -- processors by name -------------------------------------------------------------------------
def lay_out_hub_cache(home: pathlib.Path, repo: str, processor_dir: pathlib.Path) -> pathlib.Path:
    """The Hugging Face cache layout: blobs behind symlinks in snapshots/COMMIT, refs/main."""
    folder = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    for f in processor_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    return snapshot


def test_processor_by_hub_id_from_the_local_cache(tmp_path, monkeypatch, processor_dir):
    snapshot = lay_out_hub_cache(tmp_path / "hf", "Qwen/Qwen2.5-VL-7B-Instruct", processor_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_processor("Qwen/Qwen2.5-VL-7B-Instruct") == str(snapshot)
    assert resolve_processor("Qwen2.5-VL-7B-Instruct") == str(snapshot)  # the bare name people write
    transform = fastload.Qwen2VLTransform("Qwen2.5-VL-7B-Instruct", max_pixels=200_704)
    sample = {"__key__": "k", "json": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]})}
    assert transform(sample)["input_ids"][0].item() == 151644
    assert fastload.VisionConfig.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct").patch_size == 14
    with pytest.raises(FileNotFoundError) as info:
        resolve_processor("Qwen/Qwen2.5-VL-72B-Instruct")
    assert "not a local folder" in str(info.value) and "models--Qwen--Qwen2.5-VL-72B-Instruct" in str(info.value)


# -- the collator -------------------------------------------------------------------------------
def test_collator_pads_with_the_tokenizers_pad_id(processor_dir):
    collator = fastload.Qwen2VLCollator.from_pretrained(processor_dir, pad_to_multiple_of=8)
    rows = [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
             "labels": torch.tensor(ids)} for ids in ([1, 2, 3], [4] * 9)]
    batch = collator(rows + [Skip("x")])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 3:].eq(151643).all() and batch["labels"][0, 3:].eq(-100).all()


# -- template fidelity in the default (transformers) mode ------------------------------------------
def sample_of(messages, system=None) -> dict:
    meta = {"messages": messages, **({"system": system} if system is not None else {})}
    return {"__key__": "k", "json": json.dumps(meta, ensure_ascii=False)}


def transformers_ids(reference, messages, system=None) -> list[int]:
    msgs = [{"role": m["role"], "content": content_list(m["content"])} for m in messages]
    if system is not None:
        msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] + msgs
    text = reference.apply_chat_template(msgs, tokenize=False)
    return reference(text=[text], return_tensors="np")["input_ids"][0].tolist()


TEMPLATE_CASES = {
    "user_starts_with_newlines": ([{"role": "user", "content": "\n\nWhat?"}, {"role": "assistant", "content": "4"}],
                                  None),
    "answer_starts_with_newline": ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\nA\n"}],
                                   None),
    "space_newline_start": ([{"role": "user", "content": " \nQ"}, {"role": "assistant", "content": "A"}], None),
    "empty_system": ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], ""),
    "ends_with_user": ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                        {"role": "user", "content": "\nmore?"}], None),
    "empty_answer": ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}], None),
}


@pytest.fixture(scope="module")
def reference(processor_dir):
    return reference_processor(processor_dir, 200_704)


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_default_mode_tokenizes_as_transformers(name, reference, processor_dir):
    messages, system = TEMPLATE_CASES[name]
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=200_704)
    ids, labels, _ = transform.tokenize(sample_of(messages, system))
    assert ids == transformers_ids(reference, messages, system)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = transform.load()._tok.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert trained.replace("\n\n", "\n").strip() == "".join(a + "<|im_end|>\n" for a in answers).replace(
        "\n\n", "\n").strip()  # every answer, nothing else (a \n\n token spans header and answer)


def test_default_mode_mask_history_keeps_the_last_exchanges(processor_dir):
    messages = [m for i in range(4) for m in ({"role": "user", "content": f"question {i} " * 20},
                                              {"role": "assistant", "content": f"answer {i}"})]
    sample = sample_of(messages)
    full = fastload.Qwen2VLTransform(processor_dir).tokenize(sample)[0]
    exchange = (len(full) - 20) // 4  # about one exchange
    t = fastload.Qwen2VLTransform(processor_dir, cutoff_len=len(full) - exchange, mask_history=True)
    ids, labels, _ = t.tokenize(sample)
    text = t.load()._tok.decode(ids, skip_special_tokens=False)
    assert "question 0" not in text and "question 3" in text and text.startswith("<|im_start|>system")
    assert t._tok.decode([x for x in labels if x != -100], skip_special_tokens=False) == "answer 3<|im_end|>\n"
    first = fastload.Qwen2VLTransform(processor_dir, cutoff_len=len(full) - exchange)
    assert "question 3" not in first.load()._tok.decode(first.tokenize(sample)[0])


def test_preset_drops_what_llamafactory_drops(processor_dir):
    transform = fastload.Qwen2VLTransform.from_llamafactory(preset_config(processor_dir), on_error="raise")
    ends_with_user = sample_of([{"role": "user", "content": "Q"}])
    skip = transform(ends_with_user)
    assert isinstance(skip, Skip) and skip.cause == "LLaMA-Factory drops: no answer at the end"
    with pytest.raises(DroppedSample):
        transform.num_tokens(ends_with_user)
    with pytest.raises(SampleError, match="JSON tool call"):
        transform(sample_of([{"role": "user", "content": "Q"}, {"role": "function_call", "content": "oops"}]))


def test_preset_skips_are_counted_by_the_loader(tmp_path, processor_dir):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(5)] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert run_shard(tmp_path / "d.json", tmp_path / "o") == 0
    dataset = ShardDataset(str(tmp_path / "o-000000.tar"),
                           transform=fastload.Qwen2VLTransform.from_llamafactory(preset_config(processor_dir)))
    loader = fastload.DataLoader(dataset, batch_size=4, num_workers=0,
                                 collate_fn=fastload.Qwen2VLCollator.from_llamafactory(preset_config(processor_dir)))
    assert sum(len(b["input_ids"]) for b in loader) == 5
    assert loader.stats["by_cause"] == {"LLaMA-Factory drops: no answer at the end": 1}


# -- fastload-shard: several datasets, videos ---------------------------------------------------------
def test_shard_several_datasets_and_skip_videos(tmp_path):
    (tmp_path / "img.jpg").write_bytes(jpeg_bytes(photo_like(40, 60)))
    chat = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]
    (tmp_path / "a.json").write_text(json.dumps([{"messages": chat, "images": ["img.jpg"]}] * 2))
    (tmp_path / "b.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "system": ""},
        {"messages": [{"role": "user", "content": "<video>what?"}, {"role": "assistant", "content": "x"}],
         "videos": ["clip.mp4"]}]))
    entry = {"formatting": "sharegpt", "tags": {"role_tag": "role", "content_tag": "content",
                                                "user_tag": "user", "assistant_tag": "assistant"}}
    info = {"a": {**entry, "file_name": "a.json", "columns": {"messages": "messages", "images": "images"}},
            "b": {**entry, "file_name": "b.json", "columns": {"messages": "messages", "system": "system",
                                                              "videos": "videos"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    assert run_shard("--dataset-info", tmp_path / "dataset_info.json", "--dataset", "a,b", tmp_path / "o") == 0
    got = shard_samples(tmp_path / "o")
    assert sorted(got) == [0, 1, 2]  # numbered on across datasets; the video record skipped
    assert json.loads(got[2]["json"])["system"] == ""  # an empty system is kept: templates tell it from none
    manifest = json.loads((tmp_path / "o.manifest.json").read_text())
    assert manifest["skipped"] == 1 and "video" in manifest["errors"][0]
    (tmp_path / "train.yaml").write_text(f"model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\ntemplate: qwen2_vl\n"
                                         f"dataset: a, b\ndataset_dir: {tmp_path}\n")
    assert run_shard("--llamafactory", tmp_path / "train.yaml", tmp_path / "y") == 0
    assert sorted(shard_samples(tmp_path / "y")) == [0, 1, 2]
