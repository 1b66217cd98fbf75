"""Fuzzing what fastload reads from untrusted bytes, seeded, every case in a sandbox.

Mutated images (JPEG, PNG, GIF, WebP, BMP, TIFF; EXIF and XMP orientation) go through the
header parsers, decode and the kernel in both processor modes; mutated tars through
``tar_entries``, ``group_samples`` and ``ShardDataset`` under each error policy. Allowed:
a documented exception, or the reference's result (Pillow + transformers' RGB conversion;
samples or ``ShardError``/``ValueError`` for tars). Never a crash, a hang, more than 1 GB,
an undocumented exception, a header/decoded size mismatch or other pixels than Pillow's:
the harness and its categories are ``benchmarks/fuzz.py``, whose long run is the same
cases by the 100k. Hypothesis draws the mutations, derandomized, without shrinking (a
failure is reported with the input written out, to be kept in ``fuzz_regressions``).

Every input that once failed is in ``tests/fuzz_regressions`` and runs here (a ``.txt``
beside an input says what it once did).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from benchmarks import fuzz

REGRESSIONS = pathlib.Path(__file__).parent / "fuzz_regressions"
FAILED_INPUTS = pathlib.Path(os.environ.get("FASTLOAD_FUZZ_OUT", tempfile.gettempdir())) / "fastload-fuzz-failures"
TAR_TIMEOUT_S = 3.0  # a tar of a few KB reads in milliseconds: past 3 s it loops

IMAGE_SEEDS = fuzz.image_seeds()
TAR_SEEDS = fuzz.tar_seeds()
FUZZ = settings(derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def image_box():
    with fuzz.Sandbox() as box:
        yield box


@pytest.fixture(scope="module")
def tar_box():
    with fuzz.Sandbox(TAR_TIMEOUT_S) as box:
        yield box


def _draw(data) -> fuzz.Draw:
    return lambda lo, hi: data.draw(st.integers(lo, hi))


def _check(box: fuzz.Sandbox, kind: str, case: bytes) -> None:
    """Fails with the outcome and where the input was written."""
    outcome = box.run(case, kind)
    if outcome.category in fuzz.FAILURES:
        name = f"{kind}-{hashlib.sha1(case).hexdigest()[:12]}"
        fuzz.save_input(FAILED_INPUTS, outcome, name, kind, case)
        pytest.fail(f"{outcome.category}: {outcome.detail}\ninput: {FAILED_INPUTS / outcome.category}/{name}.*")


def _note(path: pathlib.Path) -> str:
    note = path.with_name(path.name.split(".")[0] + ".txt")
    return note.read_text().strip() if note.exists() else path.name


@settings(FUZZ, max_examples=2000)
@given(st.data())
def test_mutated_images(image_box, data):
    draw = _draw(data)
    _check(image_box, "image", fuzz.mutate(draw, IMAGE_SEEDS[draw(0, len(IMAGE_SEEDS) - 1)]))


@settings(FUZZ, max_examples=1500)
@given(st.data())
def test_mutated_tars(tar_box, data):
    draw = _draw(data)
    _check(tar_box, "tar", fuzz.mutate(draw, TAR_SEEDS[draw(0, len(TAR_SEEDS) - 1)]))


def test_seeds_decode_as_the_reference(image_box):
    """Unmutated, every seed is read exactly as the reference reads it."""
    for i, seed in enumerate(IMAGE_SEEDS):
        outcome = image_box.run(seed, "image")
        assert outcome.category == "ok", (i, outcome)


@pytest.mark.parametrize("path", fuzz.regression_inputs(REGRESSIONS), ids=lambda p: p.name)
def test_regression_inputs(image_box, tar_box, path):
    kind = fuzz.kind_of_path(path)
    outcome = (tar_box if kind == "tar" else image_box).run(path.read_bytes(), kind)
    assert outcome.category not in fuzz.FAILURES, (outcome.category, outcome.detail, _note(path))


def test_sandbox_survives_crash_and_hang():
    """The harness itself: a segfault and an endless loop in a case are reported, and the
    next case runs in a fresh child."""
    with fuzz.Sandbox(timeout=2) as box:
        assert box.run(b"", "crash").category == "crash"
        assert box.run(b"", "hang").category == "hang"
        assert box.run(IMAGE_SEEDS[0], "image").category == "ok"
