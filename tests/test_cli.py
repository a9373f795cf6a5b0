"""The ``stn-align`` command line: single-pair ``align`` (also as the default command), ``models``, start-up.

A freshly built AlignerNet predicts exactly the identity (zero-initialised head), so with ``--refine ecc``
the CLI must recover a small known shift: that lets these tests check real alignment behaviour without a
trained model. Images are tiny; torch runs on one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stn_align import __version__
from stn_align.checkpoint import save_model
from stn_align.cli import app
from stn_align.io import read_image, write_image
from stn_align.model import AlignerNet, ModelConfig

from conftest import SHIFT, TINY, base_image, corner_error






@pytest.fixture
def models_dir(tmp_path, monkeypatch, model_file) -> Path:
    """A temporary shipped-models folder holding ``default`` (projective) and ``affine``."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "default.safetensors").write_bytes(model_file.read_bytes())
    (folder / "default.md").write_text("# default\n\nProjective aligner for product photos.\n\nMore text.\n")
    save_model(folder / "affine.safetensors", AlignerNet(ModelConfig(transform="affine", **TINY)), {})
    monkeypatch.setenv("STN_ALIGN_MODELS_DIR", str(folder))
    return folder




def make_pair(folder: Path, name_in="in.png", name_ref="ref.png", matrix=SHIFT, seed=0, image=None):
    """Write a reference and an input such that ``matrix`` maps input pixels onto the reference."""
    ref = base_image(seed=seed) if image is None else image
    h, w = ref.shape[:2]
    inp = cv2.warpPerspective(ref, np.linalg.inv(matrix), (w, h), borderMode=cv2.BORDER_REFLECT)
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / name_ref, ref)
    write_image(folder / name_in, inp)
    return folder / name_in, folder / name_ref


