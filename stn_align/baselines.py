"""Classical OpenCV baselines for ``stn-align eval`` and the benchmark.

Every baseline is ``fn(input, reference, transform) -> (3, 3) float64 matrix | None`` with the package
convention (input pixels -> reference pixels); None means the method gave up (too few features or
matches, no model found, ECC diverged), which the evaluation counts as a failure.

Motion model: each baseline estimates the **same model as the network it is compared with** --
a homography for ``projective`` (``findHomography``, ECC ``MOTION_HOMOGRAPHY``) and a 6-parameter affine
map for ``affine`` (``estimateAffine2D``, ECC ``MOTION_AFFINE``). That is the fairer comparison: fewer
degrees of freedom make the classical methods more robust, never less.

Images are ``(H, W, C)`` arrays of any dtype accepted by :func:`refine.to_gray`; features are detected
at full resolution on 8-bit gray.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from .geometry import resize_matrix
from .refine import ecc_align, to_gray

Baseline = Callable[[np.ndarray, np.ndarray, str], "np.ndarray | None"]


def _gray8(image: np.ndarray) -> np.ndarray:
    return np.clip(to_gray(image) * 255 + 0.5, 0, 255).astype(np.uint8)


def _valid(matrix) -> np.ndarray | None:
    if matrix is None:
        return None
    m = np.asarray(matrix, np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0, 0, 1]])
    if not np.all(np.isfinite(m)) or abs(m[2, 2]) < 1e-12:
        return None
    m = m / m[2, 2]
    if abs(np.linalg.det(m)) < 1e-9:
        return None
    return m


def _fit(src: np.ndarray, dst: np.ndarray, transform: str, method: int, threshold: float) -> np.ndarray | None:
    """Robust model from matched points ``(N, 2)`` float32 (input -> reference)."""
    if transform == "affine":
        if len(src) < 3:
            return None
        matrix, _ = cv2.estimateAffine2D(src, dst, method=method, ransacReprojThreshold=threshold,
                                         maxIters=5000, confidence=0.999)
    else:
        if len(src) < 4:
            return None
        matrix, _ = cv2.findHomography(src, dst, method, threshold, maxIters=5000, confidence=0.999)
    return _valid(matrix)


def identity(image_in: np.ndarray, image_ref: np.ndarray, transform: str = "projective") -> np.ndarray:
    """No alignment: the identity matrix (what you get without any tool)."""
    return np.eye(3)


def orb(image_in: np.ndarray, image_ref: np.ndarray, transform: str = "projective", features: int = 5000) -> np.ndarray | None:
    """ORB (``features`` keypoints) + brute-force Hamming matching with cross-check + RANSAC (3 px)."""
    detector = cv2.ORB_create(nfeatures=features)
    k1, d1 = detector.detectAndCompute(_gray8(image_in), None)
    k2, d2 = detector.detectAndCompute(_gray8(image_ref), None)
    if d1 is None or d2 is None or len(k1) < 4 or len(k2) < 4:
        return None
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d1, d2)
    if len(matches) < 4:
        return None
    src = np.float32([k1[m.queryIdx].pt for m in matches])
    dst = np.float32([k2[m.trainIdx].pt for m in matches])
    return _fit(src, dst, transform, cv2.RANSAC, 3.0)


def sift(image_in: np.ndarray, image_ref: np.ndarray, transform: str = "projective", ratio: float = 0.75,
         max_side: int | None = None) -> np.ndarray | None:
    """SIFT + Lowe's ratio test (``ratio``) + MAGSAC++ (``cv2.USAC_MAGSAC``, 2 px).

    ``max_side``: detect on copies shrunk to at most this many pixels (longer side; the matrix is mapped
    back to full resolution), which bounds the time on large photos; None: full resolution.
    """
    gray_in, gray_ref = _gray8(image_in), _gray8(image_ref)
    in_to, ref_to = np.eye(3), np.eye(3)
    if max_side is not None:
        gray_in, in_to = _shrink8(gray_in, max_side)
        gray_ref, ref_to = _shrink8(gray_ref, max_side)
    detector = cv2.SIFT_create()
    k1, d1 = detector.detectAndCompute(gray_in, None)
    k2, d2 = detector.detectAndCompute(gray_ref, None)
    if d1 is None or d2 is None or len(k1) < 4 or len(k2) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < 4:
        return None
    src = np.float32([k1[m.queryIdx].pt for m in good])
    dst = np.float32([k2[m.trainIdx].pt for m in good])
    matrix = _fit(src, dst, transform, cv2.USAC_MAGSAC, 2.0)
    if matrix is None or max_side is None:
        return matrix
    matrix = np.linalg.inv(ref_to) @ matrix @ in_to
    if transform == "affine":
        matrix[2] = (0.0, 0.0, 1.0)  # exactly affine despite round-off
    return _valid(matrix)


def _shrink8(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` uint8 shrunk so its longer side is at most ``max_side``; returns ``(image, (3, 3) full -> small)``."""
    h, w = gray.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return gray, np.eye(3)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), resize_matrix((w, h), size)


def ecc(image_in: np.ndarray, image_ref: np.ndarray, transform: str = "projective") -> np.ndarray | None:
    """OpenCV's ECC from the identity, coarse-to-fine (pyramid from ~32 px up to 640 px), the transform's motion model."""
    return ecc_align(to_gray(image_in), to_gray(image_ref), np.eye(3), transform, max_side=640, coarsest=32,
                     iterations=(100, 30), eps=1e-4, gauss=(5, 3))


BASELINES: dict[str, Baseline] = {"identity": identity, "orb": orb, "sift": sift, "ecc": ecc}


def get(name: str) -> Baseline:
    """A baseline by name (``identity``, ``orb``, ``sift``, ``ecc``); ValueError otherwise."""
    try:
        return BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
