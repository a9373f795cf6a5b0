"""``stn-align apply``: a recorded transform re-applied to masks, another resolution, other files.
Real files; the CLI in process."""

from __future__ import annotations

import json

import cv2
import numpy as np
from typer.testing import CliRunner

from stn_align.cli import app
from stn_align.io import read_image, write_image
from stn_align.manifest import MANIFEST_NAME

from conftest import base_image, jsonl, shifted


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def aligned_job(tmp_path, model_file):
    src = tmp_path / "shots"
    ref_image = base_image(0)
    for name in ("a", "b"):
        write_image(src / f"{name}.jpg", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    out = tmp_path / "aligned"
    result = invoke("batch", src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return src, out, {r["input"]: r for r in jsonl(out / MANIFEST_NAME)}


def test_masks_follow_their_shots(tmp_path, model_file):
    src, out, records = aligned_job(tmp_path, model_file)
    masks = tmp_path / "masks"
    mask = np.zeros((120, 160), np.uint8)
    mask[30:90, 40:120] = 255
    for name in ("a", "b"):
        write_image(masks / f"{name}.png", mask)  # another extension than the shots: matched by name
    result = invoke("apply", out / MANIFEST_NAME, masks, "-o", tmp_path / "masks_out", "--fill", "black",
                    "--interpolation", "nearest")
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        got = read_image(tmp_path / "masks_out" / f"{name}.png")[..., 0]
        m = np.array(records[f"{name}.jpg"]["matrix"])
        expected = cv2.warpPerspective(mask, m, (160, 120), flags=cv2.INTER_NEAREST)
        assert np.mean(got != expected) < 0.002 and set(np.unique(got)) <= {0, 255}


def test_a_larger_version_of_the_shot_gives_a_larger_output(tmp_path, model_file):
    src, out, records = aligned_job(tmp_path, model_file)
    big = cv2.resize(read_image(src / "a.jpg"), (640, 480), interpolation=cv2.INTER_CUBIC)
    write_image(tmp_path / "a.tif", big)
    result = invoke("apply", out / MANIFEST_NAME, tmp_path / "a.tif", "-o", tmp_path / "a_big.tif")
    assert result.exit_code == 0, result.output
    got = read_image(tmp_path / "a_big.tif")
    assert got.shape == (480, 640, 3)
    small = cv2.resize(got, (160, 120), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(small[10:-10, 10:-10] - read_image(out / "a.jpg")[10:-10, 10:-10].astype(int)).mean() < 6


def test_json_record_and_bare_matrix(tmp_path, model_file):
    ref_image = base_image(0)
    write_image(tmp_path / "in.png", shifted(ref_image))
    write_image(tmp_path / "ref.png", ref_image)
    result = invoke(tmp_path / "in.png", "--ref", tmp_path / "ref.png", "--model", model_file, "--device", "cpu",
                    "--json", tmp_path / "t.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["input_size"] == [160, 120] and record["ref_size"] == [160, 120]
    assert invoke("apply", tmp_path / "t.json", tmp_path / "in.png", "-o", tmp_path / "again.png").exit_code == 0
    assert np.abs(read_image(tmp_path / "again.png").astype(int) - read_image(tmp_path / "in.aligned.png").astype(int)).max() <= 1
    (tmp_path / "m.json").write_text(json.dumps([[1, 0, 5], [0, 1, 0], [0, 0, 1]]))
    assert invoke("apply", tmp_path / "m.json", tmp_path / "in.png").exit_code == 0
    moved = read_image(tmp_path / "in.aligned.png")
    assert np.array_equal(moved[:, 5:], read_image(tmp_path / "in.png")[:, :-5])


def test_apply_errors(tmp_path, model_file):
    src, out, _ = aligned_job(tmp_path, model_file)
    write_image(tmp_path / "zzz.png", base_image(1))
    result = invoke("apply", out / MANIFEST_NAME, tmp_path / "zzz.png")
    assert result.exit_code == 1 and "no record of an input named zzz" in result.stderr
    (tmp_path / "bad.json").write_text('{"matrix": [1, 2]}')
    result = invoke("apply", tmp_path / "bad.json", tmp_path / "zzz.png")
    assert result.exit_code == 1 and "bad.json" in result.stderr
    assert invoke("apply").exit_code == 2  # a command, never read as an input file named "apply"
