"""fastload-shard: every input format, round trips through ShardDataset and webdataset, bad input."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from fastload.cli.shard import main as shard_main
from fastload.shards import ShardDataset
from fastload.writer import ShardWriter

from .conftest import jpeg_bytes, photo_like, png_claiming


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        shard_main([str(a) for a in args] + ["--quiet"])
    return exc.value.code


def samples(prefix) -> list[dict]:
    return list(ShardDataset(sorted(str(p) for p in prefix.parent.glob(prefix.name + "-*.tar"))))


def png_bytes(size=(40, 30), mode="RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 128)[: len(mode)]).save(out, format="PNG")
    return out.getvalue()


def test_mllm_demo_round_trip(mllm_demo, tmp_path):
    out = tmp_path / "demo"
    assert run_cli("--dataset-info", mllm_demo / "dataset_info.json", "--dataset", "mllm_demo", out,
                   "--validate") == 0
    records = json.loads((mllm_demo / "mllm_demo.json").read_text())
    got = samples(out)
    assert len(got) == len(records) == 6
    for sample, record in zip(got, records):
        meta = json.loads(sample["json"])
        assert meta["messages"] == record["messages"]  # English and Chinese text intact
        images = [k for k in sample if k.endswith("jpg")]
        assert len(images) == len(record["images"])
        for key, path in zip(sorted(images), record["images"]):
            assert sample[key] == (mllm_demo / path).read_bytes()
    assert any("\u4e00" <= ch <= "\u9fff" for s in got for ch in s["json"].decode())
    manifest = json.loads((tmp_path / "demo.manifest.json").read_text())
    assert manifest["total"] == 6 and manifest["images"]["count"] == 8
    assert manifest["shards"][0]["samples"] == 6
    theirs = list(wds.WebDataset(str(tmp_path / "demo-000000.tar"), shardshuffle=False))
    assert [t["json"] for t in theirs] == [s["json"] for s in got]


def write_chat_dataset(root, n=12, broken=()):
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"img/{i}.jpg"
        (root / name).write_bytes(jpeg_bytes(photo_like(60 + i, 80, i)))
        rows.append({"messages": [{"role": "user", "content": f"<image>What is {i}?"},
                                  {"role": "assistant", "content": f"It is {i}."}], "images": [name]})
    for i, kind in broken:
        if kind == "missing":
            rows[i]["images"] = ["img/nope.jpg"]
        elif kind == "escape":  # a real image, one folder up
            (root.parent / "outside.jpg").write_bytes(jpeg_bytes(photo_like(60, 80)))
            rows[i]["images"] = ["img/../../outside.jpg"]
        elif kind == "mismatch":
            rows[i]["images"] = rows[i]["images"] * 2
        elif kind == "undecodable":
            (root / f"img/{i}.jpg").write_bytes(b"this is not an image")
    return rows


BAD_RECORDS = {"missing": "cannot read image 'img/nope.jpg'", "escape": "escapes the dataset root",
               "mismatch": "1 <image> placeholders but 2 images", "undecodable": "not a recognised image format"}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_records_skip_or_fail(tmp_path, capsys, kind):
    root = tmp_path / "data"
    rows = write_chat_dataset(root, broken=[(3, kind)])
    src = root / "data.json"
    src.write_text(json.dumps(rows))
    assert run_cli(src, tmp_path / "out" / "s") == 0
    assert len(samples(tmp_path / "out" / "s")) == 11
    err = capsys.readouterr().err
    assert "skipped 1" in err and "record 3" in err and "data.json" in err and BAD_RECORDS[kind] in err
    manifest = json.loads((tmp_path / "out" / "s.manifest.json").read_text())
    assert manifest["skipped"] == 1 and "record 3" in manifest["errors"][0]
    code = run_cli(src, tmp_path / "out2" / "s", "--on-error", "fail")  # exit status 1, with the message
    assert isinstance(code, str) and code.startswith(f"fastload-shard: {src} record 3: ") and BAD_RECORDS[kind] in code


def test_jsonl_with_malformed_line_and_alpaca(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(photo_like(50, 50)))
    lines = [json.dumps({"instruction": "<image>Describe", "input": "briefly", "output": "A square.",
                         "images": ["a.jpg"]}),
             "{not json",
             json.dumps({"instruction": "Say hi", "output": "hi", "history": [["q", "a"]]})]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(lines))
    assert run_cli(src, tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert len(got) == 2
    first = json.loads(got[0]["json"])["messages"]
    assert first == [{"role": "user", "content": "<image>Describe\nbriefly"},
                     {"role": "assistant", "content": "A square."}]
    assert json.loads(got[1]["json"])["messages"][0] == {"role": "user", "content": "q"}
    assert "malformed JSON" in capsys.readouterr().err


def test_sharegpt_tags_from_dataset_info(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes())
    rows = [{"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
             "pics": ["x.png"]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    info = {"mine": {"file_name": "d.json", "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "images": "pics"},
                     "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                              "assistant_tag": "gpt"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    assert run_cli("--dataset-info", tmp_path / "dataset_info.json", "--dataset", "mine", tmp_path / "o") == 0
    (sample,) = samples(tmp_path / "o")
    assert json.loads(sample["json"])["messages"][1] == {"role": "assistant", "content": "yo"}
    assert sample["png"] == png_bytes()


def test_data_directory_rules(tmp_path, capsys):
    """As LLaMA-Factory reads a dataset_info.json: relative image paths from its folder (its
    ``media_dir`` default), wherever the data file is; absolute paths as they are. A relative
    path that leads out of the folder is refused, even to a real image."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "sub").mkdir(parents=True)
    (data / "img").mkdir()
    elsewhere.mkdir()
    inside, outside = jpeg_bytes(photo_like(40, 60, 1)), jpeg_bytes(photo_like(50, 30, 2))
    (data / "img" / "a.jpg").write_bytes(inside)
    (elsewhere / "b.jpg").write_bytes(outside)
    rows = _chat_rows(["img/a.jpg", str(elsewhere / "b.jpg"), "../elsewhere/b.jpg"])
    (data / "sub" / "d.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "sub/d.json", "formatting": "sharegpt",
                                                              "columns": {"messages": "messages", "images": "images"},
                                                              "tags": {"role_tag": "role", "content_tag": "content",
                                                                       "user_tag": "user", "assistant_tag": "assistant"}}}))
    assert run_cli("--dataset-info", data / "dataset_info.json", "--dataset", "d", tmp_path / "o") == 0
    assert [s["jpg"] for s in samples(tmp_path / "o")] == [inside, outside]
    err = capsys.readouterr().err
    assert "skipped 1" in err and "record 2" in err and "'../elsewhere/b.jpg' escapes the dataset root" in err


