"""The batch manifest ``OUT_DIR/alignments.jsonl``: records, fingerprints and resume decisions.

One JSON object per line, one line per event; when the manifest is read, the last record of each input
wins. A record's ``status`` is

* ``writing``: the pair was handed to a worker and its output may be (partly) written. A run appends these
  (fsynced) before any output is written, so an output file never exists without a record that claims it;
* ``ok``: the output is written (``output_bytes`` long) from the inputs the ``fingerprint`` describes;
* ``failed``: the pair could not be aligned (``error`` says why).

The ``fingerprint`` of an ``ok`` record holds what the output depends on: the input file and the reference
file (size, mtime and SHA-256 of the content), the model's weights (SHA-256) and every option that changes
the output. A re-run skips a pair only when all of these match and its output file still has the recorded
size (:func:`resume_decision`); anything else is redone and the reason counted.

A line that is not a JSON record (a non-UTF-8 byte, a half-written last line of a killed run, a hand
edit) is reported with its line number, copied to ``alignments.jsonl.corrupt`` and left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

MANIFEST_NAME = "alignments.jsonl"
CORRUPT_SUFFIX = ".corrupt"
#: Aligner attributes that change an output; recorded in every fingerprint (see :func:`output_options`).
OPTION_NAMES = ("transform", "iterations", "working_size", "refine", "fill", "mask", "min_score", "fallback",
                "interpolation", "canvas", "crop")


class ManifestError(Exception):
    """The manifest cannot be read or written; ``str(err)`` is one line naming the file."""


# --- fingerprints -----------------------------------------------------------------------------------------


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_stamps: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process
_stamps_lock = threading.Lock()


def file_stamp(path: Path | str, known: Optional[dict] = None) -> dict:
    """``{"size", "mtime_ns", "sha256"}`` of a file. The content is hashed only when size or mtime differ
    from ``known`` (a stamp recorded earlier) and from what this process hashed already."""
    st = os.stat(path)
    size, mtime = st.st_size, st.st_mtime_ns
    if known and known.get("size") == size and known.get("mtime_ns") == mtime and known.get("sha256"):
        return {"size": size, "mtime_ns": mtime, "sha256": known["sha256"]}
    key = (os.path.abspath(path), size, mtime)
    with _stamps_lock:
        digest = _stamps.get(key)
    if digest is None:
        digest = file_sha256(path)
        with _stamps_lock:
            _stamps[key] = digest
    return {"size": size, "mtime_ns": mtime, "sha256": digest}


def output_options(aligner) -> dict:
    """The aligner's options that change an output, as JSON values (a mask file or array by its SHA-256)."""
    import numpy as np

    options = {}
    for name in OPTION_NAMES:
        value = getattr(aligner, name, None)
        if name == "iterations" and value is None:
            value = getattr(getattr(getattr(aligner, "model", None), "config", None), "iterations", None)
        if name == "working_size":
            value = getattr(aligner, "size", value)
        if isinstance(value, np.ndarray):
            value = "array:" + hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        elif name == "mask" and value not in (None, "auto"):
            value = "file:" + file_sha256(value)
        elif isinstance(value, tuple):
            value = list(value)
        options[name] = value
    return options


def fingerprint(aligner, input_path: Path, reference_path: Optional[Path], options: Optional[dict] = None,
                known: Optional[dict] = None) -> dict:
    """What an output made by ``aligner`` from these two files depends on (see the module docstring).

    ``known``: the previous record's fingerprint, whose stamps spare re-hashing unchanged files."""
    known = known or {}
    return {"input": file_stamp(input_path, known.get("input")),
            "reference": file_stamp(reference_path, known.get("reference")) if reference_path else None,
            "model": getattr(aligner, "weights_sha256", None),
            "options": output_options(aligner) if options is None else options}


# --- resume -----------------------------------------------------------------------------------------------


def owns_output(record: Optional[dict]) -> bool:
    """True if the file at ``record["output"]`` was (or may have been) written by stn-align."""
    return bool(record) and (record.get("status") in ("ok", "writing") or bool(record.get("owned")))


def resume_decision(previous: Optional[dict], output: Path, current: dict) -> Optional[str]:
    """None when the pair can be skipped, else why it is redone (a few words, for the summary).

    ``previous``: the pair's last record; ``current``: :func:`fingerprint` of the pair now."""
    if previous is None:
        return "new"
    status = previous.get("status")
    if status == "failed":
        return "failed before"
    if status != "ok":
        return "interrupted"
    known = previous.get("fingerprint")
    if not isinstance(known, dict):
        return "recorded without a fingerprint"
    try:
        size = output.stat().st_size
    except OSError:
        return "output missing"
    if size == 0 or size != previous.get("output_bytes"):
        return "output changed"
    for part, reason in (("input", "input changed"), ("reference", "reference changed")):
        was, now = known.get(part), current.get(part)
        if (was or {}).get("sha256") != (now or {}).get("sha256"):
            return reason
    if known.get("model") != current.get("model"):
        return "model changed"
    was, now = known.get("options") or {}, current.get("options") or {}
    changed = [name for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
    if changed:
        return "options changed (" + ", ".join(changed) + ")"
    return None


# --- the file ---------------------------------------------------------------------------------------------


def read_manifest(path: Path | str, problems: Optional[list[str]] = None) -> dict[str, dict]:
    """``{input: record}``, the last record of each input winning.

    A line that is not a JSON record is left out; with ``problems`` given, one line per such line is
    appended to it and the line is copied (bytes as they were) to ``MANIFEST.corrupt``."""
    path = Path(path)
    records: dict[str, dict] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror or err})") from None
    bad: list[bytes] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("input"), str):
            records[record["input"]] = record
            continue
        bad.append(raw)
        if problems is not None:
            what = "an unfinished last line (a run was killed)" if number == len(lines) else "not a JSON record"
            problems.append(f"{path} line {number}: {what}; left out, kept in {path.name}{CORRUPT_SUFFIX}")
    if bad and problems is not None:
        try:
            with open(path.with_name(path.name + CORRUPT_SUFFIX), "ab") as f:
                f.write(b"\n".join(bad) + b"\n")
        except OSError as err:
            raise ManifestError(f"{path.name}{CORRUPT_SUFFIX}: cannot write ({err.strerror or err})") from None
    return records


def write_manifest(path: Path | str, records: dict[str, dict]) -> None:
    """Rewrite the manifest atomically and durably: one record per input, sorted by input path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for key in sorted(records):
                f.write(json.dumps(records[key]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise ManifestError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


class ManifestWriter:
    """Appends records to a manifest, each batch of lines flushed and fsynced before :meth:`append` returns."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as err:
            raise ManifestError(f"{path}: cannot write ({err.strerror or err})") from None

    def append(self, *records: dict) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        with self._lock:
            try:
                self._file.write(text)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as err:
                raise ManifestError(f"{self.path}: cannot write ({err.strerror or err})") from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
