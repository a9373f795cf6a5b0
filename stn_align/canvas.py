"""The output canvas: where the aligned input is drawn, and how big that image is.

A canvas is a ``(3, 3)`` matrix ``C`` from reference pixels to output pixels plus an output size ``(w, h)``;
the output is ``cv2.warpPerspective(input, C @ M, size)`` for the alignment ``M`` (input -> reference
pixels). ``reference`` (the default) is the identity at the reference's size; the others:

* ``input``: the reference's framing at the input's resolution (the same pixel count as the input);
* ``union``: large enough for the reference frame and the whole warped input, nothing cut off;

and ``crop="common"`` then keeps the largest axis-aligned rectangle that the warped input covers entirely.
"""

from __future__ import annotations

import cv2
import numpy as np

from .geometry import resize_matrix

CANVASES = ("reference", "input", "union")
CROPS = ("none", "common")
#: A ``union`` canvas larger than this many times the larger image's pixels is refused (a near-degenerate
#: projective matrix would ask for gigapixels).
MAX_UNION_GROWTH = 16


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1]])


def _corners(w: int, h: int) -> np.ndarray:
    return np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ matrix.T
    return p[:, :2] / p[:, 2:]


def largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle of non-zero cells of ``(H, W)`` ``mask``: ``(x0, y0, x1, y1)``, end exclusive
    (``(0, 0, 0, 0)`` when there is none). Row by row, the largest rectangle under a histogram (a stack)."""
    h, w = mask.shape
    heights = np.zeros(w + 1, np.int64)  # a trailing 0 closes every bar
    best, box = 0, (0, 0, 0, 0)
    for y in range(h):
        heights[:w] = np.where(mask[y] > 0, heights[:w] + 1, 0)
        stack: list[int] = []
        for x in range(w + 1):
            while stack and heights[stack[-1]] >= heights[x]:
                top = heights[stack.pop()]
                left = stack[-1] + 1 if stack else 0
                if top * (x - left) > best:
                    best, box = top * (x - left), (left, y - top + 1, x, y + 1)
            stack.append(x)
    return box


def output_canvas(matrix: np.ndarray, input_size: tuple[int, int], ref_size: tuple[int, int],
                  canvas: str = "reference", crop: str = "none") -> tuple[np.ndarray, tuple[int, int]]:
    """``(C, (w, h))``: the canvas matrix (reference pixels -> output pixels) and the output size.

    Args:
        matrix: ``(3, 3)`` input -> reference pixels.
        input_size, ref_size: ``(w, h)``.
        canvas: ``reference``, ``input`` or ``union`` (module docstring). crop: ``none`` or ``common``.
    Raises ValueError for an unknown option, an empty common area or an oversized union.
    """
    (in_w, in_h), (ref_w, ref_h) = input_size, ref_size
    if canvas == "reference":
        c, size = np.eye(3), (ref_w, ref_h)
    elif canvas == "input":
        k = np.sqrt(in_w * in_h / (ref_w * ref_h))
        size = (max(1, round(ref_w * k)), max(1, round(ref_h * k)))
        c = resize_matrix((ref_w, ref_h), size)
    elif canvas == "union":
        points = np.r_[_corners(ref_w, ref_h), _apply(matrix, _corners(in_w, in_h))]
        if not np.all(np.isfinite(points)):
            raise ValueError("--canvas union: the warped input is unbounded")
        x0, y0 = np.floor(points.min(0))
        x1, y1 = np.ceil(points.max(0))
        size = (int(x1 - x0) + 1, int(y1 - y0) + 1)
        if size[0] * size[1] > MAX_UNION_GROWTH * max(in_w * in_h, ref_w * ref_h):
            raise ValueError(f"--canvas union: the union would be {size[0]}x{size[1]} pixels (the warp is near degenerate)")
        c = _translate(-x0, -y0)
    else:
        raise ValueError(f"unknown canvas {canvas!r}; use one of {CANVASES}")
    if crop == "none":
        return c, size
    if crop != "common":
        raise ValueError(f"unknown crop {crop!r}; use one of {CROPS}")
    scale = min(1.0, 512 / max(size))  # find the rectangle on a small copy of the coverage mask
    small = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    to_small = resize_matrix(size, small)
    cover = cv2.warpPerspective(np.full((in_h, in_w), 255, np.uint8), to_small @ c @ matrix, small,
                                flags=cv2.INTER_NEAREST)
    cover = cv2.erode(cover, np.ones((3, 3), np.uint8))  # stay clear of the interpolated edge
    x0, y0, x1, y1 = largest_rectangle(cover)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("--crop common: the input and the canvas have no area in common")
    to_full = np.linalg.inv(to_small)
    (fx0, fy0), (fx1, fy1) = _apply(to_full, np.float64([[x0, y0], [x1 - 1, y1 - 1]]))
    fx0, fy0 = int(np.ceil(fx0)), int(np.ceil(fy0))
    fx1, fy1 = int(np.floor(fx1)), int(np.floor(fy1))
    return _translate(-fx0, -fy0) @ c, (max(1, fx1 - fx0 + 1), max(1, fy1 - fy0 + 1))