def test_format_sniffed_from_bytes_not_name(tmp_path):
    (tmp_path / "fake.jpg").write_bytes(png_bytes())  # a PNG named .jpg
    rows = [{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}],
             "images": ["fake.jpg"]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert run_cli(tmp_path / "d.json", tmp_path / "o") == 0
    assert "png" in samples(tmp_path / "o")[0]


def test_image_folder(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imgs" / label / f"{i}.jpg").write_bytes(jpeg_bytes(photo_like(30, 30, i)))
    assert run_cli(tmp_path / "imgs", tmp_path / "o", "--maxcount", 4) == 0
    got = samples(tmp_path / "o")
    assert [json.loads(s["json"])["label"] for s in got] == ["cat"] * 3 + ["dog"] * 3
    assert len(list(tmp_path.glob("o-*.tar"))) == 2


def test_parquet_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    imgs = [jpeg_bytes(photo_like(20, 20, i)) for i in range(3)]
    table = pa.table({"image": [{"bytes": b, "path": None} for b in imgs], "caption": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert run_cli(tmp_path / "d.parquet", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert [s["jpg"] for s in got] == imgs
    assert [json.loads(s["json"])["caption"] for s in got] == ["a", "b", "c"]


def test_parallel_equals_serial_and_rerun_overwrites(tmp_path):
    rows = write_chat_dataset(tmp_path, n=30)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert run_cli(tmp_path / "d.json", tmp_path / "a" / "s", "--maxcount", 7) == 0
    assert run_cli(tmp_path / "d.json", tmp_path / "b" / "s", "--maxcount", 7, "--workers", 2, "--validate") == 0
    a = sorted((tmp_path / "a").glob("s-*.tar"))
    b = sorted((tmp_path / "b").glob("s-*.tar"))
    assert len(a) == 5 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert run_cli(tmp_path / "d.json", tmp_path / "a" / "s", "--maxcount", 100) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s-000000.tar", "s.manifest.json"]


def test_max_pixels_reencodes(tmp_path):
    (tmp_path / "big.png").write_bytes(png_bytes((400, 300), "RGB"))
    rows = [{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "."}],
             "images": ["big.png"]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert run_cli(tmp_path / "d.json", tmp_path / "o", "--max-pixels", 10_000) == 0
    (sample,) = samples(tmp_path / "o")
    im = Image.open(io.BytesIO(sample["jpg"]))
    assert im.width * im.height <= 10_000 and abs(im.width / im.height - 4 / 3) < 0.05


def test_interrupted_writer_leaves_no_whole_looking_shard(tmp_path):
    writer = ShardWriter(str(tmp_path / "s"), maxcount=2)
    for i in range(5):
        writer.write(f"k{i}", {"txt": b"x"})
    writer.abort()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["s-000000.tar", "s-000001.tar"]  # complete ones only, no .tmp, no manifest
    assert len(list(ShardDataset(str(tmp_path / "s-{000000..000001}.tar")))) == 4


def test_missing_input_and_unknown_dataset(tmp_path, mllm_demo, capsys):
    missing = str(tmp_path / "nope.json")
    assert run_cli(missing, tmp_path / "o") == f"fastload-shard: input {missing!r} does not exist"
    assert run_cli("--dataset-info", mllm_demo / "dataset_info.json", "--dataset", "nope", tmp_path / "o") == 1
    assert "no dataset named 'nope'" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    rows = write_chat_dataset(tmp_path, n=3)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    proc = subprocess.run([sys.executable, "-m", "fastload.cli.shard", str(tmp_path / "d.json"),
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 samples" in proc.stderr and "samples/s" in proc.stderr


def _chat_rows(images: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "."}],
             "images": [name]} for name in images]


@pytest.mark.parametrize("flags", [(), ("--validate",), ("--max-pixels", 10_000), ("--workers", 2, "--validate")])
def test_bombs_are_refused_with_every_flag(tmp_path, capsys, flags):
    """--validate and --max-pixels used to decode with no limit; the limits hold with every flag."""
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (tmp_path / "big.png").write_bytes(png_claiming(9000, 9900))  # under the pixel limit, over the memory budget
    (tmp_path / "ok.png").write_bytes(png_bytes((40, 30)))
    (tmp_path / "d.json").write_text(json.dumps(_chat_rows(["bomb.png", "big.png", "ok.png"])))
    assert run_cli(tmp_path / "d.json", tmp_path / "o", *flags) == 0
    assert len(samples(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "skipped 2" in err and "decompression bomb" in err


def _killed_worker(record, **kw):
    if record["id"] == 5:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    from fastload.cli import shard

    return shard._original_convert(record, **kw)


def test_killed_pool_worker_fails_clearly(tmp_path, monkeypatch, capsys):
    """A worker killed mid-conversion (the OOM killer, a signal) ends the run with a message and
    no shard, instead of waiting forever for its tasks."""
    from fastload.cli import shard

    rows = write_chat_dataset(tmp_path, n=40)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    monkeypatch.setattr(shard, "_original_convert", shard.convert, raising=False)
    monkeypatch.setattr(shard, "convert", _killed_worker)
    with pytest.raises(SystemExit, match="worker process died"):
        shard_main([str(tmp_path / "d.json"), str(tmp_path / "o" / "s"), "--workers", "2", "--validate", "--quiet"])
    assert not list((tmp_path / "o").glob("*.tar")) if (tmp_path / "o").exists() else True
