"""CLI manners: several inputs, mistyped commands, quiet and plain progress. Real files and subprocesses."""

from __future__ import annotations

import pytest

import json

from stn_align.io import write_image

from conftest import SHIFT, base_image, corner_error, run_cli, shifted


def test_several_inputs_one_reference(tmp_path, model_file):
    ref_image = base_image(0)
    shots = []
    for i in range(3):
        shots.append(tmp_path / f"s{i}.jpg")
        write_image(shots[-1], shifted(ref_image))
    ref = tmp_path / "ref.jpg"
    write_image(ref, ref_image)
    out = tmp_path / "aligned"
    result = run_cli(*shots, ref, "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu", "--json", "-")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["input"] for r in records] == [str(s) for s in shots]  # the reference, listed by a glob, is skipped
    assert all(corner_error(r["matrix"], SHIFT) < 1.0 for r in records)
    assert sorted(p.name for p in out.iterdir()) == ["s0.jpg", "s1.jpg", "s2.jpg"]
    assert "is the reference; not aligned onto itself" in result.stderr
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    partly = run_cli(shots[0], tmp_path / "broken.jpg", "--ref", ref, "-o", out, "--model", model_file, "--device", "cpu")
    assert partly.returncode == 1 and f"{tmp_path / 'broken.jpg'}:" in partly.stderr and "aligned " in partly.stdout


def test_mistyped_command_is_an_error_with_a_suggestion():
    result = run_cli("bacth", "shots/")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "No such command 'bacth'" in result.stderr and "batch" in result.stderr


@pytest.mark.slow
def test_quiet_and_plain_progress(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0)
    for i in range(4):
        write_image(src / f"{i}.png", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    common = ("--ref", ref, "--model", model_file, "--device", "cpu", "--batch-size", "1")
    env = {"STN_ALIGN_PROGRESS_SECONDS": "0", "PATH": "/usr/bin:/bin"}
    logged = run_cli("batch", src, "-o", tmp_path / "a", *common, env=env)
    assert logged.returncode == 0, logged.stderr
    assert "progress: 1/4" in logged.stderr and "progress: 4/4" in logged.stderr  # piped: plain lines, no bar
    quiet = run_cli("batch", src, "-o", tmp_path / "b", *common, "-q", env=env)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    single = run_cli(src / "0.png", "--ref", ref, "-o", tmp_path / "one.png", "--model", common[3], "--device", "cpu",
                     "-q", env=env)
    assert single.returncode == 0 and single.stdout == "" and single.stderr == ""


def test_help_names_value_types_readably():
    from typer.testing import CliRunner

    from stn_align.cli import app

    for command in ("align", "batch", "train", "eval", "apply"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        options = result.stdout.split("Options:", 1)[1]
        assert "<str>" not in options and "<int" not in options and "<float" not in options, command
    batch = CliRunner().invoke(app, ["batch", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--batch-size INTEGER" in batch and "--min-score NUMBER" in batch and "-o, --out PATH" in batch
    assert "Examples:" in batch
