"""fastload-shard --engine ray against the local converter, member by member: mllm_demo, a few
thousand generated records with bad ones among them, output to an S3 server, and the failure
paths. One local Ray (2 CPUs) for the module: it takes seconds to start."""
from __future__ import annotations

import glob
import json
import os
import sys

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from fastload import convert_ray
from fastload.cli.shard import main as shard_main
from fastload.shards import ShardDataset, tar_entries

from .conftest import jpeg_bytes, photo_like
from .servers import S3Server

N_RECORDS, N_IMAGES = 3000, 40
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own settings


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    server = S3Server()
    with server.environment():  # before ray.init: Ray's workers inherit it
        yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        shard_main([str(a) for a in args] + ["--quiet"])
    return exc.value.code


def members(prefix) -> list[tuple[str, bytes]]:
    """Every member of every shard, in shard order: what must be identical."""
    out = []
    for path in sorted(glob.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        with open(path, "rb") as f:
            out += list(tar_entries(f, path))
    return out


def manifest(prefix) -> dict:
    with open(f"{prefix}.manifest.json") as f:
        return json.load(f)


def same_manifest(local: dict, ray_: dict) -> None:
    assert ray_["engine"] == "ray" and "shard_boundaries" in ray_
    for key in ("total", "source", "images", "skipped", "errors"):
        assert ray_[key] == local[key], key
    assert set(local) <= set(ray_)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A JSONL of N_RECORDS chat records over N_IMAGES photos, a few of them bad."""
    root = tmp_path_factory.mktemp("gen")
    (root / "img").mkdir()
    for i in range(N_IMAGES):
        (root / f"img/{i}.jpg").write_bytes(jpeg_bytes(photo_like(48 + i, 64, i)))
    with open(root / "data.jsonl", "w") as f:
        for i in range(N_RECORDS):
            images = [f"img/{i % N_IMAGES}.jpg"] + ([f"img/{(i * 7) % N_IMAGES}.jpg"] if i % 5 == 0 else [])
            if i % 997 == 3:
                images = ["img/missing.jpg"]
            content = "<image>" * len(images) + f"Describe {i}." + ("<image>" if i % 1009 == 5 else "")
            if i % 1201 == 7:
                f.write("{broken json\n")
                continue
            f.write(json.dumps({"messages": [{"role": "user", "content": content},
                                             {"role": "assistant", "content": f"Picture {i}."}],
                                "images": images}) + "\n")
    return root


def test_mllm_demo_same_as_local(mllm_demo, tmp_path):
    common = ["--dataset-info", mllm_demo / "dataset_info.json", "--dataset", "mllm_demo", "--validate"]
    assert run_cli(*common, tmp_path / "local" / "d") == 0
    assert run_cli(*common, tmp_path / "ray" / "d", "--engine", "ray") == 0
    assert members(tmp_path / "ray" / "d") == members(tmp_path / "local" / "d")
    same_manifest(manifest(tmp_path / "local" / "d"), manifest(tmp_path / "ray" / "d"))


def test_generated_records_same_samples_other_boundaries(generated, tmp_path):
    src = generated / "data.jsonl"
    assert run_cli(src, tmp_path / "local" / "d", "--maxcount", 700) == 0
    got = convert_ray.convert(str(src), str(tmp_path / "ray" / "d"), maxcount=700, batch=450, progress=False)
    local = manifest(tmp_path / "local" / "d")
    assert members(tmp_path / "ray" / "d") == members(tmp_path / "local" / "d")
    same_manifest(local, got)
    assert got == manifest(tmp_path / "ray" / "d")
    assert local["skipped"] >= 9 and local["total"] == N_RECORDS - local["skipped"]
    assert [s["samples"] for s in got["shards"]] != [s["samples"] for s in local["shards"]]
    assert max(s["samples"] for s in got["shards"]) <= 700
    assert not glob.glob(str(tmp_path / "ray" / ".*"))  # no staged file left behind


def test_validate_and_reencode_same_bytes(generated, tmp_path):
    src = generated / "data.jsonl"
    args = ["--max-pixels", 2000, "--validate", "--maxcount", 400]
    assert run_cli(src, tmp_path / "local" / "d", *args) == 0
    assert run_cli(src, tmp_path / "ray" / "d", *args, "--engine", "ray") == 0
    assert members(tmp_path / "ray" / "d") == members(tmp_path / "local" / "d")
    same_manifest(manifest(tmp_path / "local" / "d"), manifest(tmp_path / "ray" / "d"))


def test_output_to_an_object_store(generated, s3, tmp_path):
    import s3fs

    s3.upload(str(generated), "converted", [])  # creates the bucket
    src = generated / "data.jsonl"
    assert run_cli(src, tmp_path / "local" / "d", "--maxcount", 1000) == 0
    got = convert_ray.convert(str(src), "s3://converted/ray/d", maxcount=1000, progress=False)
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("converted/ray"))
    assert names == sorted([s["name"] for s in got["shards"]] + ["d.manifest.json"])
    remote = ShardDataset("s3://converted/ray/" + "d-{000000..%06d}.tar" % (len(got["shards"]) - 1))
    local = ShardDataset(str(tmp_path / "local" / "d-{000000..000002}.tar"))
    strip = lambda samples: [{k: v for k, v in s.items() if k != "__url__"} for s in samples]  # noqa: E731
    assert strip(remote) == strip(local)


def test_fail_policy_leaves_nothing(generated, tmp_path, capsys):
    code = run_cli(generated / "data.jsonl", tmp_path / "o" / "d", "--engine", "ray", "--on-error", "fail")
    assert isinstance(code, str) and code.startswith("fastload-shard: ") and " record " in code  # status 1
    assert os.listdir(tmp_path / "o") == []


def test_missing_ray_is_a_clear_message(generated, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert run_cli(generated / "data.jsonl", tmp_path / "o" / "d", "--engine", "ray") == 1
    assert "pip install 'fastload[ray]'" in capsys.readouterr().err
