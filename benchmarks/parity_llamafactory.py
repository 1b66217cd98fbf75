"""fastload's LLaMA-Factory preset against the real LLaMA-Factory 0.9.5, record by record.

    .venv/bin/python benchmarks/parity_llamafactory.py                 # parity report
    .venv/bin/python benchmarks/parity_llamafactory.py --write-golden  # ... and tests/golden/
    .venv/bin/python benchmarks/parity_llamafactory.py --timing 400    # side-by-side timing

LLaMA-Factory 0.9.5 needs transformers<=5.6.0, so it runs in its own venv (``.venv-lf``, made
here on first use: ``pip install llamafactory==0.9.5``). That process runs LLaMA-Factory's own
preprocessing (``get_dataset``'s converter and ``SupervisedDatasetProcessor``, template
``qwen2_vl``) and its SFT collator on every record and setting; this process runs
``fastload-shard`` and ``Qwen2VLTransform.from_llamafactory`` / ``Qwen2VLCollator.from_llamafactory``
on the same files, and prints per setting and record: identical, or the first differing position.
Pixels are compared with LLaMA-Factory's values and with its PIL backend on the same images
(LLaMA-Factory's own backend noise is printed beside them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import SHARED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSOR = str(SHARED / "qwen2_5_vl")
LF_VENV = os.path.join(ROOT, ".venv-lf")
LF_REQUIREMENT = "llamafactory==0.9.5"
GOLDEN = os.path.join(ROOT, "tests", "golden")
GOLDEN_IMAGES = os.path.join(GOLDEN, "llamafactory_images")
GOLDEN_FILE = os.path.join(GOLDEN, "llamafactory_golden.json")
PIXEL_SAMPLES = 64  # pixel values kept per record in the golden file
IMAGE_PAD_ID = 151655

# -- the records ---------------------------------------------------------------------------------
SHARED_IMAGES = {  # name in the case folder -> path under ../shared
    "demo1.jpg": "data/mllm_demo/mllm_demo_data/1.jpg", "demo2.jpg": "data/mllm_demo/mllm_demo_data/2.jpg",
    "demo3.jpg": "data/mllm_demo/mllm_demo_data/3.jpg",
    "origamis.jpg": "images/photos/Origamis.jpg",  # 4080x3072 phone photo
    "screen.jpg": "images/photos/computer_use1.jpeg",  # 3456x2160
    "tall.jpg": "images/photos/docparsing_example7.jpg",  # 1080x2089
    "mobile_rgba.png": "images/photos/mobile_zh_example.jpg",  # PNG RGBA 720x1280, named .jpg
    "cartoon.webp": "images/photos/cartoon_brave_person.jpeg",  # WebP 1138x640
    "hopper_exif6.jpg": "images/pillow/hopper_orientation_6.jpg",
    "transparent.png": "images/pillow_nonjpeg/transparent.png",  # RGBA 200x150
}


def make_images(folder: str) -> None:
    """Small generated images that cover what ../shared lacks (kept in tests/golden so that CI
    reads the very bytes LLaMA-Factory read)."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(13)

    def photo(h, w):
        small = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        return Image.fromarray(small).resize((w, h), Image.BICUBIC)

    def shapes(h, w, mode="RGB"):  # flat regions: PNGs that stay small, with hard edges
        from PIL import ImageDraw

        im = Image.new(mode, (w, h), (40, 90, 160, 255)[: len(mode)])
        draw = ImageDraw.Draw(im)
        for i in range(12):
            box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
            fill = tuple(rng.integers(0, 256, len(mode)).tolist())
            (draw.ellipse if i % 2 else draw.rectangle)((box[0][0], box[1][0], box[0][1], box[1][1]), fill=fill)
        return im

    def save(im, name, **kw):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            im.save(path, **kw)

    exif = Image.Exif()
    exif[0x0112] = 6
    save(photo(700, 1000), "exif6_1000x700.jpg", quality=60, exif=exif)  # landscape stored, portrait shown
    save(photo(900, 1200), "big_1200x900.jpg", quality=60)  # > 768x768
    save(photo(300, 20), "thin_20x300.jpg", quality=90)  # a side below 28
    save(photo(200, 260).convert("L"), "gray_260x200.jpg", quality=90)
    rgba = np.asarray(shapes(400, 600, "RGBA")).copy()
    rgba[:, :, 3] = np.tile(np.linspace(0, 255, 600).astype(np.uint8) // 32 * 32, (400, 1))
    rgba[:, :100, :3] = 0  # fully transparent black: white in transformers, black in LLaMA-Factory
    save(Image.fromarray(rgba, "RGBA"), "alpha_600x400.png")
    save(shapes(120, 160).convert("P", palette=Image.ADAPTIVE), "palette_160x120.png")
    save(shapes(800, 900, "RGBA"), "rgba_900x800.png")  # alpha mode: resized before conversion


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}])


