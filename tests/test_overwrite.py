"""Never overwrite what stn-align did not write: batch outputs over the user's files, train -o over photos,
other files or an existing model. Real files; the CLI in process and in real subprocesses."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from typer.testing import CliRunner

from stn_align.cli import app
from stn_align.io import write_image
from stn_align.manifest import MANIFEST_NAME

from conftest import base_image, jsonl, run_cli, shifted


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def shots(tmp_path):
    """shots/ with two photos, and shots/s/ already holding the user's own photos under the same names."""
    src = tmp_path / "shots"
    ref_image = base_image(0)
    for name in ("a.png", "b.png"):
        write_image(src / name, shifted(ref_image))
    write_image(src / "s" / "a.png", base_image(5))  # the user's, not ours
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    return src, ref


def test_batch_never_replaces_a_file_it_did_not_write(shots, model_file):
    src, ref = shots
    mine = src / "s" / "a.png"
    before = md5(mine)
    args = ("batch", src, "-o", src / "s", "--ref", ref, "--model", model_file, "--device", "cpu")
    result = invoke(*args)
    assert result.exit_code == 1
    assert md5(mine) == before
    line = next(line for line in result.stderr.splitlines() if line.startswith(str(mine)))
    assert "not written by stn-align" in line and "--overwrite" in line
    assert (src / "s" / "b.png").is_file()  # the other pair went ahead
    # a re-run still refuses; --overwrite replaces it, and from then on it is ours
    assert invoke(*args).exit_code == 1 and md5(mine) == before
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert md5(mine) != before
    assert invoke(*args, "--force").exit_code == 0


def test_batch_outputs_it_wrote_are_its_own_to_replace(shots, model_file, tmp_path):
    src, ref = shots
    out = tmp_path / "out"
    args = ("batch", src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu", "--no-recursive")
    assert invoke(*args).exit_code == 0
    assert invoke(*args, "--force").exit_code == 0  # replaces only its own outputs: no refusal
    assert {r["status"] for r in jsonl(out / MANIFEST_NAME)} == {"ok"}


def test_single_pair_refuses_to_write_over_input_or_reference(shots, model_file):
    src, ref = shots
    before = md5(ref)
    result = run_cli(src / "a.png", "--ref", ref, "-o", ref, "--model", model_file, "--device", "cpu")
    assert result.returncode == 2 and "would overwrite the reference" in result.stderr
    assert md5(ref) == before


def train(*args):
    return run_cli("train", *args, timeout=120)


def test_train_refuses_a_path_inside_the_photos(tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "10001.jpg", base_image(0))
    before = md5(photos / "10001.jpg")
    for out in (photos / "10001.jpg", photos / "model.safetensors"):
        result = train(photos, "-o", out, "--steps", "1")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert str(out) in result.stderr and "inside the training photos" in result.stderr
    assert md5(photos / "10001.jpg") == before and not (photos / "model.safetensors").exists()


@pytest.mark.slow
def test_train_refuses_other_files_folders_and_existing_models(tmp_path, model_file):
    photos = tmp_path / "photos"
    write_image(photos / "a.jpg", base_image(0))
    other = tmp_path / "notes.safetensors"
    other.write_text("not a model")
    model = tmp_path / "existing.safetensors"
    shutil.copy(model_file, model)
    before = md5(model)
    cases = [(other, "is not an stn-align model"), (tmp_path, "must end in .safetensors"), (model, "already exists")]
    for out, text in cases:
        result = train(photos, "-o", out, "--steps", "1")
        assert result.returncode == 2, (out, result.stderr)
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert md5(model) == before and other.read_text() == "not a model"


def test_train_checks_the_destination_is_writable_before_training(tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "a.jpg", base_image(0))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = train(photos, "-o", blocker / "model.safetensors", "--steps", "1")  # its parent is a file
    assert result.returncode == 2 and "cannot write there" in result.stderr
    assert "photos:" not in result.stdout  # refused before any photo was read


@pytest.mark.slow
def test_train_overwrite_replaces_and_resume_continues(tmp_path):
    from stn_align.checkpoint import read_metadata
    from stn_align.train import TrainConfig, train as run_training

    photos = tmp_path / "photos"
    for i in range(4):
        write_image(photos / f"p{i}.jpg", base_image(i))
    out = tmp_path / "m.safetensors"
    config = dict(data_dir=str(photos), out=str(out), size=64, steps=2, batch_size=2, warmup=1, eval_every=2,
                  val_pairs=2, workers=0, val_fraction=0.25, threads=1)
    run_training(TrainConfig(**config), log=lambda *_: None)
    with pytest.raises(ValueError, match="already exists"):
        run_training(TrainConfig(**config), log=lambda *_: None)
    run_training(TrainConfig(**{**config, "steps": 3, "resume": str(out)}), log=lambda *_: None)
    assert read_metadata(out)["training"]["args"]["steps"] == 3
    run_training(TrainConfig(**config, overwrite=True), log=lambda *_: None)
    assert read_metadata(out)["training"]["args"]["steps"] == 2
