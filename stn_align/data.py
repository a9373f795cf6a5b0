"""Synthetic training and evaluation pairs: random warps of real photos with known ground truth.

Two sampling modes:

* ``crop``  -- DeTone et al. 2016: the input is a crop from inside a larger photo, the reference is
  the crop whose corners are randomly displaced (no borders anywhere).
* ``whole`` -- the product-photo case: the whole image moves, rotates, scales or tilts in the frame
  and the uncovered border is filled with the photo's background colour.

Every pair comes with ``M`` (3x3, float64), input pixels -> reference pixels (see :mod:`geometry`).
Images are ``(H, W, 3)`` uint8 RGB arrays. No torch here: workers stay light.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .geometry import resize_matrix


@dataclass(frozen=True)
class WarpRanges:
    """Ranges of the random transforms. Fractions are of the image size."""

    max_rotation: float = 45.0  # degrees, whole mode
    max_scale: float = 1.43  # scale factor in [1/max_scale, max_scale] = [0.70, 1.43], whole mode
    max_shear: float = 0.15  # shear factor (tan of the shear angle), whole mode
    max_translation: float = 0.15  # whole mode
    max_perspective: float = 0.12  # corner jitter, whole mode, projective only
    crop_rho: float = 0.25  # corner jitter, crop mode
    p_identity: float = 0.08  # fraction of near-identity pairs
    p_translation: float = 0.08  # fraction of pure translations

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Photometric:
    """Independent lighting and capture changes applied to each side of a pair."""

    brightness: float = 0.15
    contrast: float = 0.3
    colour: float = 0.1
    gamma: float = 0.25
    p_blur: float = 0.25
    p_noise: float = 0.3
    p_jpeg: float = 0.3


NO_PHOTOMETRIC = Photometric(0, 0, 0, 0, 0, 0, 0)


# --- photos -----------------------------------------------------------------------------------------


def is_held_out(path: Path | str, val_fraction: float) -> bool:
    """Deterministic photo-level split by a hash of the file name (stable across machines and orderings)."""
    return key_held_out(Path(path).name, val_fraction)


def key_held_out(key: str, val_fraction: float) -> bool:
    """The split of a group key (a file name, a folder, ...): a hash, stable across machines and orderings."""
    return zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000


def load_photo(path: Path | str, max_side: int = 1024) -> np.ndarray:
    """Read a photo as ``(H, W, 3)`` uint8 RGB, downscaled so that its longer side is at most ``max_side``."""
    from .io import read_image

    image = read_image(path)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255
        image = (image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    scale = max_side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def background_colour(image: np.ndarray) -> tuple[int, int, int]:
    """Median colour of the one-pixel border: the fill that makes a warped product shot look natural."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


# --- transforms ---------------------------------------------------------------------------------------


def _about_centre(matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    cx, cy = (width - 1) / 2, (height - 1) / 2
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    return np.linalg.inv(to_centre) @ matrix @ to_centre


def sample_whole_transform(
    rng: np.random.Generator, size: tuple[int, int], ranges: WarpRanges, transform: str
) -> np.ndarray:
    """A random ``(3, 3)`` motion of a whole ``size = (w, h)`` image about its centre."""
    w, h = size
    kind = rng.random()
    gain = 0.04 if kind < ranges.p_identity else 1.0
    angle = math.radians(rng.uniform(-1, 1) * ranges.max_rotation * gain)
    scale = math.exp(rng.uniform(-1, 1) * math.log(ranges.max_scale) * gain)
    shear = rng.uniform(-1, 1) * ranges.max_shear * gain
    tx, ty = rng.uniform(-1, 1, 2) * ranges.max_translation * gain * np.array([w, h])
    if ranges.p_identity <= kind < ranges.p_identity + ranges.p_translation:
        angle, scale, shear = 0.0, 1.0, 0.0
    c, s = math.cos(angle), math.sin(angle)
    linear = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[scale, shear * scale, 0], [0, scale, 0], [0, 0, 1]])
    matrix = _about_centre(linear, w, h)
    matrix = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]]) @ matrix
    if transform == "projective" and ranges.max_perspective > 0 and not (
        ranges.p_identity <= kind < ranges.p_identity + ranges.p_translation
    ):
        src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32)
        dst = src + (rng.uniform(-1, 1, (4, 2)) * ranges.max_perspective * gain * np.array([w, h])).astype(np.float32)
        matrix = matrix @ cv2.getPerspectiveTransform(src, dst).astype(np.float64)
    return matrix / matrix[2, 2]