def kinds_rows() -> list[dict]:
    """One record per kind the issue lists (images named as in the case folder)."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": "北京"}}, ensure_ascii=False)
    return [
        {"messages": [_u("<image><image>Compare these two."), _a("The left one is brighter.")],
         "images": ["shared/demo1.jpg", "shared/demo2.jpg"]},
        {"messages": [_u("Hello"), _a("Hi!"), _u("Now look: <image> what is it?"), _a("A photo."),
                      _u("And this?<image>"), _a("Another one.")],
         "images": ["shared/demo3.jpg", "gen/big_1200x900.jpg"]},
        {"messages": [_u("<image>这是什么？请详细描述。"), _a("这是一张照片，颜色很丰富。")], "images": ["shared/demo2.jpg"]},
        {"messages": [_u("<image>Describe."), _a("Ok.")], "images": ["shared/demo1.jpg"],
         "system": "You are a meticulous describer."},
        {"messages": [_u("Say hi."), _a("hi")], "system": ""},
        {"messages": [_u("Say hi."), _a("hi")]},
        {"messages": [{"role": "system", "content": "Answer in French."}, _u("Hello?"), _a("Bonjour.")]},
        {"messages": [_u("Anything?"), _a(""), _u("Still nothing?"), _a("")]},
        {"messages": [_u("What is the weather in Beijing?"), {"role": "function_call", "content": call},
                      {"role": "observation", "content": '{"temp": 21}'}, _a("It is 21°C in Beijing.")],
         "tools": TOOLS},
        {"messages": [_u("Weather?"), {"role": "function_call",
                                       "content": "Let me check.<tool_call>" + call + "</tool_call>"},
                      {"role": "observation", "content": "sunny"}, _a("Sunny.")], "tools": TOOLS},
        {"messages": [_u("\n\nWhat is this?<image>"), _a("\nA photo.\n"), _u("\nMore?"), _a("\n\nNo.")],
         "images": ["shared/demo3.jpg"]},
        {"messages": [_u("<image>What is on the screen?"), _a("A desktop with windows.")],
         "images": ["shared/screen.jpg"]},
        {"messages": [_u("<image>Describe the photo."), _a("Origami figures on a table.")],
         "images": ["shared/origamis.jpg"]},
        {"messages": [_u("<image>Read it."), _a("A tall document.")], "images": ["shared/tall.jpg"]},
        {"messages": [_u("<image>Rotated?"), _a("Yes, EXIF says so.")], "images": ["gen/exif6_1000x700.jpg"]},
        {"messages": [_u("<image>Small rotated."), _a("Hopper.")], "images": ["shared/hopper_exif6.jpg"]},
        {"messages": [_u("<image>Transparent?"), _a("Partly.")], "images": ["gen/alpha_600x400.png"]},
        {"messages": [_u("<image>Alpha PNG."), _a("A phone screen.")], "images": ["shared/mobile_rgba.png"]},
        {"messages": [_u("<image>Alpha, small."), _a("Yes.")], "images": ["shared/transparent.png"]},
        {"messages": [_u("<image>Big alpha."), _a("Yes.")], "images": ["gen/rgba_900x800.png"]},
        {"messages": [_u("<image>WebP."), _a("A cartoon.")], "images": ["shared/cartoon.webp"]},
        {"messages": [_u("<image>Thin."), _a("A strip.")], "images": ["gen/thin_20x300.jpg"]},
        {"messages": [_u("<image>Gray."), _a("Gray.")], "images": ["gen/gray_260x200.jpg"]},
        {"messages": [_u("<image>Palette."), _a("Few colors.")], "images": ["gen/palette_160x120.png"]},
        {"messages": [_u("Only a question")]},
        {"messages": [_u("Q1"), _a("A1"), _u("Q2 without answer")]},
        {"messages": [_a("I start."), _u("Odd.")]},
        {"messages": [_u("Long story: " + "once upon a time " * 60), _a("And the end " * 40),
                      _u("<image>Now this."), _a("Done " * 30)], "images": ["shared/demo1.jpg"]},
    ]


def mllm_demo_rows() -> list[dict]:
    with open(os.path.join(SHARED, "data", "mllm_demo", "mllm_demo.json")) as f:
        rows = json.load(f)
    for row in rows:
        row["images"] = ["shared/demo" + os.path.basename(p) for p in row["images"]]
    return rows


DATASET_INFO = {
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}},
    "kinds": {"file_name": "kinds.json", "formatting": "sharegpt",
              "columns": {"messages": "messages", "images": "images", "system": "system", "tools": "tools"},
              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                       "assistant_tag": "assistant", "observation_tag": "observation",
                       "function_tag": "function_call", "system_tag": "system"}},
}

SETTINGS = [  # (name, datasets, LLaMA-Factory arguments beyond the base)
    ("default", "mllm_demo,kinds", {}),
    ("mask_history", "mllm_demo,kinds", {"mask_history": True}),
    ("train_on_prompt", "mllm_demo,kinds", {"train_on_prompt": True}),
    ("cutoff_1024", "kinds", {"cutoff_len": 1024}),
    ("cutoff_256", "mllm_demo,kinds", {"cutoff_len": 256}),
    ("cutoff_64", "mllm_demo,kinds", {"cutoff_len": 64}),
    ("cutoff_256_mask_history", "mllm_demo,kinds", {"cutoff_len": 256, "mask_history": True}),
    ("pixels_256k_64k", "kinds", {"image_max_pixels": 262144, "image_min_pixels": 65536}),
    ("default_system", "kinds", {"default_system": "Be terse."}),
]


def base_args(case_dir: str) -> dict:
    return {"model_name_or_path": PROCESSOR, "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "template": "qwen2_vl", "dataset_dir": case_dir, "cutoff_len": 2048, "overwrite_cache": True,
            "output_dir": os.path.join(case_dir, "lf_out"), "report_to": "none"}


def build_case_dir(case_dir: str) -> dict:
    """Writes the datasets, dataset_info.json and images; returns the rows per dataset."""
    os.makedirs(os.path.join(case_dir, "shared"), exist_ok=True)
    make_images(GOLDEN_IMAGES)
    shutil.copytree(GOLDEN_IMAGES, os.path.join(case_dir, "gen"), dirs_exist_ok=True)
    for name, rel in SHARED_IMAGES.items():
        shutil.copy(os.path.join(SHARED, rel), os.path.join(case_dir, "shared", name))
    rows = {"mllm_demo": mllm_demo_rows(), "kinds": kinds_rows()}
    for name, entry in DATASET_INFO.items():
        with open(os.path.join(case_dir, entry["file_name"]), "w") as f:
            json.dump(rows[name], f, ensure_ascii=False, indent=1)
    with open(os.path.join(case_dir, "dataset_info.json"), "w") as f:
        json.dump(DATASET_INFO, f, indent=1)
    return rows


# -- the LLaMA-Factory side (runs in .venv-lf) -----------------------------------------------------
def ensure_lf_venv() -> str:
    python = os.path.join(LF_VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {LF_VENV} with {LF_REQUIREMENT} (a few minutes, ~7 GB)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", LF_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", LF_REQUIREMENT], check=True)
    return python


_PRISTINE_TEMPLATES: dict = {}


def _lf_modules(args: dict):
    """(tokenizer module, template, data/model/training args) for LLaMA-Factory arguments.
    LLaMA-Factory edits its registered template in place (``default_system``), so each setting
    starts from a pristine copy, as each training run starts in a fresh process."""
    import copy

    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    _PRISTINE_TEMPLATES.setdefault("all", copy.deepcopy(TEMPLATES))
    TEMPLATES.update(copy.deepcopy(_PRISTINE_TEMPLATES["all"]))
    model_args, data_args, training_args, _, _ = get_train_args(args)
    modules = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(modules["tokenizer"], data_args)
    return modules, template, model_args, data_args, training_args


def lf_collator(modules, template):
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask
    from llamafactory.extras.constants import IGNORE_INDEX

    return SFTDataCollatorWith4DAttentionMask(template=template, model=None, pad_to_multiple_of=8,
                                              label_pad_token_id=IGNORE_INDEX, **modules)


def lf_records(args: dict, dataset: str) -> list[dict]:
    """Each row of ``dataset`` through LLaMA-Factory's converter, SupervisedDatasetProcessor and
    collator: input_ids, labels, pixel values (its default backend and its PIL backend)."""
    import torch
    from llamafactory.data.loader import _get_dataset_processor, _get_merged_dataset
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    modules, template, model_args, data_args, training_args = _lf_modules({**args, "dataset": dataset})
    aligned = _get_merged_dataset([dataset], model_args, data_args, training_args, "sft")
    processor = _get_dataset_processor(data_args, "sft", template, modules["tokenizer"], modules["processor"])
    collator = lf_collator(modules, template)
    pil = Qwen2VLImageProcessorPil.from_pretrained(args["model_name_or_path"])
    plugin, out = template.mm_plugin, []
    for row in aligned:
        try:
            enc = processor.preprocess_dataset({k: [v] for k, v in row.items()})
        except Exception as exc:  # LLaMA-Factory itself fails on this record
            out.append({"status": "error", "error": f"{type(exc).__name__}: {exc}"})
            continue
        if not enc["input_ids"]:
            out.append({"status": "dropped"})
            continue
        feature = {k: enc[k][0] for k in ("input_ids", "attention_mask", "labels", "images", "videos", "audios")}
        record = {"status": "ok", "input_ids": feature["input_ids"], "labels": feature["labels"]}
        images = feature["images"] or []
        if images:
            batch = collator([dict(feature)])
            regular = plugin._regularize_images(images, image_max_pixels=model_args.image_max_pixels,
                                                image_min_pixels=model_args.image_min_pixels)["images"]
            record.update(image_grid_thw=batch["image_grid_thw"].tolist(), pixel_values=batch["pixel_values"],
                          pixel_values_pil=torch.as_tensor(pil(regular, return_tensors="pt")["pixel_values"]),
                          backend=type(modules["processor"].image_processor).__name__)
        out.append(record)
    return out


def lf_batches(args: dict, dataset: str, groups: list[list[int]]) -> list[dict]:
    """LLaMA-Factory's collator on groups of rows (text-only ones get its dummy image)."""
    from llamafactory.data.loader import _get_dataset_processor, _get_merged_dataset

    modules, template, model_args, data_args, training_args = _lf_modules({**args, "dataset": dataset})
    aligned = _get_merged_dataset([dataset], model_args, data_args, training_args, "sft")
    processor = _get_dataset_processor(data_args, "sft", template, modules["tokenizer"], modules["processor"])
    collator, out = lf_collator(modules, template), []
    for group in groups:
        features = []
        for i in group:
            enc = processor.preprocess_dataset({k: [v] for k, v in aligned[i].items()})
            features.append({k: enc[k][0] for k in ("input_ids", "attention_mask", "labels", "images",
                                                     "videos", "audios")})
        out.append({k: v for k, v in collator(features).items()})
    return out


