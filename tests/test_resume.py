"""Resume is keyed on content and settings: a re-run skips a pair only when its input, reference, model,
output-changing options and output file are what the manifest recorded; anything else is redone, and the
summary says why. Real files, the real CLI (in process; one real subprocess)."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from stn_align.checkpoint import save_model
from stn_align.cli import app
from stn_align.io import write_image
from stn_align.manifest import MANIFEST_NAME
from stn_align.model import AlignerNet, ModelConfig

from conftest import TINY, base_image, jsonl, run_cli, shifted


def batch(*args):
    return CliRunner().invoke(app, ["batch", *[str(a) for a in args]])


def summary(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("aligned "))


def redone(result) -> str:
    lines = [line for line in result.stdout.splitlines() if " redone: " in line]
    return lines[0] if lines else ""


@pytest.fixture
def job(tmp_path, model_file):
    src, out = tmp_path / "in", tmp_path / "out"
    ref_image = base_image(0)
    for i in range(3):
        write_image(src / f"p{i}.png", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    model = tmp_path / "model.safetensors"
    shutil.copy(model_file, model)
    args = [src, "-o", out, "--ref", ref, "--model", model, "--device", "cpu", "--workers", "1"]
    first = batch(*args)
    assert first.exit_code == 0, first.output
    assert summary(first).startswith("aligned 3, skipped 0")
    return {"src": src, "out": out, "ref": ref, "model": model, "args": args, "ref_image": ref_image}


def test_unchanged_job_is_skipped_and_records_fingerprints(job):
    records = jsonl(job["out"] / MANIFEST_NAME)
    for r in records:
        fp = r["fingerprint"]
        assert r["status"] == "ok" and r["output_bytes"] == (job["out"] / r["output"]).stat().st_size
        assert len(fp["input"]["sha256"]) == 64 and len(fp["reference"]["sha256"]) == 64 and len(fp["model"]) == 64
        assert fp["options"]["refine"] == "ecc" and fp["options"]["min_score"] == 0.75
    again = batch(*job["args"])
    assert summary(again).startswith("aligned 0, skipped 3") and redone(again) == ""


def test_replaced_input_is_redone(job):
    time.sleep(0.01)
    write_image(job["src"] / "p1.png", shifted(base_image(1)))
    result = batch(*job["args"])
    assert summary(result).startswith("aligned 1, skipped 2")
    assert redone(result) == "1 redone: input changed"


def test_touched_but_identical_input_is_skipped(job):
    os.utime(job["src"] / "p1.png", ns=(1, 1))  # mtime differs: the content hash decides
    assert summary(batch(*job["args"])).startswith("aligned 0, skipped 3")


def test_reference_content_change_and_same_file_by_another_path(job, tmp_path):
    (tmp_path / "sub").mkdir()
    elsewhere = tmp_path / "sub" / ".." / "ref.png"  # the same file, another path
    args = [a if a != job["ref"] else elsewhere for a in job["args"]]
    assert summary(batch(*args)).startswith("aligned 0, skipped 3")
    copy = tmp_path / "copy.png"
    shutil.copy(job["ref"], copy)  # the same content in another file
    args = [a if a != job["ref"] else copy for a in job["args"]]
    assert summary(batch(*args)).startswith("aligned 0, skipped 3")
    write_image(job["ref"], base_image(2))  # the content changes under the same name
    result = batch(*job["args"])
    assert summary(result).startswith("aligned 3, skipped 0")
    assert redone(result) == "3 redone: reference changed"


@pytest.mark.parametrize("option, value, name", [
    ("--refine", "none", "refine"), ("--fill", "black", "fill"), ("--iterations", "2", "iterations"),
    ("--min-score", "0.5", "min_score"), ("--mask", "auto", "mask"), ("--fallback", "none", "fallback"),
])
def test_changed_option_is_redone(job, option, value, name):
    result = batch(*job["args"], option, value)
    assert summary(result).startswith("aligned 3, skipped 0"), result.output
    assert redone(result) == f"3 redone: options changed ({name})"
    assert summary(batch(*job["args"], option, value)).startswith("aligned 0, skipped 3")


def test_retrained_model_under_the_same_name_is_redone(job):
    torch = pytest.importorskip("torch")
    net = AlignerNet(ModelConfig(**TINY))
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    save_model(job["model"], net, {})
    result = batch(*job["args"])
    assert summary(result).startswith("aligned 3, skipped 0") and redone(result) == "3 redone: model changed"


def test_empty_truncated_or_missing_output_is_redone(job):
    out = job["out"]
    (out / "p0.png").write_bytes(b"")
    data = (out / "p1.png").read_bytes()
    (out / "p1.png").write_bytes(data[: len(data) // 2])
    (out / "p2.png").unlink()
    result = batch(*job["args"])
    assert summary(result).startswith("aligned 3, skipped 0")
    assert redone(result) == "3 redone: output changed 2, output missing 1"


def test_force_redoes_everything(job):
    result = batch(*job["args"], "--force")
    assert summary(result).startswith("aligned 3, skipped 0") and redone(result) == "3 redone: forced (--force)"


def test_vanished_inputs_are_reported(job):
    (job["src"] / "p2.png").unlink()
    result = batch(*job["args"])
    assert result.exit_code == 0
    assert "1 input(s) recorded in the manifest no longer exist" in result.stderr and "p2.png" in result.stderr
    assert (job["out"] / "p2.png").is_file()  # its output is kept


def test_manifest_of_an_older_version_is_redone(job):
    path = job["out"] / MANIFEST_NAME
    old = [{k: v for k, v in r.items() if k not in ("fingerprint", "output_bytes")} for r in jsonl(path)]
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in old))
    result = batch(*job["args"])
    assert summary(result).startswith("aligned 3, skipped 0")
    assert redone(result) == "3 redone: recorded without a fingerprint"


def test_resume_in_a_real_subprocess(job):
    write_image(job["src"] / "p0.png", shifted(base_image(3)))
    result = run_cli("batch", *job["args"])
    assert result.returncode == 0, result.stderr
    assert "aligned 1, skipped 2" in result.stdout and "1 redone: input changed" in result.stdout
    assert np.array_equal(sorted(r["input"] for r in jsonl(job["out"] / MANIFEST_NAME)), ["p0.png", "p1.png", "p2.png"])