def corner_jitter(rng: np.random.Generator, rho: tuple[float, float], transform: str) -> np.ndarray:
    """Random corner displacements ``(4, 2)`` within ``+-rho = (rho_x, rho_y)`` pixels (affine: a parallelogram)."""
    if transform == "affine":
        d = rng.uniform(-1, 1, (3, 2)) * np.array(rho) / 1.5
        return np.vstack([d, d[0] + d[2] - d[1]])
    return rng.uniform(-1, 1, (4, 2)) * np.array(rho)


# --- pairs --------------------------------------------------------------------------------------------


def _warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], fill=(0, 0, 0)) -> np.ndarray:
    """``cv2.warpPerspective`` with an anti-aliasing pre-shrink when ``matrix`` minifies by more than 1.5x."""
    shrink = math.sqrt(abs(np.linalg.det(matrix[:2, :2]))) if abs(matrix[2, 0]) + abs(matrix[2, 1]) < 1e-3 else None
    if shrink is None:  # projective: estimate the scale from the corner quad's area
        h, w = image.shape[:2]
        quad = cv2.perspectiveTransform(np.array([[[0, 0], [w, 0], [w, h], [0, h]]], np.float32), matrix)[0]
        shrink = math.sqrt(max(cv2.contourArea(quad), 1.0) / (w * h))
    if shrink < 1 / 1.5:
        factor = min(1.0, shrink * 1.25)
        small = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        to_small = resize_matrix((image.shape[1], image.shape[0]), (small.shape[1], small.shape[0]))
        image, matrix = small, matrix @ np.linalg.inv(to_small)
    return cv2.warpPerspective(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def crop_pair(
    photo: np.ndarray,
    rng: np.random.Generator,
    out_size: tuple[int, int],
    rho: float,
    transform: str = "projective",
    scale_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeTone's protocol: a crop and the same crop with corners displaced by up to ``rho`` of its size.

    Args:
        photo: ``(H, W, 3)`` uint8.
        out_size: ``(w, h)`` of both output images.
        rho: corner displacement, a fraction of the crop's width/height.
        scale_range: crop size in photo pixels relative to ``out_size``; None samples sizes from
            ``out_size``-ish up to the largest crop that fits (the crop is resized to ``out_size``).

    Returns:
        ``(input, reference, M)``: two ``(h, w, 3)`` uint8 images and the ``(3, 3)`` input->reference matrix.
    """
    ph, pw = photo.shape[:2]
    ow, oh = out_size
    fit = min((pw - 1) / (ow * (1 + 2 * rho)), (ph - 1) / (oh * (1 + 2 * rho)))
    if fit <= 0:
        raise ValueError(f"photo {pw}x{ph} too small for {ow}x{oh} crops with rho={rho}")
    lo, hi = scale_range if scale_range else (min(fit, max(0.75, 0.35 * fit)), fit)
    scale = rng.uniform(min(lo, fit), min(hi, fit))
    aspect = math.exp(rng.uniform(-0.25, 0.25)) if scale_range is None else 1.0
    sx = min(scale * aspect, fit)
    sy = min(scale / aspect, fit)
    rw, rh = ow * sx, oh * sy
    mx, my = rho * rw, rho * rh
    x0 = mx + rng.random() * max(0.0, pw - 1 - rw - 2 * mx)
    y0 = my + rng.random() * max(0.0, ph - 1 - rh - 2 * my)
    # A: output pixels -> photo pixels for the axis-aligned crop (pixel-centre convention).
    to_photo = np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1]]) @ np.linalg.inv(resize_matrix((rw, rh), out_size))
    corners = np.array([[0, 0], [ow - 1, 0], [ow - 1, oh - 1], [0, oh - 1]], np.float64)
    photo_corners = cv2.perspectiveTransform(corners[None], to_photo)[0]
    moved = photo_corners + corner_jitter(rng, (mx, my), transform)
    ref_to_photo = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32)).astype(np.float64)
    image_in = _warp(photo, np.linalg.inv(to_photo), out_size)
    image_ref = _warp(photo, np.linalg.inv(ref_to_photo), out_size)
    matrix = np.linalg.inv(ref_to_photo) @ to_photo
    return image_in, image_ref, matrix / matrix[2, 2]


def whole_pair(
    photo: np.ndarray,
    rng: np.random.Generator,
    out_size: tuple[int, int],
    ranges: WarpRanges,
    transform: str = "projective",
    fill: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The product case: the reference is the photo framed at ``out_size``; the input is the photo moved in frame.

    The uncovered border of the input is filled with ``fill`` (default: the photo's border colour).
    Returns ``(input, reference, M)`` as :func:`crop_pair`.
    """
    fill = background_colour(photo) if fill is None else fill
    to_out = resize_matrix((photo.shape[1], photo.shape[0]), out_size)
    motion = sample_whole_transform(rng, out_size, ranges, transform)  # reference frame -> input frame
    image_ref = _warp(photo, to_out, out_size, fill)
    image_in = _warp(photo, motion @ to_out, out_size, fill)
    matrix = np.linalg.inv(motion)
    return image_in, image_ref, matrix / matrix[2, 2]


def photometric(image: np.ndarray, rng: np.random.Generator, p: Photometric = Photometric()) -> np.ndarray:
    """Random brightness, contrast, colour, gamma, blur, noise and JPEG artefacts: ``(H, W, 3)`` uint8 -> same."""
    x = image.astype(np.float32) / 255
    x = x ** math.exp(rng.uniform(-p.gamma, p.gamma))
    mean = x.mean()
    x = (x - mean) * math.exp(rng.uniform(-p.contrast, p.contrast)) + mean + rng.uniform(-p.brightness, p.brightness)
    x = x * (1 + rng.uniform(-p.colour, p.colour, 3)).astype(np.float32)
    if rng.random() < p.p_blur:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2))
    if rng.random() < p.p_noise:
        x = x + rng.normal(0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    out = np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < p.p_jpeg:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


@dataclass(frozen=True)
class PairSampler:
    """Draws training batches: mode, photo and transform per pair, with photometric jitter.

    ``batch(step)`` is a pure function of ``(seed, step)``: resuming or changing workers cannot change
    the data a step sees.
    """

    transform: str
    size: int
    ranges: WarpRanges = WarpRanges()
    photometric: Photometric = Photometric()
    p_crop: float = 0.5
    seed: int = 0

    def pair(self, photo: np.ndarray, rng: np.random.Generator, mode: str):
        out = (self.size, self.size)
        if mode == "crop":
            rho = self.ranges.crop_rho * (rng.uniform(0.05, 1.0) if rng.random() > self.ranges.p_identity else 0.03)
            image_in, image_ref, matrix = crop_pair(photo, rng, out, rho, self.transform)
        else:
            image_in, image_ref, matrix = whole_pair(photo, rng, out, self.ranges, self.transform)
        return photometric(image_in, rng, self.photometric), photometric(image_ref, rng, self.photometric), matrix

    def batch(self, photos: list[np.ndarray], step: int, batch_size: int, groups: list[list[int]] | None = None):
        """``(inputs (B, S, S, 3) uint8, references (B, S, S, 3) uint8, matrices (B, 3, 3) float64)``.

        ``groups`` (lists of photo indices, e.g. one per sub-folder) are drawn equally often.
        """
        rng = np.random.default_rng([self.seed, step])
        groups = groups or [list(range(len(photos)))]
        inputs, refs, mats = [], [], []
        for _ in range(batch_size):
            group = groups[int(rng.integers(len(groups)))]
            photo = photos[group[int(rng.integers(len(group)))]]
            mode = "crop" if rng.random() < self.p_crop else "whole"
            a, b, m = self.pair(photo, rng, mode)
            inputs.append(a), refs.append(b), mats.append(m)
        return np.stack(inputs), np.stack(refs), np.stack(mats)