def run(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------------------- start-up


def test_help_does_not_import_torch():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from stn_align.cli import app\n"
        "for argv in (['--help'], ['align', '--help'], ['batch', '--help'], ['models', '--help'], ['--version']):\n"
        "    sys.argv = ['stn-align', *argv]\n"
        "    try:\n"
        "        app()\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (argv, e.code)\n"
        "heavy = sorted(m for m in ('torch', 'cv2', 'kornia') if m in sys.modules)\n"
        "print('HEAVY', heavy, time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    for word in ("align", "batch", "models", "--ref-dir", "--fail-on-suspect", f"stn-align {__version__}"):
        assert word in out.stdout


def test_help_and_version_in_process():
    for args in (["--help"], ["align", "--help"], ["batch", "--help"], ["models", "--help"]):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output
    assert run("--version").stdout.strip() == f"stn-align {__version__}"
    assert "batch" in run().output  # no arguments: help


def test_mistyped_command_is_not_taken_for_an_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("bacth", "x", "-o", "y")
    assert result.exit_code == 2
    assert "batch" in result.output  # "No such command 'bacth'. Did you mean 'batch'?"


# ------------------------------------------------------------------------------------------ single pair


def test_default_command_default_output_and_matrix(tmp_path, model_file):
    inp, ref = make_pair(tmp_path)
    record_file = tmp_path / "rec.json"
    # exactly the documented shape: no subcommand name
    result = run(inp, "--ref", ref, "--model", model_file, "--device", "cpu", "--json", record_file)
    assert result.exit_code == 0, result.output
    out = tmp_path / "in.aligned.png"
    assert out.is_file()
    assert str(out) in result.stdout and "score" in result.stdout and "matrix" in result.stdout
    assert "using cpu" in result.stderr
    record = json.loads(record_file.read_text())
    assert set(record) >= {"input", "reference", "output", "matrix", "transform", "score", "suspect", "refined", "model"}
    assert record["output"] == str(out) and record["model"] == "tiny" and record["transform"] == "projective"
    m = np.array(record["matrix"])
    assert corner_error(m) < 1.0, m  # identity network + ECC recovers the 3.6 px shift
    assert record["refined"] and not record["suspect"] and record["score"] > 0.9
    # the recorded matrix reproduces the written output
    image_in, image_ref, written = read_image(inp), read_image(ref), read_image(out)
    assert written.shape == image_ref.shape
    expected = cv2.warpPerspective(image_in, m, (image_ref.shape[1], image_ref.shape[0]),
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    assert np.abs(expected.astype(int) - written.astype(int)).max() <= 1
    # the printed matrix is the recorded one
    printed = [[float(v) for v in line.split()] for line in result.stdout.splitlines()[-3:]]
    assert np.allclose(printed, m, atol=1e-6)
    # a second run overwrites only the .aligned file; inputs untouched
    before = inp.read_bytes(), ref.read_bytes()
    assert run("align", inp, "--ref", ref, "--model", model_file, "--device", "cpu").exit_code == 0
    assert (inp.read_bytes(), ref.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.aligned.png", "in.png", "rec.json", "ref.png"]


def test_json_to_stdout(tmp_path, model_file):
    inp, ref = make_pair(tmp_path, "in.jpg", "ref.jpg")
    out = tmp_path / "sub" / "out.jpg"
    result = run("align", inp, "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu", "--json", "-",
                 "--refine", "none", "--fallback", "none")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # stdout carries only the JSON; human output went to stderr
    assert record["output"] == str(out) and out.is_file()
    assert record["refined"] is False and np.allclose(record["matrix"], np.eye(3), atol=1e-6)
    assert "matrix" in result.stderr


def test_preview_sheet_and_mask_options(tmp_path, model_file):
    inp, ref = make_pair(tmp_path)
    sheet = tmp_path / "sheet.png"
    result = run(inp, "--ref", ref, "-o", tmp_path / "out.png", "--model", model_file, "--device", "cpu",
                 "--preview", sheet, "--mask", "auto")
    assert result.exit_code == 0, result.output
    image = read_image(sheet)
    assert image.shape[0] > 120 and image.shape[1] > 4 * 160 and image.shape[2] == 3  # several panels side by side
    result = run(inp, "--ref", ref, "--model", model_file, "--mask", tmp_path / "no-such-mask.png")
    assert result.exit_code == 2 and "no-such-mask.png" in error_lines(result)[0]


def test_real_subprocess(tmp_path, model_file):
    inp, ref = make_pair(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "stn_align.cli", str(inp), "--ref", str(ref), "-o", str(tmp_path / "o.png"),
                          "--model", str(model_file), "--device", "cpu", "--json", "-"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert corner_error(record["matrix"]) < 1.0
    assert (tmp_path / "o.png").is_file()


def test_refuses_to_overwrite_input_or_reference(tmp_path, model_file, monkeypatch):
    inp, ref = make_pair(tmp_path)
    before = inp.read_bytes()
    for target in (inp, ref, tmp_path / "." / "in.png"):
        result = run(inp, "--ref", ref, "-o", target, "--model", model_file)
        assert result.exit_code == 2
        [line] = error_lines(result)
        assert "overwrite" in line and str(target) in line
    monkeypatch.chdir(tmp_path)  # relative spelling of the same file
    result = run("in.png", "--ref", "ref.png", "-o", str(inp), "--model", model_file)
    assert result.exit_code == 2
    assert inp.read_bytes() == before


def test_bad_files_are_one_line_errors(tmp_path, model_file):
    inp, ref = make_pair(tmp_path)
    (tmp_path / "broken.png").write_bytes(inp.read_bytes()[:200])
    model = ["--model", model_file]
    cases = [
        ([tmp_path / "missing.png", "--ref", ref, *model], 1, "missing.png: no such file"),
        ([inp, "--ref", tmp_path / "broken.png", *model], 1, "broken.png: truncated or corrupt"),
        ([inp, "--ref", ref, "--model", tmp_path / "nope.safetensors"], 1, "nope.safetensors: no such checkpoint file"),
        ([inp, "--ref", ref, "--model", "nosuchmodel"], 1, "nosuchmodel: unknown model"),
        ([inp, "--ref", ref, *model, "--fill", "purple"], 2, "invalid fill"),
        ([inp, "--ref", ref, *model, "--transform", "similarity"], 2, "--transform"),
        ([inp, "--ref", ref, *model, "-o", tmp_path / "out.gif"], 2, "unsupported output format"),
        ([inp, "--ref", ref, *model, "--iterations", "0"], 2, "--iterations"),
        ([inp, "--ref", ref, *model, "--device", "tpu"], 2, "unknown device"),
    ]
    for args, code, text in cases:
        result = run(*args) if "--device" in args else run(*args, "--device", "cpu")
        assert result.exit_code == code, (text, result.output)
        [line] = error_lines(result)
        assert text in line, line
    assert not (tmp_path / "in.aligned.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_is_an_error(tmp_path, model_file):
    inp, ref = make_pair(tmp_path)
    result = run(inp, "--ref", ref, "--model", model_file, "--device", "cuda")
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert "cuda" in line.lower() and "no CUDA GPU" in line


def test_transform_picks_the_shipped_model(tmp_path, models_dir):
    inp, ref = make_pair(tmp_path)
    result = run(inp, "--ref", ref, "--transform", "affine", "--device", "cpu", "--json", "-")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["model"] == "affine" and record["transform"] == "affine"
    assert np.allclose(record["matrix"][2], [0, 0, 1])
    result = run(inp, "--ref", ref, "--device", "cpu", "--json", "-")  # no options: the default model
    assert json.loads(result.stdout)["model"] == "default"
    result = run(inp, "--ref", ref, "--transform", "affine", "--model", "default", "--device", "cpu")
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert "projective" in line and "--transform affine" in line


def test_sixteen_bit_and_alpha_are_kept(tmp_path, model_file):
    rgb = base_image(seed=1)
    deep = (rgb.astype(np.uint16) * 257 + np.arange(rgb.shape[1], dtype=np.uint16)[None, :, None]).astype(np.uint16)
    inp, ref = make_pair(tmp_path / "deep", image=deep)
    assert read_image(inp).dtype == np.uint16
    out = tmp_path / "deep.png"
    assert run(inp, "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu").exit_code == 0
    written = read_image(out)
    assert written.dtype == np.uint16 and written.shape == deep.shape

    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    inp, ref = make_pair(tmp_path / "alpha", image=rgba)
    out = tmp_path / "alpha.png"
    assert run(inp, "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu").exit_code == 0
    written = read_image(out)
    assert written.shape == rgba.shape and written.dtype == np.uint8
    assert (written[20:-20, 20:-20, 3] == 200).all()

    gray16 = deep[..., :1]
    inp, ref = make_pair(tmp_path / "gray", image=gray16)
    out = tmp_path / "gray.tif"
    result = run(inp, "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu", "--fill", "transparent",
                 "--refine", "none")
    assert result.exit_code == 0, result.output
    written = read_image(out)
    assert written.dtype == np.uint16 and written.shape[2] == 4  # alpha added (gray + alpha is written as RGBA)

    result = run(inp, "--ref", ref, "-o", tmp_path / "x.jpg", "--model", model_file, "--fill", "transparent")
    assert result.exit_code == 2 and not (tmp_path / "x.jpg").exists()
    [line] = error_lines(result)
    assert "alpha" in line


# ---------------------------------------------------------------------------------------------- models


def test_models_lists_shipped_models(models_dir):
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    for word in ("default", "affine", "projective", "64 px", "1.50 px", "90%", "Projective aligner for product photos."):
        assert word in text, text
    params = sum(p.numel() for p in AlignerNet(ModelConfig(**TINY)).parameters())
    assert f"{params:,}" in text


def test_models_none_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("STN_ALIGN_MODELS_DIR", str(tmp_path))
    result = run("models")
    assert result.exit_code == 0
    assert "no models installed" in result.stdout


def test_models_unreadable_checkpoint_does_not_crash(tmp_path, monkeypatch):
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("STN_ALIGN_MODELS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "broken" in result.stdout and "unreadable" in result.stdout
