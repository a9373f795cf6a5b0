"""Pictures to check alignments at a glance: one sheet per pair.

A sheet is one row of five equal tiles under a title bar::

    | input | reference | aligned | overlay | checkerboard |

* overlay: the reference in magenta and the aligned input in green -- where they agree the picture is
  gray/white, misaligned edges show as magenta/green fringes;
* checkerboard: alternating squares of the reference and the aligned input -- broken lines at the
  square boundaries show misalignment.

Images of any size, dtype (uint8/uint16/float) and channel count (1, 3, 4; alpha on white) are
accepted; tiles keep each image's aspect ratio (letterboxed on gray). No torch here.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

TILE = 256
TITLE_H = 28
LABEL_H = 20
GAP = 4
LABELS = ("input", "reference", "aligned", "overlay ref=magenta aligned=green", "checkerboard")


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` any dtype -> ``(H, W, 3)`` uint8 RGB, alpha composited on white."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.dtype == np.uint8:
        f = x.astype(np.float32) / 255
    elif x.dtype == np.uint16:
        f = x.astype(np.float32) / 65535
    else:
        f = np.clip(x.astype(np.float32), 0, 1)
    if f.shape[2] == 4:
        f = f[..., :3] * f[..., 3:] + (1 - f[..., 3:])
    elif f.shape[2] == 2:
        f = f[..., :1] * f[..., 1:] + (1 - f[..., 1:])
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    return np.clip(f[..., :3] * 255 + 0.5, 0, 255).astype(np.uint8)


def overlay(reference: np.ndarray, aligned: np.ndarray) -> np.ndarray:
    """Reference in magenta, aligned in green: ``(H, W, 3)`` uint8 (aligned is resized to the reference if needed)."""
    ref = cv2.cvtColor(to_rgb8(reference), cv2.COLOR_RGB2GRAY)
    ali = cv2.cvtColor(to_rgb8(aligned), cv2.COLOR_RGB2GRAY)
    if ali.shape != ref.shape:
        ali = cv2.resize(ali, (ref.shape[1], ref.shape[0]), interpolation=cv2.INTER_AREA)
    return np.dstack([ref, ali, ref])


def checkerboard(reference: np.ndarray, aligned: np.ndarray, squares: int = 8) -> np.ndarray:
    """Alternating squares (``squares`` along the longer side) of reference and aligned: ``(H, W, 3)`` uint8."""
    ref, ali = to_rgb8(reference), to_rgb8(aligned)
    if ali.shape != ref.shape:
        ali = cv2.resize(ali, (ref.shape[1], ref.shape[0]), interpolation=cv2.INTER_AREA)
    h, w = ref.shape[:2]
    cell = max(1, int(np.ceil(max(h, w) / squares)))
    yy, xx = np.mgrid[0:h, 0:w]
    pick = ((yy // cell + xx // cell) % 2).astype(bool)
    return np.where(pick[..., None], ali, ref)


def _tile(image: np.ndarray, label: str, size: int) -> np.ndarray:
    """Fit ``image`` into a ``size`` x ``size`` gray box with a label strip above: ``(LABEL_H + size, size, 3)``."""
    rgb = to_rgb8(image)
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (nw, nh), interpolation=interp)
    tile = np.full((LABEL_H + size, size, 3), 128, np.uint8)
    tile[:LABEL_H] = 40
    y0, x0 = LABEL_H + (size - nh) // 2, (size - nw) // 2
    tile[y0 : y0 + nh, x0 : x0 + nw] = small
    _text(tile, label, (4, LABEL_H - 6), 0.4, size - 8)
    return tile


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float, max_width: int) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    while len(text) > 4 and cv2.getTextSize(text, font, scale, 1)[0][0] > max_width:
        text = text[:-4] + "..."
    cv2.putText(canvas, text, origin, font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def make_sheet(
    input: np.ndarray,
    reference: np.ndarray,
    aligned: np.ndarray,
    title: str = "",
    labels: Sequence[str] = LABELS,
    tile: int = TILE,
) -> np.ndarray:
    """One preview sheet: ``(TITLE_H + LABEL_H + tile + GAP, 5 * tile + 6 * GAP, 3)`` uint8 RGB (308 x 1304 by default).

    Args:
        input: the input image ``(H, W[, C])``.
        reference: the reference ``(H_ref, W_ref[, C])``.
        aligned: the input warped onto the reference ``(H_ref, W_ref[, C])``.
        title: a line of text on top (e.g. file name, error, score).
        labels: the five tile labels.
        tile: tile side in pixels.
    """
    tiles = [_tile(image, label, tile) for image, label in zip(
        (input, reference, aligned, overlay(reference, aligned), checkerboard(reference, aligned)), labels)]
    width = len(tiles) * tile + (len(tiles) + 1) * GAP
    sheet = np.full((TITLE_H + LABEL_H + tile + GAP, width, 3), 24, np.uint8)
    for k, t in enumerate(tiles):
        x = GAP + k * (tile + GAP)
        sheet[TITLE_H : TITLE_H + t.shape[0], x : x + tile] = t
    if title:
        _text(sheet, title, (GAP + 2, TITLE_H - 9), 0.5, width - 2 * GAP)
    return sheet
