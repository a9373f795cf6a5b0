"""Tests for stn_align.refine: ECC refinement, foreground masks, the alignment score."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stn_align.geometry import corner_error
from stn_align.refine import alignment_score, foreground_mask, refine_ecc, resolve_mask, to_gray

cv2.setNumThreads(1)


def textured(h: int = 160, w: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture ``(h, w, 3)`` uint8 (structure at several scales)."""
    rng = np.random.default_rng(seed)
    x = sum(cv2.GaussianBlur(rng.normal(size=(h, w, 3)).astype(np.float32), (0, 0), s) * s for s in (2, 5, 12))
    x = (x - x.min()) / (x.max() - x.min())
    return (x * 255).astype(np.uint8)


def product_on_white(h: int = 180, w: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A white image with a 'product' (dark box + coloured ellipse with a printed pattern); returns (image, truth)."""
    image = np.full((h, w, 3), 255, np.uint8)
    cv2.rectangle(image, (60, 50), (130, 140), (40, 40, 60), -1)
    cv2.ellipse(image, (130, 95), (35, 25), 20, 0, 360, (200, 60, 40), -1)
    cv2.putText(image, "AB", (70, 100), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (230, 230, 90), 2)
    truth = (np.abs(image.astype(int) - 255).max(axis=2) > 0).astype(np.uint8) * 255
    return image, truth


def shifted_pair(dx: float, dy: float, seed: int = 0):
    """(input, reference, M) where the reference is the input shifted by (dx, dy) and slightly rotated."""
    image_in = textured(seed=seed)
    angle = np.radians(2.0)
    c, s = np.cos(angle), np.sin(angle)
    cx = cy = 79.5
    m = np.array([[c, -s, cx - c * cx + s * cy + dx], [s, c, cy - s * cx - c * cy + dy], [0, 0, 1]])
    image_ref = cv2.warpPerspective(image_in, m, (160, 160), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return image_in, image_ref, m


def off_by(m: np.ndarray, dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]]) @ m


@pytest.mark.parametrize("transform", ["projective", "affine"])
def test_ecc_fixes_a_slightly_off_estimate(transform):
    image_in, image_ref, truth = shifted_pair(6.3, -4.1)
    start = off_by(truth, 2.5, -1.0)
    assert corner_error(start, truth, (160, 160)) > 2.5
    refined, improved = refine_ecc(to_gray(image_in), to_gray(image_ref), start, transform)
    assert improved
    assert corner_error(refined, truth, (160, 160)) < 0.5


def test_ecc_never_makes_a_good_estimate_worse():
    image_in, image_ref, truth = shifted_pair(3.0, 2.0, seed=1)
    refined, _ = refine_ecc(to_gray(image_in), to_gray(image_ref), truth, "projective")
    assert corner_error(refined, truth, (160, 160)) < 0.2


def test_ecc_failure_returns_the_estimate_unchanged():
    flat = np.full((120, 120), 0.9, np.float32)  # no texture at all: ECC cannot work
    start = off_by(np.eye(3), 1.5, 0.5)
    refined, improved = refine_ecc(flat, flat, start, "projective")
    assert not improved and np.array_equal(refined, start)
    noise_a = np.random.default_rng(0).random((120, 120)).astype(np.float32)
    noise_b = np.random.default_rng(1).random((120, 120)).astype(np.float32)  # unrelated images
    refined, improved = refine_ecc(noise_a, noise_b, start, "projective")
    assert corner_error(refined, start, (120, 120)) < 0.08 * 170 or not improved
    bad = np.full((3, 3), np.nan)
    refined, improved = refine_ecc(noise_a, noise_a, bad, "projective")
    assert not improved


def test_ecc_with_a_mask_on_a_product_shot():
    image, _ = product_on_white(200, 200)
    truth = np.array([[1, 0, 3.4], [0, 1, -2.2], [0, 0, 1]], np.float64)
    image_ref = cv2.warpPerspective(image, truth, (200, 200), borderValue=(255, 255, 255))
    image_ref = cv2.GaussianBlur(image_ref, (0, 0), 0.7)
    image_in = cv2.GaussianBlur(image, (0, 0), 0.7)
    start = off_by(truth, -2.0, 1.5)
    mask = foreground_mask(image_ref)
    refined, improved = refine_ecc(to_gray(image_in), to_gray(image_ref), start, "affine", mask=mask)
    assert improved and corner_error(refined, truth, (200, 200)) < 0.5


def test_foreground_mask_on_a_product_on_white():
    image, truth = product_on_white()
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    mask = foreground_mask(noisy)
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert (mask[truth > 0] > 0).mean() > 0.99  # the whole product is inside
    assert mask[:8].max() == 0 and mask[-8:].max() == 0 and mask[:, :8].max() == 0  # background is out
    assert (mask > 0).sum() < 1.8 * (truth > 0).sum()  # a small margin, not the whole image


def test_foreground_mask_uses_alpha_and_gives_up_on_busy_backgrounds():
    image, truth = product_on_white()
    rgba = np.dstack([image, truth])  # transparent background
    mask = foreground_mask(rgba)
    assert (mask[truth > 0] > 0).all() and mask[0, 0] == 0
    busy = textured(120, 150)
    assert (foreground_mask(busy) == 255).all()
    assert resolve_mask("auto", image).shape == image.shape[:2]
    assert resolve_mask(None, image) is None and resolve_mask("none", image) is None


def test_score_ranks_a_correct_alignment_above_a_wrong_one():
    image_in, image_ref, truth = shifted_pair(5.0, 3.0, seed=2)
    gi, gr = to_gray(image_in), to_gray(image_ref)
    right = alignment_score(gi, gr, truth)
    near = alignment_score(gi, gr, off_by(truth, 2.0, 0.0))
    wrong = alignment_score(gi, gr, off_by(truth, 12.0, -9.0))
    assert 0.0 <= wrong < near < right <= 1.0
    assert right > 0.9 and wrong < 0.5
    assert alignment_score(gi, gr, np.full((3, 3), np.nan)) == 0.0


def test_score_on_a_product_shot_with_mask():
    image, _ = product_on_white()
    g = to_gray(image)
    mask = foreground_mask(image)
    right = alignment_score(g, g, np.eye(3), mask=mask)
    wrong = alignment_score(g, g, off_by(np.eye(3), 15, 10), mask=mask)
    assert right > 0.95 and wrong < right - 0.3
