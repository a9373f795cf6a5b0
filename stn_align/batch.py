"""Batch mode: align every image of a directory tree to one reference or to a mirrored reference tree.

``align_directory(aligner, input_dir, out_dir, ref=... | ref_dir=...)`` is what ``stn-align batch``
runs. The pipeline:

* images are decoded on a thread pool (``workers`` threads; the single ``ref`` is decoded once),
  one chunk ahead of the network;
* the network runs on chunks of ``batch_size`` pairs at once (:meth:`Aligner.estimate`);
* ECC refinement, score, full-resolution warp and encoding run per pair on the same thread pool
  (OpenCV and Pillow release the GIL), writes are atomic (:func:`io.write_image`).

The output tree mirrors the input tree: ``OUT_DIR/REL`` for ``INPUT_DIR/REL`` (same name and format).
An ``OUT_DIR`` inside ``INPUT_DIR`` is allowed and not entered when listing the inputs; ``OUT_DIR`` equal
to ``INPUT_DIR`` (or to ``REF_DIR``) is refused. No output may ever be an input or a reference file.

Manifest ``OUT_DIR/alignments.jsonl`` (:mod:`stn_align.manifest`): one JSON object per input, fields ``input``,
``reference``, ``output`` (relative to INPUT_DIR, REF_DIR, OUT_DIR; a single ``--ref`` is recorded as given),
``matrix`` (3x3, input pixels -> reference pixels), ``transform``, ``score``, ``suspect``, ``refined``, ``method``
(the winning path: ``network``, ``rotated``, ``features`` or ``identity``, ``+ecc`` when polished; see
:class:`stn_align.align.AlignResult`), ``model``, ``status`` (``ok`` / ``failed``), ``error`` (failed only), and
for ``ok`` records ``output_bytes`` and the ``fingerprint`` (input, reference, model weights, options). During a
run the manifest is a journal: a ``writing`` record (fsynced) before a pair's output may be written, its
``ok`` or ``failed`` record (fsynced) when it is done, so a killed run keeps its work and no output exists
without a record. At the start and the end (and after an interruption) the file is rewritten atomically
with one record per input, the last one winning, sorted by input path. A sub-folder of INPUT_DIR that cannot
be listed gets a ``failed`` record of its own (``input`` is the folder) and the run goes on; an unreadable
INPUT_DIR is an error before any work.

Resume: an input is skipped (counted ``skipped``; its ``ok`` record is kept as is) only when its input and
reference content, the model's weights and the output-changing options match its record and its output file
still has the recorded size (:func:`manifest.resume_decision`); anything else is redone and the reason
counted (``summary.redone``). ``force=True`` redoes everything. An output path holding a file that the
manifest does not claim (the user's own) is never written: that pair fails, unless ``overwrite=True``.

One writer per output folder: a run holds ``OUT_DIR/.stn-align.lock`` (its pid and host) from start to end
(:class:`OutputLock`); a second run on the same OUT_DIR is refused while the first is alive, and the lock of a
run that was killed is taken over. Engines share the planning, the lock, the manifest and resume
(:func:`prepare`, :func:`open_run`) and the work on a pair (:func:`decode_pair`, :func:`finish_pair`,
:func:`align_chunk`); :func:`align_directory` is the local engine, :mod:`stn_align.ray_engine` runs the same
job on a Ray cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .io import DEFAULT_MAX_PIXELS, ImageError, list_images, read_image, read_info, write_image
from .manifest import (MANIFEST_NAME, ManifestError, ManifestWriter, fingerprint, output_options, owns_output,
                       read_manifest, resume_decision, write_manifest)

#: Default memory budget of a local batch's images in flight, bytes (``--max-memory``, in MB on the CLI).
DEFAULT_MEMORY_BUDGET = 1024 * 2**20
#: Estimated bytes a pair holds while in flight, per input pixel: the decoded image, its gray copy, the
#: full-resolution output and OpenCV's temporaries (60-MP pairs measured about 12 B per pixel).
BYTES_PER_PIXEL = 12


#: ``--format``: the suffix each output gets (``keep``: its input's).
OUTPUT_FORMATS = {"jpg": ".jpg", "png": ".png", "tiff": ".tif", "webp": ".webp"}

#: Output formats that can hold an alpha channel (``fill="transparent"``).
ALPHA_SUFFIXES = frozenset({".png", ".tif", ".tiff", ".webp"})


class BatchError(Exception):
    """A problem with the whole run, found before any work (one line). ``usage`` marks option errors."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


@dataclass
class Pair:
    """One planned alignment."""

    input: Path  # the file
    rel: str  # its path relative to INPUT_DIR, posix
    output: Path
    reference: Optional[Path]  # None when pairing failed
    ref_label: str  # as recorded in the manifest
    error: Optional[str] = None  # set at planning time (no reference, ambiguous, would overwrite)


