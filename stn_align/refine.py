"""Photometric refinement (OpenCV's ECC) and the alignment score.

All matrices follow the package convention: ``(3, 3)`` float64, input pixels -> reference pixels.
Images here are single-channel float32 ``(H, W)`` in ``[0, 1]`` (see :func:`to_gray`).
"""

from __future__ import annotations

import cv2
import numpy as np

from .geometry import resize_matrix


def to_gray(image: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` uint8/uint16/float -> ``(H, W)`` float32 in ``[0, 1]``; alpha composited on white."""
    if image.dtype == np.uint8:
        x = image.astype(np.float32) / 255
    elif image.dtype == np.uint16:
        x = image.astype(np.float32) / 65535
    else:
        x = image.astype(np.float32)
    if x.ndim == 2:
        return x
    if x.shape[2] == 4:
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + (1 - alpha)
    if x.shape[2] == 1:
        return x[..., 0]
    return cv2.cvtColor(np.ascontiguousarray(x[..., :3]), cv2.COLOR_RGB2GRAY)


def _shrink(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Downscale so the longer side is at most ``max_side``; returns ``(image, (3, 3) original->small)``."""
    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return gray, np.eye(3)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), resize_matrix((w, h), size)


def overlap_mask(input_size: tuple[int, int], matrix: np.ndarray, ref_size: tuple[int, int], erode: int = 2) -> np.ndarray:
    """``(H_ref, W_ref)`` uint8 mask (255 inside) of the reference pixels that the warped input covers."""
    ones = np.full((input_size[1], input_size[0]), 255, np.uint8)
    mask = cv2.warpPerspective(ones, matrix, ref_size, flags=cv2.INTER_NEAREST, borderValue=0)
    if erode:
        mask = cv2.erode(mask, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8))
    return mask


def zncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of ``a`` and ``b`` ``(H, W)`` over ``mask > 0``; -1..1."""
    sel = mask > 0
    if sel.sum() < 16:
        return 0.0
    x, y = a[sel].astype(np.float64), b[sel].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 1e-12 else 0.0


def alignment_score(
    input_gray: np.ndarray, ref_gray: np.ndarray, matrix: np.ndarray, max_side: int = 256, mask: np.ndarray | None = None
) -> float:
    """How well ``matrix`` aligns the two images, in ``[0, 1]``: ZNCC over the overlap, scaled by coverage.

    Args:
        input_gray, ref_gray: ``(H, W)`` float32.
        matrix: ``(3, 3)`` input -> reference pixels.
        mask: optional ``(H_ref, W_ref)`` uint8 region of interest in the reference.
    """
    ref_small, ref_to_small = _shrink(ref_gray, max_side)
    in_small, in_to_small = _shrink(input_gray, max_side)
    m = ref_to_small @ matrix @ np.linalg.inv(in_to_small)
    size = (ref_small.shape[1], ref_small.shape[0])
    warped = cv2.warpPerspective(in_small, m, size, flags=cv2.INTER_LINEAR)
    valid = overlap_mask((in_small.shape[1], in_small.shape[0]), m, size)
    if mask is not None:
        valid = valid & cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    coverage = (valid > 0).mean()
    return float(np.clip(zncc(warped, ref_small, valid), 0, 1) * min(1.0, coverage / 0.5))


def refine_ecc(
    input_gray: np.ndarray,
    ref_gray: np.ndarray,
    matrix: np.ndarray,
    transform: str,
    max_side: int = 1024,
    coarsest: int = 64,
    iterations: int = 60,
    eps: float = 1e-5,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """Coarse-to-fine ECC from ``matrix``; returns ``(matrix, improved)``, the input unchanged when ECC does not help.

    ECC maximises the enhanced correlation coefficient over a homography (or an affine map, matching
    ``transform``) on an image pyramid, from ``coarsest`` pixels up to ``max_side`` pixels. The result
    is kept only if the ZNCC over the overlap rises.
    """
    ref, ref_to = _shrink(ref_gray, max_side)
    inp, in_to = _shrink(input_gray, max_side)
    current = ref_to @ matrix @ np.linalg.inv(in_to)
    motion = cv2.MOTION_HOMOGRAPHY if transform == "projective" else cv2.MOTION_AFFINE
    ref_mask = None if mask is None else cv2.resize(mask, (ref.shape[1], ref.shape[0]), interpolation=cv2.INTER_NEAREST)
    levels = max(0, int(np.floor(np.log2(max(ref.shape) / coarsest))))
    start = current.copy()
    for level in range(levels, -1, -1):
        f = 0.5**level
        r_size = (max(8, round(ref.shape[1] * f)), max(8, round(ref.shape[0] * f)))
        i_size = (max(8, round(inp.shape[1] * f)), max(8, round(inp.shape[0] * f)))
        r_l = cv2.resize(ref, r_size, interpolation=cv2.INTER_AREA) if level else ref
        i_l = cv2.resize(inp, i_size, interpolation=cv2.INTER_AREA) if level else inp
        to_r = resize_matrix((ref.shape[1], ref.shape[0]), r_size)
        to_i = resize_matrix((inp.shape[1], inp.shape[0]), i_size)
        m_l = to_r @ current @ np.linalg.inv(to_i)  # input_l -> ref_l
        valid = overlap_mask(i_size, m_l, r_size)
        if ref_mask is not None:
            valid &= cv2.resize(ref_mask, r_size, interpolation=cv2.INTER_NEAREST)
        if (valid > 0).sum() < 64:
            continue
        warp = np.linalg.inv(m_l)  # ECC's warp maps template (reference) pixels to input pixels
        warp = (warp / warp[2, 2]).astype(np.float32)
        if motion == cv2.MOTION_AFFINE:
            warp = warp[:2]
        try:
            _, warp = cv2.findTransformECC(r_l, i_l, warp, motion,
                                           (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps), valid, 3)
        except cv2.error:
            break
        warp = np.vstack([warp, [0, 0, 1]]) if warp.shape[0] == 2 else warp
        m_l = np.linalg.inv(warp.astype(np.float64))
        current = np.linalg.inv(to_r) @ m_l @ to_i
        current /= current[2, 2]
    before = _agreement(inp, ref, start, ref_mask)
    after = _agreement(inp, ref, current, ref_mask)
    if not np.all(np.isfinite(current)) or after <= before:
        return matrix, False
    refined = np.linalg.inv(ref_to) @ current @ in_to
    return refined / refined[2, 2], True


def _agreement(inp: np.ndarray, ref: np.ndarray, matrix: np.ndarray, mask: np.ndarray | None) -> float:
    size = (ref.shape[1], ref.shape[0])
    warped = cv2.warpPerspective(inp, matrix, size, flags=cv2.INTER_LINEAR)
    valid = overlap_mask((inp.shape[1], inp.shape[0]), matrix, size)
    if mask is not None:
        valid &= mask
    return zncc(warped, ref, valid)
