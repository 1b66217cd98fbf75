"""Running out of shared memory: a small /dev/shm (docker's default is 64 MB) must not limit
the loader nor kill its workers with SIGBUS; and running out of file descriptors must say
what to change.

The loader tests run a script in a private mount namespace with its own small tmpfs on
/dev/shm (``unshare -m``, root only), so the real kernel paths are exercised: no mocks.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap

import pytest

from fastload.loader import shm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import gc, json, os, sys, warnings
    import torch
    import fastload

    MB = 1 << 20
    sizes = json.loads(sys.argv[1])  # bytes of float32 per item
    fallback = os.environ["FASTLOAD_SHM_FALLBACK_DIR"]

    def item(i):
        n = sizes[i] // 4
        return torch.arange(n, dtype=torch.float32).remainder_(1000).add_(1000 * i)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(sizes)
        def __getitem__(self, i):
            return {"i": i, "x": item(i)}

    def collate(samples):  # items have different lengths: concatenate, keep the indices
        return {"i": [s["i"] for s in samples], "x": torch.cat([s["x"] for s in samples])}

    def used(path):
        st = os.statvfs(path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def ours(folder):
        return sorted(n for n in os.listdir(folder) if n.startswith("fastload-"))

    out = {"batches": 0, "bad": [], "shm_used_max": 0, "largest": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dl = fastload.DataLoader(Items(), batch_size=2, num_workers=2, collate_fn=collate)
        for b in dl:
            want = torch.cat([item(i) for i in b["i"]])
            if not torch.equal(b["x"], want):
                out["bad"].append(b["i"])
            out["batches"] += 1
            out["largest"] = max(out["largest"], b["x"].nbytes)
            out["shm_used_max"] = max(out["shm_used_max"], used("/dev/shm"))
            del b, want
        del dl
        gc.collect()
    out["warnings"] = [str(w.message) for w in caught if "fastload" in str(w.message)]
    out["shm_size"] = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
    out["left_shm"], out["left_fallback"] = ours("/dev/shm"), ours(fallback)
    out["shm_used_after"] = used("/dev/shm")
    print("RESULT " + json.dumps(out))
''')


def _run_in_small_shm(tmp_path, shm_mb: int, sizes: list[int], script: str = SCRIPT) -> dict:
    """Runs SCRIPT with a private ``shm_mb`` MB tmpfs on /dev/shm; skips where that is impossible."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        pytest.skip("needs Linux with util-linux `unshare`")
    if os.geteuid() != 0:
        pytest.skip("needs root to give the test its own small /dev/shm (unshare -m + mount tmpfs)")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs on /dev/shm (unshare -m): {probe.stderr.strip()}")
    path = tmp_path / "small_shm.py"
    path.write_text(script)
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    env = {**os.environ, "FASTLOAD_SHM_FALLBACK_DIR": str(fallback),
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = (f"mount -t tmpfs -o size={shm_mb}m tmpfs /dev/shm && "
           f'exec "{sys.executable}" "{path}" \'{json.dumps(sizes)}\'')
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    result["fallback_files"] = os.listdir(fallback)
    return result


MB = 1 << 20


def test_batches_larger_than_shm_arrive_without_touching_it(tmp_path):
    # 64 MB of /dev/shm (docker's default); batches 1 and 2 (one per worker) are 100 MB. Segments
    # are memfds: /dev/shm's size does not limit them and nothing is ever named there.
    sizes = [MB // 4, MB // 2, 50 * MB, 50 * MB, 50 * MB, 50 * MB, MB, MB // 4, MB // 2, MB]
    r = _run_in_small_shm(tmp_path, 64, sizes)
    assert r["shm_size"] == 64 * MB
    assert r["batches"] == 5 and r["bad"] == []
    assert r["largest"] == 100 * MB > r["shm_size"]
    assert r["warnings"] == []
    assert r["shm_used_max"] == 0
    assert r["left_shm"] == [] and r["left_fallback"] == [] and r["fallback_files"] == []


LADDER = textwrap.dedent('''
    import json, os
    from fastload.loader import shm
    MB = 1 << 20
    lid = shm.new_loader_id()
    got = []
    for slot, (size, least) in enumerate([(8 * MB, None), (12 * MB, 6 * MB), (20 * MB, 20 * MB)]):
        path, n, buf = shm.create_segment(shm.segment_path(lid, 0, slot, 1), size, least)
        buf[:] = bytes(n)  # touch every page: no SIGBUS, the space was reserved
        got.append([os.path.dirname(path), n])
    left = sorted(os.listdir("/dev/shm")) + sorted(os.listdir(shm.fallback_dir()))
    shm.unlink_matching(lid)
    print("RESULT " + json.dumps({"got": got, "left": len(left),
                                  "after": os.listdir("/dev/shm") + os.listdir(shm.fallback_dir())}))
''')


def test_named_segments_fall_back_from_a_full_shm(tmp_path):
    """Where memfd is missing, segments are named files: a full 16 MB /dev/shm gives the
    slot's minimum there, then a file in the fallback folder; every name is removed."""
    r = _run_in_small_shm(tmp_path, 16, [], script=LADDER)
    fallback = str(tmp_path / "fallback")
    assert r["got"] == [["/dev/shm", 8 * MB], ["/dev/shm", 6 * MB], [fallback, 20 * MB]]
    assert r["left"] == 3 and r["after"] == []


def test_too_many_open_files_says_raise_ulimit(tmp_path, monkeypatch):
    monkeypatch.setenv(shm.FALLBACK_ENV, str(tmp_path))
    path = shm.segment_path(shm.new_loader_id(), 0, 0, 1)
    created, size, buf = shm.create_segment(path, 1 << 16)
    buf.close()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        try:
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        with pytest.raises(RuntimeError, match=r"ulimit -n.*fewer workers"):
            shm.attach_segment(created, size)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not os.path.exists(created)  # the name is removed even when mapping failed
