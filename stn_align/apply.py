"""Re-applying a recorded transform to other files: a mask layer, a RAW development, a higher-resolution
version of the same shot.

A transform comes from a batch manifest (``alignments.jsonl``: one record per input) or from a JSON file
(the single-pair command's ``--json`` record, or a bare ``3x3`` list). A record made by this version holds
``input_size`` and ``ref_size``; a file of another size than the input it was measured on is taken as the
same shot at another resolution: the matrix is rescaled and the output is the reference frame at the same
scale (a 2x larger file gives a 2x larger output). Without sizes, the file is taken at the input's size and
the output gets the file's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .geometry import resize_matrix


class ApplyError(Exception):
    """A transform source or a file that cannot be used; one line naming it."""


@dataclass
class Transform:
    """A recorded alignment: ``matrix`` ``(3, 3)`` input -> reference pixels, and the sizes it was measured at."""

    matrix: np.ndarray
    input_size: Optional[tuple[int, int]] = None  # (w, h)
    ref_size: Optional[tuple[int, int]] = None
    name: str = ""  # the input it was recorded for (manifest records)

    def for_file(self, file_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """``(matrix, output size)`` for a file of ``file_size = (w, h)`` showing the same shot."""
        if self.input_size is None or self.ref_size is None:
            return self.matrix, file_size
        k = np.sqrt(file_size[0] * file_size[1] / (self.input_size[0] * self.input_size[1]))
        out = (max(1, round(self.ref_size[0] * k)), max(1, round(self.ref_size[1] * k)))
        m = resize_matrix(self.ref_size, out) @ self.matrix @ resize_matrix(file_size, self.input_size)
        return m, out


def _transform(record, source: str) -> Transform:
    if isinstance(record, list):
        record = {"matrix": record}
    if not isinstance(record, dict):
        raise ApplyError(f"{source}: not a transform record")
    try:
        matrix = np.array(record["matrix"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ApplyError(f"{source}: no 3x3 'matrix'") from None
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        raise ApplyError(f"{source}: 'matrix' must be a finite 3x3 list")
    sizes = [tuple(int(v) for v in record[k]) if isinstance(record.get(k), list) and len(record[k]) == 2 else None
             for k in ("input_size", "ref_size")]
    return Transform(matrix, sizes[0], sizes[1], str(record.get("input", "")))


def load_transforms(path: Path | str) -> list[Transform]:
    """The transforms of a manifest (``ok`` records) or of a JSON file (one record or a 3x3 list)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ApplyError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    try:
        return [_transform(json.loads(text), str(path))]
    except ValueError:
        pass  # not one JSON document: a manifest, one record per line
    from .manifest import read_manifest

    records = read_manifest(path)
    transforms = [_transform(r, f"{path}: {name}") for name, r in sorted(records.items()) if r.get("status") == "ok"]
    if not transforms:
        raise ApplyError(f"{path}: neither a JSON transform nor a manifest with aligned records")
    return transforms


def _stem(name: str) -> str:
    head, _, tail = name.rpartition("/")
    tail = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}/{tail}" if head else tail


def match(transforms: list[Transform], rel: str) -> Transform:
    """The transform for a file at relative path ``rel``: the only one, or the manifest record whose input has
    the same relative path without its extension (then the same file name without extension, if unique)."""
    if len(transforms) == 1 and not transforms[0].name:
        return transforms[0]
    same_path = [t for t in transforms if _stem(t.name) == _stem(rel)]
    if len(same_path) == 1:
        return same_path[0]
    base = _stem(rel).rsplit("/", 1)[-1]
    same_name = [t for t in transforms if _stem(t.name).rsplit("/", 1)[-1] == base]
    if len(same_name) == 1:
        return same_name[0]
    if not same_name:
        raise ApplyError(f"{rel}: no record of an input named {base}.* in the manifest")
    raise ApplyError(f"{rel}: several inputs named {base}.* in the manifest ({', '.join(t.name for t in same_name)})")


def apply_file(transform: Transform, source: Path, output: Path, fill="white", interpolation: str = "linear",
               quality: int = 95) -> tuple[np.ndarray, tuple[int, int]]:
    """Warp ``source`` with ``transform`` (rescaled to its size) into ``output``, keeping its metadata.
    Returns the matrix used and the output size."""
    from .align import warp_image
    from .batch import writable
    from .io import read_image, read_info, write_image

    image = read_image(source)
    matrix, size = transform.for_file((image.shape[1], image.shape[0]))
    write_image(output, writable(warp_image(image, matrix, size, fill, None, interpolation)), quality, read_info(source))
    return matrix, size