def lf_side(case_dir: str, out_path: str) -> None:
    import llamafactory
    import torch
    import transformers

    results = {"versions": {"llamafactory": llamafactory.__version__, "transformers": transformers.__version__,
                            "torch": torch.__version__}, "records": {}, "batches": {}}
    for name, datasets, extra in SETTINGS:
        args = {**base_args(case_dir), **extra}
        for dataset in datasets.split(","):
            results["records"][f"{name}/{dataset}"] = lf_records(args, dataset)
    results["batches"]["default/kinds"] = lf_batches(base_args(case_dir), "kinds", BATCH_GROUPS)
    torch.save(results, out_path)


BATCH_GROUPS = [[0, 1, 2], [4, 5, 6], [3, 10]]  # kinds rows: images, text only (dummy image), mixed


# -- the fastload side ---------------------------------------------------------------------------
def shard(case_dir: str, dataset: str, out_prefix: str) -> dict:
    """fastload-shard on one dataset of the case folder; returns {row id: raw shard sample}."""
    from fastload.cli.shard import main as shard_main
    from fastload.shards import ShardDataset

    try:
        shard_main(["--dataset-info", os.path.join(case_dir, "dataset_info.json"), "--dataset", dataset,
                    out_prefix, "--quiet"])
    except SystemExit as exc:
        assert exc.code == 0, exc.code
    tars = sorted(p for p in os.listdir(os.path.dirname(out_prefix))
                  if p.startswith(os.path.basename(out_prefix)) and p.endswith(".tar"))
    samples = ShardDataset([os.path.join(os.path.dirname(out_prefix), t) for t in tars])
    return {int(s["__key__"]): s for s in samples}


