"""Errors name the file and the reason in words; nothing a run skips goes unsaid. Real files, real OS
errors (a file-size limit makes writes fail as a full disk does), the CLI in process and in subprocesses."""

from __future__ import annotations

import os
import resource
import signal

import pytest
from typer.testing import CliRunner

from stn_align.batch import LOCK_NAME
from stn_align.cli import app
from stn_align.io import read_image, write_image
from stn_align.manifest import CORRUPT_SUFFIX, MANIFEST_NAME

from conftest import base_image, jsonl, run_cli, shifted


def batch(*args):
    return CliRunner().invoke(app, ["batch", *[str(a) for a in args]])


@pytest.fixture
def job(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0)
    write_image(src / "a.png", shifted(ref_image))
    write_image(src / "b.png", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    out = tmp_path / "out"
    return src, ref, out, ["--ref", ref, "--model", model_file, "--device", "cpu"]


def test_write_failure_names_the_output_and_the_reason(job):
    """Writes that fail like a full disk (EFBIG under a file-size limit) fail each pair with path and reason."""
    src, ref, out, common = job
    out.mkdir()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the manifest fits, the images do not

    result = run_cli("batch", src, "-o", out, *common, "--refine", "none", preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    for name in ("a.png", "b.png"):
        assert f"{out / name}: cannot write file (File too large)" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_output_folder_that_cannot_be_written_is_one_line(job):
    src, ref, out, common = job
    (out / LOCK_NAME).mkdir(parents=True)  # the lock cannot be written
    result = batch(src, "-o", out, *common)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {out}: cannot write in the output directory (Is a directory)"
    (out / LOCK_NAME).rmdir()
    (out / MANIFEST_NAME).mkdir()  # the manifest cannot be read
    result = batch(src, "-o", out, *common)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(out / MANIFEST_NAME) in last and "Is a directory" in last


def test_corrupt_manifest_line_is_named_kept_and_the_run_goes_on(job):
    src, ref, out, common = job
    assert batch(src, "-o", out, *common).exit_code == 0
    path = out / MANIFEST_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    bad = b'{"input": "a.png", "status": "ok", "note": "caf\xe9"}\n'  # a non-UTF-8 byte
    path.write_bytes(lines[0] + bad + lines[1])
    result = batch(src, "-o", out, *common)
    assert result.exit_code == 0, result.output
    assert f"{path} line 2: not a JSON record" in result.stderr and CORRUPT_SUFFIX in result.stderr
    assert (out / (MANIFEST_NAME + CORRUPT_SUFFIX)).read_bytes() == bad
    assert sorted(r["input"] for r in jsonl(path)) == ["a.png", "b.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_skipped_entries_are_counted_and_listed(job, tmp_path):
    src, ref, out, common = job
    os.symlink(tmp_path / "nowhere.png", src / "dangling.png")
    os.mkfifo(src / "pipe.png")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", src / "linked")
    for name in ("anim.gif", "phone.heic", "raw.CR2", "notes.txt"):
        (src / name).write_bytes(b"x")
    write_image(src / "camera.jfif", shifted(base_image(0)))  # JFIF is JPEG: aligned
    result = batch(src, "-o", out, *common)
    assert result.exit_code == 0, result.output
    assert "aligned 3," in result.stdout and (out / "camera.jfif").is_file()
    assert f"not inputs: 7 entries of {src} skipped (--verbose lists them)" in result.stderr
    verbose = batch(src, "-o", out, *common, "--verbose")
    expected = {"dangling.png": "dangling symlink", "pipe.png": "not a regular file", "linked": "symlinked folder",
                "anim.gif": "unsupported image format .gif", "phone.heic": "unsupported image format .heic",
                "raw.CR2": "camera RAW", "notes.txt": "not an image file name"}
    for name, reason in expected.items():
        assert any(line.strip().startswith(f"{src / name}: ") and reason in line for line in verbose.stderr.splitlines()), name


def test_eval_synthetic_skips_bad_photos_with_a_line_each(tmp_path, model_file):
    photos = tmp_path / "photos"
    for i in range(3):
        write_image(photos / f"p{i}.jpg", base_image(i, (320, 240)))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = CliRunner().invoke(app, ["eval", str(photos), "--synthetic", "--n", "6", "--model", str(model_file),
                                      "--device", "cpu", "--baselines", "", "--size", "64"])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and str(photos / "broken.jpg") in skipped[0]


def test_gif_input_to_the_single_pair_command_is_read(tmp_path, model_file):
    from PIL import Image

    ref = tmp_path / "ref.png"
    write_image(ref, base_image(0))
    Image.fromarray(base_image(0)).save(tmp_path / "in.gif")
    result = run_cli(tmp_path / "in.gif", "--ref", ref, "--model", model_file, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert read_image(tmp_path / "in.aligned.png").shape[:2] == (120, 160)
