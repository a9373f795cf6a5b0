"""Exit codes and signals, with real subprocesses and real signals: SIGTERM and SIGINT stop a batch
gracefully (every finished output recorded, lock released, exit 143/130), a second signal stops it at once,
kill -9 at a random point loses and duplicates nothing, and --fail-on-suspect judges the whole job."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stn_align.batch import LOCK_NAME
from stn_align.io import read_image, write_image
from stn_align.manifest import MANIFEST_NAME, read_manifest

from conftest import base_image, jsonl, run_cli, shifted

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="POSIX signals")]


def make_inputs(root: Path, n: int, size=(96, 72)) -> tuple[Path, Path]:
    ref_image = base_image(0, size)
    src = root / "in"
    moved = shifted(ref_image)
    for i in range(n):
        write_image(src / f"{i // 100:02d}" / f"{i:04d}.png", moved)
    ref = root / "ref.png"
    write_image(ref, ref_image)
    return src, ref


def start_batch(src, ref, out, model_file, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "stn_align.cli", "batch", src, "-o", out, "--ref", ref, "--model", model_file,
            "--device", "cpu", "--workers", "1", "--batch-size", "2", *extra]
    return subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the manifest holds ``count`` finished records (or the process ended)."""
    deadline = time.monotonic() + timeout
    path = out / MANIFEST_NAME
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text(errors="replace").count('"status": "ok"') >= count:
            return
        time.sleep(0.01)


def check_consistent(out: Path, src: Path, allow_writing: bool = False) -> list[dict]:
    """No output without its record and no ok record without its output; after a clean end, one line per
    input. After an abrupt end (``allow_writing``) the manifest is a journal: the last record of an input counts,
    and ``writing`` records (work handed out, maybe written) may remain; the next run compacts it."""
    if allow_writing:
        records = list(read_manifest(out / MANIFEST_NAME).values())
    else:
        records = jsonl(out / MANIFEST_NAME)
        inputs = [r["input"] for r in records]
        assert len(inputs) == len(set(inputs)), "duplicate records"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    hidden = {f for f in files if f.rsplit("/", 1)[-1].startswith(".")}  # the lock, temporary files
    assert allow_writing or not hidden, f"left behind: {hidden}"
    files -= hidden
    ok = {r["output"]: r for r in records if r["status"] == "ok"}
    writing = {r["output"] for r in records if r["status"] == "writing"}
    assert allow_writing or not writing
    assert files <= set(ok) | writing, f"outputs without a record: {sorted(files - set(ok) - writing)}"
    for name, r in ok.items():
        path = out / name
        assert path.is_file() and path.stat().st_size == r["output_bytes"], name
        assert (src / r["input"]).is_file()
    return records


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_stops_gracefully_and_a_rerun_resumes(tmp_path, model_file, sig, code, name):
    src, ref = make_inputs(tmp_path, 160)
    out = tmp_path / "out"
    proc = start_batch(src, ref, out, model_file)
    wait_for_records(out, 6, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"stopped by {name}" in stderr and "re-run the same command to resume" in stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr
    assert not (out / LOCK_NAME).exists()
    records = check_consistent(out, src)
    done = sum(r["status"] == "ok" for r in records)
    assert 6 <= done < 160
    rerun = run_cli("batch", src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu")
    assert rerun.returncode == 0, rerun.stderr
    assert f"aligned {160 - done}, skipped {done}," in rerun.stdout
    assert len(check_consistent(out, src)) == 160


def test_second_signal_stops_at_once_cleanly(tmp_path, model_file):
    src, ref = make_inputs(tmp_path, 48, size=(800, 600))  # big enough that the pairs in progress take a while
    out = tmp_path / "out"
    proc = start_batch(src, ref, out, model_file, "--batch-size", "8")
    wait_for_records(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # two signals at once would reach Python's handler as one
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped at once" in stderr and "terminate called" not in stderr and "Traceback" not in stderr
    assert not (out / LOCK_NAME).exists()
    check_consistent(out, src, allow_writing=True)
    rerun = run_cli("batch", src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu")
    assert rerun.returncode == 0, rerun.stderr
    records = check_consistent(out, src)
    assert len(records) == 48 and {r["status"] for r in records} == {"ok"}


@pytest.mark.slow
def test_kill_9_at_a_random_point_loses_and_duplicates_nothing(tmp_path, model_file):
    seed = int(os.environ.get("STN_ALIGN_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"kill -9 test seed: {seed} (rerun with STN_ALIGN_KILL_SEED={seed})")
    rng = random.Random(seed)
    n = 300
    src, ref = make_inputs(tmp_path, n, size=(64, 48))
    out = tmp_path / "out"
    proc = start_batch(src, ref, out, model_file, "--refine", "none")
    kill_after = rng.randrange(1, n)  # finished records before the kill, then a random extra delay
    wait_for_records(out, kill_after, proc)
    time.sleep(rng.random() * 0.05)
    proc.kill()
    proc.communicate(timeout=60)
    before = {r["input"]: r for r in check_consistent(out, src, allow_writing=True)}
    finished = {k for k, r in before.items() if r["status"] == "ok"}
    stamps = {k: (out / before[k]["output"]).stat().st_mtime_ns for k in finished}
    rerun = run_cli("batch", src, "-o", out, "--ref", ref, "--model", model_file, "--device", "cpu", "--refine", "none")
    assert rerun.returncode == 0, (seed, rerun.stderr)
    records = check_consistent(out, src)
    assert len(records) == n and {r["status"] for r in records} == {"ok"}, seed
    assert f"skipped {len(finished)}," in rerun.stdout, (seed, rerun.stdout)
    assert all((out / before[k]["output"]).stat().st_mtime_ns == stamps[k] for k in finished), seed
    for r in records[:: 37]:
        assert read_image(out / r["output"]).shape == (48, 64, 3)


def test_fail_on_suspect_judges_the_whole_job_and_the_single_pair(tmp_path, model_file):
    src = tmp_path / "in"
    write_image(src / "a.png", base_image(3))  # another product: the alignment is suspect
    ref = tmp_path / "ref.png"
    write_image(ref, base_image(0))
    out = tmp_path / "out"
    common = ("--model", model_file, "--device", "cpu", "--fallback", "none", "--min-score", "0.9")
    first = run_cli("batch", src, "-o", out, "--ref", ref, "--fail-on-suspect", *common)
    assert first.returncode == 1 and "suspect 1" in first.stdout
    again = run_cli("batch", src, "-o", out, "--ref", ref, "--fail-on-suspect", *common)
    assert again.returncode == 1 and "skipped 1" in again.stdout and "suspect 1" in again.stdout
    assert run_cli("batch", src, "-o", out, "--ref", ref, *common).returncode == 0
    single = run_cli(src / "a.png", "--ref", ref, "-o", tmp_path / "a_out.png", "--fail-on-suspect", *common)
    assert single.returncode == 1 and (tmp_path / "a_out.png").is_file()
    assert run_cli(src / "a.png", "--ref", ref, "-o", tmp_path / "b_out.png", *common).returncode == 0
