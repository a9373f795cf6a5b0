"""Every option is checked before any work: a bad value is one line on stderr (``error: ...``), exit 2,
and nothing is written. Real files; the CLI in process (Typer's runner) and in real subprocesses."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stn_align.cli import app
from stn_align.io import write_image

from conftest import base_image, run_cli


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "in"
    write_image(src / "a.png", base_image(0))
    ref = tmp_path / "ref.png"
    write_image(ref, base_image(0))
    return src, ref


def check_usage_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--workers", "0"), ("--max-pixels", "0"), ("--iterations", "0"),
    ("--min-score", "1.5"), ("--min-score", "-0.1"), ("--working-size", "10"), ("--batch-size", "lots"),
])
def test_batch_options(files, tmp_path, model_file, option, value):
    src, ref = files
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["batch", str(src), "-o", str(out), "--ref", str(ref), "--model", str(model_file),
                                      option, value])
    check_usage_error(result, option)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [
    ("--steps", "0"), ("--steps", "-5"), ("--size", "0"), ("--size", "100"), ("--eval-every", "0"),
    ("--batch-size", "0"), ("--checkpoint-every", "0"), ("--val-fraction", "1"), ("--lr", "0"),
])
def test_train_options(files, tmp_path, option, value):
    src, _ = files
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["train", str(src), "-o", str(out), option, value])
    check_usage_error(result, option)
    assert not out.exists()


def test_single_pair_options(files, tmp_path, model_file):
    src, ref = files
    out = tmp_path / "o.png"
    for extra in (["--max-pixels", "0"], ["--iterations", "0"], ["--min-score", "2"]):
        result = CliRunner().invoke(app, [str(src / "a.png"), "--ref", str(ref), "-o", str(out), "--model",
                                          str(model_file), *extra])
        check_usage_error(result, extra[0])
    assert not out.exists()


def test_bad_json_destination_fails_before_the_image_is_written(files, tmp_path, model_file):
    src, ref = files
    out = tmp_path / "o.png"
    for bad, words in ((tmp_path / "no" / "such" / "r.json", "no such directory"), (tmp_path, "is a directory")):
        result = run_cli(src / "a.png", "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu",
                         "--json", bad)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and str(bad) in result.stderr
        assert not out.exists()


def test_eval_options(tmp_path):
    for extra in (["--n", "0"], ["--threads", "0"], ["--preview-n", "-1"]):
        result = CliRunner().invoke(app, ["eval", str(tmp_path), *extra])
        check_usage_error(result, extra[0])


def test_unknown_option_and_command_are_one_line(tmp_path):
    check_usage_error(CliRunner().invoke(app, ["batch", str(tmp_path), "--nope"]), "--nope")
    check_usage_error(CliRunner().invoke(app, ["bacth"]), "bacth")


def test_usage_error_in_a_real_subprocess(files, tmp_path):
    src, ref = files
    result = run_cli("batch", src, "-o", tmp_path / "out", "--ref", ref, "--batch-size", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--batch-size" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
