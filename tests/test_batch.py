"""Batch mode: ``stn_align.batch.align_directory`` and ``stn-align batch``.

Pairing rules, the mirrored output tree, the manifest and resume, bad inputs (each a one-line failed
record, the run goes on), and the directory-level refusals. A fresh AlignerNet is the identity, so
with ECC it recovers the small shift between each input and its reference. Images are tiny.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stn_align.align import Aligner
from stn_align.batch import LOCK_NAME, MANIFEST_NAME, BatchError, OutputLock, align_directory, plan_pairs, read_manifest
from stn_align.checkpoint import save_model
from stn_align.cli import app
from stn_align.io import ImageError, read_image, write_image
from stn_align.model import AlignerNet, ModelConfig

from conftest import SHIFT, base_image, corner_error








def shifted(image: np.ndarray) -> np.ndarray:
    """The input whose alignment onto ``image`` is SHIFT."""
    h, w = image.shape[:2]
    out = cv2.warpPerspective(image, np.linalg.inv(SHIFT), (w, h), borderMode=cv2.BORDER_REFLECT)
    return out.reshape(image.shape)


def put(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, image)
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (far over the limit); the data is tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def batch(*args, **kw):
    return CliRunner().invoke(app, ["batch", *[str(a) for a in args]], **kw)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def summary_line(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("aligned "))


@pytest.fixture
def tree(tmp_path) -> dict:
    """INPUT_DIR with good images in sub-folders (8-bit, 16-bit, RGBA) and every kind of bad file."""
    ref_image = base_image(0)
    src = tmp_path / "in"
    put(src / "a.png", shifted(ref_image))
    put(src / "sub" / "b.jpg", shifted(ref_image))
    deep = ref_image.astype(np.uint16) * 257
    put(src / "sub" / "deeper" / "c16.png", shifted(deep))
    put(src / "d_rgba.png", shifted(np.dstack([ref_image, np.full(ref_image.shape[:2], 180, np.uint8)])))
    good = (src / "a.png").read_bytes()
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    (src / "truncated.png").write_bytes(good[: len(good) // 3])
    (src / "zero.png").write_bytes(b"")
    (src / "notes.png").write_text("this is not an image\n")
    bomb_png(src / "bomb.png")
    (src / "readme.txt").write_text("not listed: no image extension\n")
    ref = put(tmp_path / "ref.png", ref_image)
    return {"src": src, "ref": ref, "out": tmp_path / "out", "ref_image": ref_image,
            "good": ["a.png", "d_rgba.png", "sub/b.jpg", "sub/deeper/c16.png"],
            "bad": ["bomb.png", "corrupt.jpg", "notes.png", "truncated.png", "zero.png"]}


# ------------------------------------------------------------------------------------------------ CLI


def test_single_ref_tree_bad_inputs_and_resume(tree, model_file):
    src, ref, out = tree["src"], tree["ref"], tree["out"]
    args = (src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu", "--batch-size", "3", "--workers", "2")
    result = batch(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert summary_line(result).startswith("aligned 4, skipped 0, failed 5, suspect 0")
    assert "pairs/s" in result.stdout
    # every failure listed at the end, one line each, naming the file
    tail = result.stderr.splitlines()[-5:]
    reasons = {"bomb.png": "limit", "corrupt.jpg": "corrupt", "notes.png": "not an image",
               "truncated.png": "truncated", "zero.png": "empty"}
    for name, reason in reasons.items():
        [line] = [t for t in tail if t.startswith(str(src / name) + ": ")]
        assert reason in line, line
    # mirrored output tree, same names; nothing for the bad inputs; inputs untouched
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*tree["good"], MANIFEST_NAME])
    records = {r["input"]: r for r in manifest(out)}
    assert sorted(records) == sorted(tree["good"] + tree["bad"])
    for name in tree["good"]:
        r = records[name]
        assert r["status"] == "ok" and r["output"] == name and r["reference"] == str(ref)
        assert corner_error(r["matrix"]) < 1.0, (name, r["matrix"])  # the 3.6 px shift recovered
        assert r["transform"] == "projective" and isinstance(r["score"], float) and r["suspect"] is False
    for name in tree["bad"]:
        assert records[name]["status"] == "failed" and records[name]["error"].startswith(str(src / name) + ": ")
    # the recorded matrix reproduces the output; depth and alpha are kept
    a_in, a_out = read_image(src / "a.png"), read_image(out / "a.png")
    m = np.array(records["a.png"]["matrix"])
    expected = cv2.warpPerspective(a_in, m, (a_out.shape[1], a_out.shape[0]), borderValue=(255, 255, 255))
    assert np.abs(expected.astype(int) - a_out.astype(int)).max() <= 1
    assert read_image(out / "sub/deeper/c16.png").dtype == np.uint16
    rgba = read_image(out / "d_rgba.png")
    assert rgba.shape[2] == 4 and (rgba[20:-20, 20:-20, 3] == 180).all()

    # resume: nothing redone, failed ones retried, one record per input
    stamp = (out / "a.png").stat().st_mtime_ns
    result = batch(*args)
    assert result.exit_code == 1
    assert summary_line(result).startswith("aligned 0, skipped 4, failed 5")
    assert (out / "a.png").stat().st_mtime_ns == stamp
    assert len(manifest(out)) == 9
    # a deleted output is redone
    (out / "sub" / "b.jpg").unlink()
    result = batch(*args)
    assert summary_line(result).startswith("aligned 1, skipped 3, failed 5")
    assert (out / "sub" / "b.jpg").is_file()
    # --force redoes everything
    result = batch(*args, "--force")
    assert summary_line(result).startswith("aligned 4, skipped 0, failed 5")
    assert len(manifest(out)) == 9
    # fixing the bad inputs: only they are done on the next run, exit 0
    for name in tree["bad"]:
        (src / name).unlink()
    put(src / "zero.png", shifted(tree["ref_image"]))
    result = batch(*args)
    assert result.exit_code == 0, result.output
    assert summary_line(result).startswith("aligned 1, skipped 4, failed 0")
    statuses = {r["input"]: r["status"] for r in manifest(out)}
    assert statuses["zero.png"] == "ok"  # records of vanished inputs stay, with their last status
    assert statuses["bomb.png"] == "failed"


def test_ref_dir_pairing(tmp_path, model_file):
    src, refs, out = tmp_path / "in", tmp_path / "refs", tmp_path / "out"
    imgs = [base_image(i) for i in range(4)]
    put(src / "p1.png", shifted(imgs[0]))
    put(refs / "p1.png", imgs[0])  # same relative path ...
    put(refs / "p1.jpg", imgs[1])  # ... wins over a same-stem file
    put(src / "sub" / "p2.jpg", shifted(imgs[1]))
    put(refs / "sub" / "p2.png", imgs[1])  # same relative stem, another extension
    put(src / "p3.png", shifted(imgs[2]))  # no reference at all
    put(src / "p4.png", shifted(imgs[3]))
    put(refs / "p4.jpg", imgs[3])
    put(refs / "p4.tif", imgs[3])  # two candidates: ambiguous
    put(src / "other" / "p1.png", shifted(imgs[0]))  # the reference must be at the same relative path
    result = batch(src, "-o", out, "--ref-dir", refs, "--model", model_file, "--device", "cpu")
    assert result.exit_code == 1, result.output
    records = {r["input"]: r for r in manifest(out)}
    assert records["p1.png"]["status"] == "ok" and records["p1.png"]["reference"] == "p1.png"
    assert records["sub/p2.jpg"]["status"] == "ok" and records["sub/p2.jpg"]["reference"] == "sub/p2.png"
    assert corner_error(records["p1.png"]["matrix"]) < 1.0
    assert corner_error(records["sub/p2.jpg"]["matrix"]) < 1.0
    assert (out / "sub" / "p2.jpg").is_file() and read_image(out / "sub" / "p2.jpg").shape == imgs[1].shape
    for name, reason in (("p3.png", "no reference"), ("p4.png", "ambiguous"), ("other/p1.png", "no reference")):
        assert records[name]["status"] == "failed"
        assert records[name]["error"].startswith(str(src / name) + ": ") and reason in records[name]["error"]
        assert any(line.startswith(str(src / name) + ": ") for line in result.stderr.splitlines())
    assert "p4.jpg, p4.tif" in records["p4.png"]["error"]
    # a reference that cannot be read fails its pair only
    (refs / "sub" / "p2.png").write_bytes(b"")
    result = batch(src, "-o", out, "--ref-dir", refs, "--model", model_file, "--device", "cpu", "--force")
    records = {r["input"]: r for r in manifest(out)}
    assert records["sub/p2.jpg"]["error"] == f"{refs / 'sub' / 'p2.png'}: empty file (0 bytes)"
    assert records["p1.png"]["status"] == "ok"


def test_directory_refusals(tmp_path, model_file):
    src = tmp_path / "in"
    put(src / "a.png", base_image(0))
    ref = put(tmp_path / "ref.png", base_image(0))
    common = ("--model", model_file, "--device", "cpu")
    cases = [
        ((src, "-o", src, "--ref", ref), 2, f"{src}: the output directory is the input directory"),
        ((src, "-o", tmp_path / "in" / ".", "--ref", ref), 2, "is the input directory"),
        ((src, "-o", tmp_path / "o", "--ref-dir", tmp_path / "o"), 2, "is the reference directory"),
        ((src, "-o", tmp_path / "o"), 2, "exactly one of --ref"),
        ((src, "-o", tmp_path / "o", "--ref", ref, "--ref-dir", tmp_path), 2, "exactly one of --ref"),
        ((src, "-o", tmp_path / "o", "--ref", tmp_path / "nope.png"), 1, f"{tmp_path / 'nope.png'}: no such file"),
        ((tmp_path / "nodir", "-o", tmp_path / "o", "--ref", ref), 1, f"{tmp_path / 'nodir'}: no such directory"),
        ((src, "-o", tmp_path / "o", "--ref-dir", tmp_path / "norefs"), 1, "norefs: no such directory"),
        ((src, "-o", tmp_path / "o", "--ref", ref, "--batch-size", "0"), 2, "--batch-size"),
        ((src, "-o", tmp_path / "o", "--ref", ref, "--fill", "transparent"), 0, None),
    ]
    put(src / "b.jpg", base_image(1))
    cases[-1] = ((src, "-o", tmp_path / "o", "--ref", ref, "--fill", "transparent"), 2, "b.jpg")
    for args, code, text in cases:
        result = batch(*args, *common)
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert text in line, line
        assert not (tmp_path / "o").exists()  # refused before any work
    assert sorted(p.name for p in src.iterdir()) == ["a.png", "b.jpg"]


def test_out_dir_inside_input_dir_is_left_out(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0)
    put(src / "a.png", shifted(ref_image))
    put(src / "s" / "b.png", shifted(ref_image))
    ref = put(tmp_path / "ref.png", ref_image)
    out = src / "aligned"
    args = (src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu")
    result = batch(*args)
    assert result.exit_code == 0, result.output
    assert "left out of the inputs" in result.stderr
    assert summary_line(result).startswith("aligned 2, skipped 0")
    result = batch(*args, "--force")  # the outputs are not picked up as inputs
    assert summary_line(result).startswith("aligned 2, skipped 0, failed 0")
    assert sorted(r["input"] for r in manifest(out)) == ["a.png", "s/b.png"]
    assert not (out / "aligned").exists()


def test_fail_on_suspect(tmp_path, model_file):
    src = tmp_path / "in"
    put(src / "a.png", shifted(base_image(0)))
    ref = put(tmp_path / "ref.png", base_image(0))
    args = (src, "-o", tmp_path / "out", "--ref", ref, "--model", model_file, "--device", "cpu", "--refine", "none",
            "--min-score", "0.999", "--fallback", "none")
    result = batch(*args)
    assert result.exit_code == 0 and "suspect 1" in summary_line(result)
    assert "a.png" in result.stderr  # suspects are named
    assert manifest(tmp_path / "out")[0]["suspect"] is True
    assert batch(*args, "--force", "--fail-on-suspect").exit_code == 1


# --------------------------------------------------------------------------------------------- engine


def test_engine_progress_and_killed_run(tmp_path, model_file):
    src, out = tmp_path / "in", tmp_path / "out"
    ref_image = base_image(0)
    names = [f"{i:02d}.png" for i in range(5)]
    for name in names:
        put(src / name, shifted(ref_image))
    ref = put(tmp_path / "ref.png", ref_image)
    aligner = Aligner.load(model_file, "cpu", refine="none")
    seen = []
    summary = align_directory(aligner, src, out, ref=ref, batch_size=2, workers=2, on_progress=seen.append)
    assert (summary.total, summary.aligned, summary.failed, summary.skipped) == (5, 5, 0, 0)
    assert summary.pairs_per_second > 0 and summary.manifest == out / MANIFEST_NAME
    assert sorted(r["input"] for r in seen) == names and all(r["status"] == "ok" for r in seen)
    # simulate a run killed mid-way: duplicate appended records and a half-written last line
    lines = (out / MANIFEST_NAME).read_text().splitlines()
    broken = [*lines, lines[0], lines[1].replace('"status": "ok"', '"status": "failed", "owned": true'), lines[2][:40]]
    (out / MANIFEST_NAME).write_text("\n".join(broken))
    records = read_manifest(out / MANIFEST_NAME)
    assert len(records) == 5 and records["01.png"]["status"] == "failed"  # last record wins
    seen.clear()
    summary = align_directory(aligner, src, out, ref=ref, batch_size=2, on_progress=seen.append)
    assert (summary.aligned, summary.skipped) == (1, 4)  # only the one whose last record failed
    assert [r["input"] for r in seen if r["status"] == "ok"] == ["01.png"]
    final = manifest(out)
    assert [r["input"] for r in final] == names and all(r["status"] == "ok" for r in final)
    # the same reference content under another path is the same job; another reference is not
    same = put(tmp_path / "copy" / "ref.png", ref_image)
    assert align_directory(aligner, src, out, ref=same).skipped == 5
    other = put(tmp_path / "ref2.png", base_image(1))
    summary = align_directory(aligner, src, out, ref=other)
    assert summary.aligned == 5 and summary.redone == {"reference changed": 5}


def test_engine_setup_errors(tmp_path, model_file):
    src = tmp_path / "in"
    put(src / "a.png", base_image(0))
    with pytest.raises(BatchError):
        plan_pairs(src, src, ref=tmp_path / "r.png")
    with pytest.raises(BatchError):
        plan_pairs(src, tmp_path / "o")
    with pytest.raises(ImageError, match="no such file"):
        align_directory(Aligner.load(model_file, "cpu"), src, tmp_path / "o", ref=tmp_path / "r.png")
    assert not (tmp_path / "o").exists()


def test_unreadable_subfolder_is_a_failed_record(tmp_path, model_file, monkeypatch):
    src = tmp_path / "in"
    ref_image = base_image(0)
    put(src / "a.png", shifted(ref_image))
    put(src / "locked" / "b.png", shifted(ref_image))
    ref = put(tmp_path / "ref.png", ref_image)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # as root, chmod 000 would not stop us reading
    result = batch(src, "-o", tmp_path / "out", "--ref", ref, "--model", model_file, "--device", "cpu")
    assert result.exit_code == 1
    assert summary_line(result).startswith("aligned 1, skipped 0, failed 1")
    assert f"{src / 'locked'}: permission denied" in result.stderr.splitlines()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read chmod 000 folders")
def test_unreadable_input_dir_really(tmp_path, model_file):
    src = tmp_path / "in"
    put(src / "a.png", base_image(0))
    ref = put(tmp_path / "ref.png", base_image(0))
    src.chmod(0)
    try:
        result = batch(src, "-o", tmp_path / "out", "--ref", ref, "--model", model_file, "--device", "cpu")
    finally:
        src.chmod(0o755)
    assert result.exit_code == 1
    assert f"error: {src}: permission denied" in result.stderr


# -------------------------------------------------------------------------------- one writer per OUT_DIR


def one_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = tmp_path / "in"
    put(src / "a.png", shifted(base_image(0)))
    return src, put(tmp_path / "ref.png", base_image(0)), tmp_path / "out"


def write_lock(out: Path, pid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    lock.write_text(f"{pid}\n{socket.gethostname()}\n")
    return lock


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path, model_file):
    src, ref, out = one_pair(tmp_path)
    args = (src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu", "--refine", "none")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # another live process
    try:
        lock = write_lock(out, holder.pid)
        result = batch(*args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: {lock}: ") and f"(pid {holder.pid})" in line
        assert not (out / "a.png").exists() and not (out / MANIFEST_NAME).exists()  # no work done
        assert lock.read_text().split()[0] == str(holder.pid)  # the other run's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # that process is gone (killed, its lock left behind): the next run takes the lock over
    result = batch(*args)
    assert result.exit_code == 0, result.output
    assert summary_line(result).startswith("aligned 1, skipped 0, failed 0")
    assert (out / "a.png").is_file() and not lock.exists()  # released at the end


def test_the_lock_is_held_during_the_run_and_released_on_interrupt(tmp_path, model_file):
    src, ref, out = one_pair(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = write_lock(out, dead.pid)  # a stale lock
    aligner = Aligner.load(model_file, "cpu", refine="none")
    holders = []

    def on_progress(record: dict) -> None:
        holders.append(lock.read_text().split()[0])
        with pytest.raises(BatchError, match=f"{LOCK_NAME}: .*pid {os.getpid()}"):  # same process, same OUT_DIR
            align_directory(aligner, src, out, ref=ref)

    summary = align_directory(aligner, src, out, ref=ref, on_progress=on_progress)
    assert summary.aligned == 1 and holders == [str(os.getpid())]
    assert not lock.exists()

    def interrupt(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        align_directory(aligner, src, out, ref=ref, force=True, on_progress=interrupt)
    assert not lock.exists()
    assert [r["input"] for r in manifest(out)] == ["a.png"]
    with OutputLock(out) as held:  # free again
        assert held.holder() == (os.getpid(), socket.gethostname())
    assert not lock.exists()


def test_engine_options(tmp_path, model_file, monkeypatch):
    src, ref, out = one_pair(tmp_path)
    common = (src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu")
    for extra, code, text in ((("--engine", "spark"), 2, "--engine must be local or ray"),
                              (("--ray-address", "auto"), 2, "--ray-address needs --engine ray")):
        result = batch(*common, *extra)
        assert result.exit_code == code and text in result.stderr, result.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = batch(*common, "--engine", "ray")
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: --engine ray needs Ray") and 'pip install "stn-align[ray]"' in line
    assert not out.exists()


# ------------------------------------------------------------------------- the warp on the network's device


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_full_resolution_warp_on_the_device_matches_opencv(device):
    """Batch warps on the device that runs the network (kornia on CUDA); it must agree with OpenCV's warp,
    which the manifest's matrices promise, within 1 grey level. ``cpu`` runs the same torch path on the CPU."""
    from stn_align.align import _warp_torch, warp_image

    rgb = base_image(1, (400, 300))
    images = {"rgb": rgb, "gray": cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None],
              "rgba": np.dstack([rgb, np.linspace(0, 255, 400, dtype=np.uint8)[None].repeat(300, 0)]),
              "rgb16": rgb.astype(np.uint16) * 257}
    matrix = np.array([[0.93, 0.08, 12.0], [-0.06, 1.04, -7.5], [2e-4, -1e-4, 1.0]])  # input -> reference pixels
    size = (360, 280)
    for name, image in images.items():
        for fill in ("white", "black", "edge", "transparent", (10, 200, 30)):
            expected = warp_image(image, matrix, size, fill)  # OpenCV
            if device == "cuda":
                got = warp_image(image, matrix, size, fill, torch.device("cuda"))
            else:
                src = image
                if fill == "transparent":  # what warp_image does before choosing the path
                    src = np.repeat(src, 3, axis=2) if src.shape[2] == 1 else src
                    top = 65535 if src.dtype == np.uint16 else 255
                    src = src if src.shape[2] == 4 else np.dstack([src, np.full(src.shape[:2], top, src.dtype)])
                got = _warp_torch(src, matrix, size, fill, torch.device("cpu"))
            assert got.shape == expected.shape and got.dtype == expected.dtype, (name, fill)
            grey = 257 if image.dtype == np.uint16 else 1
            diff = np.abs(got.astype(np.int64) - expected.astype(np.int64)).max()
            assert diff <= grey, (name, fill, diff)