def fastload_record(transform, sample) -> dict:
    """The preset's output for one sample, as a comparable record."""
    from fastload.errors import Skip

    if sample is None:
        return {"status": "not sharded"}
    try:
        out = transform(sample)
    except Exception as exc:
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    if isinstance(out, Skip):
        return {"status": "skipped", "cause": out.cause, "error": out.message}
    record = {"status": "ok", "input_ids": out["input_ids"].tolist(), "labels": out["labels"].tolist()}
    if "pixel_values" in out:
        record.update(image_grid_thw=out["image_grid_thw"].tolist(), pixel_values=out["pixel_values"])
    return record


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(lf: dict, fl: dict) -> tuple[str, str]:
    """(verdict, detail): identical / differs / both drop / documented."""
    if lf["status"] != "ok" or fl["status"] != "ok":
        if lf["status"] in ("dropped", "error") and fl["status"] in ("skipped", "not sharded"):
            return "same drop", f"LLaMA-Factory {lf['status']}; fastload {fl['status']} ({fl.get('cause', '')})"
        if fl["status"] == "skipped" and fl.get("cause") == "cutoff_len cuts an image's tokens":
            return "image cut", "fastload skips: cutoff_len cuts an image's tokens (LLaMA-Factory's sample is broken)"
        return "DIFFERS", (f"LLaMA-Factory {lf['status']} {lf.get('error', '')} / "
                           f"fastload {fl['status']} {fl.get('error', '')}")
    for key in ("input_ids", "labels"):
        pos = first_difference(lf[key], fl[key])
        if pos is not None:
            return "DIFFERS", (f"{key} differ at {pos} (of {len(lf[key])}/{len(fl[key])}): "
                               f"LLaMA-Factory {lf[key][pos:pos + 3]} fastload {fl[key][pos:pos + 3]}")
    if lf.get("image_grid_thw") != fl.get("image_grid_thw"):
        if lf["input_ids"].count(IMAGE_PAD_ID) < sum(t * h * w // 4 for t, h, w in lf["image_grid_thw"]):
            return "images left out", ("tokens identical; truncation removed an image's tokens whole: fastload leaves "
                                  f"its pixels out ({fl.get('image_grid_thw')}), LLaMA-Factory's would not match")
        return "DIFFERS", f"image_grid_thw {lf.get('image_grid_thw')} vs {fl.get('image_grid_thw')}"
    if "pixel_values" not in lf:
        return "identical", "tokens identical"
    vs_lf = float((lf["pixel_values"] - fl["pixel_values"]).abs().max())
    vs_pil = float((lf["pixel_values_pil"] - fl["pixel_values"]).abs().max())
    noise = float((lf["pixel_values"] - lf["pixel_values_pil"]).abs().max())
    return "identical", (f"tokens and grids identical; pixels max|diff| {vs_lf:.4f} vs LLaMA-Factory "
                         f"({lf['backend']}), {vs_pil:.2g} vs its PIL backend; its own backend noise {noise:.4f}")


def run_parity(case_dir: str, lf_results: dict) -> tuple[dict, dict]:
    """Prints the per-record report; returns the verdicts per setting and their counts."""
    import fastload

    sharded = {ds: shard(case_dir, ds, os.path.join(case_dir, "tars", ds)) for ds in DATASET_INFO}
    counts, verdicts = {}, {}
    for name, datasets, extra in SETTINGS:
        config = {**base_args(case_dir), **extra}
        transform = fastload.Qwen2VLTransform.from_llamafactory(config)
        for dataset in datasets.split(","):
            key = f"{name}/{dataset}"
            verdicts[key] = []
            for i, lf in enumerate(lf_results["records"][key]):
                verdict, detail = compare(lf, fastload_record(transform, sharded[dataset].get(i)))
                counts[verdict] = counts.get(verdict, 0) + 1
                verdicts[key].append(verdict)
                print(f"{key:40s} record {i:2d}: {verdict:15s} {detail}")
    return verdicts, counts


def run_batches(case_dir: str, lf_results: dict) -> int:
    """fastload's preset collator against LLaMA-Factory's on the same groups; returns mismatches."""
    import fastload

    config = base_args(case_dir)
    transform = fastload.Qwen2VLTransform.from_llamafactory(config)
    collator = fastload.Qwen2VLCollator.from_llamafactory(config)
    sharded = shard(case_dir, "kinds", os.path.join(case_dir, "tars", "kinds_batches"))
    bad = 0
    for group, lf in zip(BATCH_GROUPS, lf_results["batches"]["default/kinds"]):
        ours = collator([transform(sharded[i]) for i in group])
        same = all(ours[k].tolist() == lf[k].tolist() for k in ("input_ids", "attention_mask", "labels",
                                                                "image_grid_thw"))
        pixels = float((ours["pixel_values"] - lf["pixel_values"]).abs().max())
        bad += not same
        print(f"batch {group}: input_ids/attention_mask/labels/image_grid_thw "
              f"{'identical' if same else 'DIFFER'} (shape {tuple(ours['input_ids'].shape)}); "
              f"pixels max|diff| {pixels:.4f}")
    return bad


# -- golden outputs for CI -------------------------------------------------------------------------
def rle(values: list[int]) -> list[list[int]]:
    """Run-length pairs [value, count]: image pads and masked labels compress to a few pairs."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def pixel_index(numel: int, n: int = PIXEL_SAMPLES) -> list[int]:
    """Evenly spread positions in the flattened pixel_values (the tests use the same)."""
    return [j * (numel - 1) // (n - 1) for j in range(n)]


def pixel_sample(pixels) -> list[float]:
    flat = pixels.reshape(-1)
    return [round(float(flat[i]), 6) for i in pixel_index(flat.numel())]


def trained_mask(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Labels as run lengths of "trained" (labels are the ids there, -100 elsewhere)."""
    assert all(label in (token, -100) for token, label in zip(ids, labels))
    return rle([int(label != -100) for label in labels])


def golden_record(lf: dict, verdict: str, token_lists: dict, with_pixels: bool) -> dict:
    record = {"status": lf["status"], "fastload": verdict}
    if lf["status"] == "ok":
        ids = json.dumps(rle(lf["input_ids"]))
        record.update(input_ids=token_lists.setdefault(ids, len(token_lists)),
                      trained=trained_mask(lf["input_ids"], lf["labels"]))
    if "pixel_values" in lf:
        record["image_grid_thw"] = lf["image_grid_thw"]
        if with_pixels:
            record.update(pixel_lf=pixel_sample(lf["pixel_values"]), pixel_pil=pixel_sample(lf["pixel_values_pil"]))
    return record


def write_golden(rows: dict, lf_results: dict, verdicts: dict) -> None:
    """input_ids as indexes into ``token_lists`` (run-length pairs, each distinct list once),
    labels as run lengths of "trained", pixel samples for the default setting only."""
    token_lists: dict[str, int] = {}
    records = {k: [golden_record(r, verdict, token_lists, k.startswith("default/"))
                   for r, verdict in zip(v, verdicts[k])] for k, v in lf_results["records"].items()}
    golden = {"about": "LLaMA-Factory outputs recorded by benchmarks/parity_llamafactory.py --write-golden",
              "versions": lf_results["versions"], "dataset_info": DATASET_INFO, "rows": rows,
              "shared_images": SHARED_IMAGES,
              "settings": [{"name": n, "datasets": d, "args": a} for n, d, a in SETTINGS],
              "token_lists": [json.loads(t) for t in token_lists], "records": records,
              "batches": {"groups": BATCH_GROUPS, "default/kinds": [
                  {k: v.tolist() for k, v in b.items() if k != "pixel_values"}
                  for b in lf_results["batches"]["default/kinds"]]}}
    for batch in golden["batches"]["default/kinds"]:
        for key in ("input_ids", "labels", "attention_mask"):
            batch[key] = [rle(row) for row in batch[key]]
    with open(GOLDEN_FILE, "w") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {GOLDEN_FILE} ({os.path.getsize(GOLDEN_FILE) / 1e3:.0f} kB)")


# -- timing ----------------------------------------------------------------------------------------
TIMING_IMAGES = ["shared/demo1.jpg", "shared/demo2.jpg", "shared/demo3.jpg", "shared/origamis.jpg",
                 "shared/screen.jpg", "shared/tall.jpg", "shared/mobile_rgba.png", "shared/cartoon.webp",
                 "gen/big_1200x900.jpg", "gen/exif6_1000x700.jpg"]


def timing_rows(n: int) -> list[dict]:
    """``n`` one- or two-image conversations over the real photos, as a user's dataset has them."""
    rows = []
    for i in range(n):
        first, second = TIMING_IMAGES[i % len(TIMING_IMAGES)], TIMING_IMAGES[(i * 7 + 3) % len(TIMING_IMAGES)]
        if i % 3 == 0:
            rows.append({"messages": [_u("<image><image>What differs between these?"),
                                      _a(f"Sample {i}: the second one is " + "quite different. " * (i % 5))],
                         "images": [first, second]})
        else:
            rows.append({"messages": [_u(f"<image>Describe picture {i}."), _a("It shows " + "details " * (i % 9)),
                                      _u("Anything else?"), _a("No.")], "images": [first]})
    return rows


def timing_args(case_dir: str) -> dict:
    return {**base_args(case_dir), "dataset": "timing", "preprocessing_num_workers": 2}


def lf_timing(case_dir: str, out_path: str, batch_size: int) -> None:
    """LLaMA-Factory as a user runs it: get_dataset with 2 preprocessing workers, then its
    collator in a torch DataLoader with 2 workers; seconds to the first batch and to all."""
    import torch
    from llamafactory.data import get_dataset

    start = time.perf_counter()
    modules, template, model_args, data_args, training_args = _lf_modules(timing_args(case_dir))
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **modules)["train_dataset"]
    prep = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2,
                                         collate_fn=lf_collator(modules, template))
    first, tokens, samples = None, 0, 0
    for batch in loader:
        first = first or time.perf_counter() - start
        tokens += int((batch["attention_mask"] == 1).sum())
        samples += batch["input_ids"].shape[0]
    torch.save({"prep": prep, "first": first, "all": time.perf_counter() - start, "tokens": tokens,
                "samples": samples}, out_path)


