"""The Ray engine (``stn-align batch --engine ray``) against the local engine, on a small local Ray instance.

Skipped when Ray (``pip install "stn-align[ray]"``) is not installed. One Ray instance (2 CPUs, no dashboard)
serves the module; each run starts a pool of two CPU actors.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from stn_align.align import Aligner  # noqa: E402
from stn_align.batch import MANIFEST_NAME, align_directory, read_manifest  # noqa: E402
from stn_align.cli import app  # noqa: E402
from stn_align.io import read_image, write_image  # noqa: E402
from stn_align.ray_engine import align_directory_ray  # noqa: E402

from conftest import base_image  # noqa: E402

pytestmark = pytest.mark.slow  # CI runs these too: python -m pytest -q -m slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def aligner() -> Aligner:
    """The shipped default model (its estimates are not the identity, so batching would show in the matrices)."""
    return Aligner.load("default", "cpu")


def moved(image: np.ndarray, seed: int) -> np.ndarray:
    """``image`` under a random small projective motion (the input to align onto ``image``)."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    corners = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    jitter = (corners + rng.uniform(-0.06, 0.06, (4, 2)) * (w, h)).astype(np.float32)
    m = cv2.getPerspectiveTransform(corners, jitter)
    return cv2.warpPerspective(image, m, (w, h), borderValue=(255, 255, 255))


@pytest.fixture
def pair_tree(tmp_path) -> dict:
    """7 inputs (two folders) with counterparts in refs/, plus one corrupt input."""
    src, refs = tmp_path / "in", tmp_path / "refs"
    names = [f"{'sub/' if i % 3 == 0 else ''}p{i}.{'png' if i % 2 else 'jpg'}" for i in range(7)]
    for i, name in enumerate(names):
        ref = base_image(i, (192, 144))
        for path, image in ((src / name, moved(ref, i)), (refs / name, ref)):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image(path, image)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    return {"src": src, "refs": refs, "names": names, "tmp": tmp_path}


def assert_same_results(out_a: Path, out_b: Path) -> None:
    """Same records (matrices within 1e-5, scores within 1e-4) and the same output images (within 1 grey level)."""
    a, b = read_manifest(out_a / MANIFEST_NAME), read_manifest(out_b / MANIFEST_NAME)
    assert sorted(a) == sorted(b)
    for key in a:
        ra, rb = a[key], b[key]
        assert set(ra) == set(rb), key
        for field in set(ra) - {"matrix", "score"}:
            assert ra[field] == rb[field], (key, field)
        if ra["status"] == "ok":
            np.testing.assert_allclose(rb["matrix"], ra["matrix"], atol=1e-5, rtol=0)
            assert abs(ra["score"] - rb["score"]) <= 1e-4
            ia, ib = read_image(out_a / ra["output"]), read_image(out_b / rb["output"])
            assert ia.shape == ib.shape and np.abs(ia.astype(int) - ib.astype(int)).max() <= 1, key


def test_ray_engine_matches_the_local_engine_and_resumes(pair_tree, aligner):
    src, refs, tmp = pair_tree["src"], pair_tree["refs"], pair_tree["tmp"]
    local = align_directory(aligner, src, tmp / "local", ref_dir=refs, batch_size=3, workers=2)
    info = []
    rayed = align_directory_ray(aligner, src, tmp / "ray", ref_dir=refs, batch_size=3, on_info=info.append)
    assert (rayed.total, rayed.aligned, rayed.failed, rayed.skipped) == (local.total, local.aligned, local.failed, 0)
    assert (rayed.aligned, rayed.failed) == (7, 1)
    assert rayed.failures == local.failures and rayed.failures[0].startswith(f"{src / 'broken.jpg'}: ")
    assert info and info[0].startswith("ray: 2 actor(s), 1 CPU")
    assert_same_results(tmp / "local", tmp / "ray")
    assert not (tmp / "ray" / ".stn-align.lock").exists()  # released at the end

    # resume: the aligned pairs are skipped, the failed one retried; one record per input
    again = align_directory_ray(aligner, src, tmp / "ray", ref_dir=refs, batch_size=3)
    assert (again.aligned, again.skipped, again.failed) == (0, 7, 1)
    lines = (tmp / "ray" / MANIFEST_NAME).read_text().splitlines()
    assert sorted(json.loads(line)["input"] for line in lines) == sorted([*pair_tree["names"], "broken.jpg"])


def test_cli_engine_ray_with_one_reference(tmp_path, aligner):
    src = tmp_path / "in"
    ref_image = base_image(0, (192, 144))
    for i in range(4):
        path = src / f"a{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, moved(ref_image, 10 + i))
    write_image(tmp_path / "ref.png", ref_image)
    common = ["--ref", str(tmp_path / "ref.png"), "--batch-size", "2"]
    local = CliRunner().invoke(app, ["batch", str(src), "-o", str(tmp_path / "local"), "--device", "cpu", *common])
    assert local.exit_code == 0, local.output
    result = CliRunner().invoke(app, ["batch", str(src), "-o", str(tmp_path / "ray"), "--engine", "ray", *common])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert next(line for line in result.stdout.splitlines() if line.startswith("aligned ")).startswith(
        "aligned 4, skipped 0, failed 0")
    assert_same_results(tmp_path / "local", tmp_path / "ray")