@dataclass
class BatchSummary:
    """What a run did. ``failures`` are one-line ``PATH: reason`` messages."""

    total: int = 0
    aligned: int = 0
    skipped: int = 0
    failed: int = 0
    suspect: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)  # input paths (relative) of suspect alignments
    manifest: Optional[Path] = None
    excluded_out_dir: bool = False  # OUT_DIR was inside INPUT_DIR and left out of the listing
    interrupted: bool = False
    redone: dict[str, int] = field(default_factory=dict)  # why pairs recorded before were redone: count per reason
    gone: list[str] = field(default_factory=list)  # inputs with an ok record that are no longer there (outputs kept)
    warnings: list[str] = field(default_factory=list)  # one-line notes, e.g. a corrupt manifest line
    skipped_entries: list[tuple[Path, str]] = field(default_factory=list)  # listing entries that are not inputs

    @property
    def pairs_per_second(self) -> float:
        """Throughput of the pairs actually processed (aligned or failed; skipped ones excluded)."""
        done = self.aligned + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


# --- planning ---------------------------------------------------------------------------------------------


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _stem_key(rel: str) -> str:
    """``a/b/photo.JPG`` -> ``a/b/photo`` (the pairing key for "same stem, any image extension")."""
    head, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}" if head else stem


def list_inputs(root: Path, recursive: bool = True, exclude: Optional[Path] = None,
                skipped: Optional[list[tuple[Path, str]]] = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``root`` (:func:`io.list_images`), but a sub-folder that cannot be listed is
    reported, not fatal, and ``exclude`` (e.g. an OUT_DIR inside INPUT_DIR) is not entered.
    Returns ``(files, [(folder, reason)])``; raises :class:`ImageError` when ``root`` cannot be listed.
    """
    problems: list[tuple[Path, str]] = []
    files = list_images(root, recursive, exclude=exclude, problems=problems, skipped=skipped)
    return files, problems


def plan_pairs(
    input_dir: Path | str,
    out_dir: Path | str,
    ref: Path | str | None = None,
    ref_dir: Path | str | None = None,
    recursive: bool = True,
    skipped: Optional[list[tuple[Path, str]]] = None,
    output_format: str = "keep",
    ref_in_folder: Optional[str] = None,
    pairs_csv: Path | str | None = None,
    ignore_case: bool = False,
) -> tuple[list[Pair], bool]:
    """List the inputs and pair each with its reference. Returns ``(pairs, out_dir_excluded)``.

    ``skipped`` collects ``(path, reason)`` for the entries of ``input_dir`` that are not inputs
    (see :func:`io.list_images`). ``output_format``: ``keep`` (outputs named as their inputs) or one of
    :data:`OUTPUT_FORMATS` (the suffix replaced; two inputs that would share an output both fail).

    Raises :class:`BatchError` (usage) for inconsistent directories and :class:`ImageError` for an
    unreadable ``input_dir`` / ``ref_dir`` / missing ``ref``. Per-input problems (no reference,
    ambiguous reference, output that would overwrite an input) become ``Pair.error``.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if sum(x is not None for x in (ref, ref_dir, ref_in_folder, pairs_csv)) != 1:
        raise BatchError("give exactly one of --ref FILE, --ref-dir DIR, --ref-in-folder NAME or --pairs CSV", usage=True)
    in_root, out_root = input_dir.resolve(), out_dir.resolve()
    if in_root == out_root:
        raise BatchError(f"{out_dir}: the output directory is the input directory (choose another -o)", usage=True)
    if out_root.exists() and not out_root.is_dir():
        raise BatchError(f"{out_dir}: not a directory", usage=True)
    if ref_dir is not None and Path(ref_dir).resolve() == out_root:
        raise BatchError(f"{out_dir}: the output directory is the reference directory (choose another -o)", usage=True)
    inside = _is_within(out_root, in_root)
    inputs, unlisted = list_inputs(input_dir, recursive, exclude=out_root if inside else None, skipped=skipped)
    excluded = inside and recursive

    protected: set[Path] = {p.resolve() for p in inputs}
    pairs: list[Pair] = []
    fold = (lambda text: text.lower()) if ignore_case else (lambda text: text)
    if ref_in_folder is not None:
        pairs = _pairs_by_folder(inputs, input_dir, out_dir, ref_in_folder, fold, skipped)
    elif pairs_csv is not None:
        pairs = _pairs_from_csv(Path(pairs_csv), input_dir, out_dir, protected)
    elif ref is not None:
        ref = Path(ref)
        if ref.is_dir():
            raise ImageError(ref, "is a directory (use --ref-dir for a directory of references)")
        protected.add(ref.resolve())
        for p in inputs:
            rel = p.relative_to(input_dir).as_posix()
            pairs.append(Pair(p, rel, out_dir / rel, ref, str(ref)))
    else:
        ref_dir = Path(ref_dir)
        refs = list_images(ref_dir, recursive=recursive)
        by_rel: dict[str, Path] = {}
        by_stem: dict[str, list[Path]] = {}
        for r in refs:
            rel = r.relative_to(ref_dir).as_posix()
            by_rel[fold(rel)] = r
            by_stem.setdefault(fold(_stem_key(rel)), []).append(r)
            protected.add(r.resolve())
        for p in inputs:
            rel = p.relative_to(input_dir).as_posix()
            pair = Pair(p, rel, out_dir / rel, None, "")
            if fold(rel) in by_rel:
                pair.reference = by_rel[fold(rel)]
                pair.ref_label = pair.reference.relative_to(ref_dir).as_posix()
            else:
                found = by_stem.get(fold(_stem_key(rel)), [])
                if len(found) == 1:
                    pair.reference, pair.ref_label = found[0], found[0].relative_to(ref_dir).as_posix()
                elif not found:
                    pair.error = (f"{p}: no reference in {ref_dir} (looked for {rel} and "
                                  f"{_stem_key(rel)}.* with any image extension)")
                else:
                    names = ", ".join(r.relative_to(ref_dir).as_posix() for r in found)
                    pair.error = f"{p}: ambiguous reference in {ref_dir}: {names}"
            pairs.append(pair)
    for folder, reason in unlisted:  # an unreadable sub-folder: one failed record, the run goes on
        rel = folder.relative_to(input_dir).as_posix()
        pairs.append(Pair(folder, rel, out_dir / rel, None, "", error=f"{folder}: {reason}"))
    pairs.sort(key=lambda p: p.rel.split("/"))
    if output_format != "keep":
        if output_format not in OUTPUT_FORMATS:
            raise BatchError(f"--format must be keep or one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}", usage=True)
        claimed: dict[Path, Pair] = {}
        for pair in pairs:
            pair.output = pair.output.with_suffix(OUTPUT_FORMATS[output_format])
            other = claimed.setdefault(pair.output, pair)
            if other is not pair and pair.error is None:
                pair.error = f"{pair.input}: its output {pair.output} would also be {other.input}'s (--format {output_format})"
    for pair in pairs:
        if pair.error is None and pair.output.resolve() in protected:
            pair.error = f"{pair.output}: refusing to write an output over an input or reference file"
    return pairs, excluded


def _pairs_by_folder(inputs: list[Path], input_dir: Path, out_dir: Path, pattern: str, fold,
                     skipped: Optional[list] = None) -> list[Pair]:
    """``--ref-in-folder``: in each folder, the one image whose name matches ``pattern`` (a name or a glob) is the
    reference of the others; it is not aligned itself."""
    import fnmatch

    by_folder: dict[Path, list[Path]] = {}
    for p in inputs:
        by_folder.setdefault(p.parent, []).append(p)
    pairs = []
    for folder, files in by_folder.items():
        refs = [p for p in files if fnmatch.fnmatchcase(fold(p.name), fold(pattern))]
        for p in files:
            rel = p.relative_to(input_dir).as_posix()
            if p in refs:
                if skipped is not None:
                    skipped.append((p, f"the reference of its folder (--ref-in-folder {pattern})"))
                continue
            pair = Pair(p, rel, out_dir / rel, None, "")
            if len(refs) == 1:
                pair.reference, pair.ref_label = refs[0], refs[0].relative_to(input_dir).as_posix()
            elif not refs:
                pair.error = f"{p}: no reference matching {pattern!r} in {folder}"
            else:
                pair.error = f"{p}: several references match {pattern!r} in {folder}: {', '.join(r.name for r in refs)}"
            pairs.append(pair)
    return pairs


def _pairs_from_csv(path: Path, input_dir: Path, out_dir: Path, protected: set[Path]) -> list[Pair]:
    """``--pairs CSV``: rows ``input,reference`` (an optional header row ``input,reference``). Inputs are relative
    to INPUT_DIR, references to the CSV's folder (or absolute). Only the listed inputs are aligned."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BatchError(f"{path}: cannot read the pairs file ({getattr(err, 'strerror', None) or err})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["input", "reference"]:
        rows = rows[1:]
    pairs, seen = [], set()
    for number, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise BatchError(f"{path} row {number}: expected 'input,reference'", usage=True)
        rel = Path(row[0].strip()).as_posix()
        source = input_dir / rel
        reference = Path(row[1].strip())
        reference = reference if reference.is_absolute() else path.parent / reference
        pair = Pair(source, rel, out_dir / rel, reference, row[1].strip())
        if rel in seen:
            raise BatchError(f"{path} row {number}: {rel} is listed twice", usage=True)
        seen.add(rel)
        if not source.resolve().is_relative_to(input_dir.resolve()):
            pair.error = f"{source}: not inside {input_dir} (inputs in a pairs file are relative to INPUT_DIR)"
        protected.update({source.resolve(), reference.resolve()})
        pairs.append(pair)
    return pairs


def check_alpha_outputs(pairs: list[Pair]) -> None:
    """``fill="transparent"`` needs outputs that hold alpha; raises :class:`BatchError` (usage) otherwise."""
    no_alpha = [p.rel for p in pairs if p.error is None and p.output.suffix.lower() not in ALPHA_SUFFIXES]
    if no_alpha:
        raise BatchError(f"--fill transparent: {len(no_alpha)} input(s) are in a format without alpha "
                         f"(e.g. {no_alpha[0]}); use PNG, TIFF or WebP inputs or another --fill", usage=True)


def writable(image: np.ndarray) -> np.ndarray:
    """Gray + alpha ``(H, W, 2)`` (what ``fill="transparent"`` makes of a gray input) -> RGBA, which files hold."""
    if image.ndim == 3 and image.shape[2] == 2:
        return np.ascontiguousarray(np.concatenate([np.repeat(image[..., :1], 3, axis=2), image[..., 1:]], axis=2))
    return image


# --- one writer per output folder -------------------------------------------------------------------------

LOCK_NAME = ".stn-align.lock"
_held_locks: set[Path] = set()  # lock files this process holds (resolved paths)
_held_guard = threading.Lock()


def _pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this machine (one of another user, or a zombie, counts)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would end the process there: never take a lock over
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Serialise lock checks on ``folder`` between processes: ``flock`` on the folder (POSIX; elsewhere, or
    on a file system without it, no guard, and only the check-then-replace window is unprotected)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class OutputLock:
    """One writer per output folder: ``OUT_DIR/.stn-align.lock`` holds the pid and host of the run writing there.

    :meth:`acquire` raises :class:`BatchError` (one line naming the lock file and the pid) while that run is
    alive, and takes over the lock of a run that was killed (its pid no longer exists on this host). A lock
    written on another host is never taken over (its pid cannot be checked from here). :meth:`release`
    removes the file if it is still ours. ``with OutputLock(out_dir):`` does both.
    """

    def __init__(self, folder: Path | str):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def holder(self) -> Optional[tuple[int, str]]:
        """``(pid, host)`` written in the lock file, or None when there is none (or it is unreadable)."""
        try:
            fields = self.path.read_text(encoding="utf-8", errors="replace").split()
            return int(fields[0]), (fields[1] if len(fields) > 1 else "")
        except (OSError, ValueError, IndexError):
            return None

    def _alive(self, pid: int, host: str) -> bool:
        if host and host != socket.gethostname():
            return True
        if pid == os.getpid():  # this process: held unless it is a killed run's lock with a recycled pid
            with _held_guard:
                return self.path.resolve() in _held_locks
        return _pid_alive(pid)

    def acquire(self) -> "OutputLock":
        with _folder_guard(self.path.parent):
            holder = self.holder()
            if holder is not None and self._alive(*holder):
                pid, host = holder
                where = f" on {host}" if host and host != socket.gethostname() else ""
                raise BatchError(f"{self.path}: {self.path.parent} is being written by another stn-align batch run "
                                 f"(pid {pid}{where}); wait for it to end, or delete the lock file if that run is gone")
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            try:
                tmp.write_text(f"{os.getpid()}\n{socket.gethostname()}\n", encoding="utf-8")
                os.replace(tmp, self.path)  # free, or a killed run's: ours now
            except OSError as err:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise BatchError(f"{self.path.parent}: cannot write in the output directory "
                                 f"({err.strerror or err})") from None
        with _held_guard:
            _held_locks.add(self.path.resolve())
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _held_guard:
            _held_locks.discard(self.path.resolve())
        holder = self.holder()
        if holder is not None and holder[0] == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- signals ----------------------------------------------------------------------------------------------


class StopSignals:
    """SIGINT and SIGTERM stop a run gracefully: the first sets :attr:`event` (no new pair starts; the pairs in
    progress finish and are recorded, the manifest is compacted and the lock released), a second one exits at
    once, cleanly (the lock released; what was recorded is on disk). Exit status ``128 + signal``: 130 or 143.

    ``with StopSignals(on_first=print_line) as stop:`` then pass ``stop.event`` to :func:`align_directory`.
    Only in the main thread (elsewhere it does nothing)."""

    def __init__(self, on_first: Optional[Callable[[int], None]] = None):
        self.event = threading.Event()
        self.signum: Optional[int] = None
        self.on_first = on_first
        self._saved: dict = {}

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 2)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.event.set()
            if self.on_first:
                self.on_first(signum)
            return
        with _held_guard:
            held = list(_held_locks)
        for path in held:  # what a clean exit would do: no stale lock for the next run
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(path.read_text().split()[0]) == os.getpid():
                    path.unlink()
        os.write(2, b"stopped at once; every finished pair is recorded: re-run the same command to resume\n")
        os._exit(128 + signum)  # no interpreter teardown under running native threads

    def __enter__(self) -> "StopSignals":
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


# --- records ----------------------------------------------------------------------------------------------


def _one_line(err: BaseException, path: Path) -> str:
    if isinstance(err, ImageError):
        return str(err)
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{path}: {text}"


def _read(path: Path, max_pixels: Optional[int]):
    try:
        return read_image(path, max_pixels=max_pixels), None
    except Exception as err:  # noqa: BLE001 - any bad file becomes a failed record, the run goes on
        return None, _one_line(err, path)


def base_record(pair: Pair, out_dir: Path, model_name: str) -> dict:
    """The manifest fields every record of ``pair`` has (paths relative to their roots, the model)."""
    return {"input": pair.rel, "reference": pair.ref_label,
            "output": pair.output.relative_to(out_dir).as_posix(), "model": model_name}


def failed_record(pair: Pair, out_dir: Path, model_name: str, transform: str, message: str) -> dict:
    """The manifest record of a pair that failed with the one-line ``message``."""
    return {**base_record(pair, out_dir, model_name), "matrix": None, "transform": transform, "score": None,
            "suspect": False, "refined": False, "method": None, "status": "failed", "error": message}


# --- the work on pairs (shared by the engines) --------------------------------------------------------------


def decode_pair(pair: Pair, max_pixels: Optional[int], shared_ref: Optional[np.ndarray] = None):
    """``(image, reference, None)`` or ``(None, None, one-line error)``; ``shared_ref``: the single reference."""
    image, err = _read(pair.input, max_pixels)
    if err is not None:
        return None, None, err
    if shared_ref is not None:
        return image, shared_ref, None
    reference, err = _read(pair.reference, max_pixels)
    return image, reference, err


def shared_reference(aligner, shared_ref: Optional[np.ndarray]) -> dict:
    """What :meth:`Aligner.finish` can reuse for every pair of a single reference: its gray image and mask."""
    if shared_ref is None:
        return {}
    from .refine import resolve_mask, to_gray

    shared = {"ref_gray": to_gray(shared_ref)}
    region = resolve_mask(getattr(aligner, "mask", None), shared_ref)
    if region is not None:
        shared["mask"] = region
    return shared


def finish_pair(aligner, pair: Pair, image, reference, matrix, shared: dict, out_dir: Path,
                options: Optional[dict] = None) -> dict:
    """Refine, score, warp and write one pair from its network estimate; returns its manifest record
    (``ok`` with the output's size and the pair's :func:`manifest.fingerprint`, or ``failed``)."""
    model_name = getattr(aligner, "name", "custom")
    try:
        result = aligner.finish(image, reference, matrix, warp=True, **shared)
        options = output_options(aligner) if options is None else options
        write_image(pair.output, writable(result.image), options.get("quality", 95), read_info(pair.input))
        record = {**base_record(pair, out_dir, model_name), **result.to_record(), "status": "ok",
                  "output_bytes": pair.output.stat().st_size,
                  "fingerprint": fingerprint(aligner, pair.input, pair.reference, options)}
        return record
    except Exception as err:  # noqa: BLE001
        return failed_record(pair, out_dir, model_name, aligner.transform, _one_line(err, pair.input))


def align_chunk(aligner, chunk: list[Pair], out_dir: Path, pool: ThreadPoolExecutor,
                max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, shared_ref: Optional[np.ndarray] = None,
                shared: Optional[dict] = None, options: Optional[dict] = None) -> list[dict]:
    """One chunk start to end (decode on ``pool``, one network batch, finish and write on ``pool``); one record
    per pair, in order. What an engine that gets its work in batches (Ray Data) runs on each batch.
    ``options``: the run's output options (:attr:`BatchRun.options`)."""
    model_name = getattr(aligner, "name", "custom")
    shared = shared_reference(aligner, shared_ref) if shared is None else shared
    options = output_options(aligner) if options is None else options
    decoded = list(pool.map(lambda p: decode_pair(p, max_pixels, shared_ref), chunk))
    records: list[Optional[dict]] = [None] * len(chunk)
    ready = []
    for i, (pair, (image, reference, err)) in enumerate(zip(chunk, decoded)):
        if err is not None:
            records[i] = failed_record(pair, out_dir, model_name, aligner.transform, err)
        else:
            ready.append((i, pair, image, reference))
    if ready:
        try:
            matrices = aligner.estimate([r[2] for r in ready], [r[3] for r in ready])
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: fail this chunk, go on
            for i, pair, _, _ in ready:
                records[i] = failed_record(pair, out_dir, model_name, aligner.transform, _one_line(err, pair.input))
        else:
            futures = [(i, pool.submit(finish_pair, aligner, pair, image, reference, matrix, shared, out_dir, options))
                       for (i, pair, image, reference), matrix in zip(ready, matrices)]
            for i, future in futures:
                records[i] = future.result()
    return records


# --- the run ----------------------------------------------------------------------------------------------

#: Temporary files a killed run may leave in OUT_DIR (``io.write_image``'s, the manifest's and the lock's).
_TMP_PATTERN = re.compile(r"^\..+\.(?:[0-9a-f]{8}|\d+)\.tmp$|^" + re.escape(LOCK_NAME) + r"\.\d+\.tmp$")


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files of killed runs under ``out_dir`` (run while holding its lock); returns how many."""
    removed = 0
    for folder, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if _TMP_PATTERN.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


class BatchRun:
    """The bookkeeping every engine shares: manifest, resume and summary of one run (see :func:`open_run`).

    ``todo`` holds the pairs left to align. The engine calls :meth:`begin` with pairs before any of their
    outputs can be written (a ``writing`` record each, fsynced) and reports each pair with :meth:`done`.
    """

    def __init__(self, aligner, out_dir: Path, summary: BatchSummary, on_progress=None, write: Optional[dict] = None):
        self.out_dir, self.summary, self.on_progress = out_dir, summary, on_progress
        self.aligner = aligner
        self.model_name = getattr(aligner, "name", "custom")
        self.transform = aligner.transform
        self.options = {**output_options(aligner), **(write or {})}  # everything an output depends on
        self.records = read_manifest(summary.manifest, problems=summary.warnings)
        write_manifest(summary.manifest, self.records)  # compact what a killed run left
        self.manifest = ManifestWriter(summary.manifest)
        self.todo: list[Pair] = []
        self.start = time.perf_counter()

    def base(self, pair: Pair) -> dict:
        return base_record(pair, self.out_dir, self.model_name)

    def failed(self, pair: Pair, message: str) -> dict:
        record = failed_record(pair, self.out_dir, self.model_name, self.transform, message)
        if owns_output(self.records.get(pair.rel)):
            record["owned"] = True  # the file there is still ours: a later run may replace it
        return record

    def sort(self, pairs: list[Pair], force: bool = False, overwrite: bool = False) -> None:
        """Planning errors fail; pairs whose output is up to date are skipped (resume, see
        :func:`manifest.resume_decision`); an output file this run does not own is refused unless
        ``overwrite``; the rest go to ``todo`` and the reasons are counted in ``summary.redone``."""
        planned = {pair.rel for pair in pairs}
        self.summary.gone = sorted(rel for rel, r in self.records.items()
                                   if rel not in planned and r.get("status") == "ok")
        for pair in pairs:
            previous = self.records.get(pair.rel)
            if pair.error is not None:
                self.done(pair, self.failed(pair, pair.error))
                continue
            if not owns_output(previous) and not overwrite and os.path.lexists(pair.output):
                self.done(pair, self.failed(pair, f"{pair.output}: already exists and was not written by stn-align "
                                                  f"(not in {MANIFEST_NAME}); left as it is (--overwrite replaces it)"))
                continue
            reason = "forced (--force)" if force else None
            if reason is None and previous is not None:
                try:
                    current = fingerprint(self.aligner, pair.input, pair.reference, self.options,
                                          known=previous.get("fingerprint") if isinstance(previous.get("fingerprint"), dict) else None)
                except OSError as err:  # unreadable now: the work will say so in its record
                    current = {}
                    reason = f"cannot read ({err.strerror or err})"
                reason = reason or resume_decision(previous, pair.output, current)
            elif reason is None:
                reason = "new"
            if reason is None:
                self.done(pair, {**previous, "status": "skipped"})
                continue
            if reason != "new":
                self.summary.redone[reason] = self.summary.redone.get(reason, 0) + 1
            self.todo.append(pair)

    def begin(self, pairs: list[Pair]) -> None:
        """Record (fsynced) that these pairs' outputs may now be written: no output without its record."""
        records = [{**self.base(pair), "status": "writing"} for pair in pairs]
        if records:
            self.manifest.append(*records)
            for pair, record in zip(pairs, records):
                self.records[pair.rel] = record

    def done(self, pair: Pair, record: dict) -> None:
        """Count ``record`` (``ok``, ``failed`` or ``skipped``), append it to the manifest, report progress."""
        summary, status = self.summary, record["status"]
        if status == "failed" and owns_output(self.records.get(pair.rel)):
            record = {**record, "owned": True}
        if status != "skipped":
            self.manifest.append(record)
            self.records[pair.rel] = record
        if status == "failed":
            summary.failed += 1
            summary.failures.append(record["error"])
        else:
            if status == "skipped":
                summary.skipped += 1
            else:
                summary.aligned += 1
            if record.get("suspect"):  # a skipped pair's suspect verdict still stands: the job is judged whole
                summary.suspect += 1
                summary.suspects.append(pair.rel)
        if self.on_progress:
            self.on_progress(record)

    def close(self) -> None:
        self.summary.seconds = time.perf_counter() - self.start
        self.manifest.close()
        try:
            write_manifest(self.summary.manifest, self.records)
            write_suspects(self.out_dir, self.records)
        except (ManifestError, OSError):
            pass  # the appended records are still there; the next run compacts them


SUSPECTS_NAME = "suspects.txt"


def suspect_outputs(records: dict[str, dict]) -> list[str]:
    """Outputs (relative to OUT_DIR) of the manifest's suspect alignments, sorted."""
    return sorted(r["output"] for r in records.values() if r.get("status") == "ok" and r.get("suspect"))


def write_suspects(out_dir: Path, records: dict[str, dict]) -> list[str]:
    """``OUT_DIR/suspects.txt``: one output path (relative to OUT_DIR) per suspect alignment of the whole job
    (not written while there has never been one). Returns the suspect outputs."""
    from .io import write_text_atomic

    suspects = suspect_outputs(records)
    if suspects or (out_dir / SUSPECTS_NAME).exists():  # written when there is something to say (or to take back)
        write_text_atomic(out_dir / SUSPECTS_NAME, "".join(f"{name}\n" for name in suspects))
    return suspects


def gather_suspects(out_dir: Path, records: dict[str, dict], suspect_dir: Path) -> list[str]:
    """A copy of each suspect output in ``suspect_dir`` (same relative path), for review. The copies this
    function made before whose pairs are no longer suspect are removed (it lists what it placed in
    ``suspect_dir/suspects.txt``; nothing else there is touched). Returns the suspect outputs."""
    import shutil

    from .io import write_text_atomic

    suspects = suspect_outputs(records)
    listing = suspect_dir / SUSPECTS_NAME
    before = set(listing.read_text(encoding="utf-8").splitlines()) if listing.is_file() else set()
    for name in sorted(before - set(suspects)):
        with contextlib.suppress(OSError):
            (suspect_dir / name).unlink()
    for name in suspects:
        target = suspect_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(out_dir / name, tmp)
        os.replace(tmp, target)
    write_text_atomic(listing, "".join(f"{name}\n" for name in suspects))
    return suspects


@contextlib.contextmanager
def open_run(aligner, pairs: list[Pair], out_dir: Path, summary: BatchSummary, force: bool = False,
             on_progress: Optional[Callable[[dict], None]] = None,
             on_start: Optional[Callable[[int], None]] = None, overwrite: bool = False,
             write: Optional[dict] = None) -> Iterator[BatchRun]:
    """Create ``out_dir``, take its :class:`OutputLock`, remove killed runs' temporary files, compact the
    manifest and sort ``pairs`` (failed at planning, skipped, to do); yields the :class:`BatchRun`. On exit,
    also on an error or Ctrl-C, the manifest is rewritten (one record per input) and the lock released.
    ``force`` redoes every pair; ``overwrite`` lets outputs replace files stn-align did not write; ``write``:
    how outputs are encoded (``{"quality": 95, "format": "keep"}``), part of every pair's fingerprint."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImageError(out_dir, f"cannot create output directory ({err.strerror or err})") from None
    summary.manifest = out_dir / MANIFEST_NAME
    with OutputLock(out_dir):
        remove_stale_temporaries(out_dir)
        try:
            run = BatchRun(aligner, out_dir, summary, on_progress, write)
        except ManifestError as err:
            raise BatchError(str(err)) from None
        try:
            if on_start:
                on_start(len(pairs))
            run.start = time.perf_counter()
            run.sort(pairs, force, overwrite)
            yield run
        except KeyboardInterrupt:
            summary.interrupted = True
            raise
        except ManifestError as err:  # e.g. the disk is full: stop, say where
            raise BatchError(str(err)) from None
        finally:
            run.close()


def prepare(aligner, input_dir, out_dir, ref=None, ref_dir=None, recursive: bool = True, batch_size: int = 16,
            workers: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, plan=None, ref_image=None,
            skipped_entries: Optional[list] = None):
    """The checks and planning every engine does before any work: ``(pairs, excluded, shared_ref, workers)``.

    Raises :class:`BatchError` or :class:`ImageError` (see :func:`align_directory`)."""
    if batch_size < 1:
        raise BatchError("--batch-size must be at least 1", usage=True)
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise BatchError("--workers must be at least 1", usage=True)
    if max_pixels is not None and max_pixels < 1:
        raise BatchError("--max-pixels must be at least 1", usage=True)
    pairs, excluded = plan if plan is not None else plan_pairs(input_dir, out_dir, ref, ref_dir, recursive,
                                                               skipped=skipped_entries)
    if getattr(aligner, "fill", None) == "transparent":
        check_alpha_outputs(pairs)
    shared_ref = ref_image
    if ref is not None and shared_ref is None:
        shared_ref = read_image(ref, max_pixels=max_pixels)  # ImageError: fatal, before any work
    return pairs, excluded, shared_ref, workers


def align_directory(
    aligner,
    input_dir: Path | str,
    out_dir: Path | str,
    ref: Path | str | None = None,
    ref_dir: Path | str | None = None,
    recursive: bool = True,
    force: bool = False,
    batch_size: int = 16,
    workers: Optional[int] = None,
    on_progress: Optional[Callable[[dict], None]] = None,
    on_start: Optional[Callable[[int], None]] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    plan: Optional[tuple[list[Pair], bool]] = None,
    ref_image: Optional[np.ndarray] = None,
    overwrite: bool = False,
    stop: Optional[threading.Event] = None,
    output_format: str = "keep",
    quality: int = 95,
    ref_in_folder: Optional[str] = None,
    pairs_csv: Path | str | None = None,
    ignore_case: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> BatchSummary:
    """Align every image under ``input_dir`` into ``out_dir`` on this machine; see the module docstring.

    Args:
        aligner: a loaded :class:`stn_align.align.Aligner`.
        ref / ref_dir / ref_in_folder / pairs_csv: one reference for all inputs; a tree of references paired by
            relative path (or by relative stem with any image extension); in each folder the image whose name
            matches a pattern; or a CSV of ``input,reference`` rows (see :func:`plan_pairs`). ``ignore_case``
            applies to the first two kinds of matching.
        force: redo every pair, even those whose output is up to date.
        batch_size: pairs per network call. workers: decode/refine/encode threads (default min(4, cpus)).
        on_start: called once with the number of inputs. on_progress: called with each input's record
            (``status`` ``ok``, ``failed`` or ``skipped``) as it completes, from the calling thread.
        max_pixels: decompression-bomb limit of every decode (see :func:`io.read_image`).
        plan: the result of :func:`plan_pairs` for these arguments, if already computed.
        ref_image: ``ref`` already decoded, if it was.
        overwrite: let outputs replace files in ``out_dir`` that stn-align did not write (default: such a
            pair fails with a one-line message and the file is left as it is).
        stop: when set (e.g. by a signal handler), no new pair is started; the pairs in progress finish and
            are recorded, and the summary says ``interrupted``.
        output_format: ``keep`` (each output in its input's format) or one of :data:`OUTPUT_FORMATS`.
        quality: JPEG and WebP quality, 1-100 (WebP 100: lossless).
        memory_budget: about how many bytes the images in flight may hold (see :func:`_pipeline`).

    Raises :class:`BatchError` or :class:`ImageError` before any work for a bad setup
    (missing/unreadable ``ref``, ``input_dir``, ``ref_dir``; ``out_dir`` equal to ``input_dir``), and
    :class:`BatchError` when another run holds ``out_dir``'s lock (:class:`OutputLock`).
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    skipped_entries: list[tuple[Path, str]] = []
    if plan is None:
        plan = plan_pairs(input_dir, out_dir, ref, ref_dir, recursive, skipped=skipped_entries, output_format=output_format,
                          ref_in_folder=ref_in_folder, pairs_csv=pairs_csv, ignore_case=ignore_case)
    pairs, excluded, shared_ref, workers = prepare(aligner, input_dir, out_dir, ref, ref_dir, recursive, batch_size,
                                                   workers, max_pixels, plan, ref_image, skipped_entries)
    summary = BatchSummary(total=len(pairs), excluded_out_dir=excluded, skipped_entries=skipped_entries)
    write = {"format": output_format, "quality": quality}
    with open_run(aligner, pairs, out_dir, summary, force, on_progress, on_start, overwrite, write) as run, \
            _network_threads(aligner, workers):
        _pipeline(aligner, run, batch_size, workers, max_pixels, shared_ref, stop, memory_budget)
        summary.interrupted = summary.interrupted or bool(stop is not None and stop.is_set())
    return summary


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def _network_threads(aligner, workers: int) -> Iterator[None]:
    """For the run, a network on the CPU gets the cores the workers leave (at least one, never more than
    torch's setting); restored after. Its intra-op threads would otherwise fight the workers for the cores
    (with 2 workers on 2 cores, torch's default 2 threads made the whole batch 2-3x slower)."""
    device = getattr(aligner, "device", None)
    if getattr(device, "type", None) != "cpu":
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, min(saved, _cpus() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _image_pixels(path: Optional[Path]) -> int:
    """Width x height from the file's header (no decode); 0 when it cannot be read (the decode will say why)."""
    if path is None:
        return 0
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001
        return 0


def pair_bytes(pair: Pair, shared_reference: bool) -> int:
    """Estimated memory of a pair in flight (:data:`BYTES_PER_PIXEL`); a shared reference counts once, elsewhere."""
    pixels = _image_pixels(pair.input) + (0 if shared_reference else _image_pixels(pair.reference))
    return BYTES_PER_PIXEL * pixels


def _pipeline(aligner, run: BatchRun, batch_size: int, workers: int, max_pixels, shared_ref,
              stop: Optional[threading.Event] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
    """The local engine: decode one chunk ahead on the pool, the network on this thread, finish on the pool.

    Memory is bounded by pixels, not by counts: pairs in flight (decoding, waiting for the network, being
    finished) may hold about ``memory_budget`` bytes (:func:`pair_bytes`, from the files' headers); a chunk
    is cut short, and no chunk is prefetched, where the next pair would pass it. One pair always runs, however
    large. When ``stop`` is set, no new chunk is started; the pairs already handed to the pool finish and are
    recorded."""
    shared = shared_reference(aligner, shared_ref)
    todo = deque(run.todo)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stn-batch")
    stopping = (lambda: stop.is_set()) if stop is not None else (lambda: False)
    cost: dict[int, int] = {}  # id(pair) -> estimated bytes while in flight
    inflight = 0

    def release(pair: Pair) -> None:
        nonlocal inflight
        inflight -= cost.pop(id(pair), 0)

    def take_chunk() -> list[Pair]:
        """Up to ``batch_size`` pairs that fit in the budget beside what is in flight (one when nothing is)."""
        nonlocal inflight
        chunk: list[Pair] = []
        while todo and len(chunk) < batch_size:
            pair = todo[0]
            if id(pair) not in cost:
                cost[id(pair)] = pair_bytes(pair, shared_ref is not None)
            if inflight and inflight + cost[id(pair)] > memory_budget:
                break
            chunk.append(todo.popleft())
            inflight += cost[id(pair)]
        return chunk

    try:
        decoding: deque[tuple[list[Pair], list[Future]]] = deque()
        finishing: deque[tuple[Pair, Future]] = deque()

        def prefetch() -> None:
            while todo and len(decoding) < 2 and not stopping():  # the current chunk and one ahead
                chunk = take_chunk()
                if not chunk:
                    return
                decoding.append((chunk, [pool.submit(decode_pair, p, max_pixels, shared_ref) for p in chunk]))

        def record_oldest() -> None:
            pair, fut = finishing.popleft()
            run.done(pair, fut.result())
            release(pair)

        while True:
            prefetch()
            if stopping():
                break
            if not decoding:
                if not todo:
                    break
                record_oldest()  # nothing fits beside the pairs being finished: wait for the oldest
                continue
            chunk, futures = decoding.popleft()
            prefetch()  # two chunks decode while this one waits for its decode and then the network
            decoded = [f.result() for f in futures]
            ready = []
            for pair, (image, reference, err) in zip(chunk, decoded):
                if err is not None:
                    run.done(pair, run.failed(pair, err))
                    release(pair)
                else:
                    ready.append((pair, image, reference))
            if ready:
                try:
                    matrices = aligner.estimate([r[1] for r in ready], [r[2] for r in ready])
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: fail this chunk, go on
                    for pair, _, _ in ready:
                        run.done(pair, run.failed(pair, _one_line(err, pair.input)))
                        release(pair)
                else:
                    run.begin([pair for pair, _, _ in ready])
                    for (pair, image, reference), matrix in zip(ready, matrices):
                        finishing.append((pair, pool.submit(finish_pair, aligner, pair, image, reference, matrix,
                                                            shared, run.out_dir, run.options)))
            del decoded, ready, futures
            while finishing and (finishing[0][1].done() or len(finishing) > 2 * batch_size):
                record_oldest()  # in order; never more than two chunks' worth waiting
        while finishing:
            record_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: drop queued work, let running pairs end