def fastload_timing(case_dir: str, batch_size: int, exact: bool = True) -> dict:
    """fastload as a switching user runs it: fastload-shard from the same dataset_info, then the
    preset transform (``exact=False``: DCT-scaled decoding, approximate pixels) and collator in
    fastload.DataLoader with 2 workers."""
    import fastload
    from fastload.cli.shard import main as shard_main

    start = time.perf_counter()
    prefix = os.path.join(case_dir, "tars", "timing")
    try:
        shard_main(["--dataset-info", os.path.join(case_dir, "dataset_info.json"), "--dataset", "timing",
                    prefix, "--quiet"])
    except SystemExit as exc:
        assert exc.code == 0
    prep = time.perf_counter() - start
    config = timing_args(case_dir)
    transform = fastload.Qwen2VLTransform.from_llamafactory(config, exact=exact)
    dataset = fastload.ShardDataset(f"{prefix}-000000.tar", transform=transform)
    loader = fastload.DataLoader(dataset, batch_size=batch_size, num_workers=2,
                                 collate_fn=fastload.Qwen2VLCollator.from_llamafactory(config))
    first, tokens, samples = None, 0, 0
    for batch in loader:
        first = first or time.perf_counter() - start
        tokens += int((batch["attention_mask"] == 1).sum())
        samples += batch["input_ids"].shape[0]
    return {"prep": prep, "first": first, "all": time.perf_counter() - start, "tokens": tokens,
            "samples": samples, "skipped": loader.stats["skipped"]}


def run_timing(case_dir: str, n: int, batch_size: int, reuse_lf: bool = False) -> None:
    rows = timing_rows(n)
    with open(os.path.join(case_dir, "timing.json"), "w") as f:
        json.dump(rows, f)
    info = json.load(open(os.path.join(case_dir, "dataset_info.json")))
    info["timing"] = {**DATASET_INFO["mllm_demo"], "file_name": "timing.json"}
    with open(os.path.join(case_dir, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    out = os.path.join(case_dir, "lf_timing.pt")
    if not (reuse_lf and os.path.exists(out)):
        subprocess.run([ensure_lf_venv(), __file__, "--lf-timing", case_dir, out, "--batch-size", str(batch_size)],
                       check=True, env=_lf_env(case_dir))
    import torch

    lf = torch.load(out)
    runs = [("LLaMA-Factory", lf), ("fastload", fastload_timing(case_dir, batch_size)),
            ("fastload fast", fastload_timing(case_dir, batch_size, exact=False))]
    print(f"{n} samples, batch size {batch_size}, 2 workers each")
    for label, r in runs:
        print(f"  {label:14s} preprocessing/conversion {r['prep']:6.1f} s, first batch {r['first']:6.1f} s, "
              f"all {r['samples']} samples as tensors {r['all']:6.1f} s, {r['tokens']} attended tokens")
    for label, r in runs[1:]:
        print(f"  {label}: first batch {lf['first'] / r['first']:.1f}x, all {lf['all'] / r['all']:.1f}x sooner; "
              f"tokens {'identical' if lf['tokens'] == r['tokens'] else 'DIFFER'}")


def _lf_env(case_dir: str) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(case_dir, "hf_datasets"), TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write-golden", action="store_true", help="record LLaMA-Factory's outputs into tests/golden/")
    p.add_argument("--timing", type=int, metavar="N", help="time N samples side by side instead")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep", help="work in this folder and keep it")
    p.add_argument("--lf-results", action="store_true",
                   help="reuse LLaMA-Factory's results saved in --keep's folder by an earlier run")
    p.add_argument("--lf-side", nargs=2, metavar=("CASE_DIR", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--lf-timing", nargs=2, metavar=("CASE_DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lf_side:
        return lf_side(*args.lf_side)
    if args.lf_timing:
        return lf_timing(*args.lf_timing, args.batch_size)
    if not os.path.isdir(PROCESSOR):
        raise SystemExit(f"{SHARED} is absent: the parity check needs ../shared")
    case_dir = args.keep or tempfile.mkdtemp(prefix="lf_parity_")
    try:
        rows = build_case_dir(case_dir)
        if args.timing:
            return run_timing(case_dir, args.timing, args.batch_size, args.lf_results)
        out = os.path.join(case_dir, "lf_results.pt")
        if not (args.lf_results and os.path.exists(out)):
            subprocess.run([ensure_lf_venv(), __file__, "--lf-side", case_dir, out], check=True,
                           env=_lf_env(case_dir))
        import torch

        lf_results = torch.load(out, weights_only=False)
        print(f"LLaMA-Factory {lf_results['versions']}")
        verdicts, counts = run_parity(case_dir, lf_results)
        bad_batches = run_batches(case_dir, lf_results)
        print(f"summary: {counts}; collated batches differing: {bad_batches}")
        if args.write_golden:
            write_golden(rows, lf_results, verdicts)
    finally:
        if not args.keep:
            shutil.rmtree(case_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
