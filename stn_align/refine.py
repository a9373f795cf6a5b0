"""Photometric refinement (OpenCV's ECC), foreground masks and the alignment score.

All matrices follow the package convention: ``(3, 3)`` float64, input pixels -> reference pixels.
Images here are single-channel float32 ``(H, W)`` in ``[0, 1]`` (see :func:`to_gray`) unless a
docstring says otherwise. Masks are ``(H, W)`` uint8, 255 = region of interest, 0 = ignore; a mask
passed to :func:`refine_ecc` or :func:`alignment_score` lives in the **reference** frame (it is
resized to the reference's size if it differs).
"""

from __future__ import annotations

import cv2
import numpy as np

from .geometry import pixel_corners, resize_matrix, transform_points
from .io import to_float, to_float_rgb

# --- images --------------------------------------------------------------------------------------------


#: Above this many pixels, colour is turned to gray in the image's own dtype first: a float copy of a 60-MP
#: RGB photo alone would take 720 MB (the result differs by at most half a grey level).
LARGE_PIXELS = 4_000_000


def to_gray(image: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` uint8/uint16/float -> ``(H, W)`` float32 in ``[0, 1]``; alpha composited on white."""
    if image.ndim == 2 or image.shape[2] == 1:
        x = to_float(image) if image.dtype in (np.uint8, np.uint16) else image.astype(np.float32)
        return np.ascontiguousarray(x.reshape(image.shape[:2]))
    if image.shape[2] == 3 and image.dtype in (np.uint8, np.uint16) and image.shape[0] * image.shape[1] > LARGE_PIXELS:
        return to_float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    return cv2.cvtColor(to_float_rgb(image), cv2.COLOR_RGB2GRAY)


def _shrink(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Downscale so the longer side is at most ``max_side``; returns ``(image, (3, 3) original->small)``."""
    h, w = gray.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return gray, np.eye(3)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), resize_matrix((w, h), size)


def _fit_mask(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """A mask resized (nearest) to ``size = (w, h)``, as uint8 0/255; None passes through."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., -1] if m.shape[2] in (2, 4) else m[..., 0]
    m = np.where(m > (0.5 if m.dtype.kind == "f" else 0), 255, 0).astype(np.uint8)
    if (m.shape[1], m.shape[0]) != tuple(size):
        m = cv2.resize(m, tuple(size), interpolation=cv2.INTER_NEAREST)
    return m


# --- foreground masks ------------------------------------------------------------------------------------


def foreground_mask(
    image: np.ndarray, threshold: float = 0.06, dilate: float = 0.02, max_side: int = 512
) -> np.ndarray:
    """Estimate the product (foreground) of a product shot on a plain background: ``(H, W)`` uint8, 255 = product.

    * An image with a non-trivial alpha channel: the opaque pixels.
    * Otherwise the background colour is the median of the one-pixel border; pixels farther than
      ``threshold`` (fraction of full scale, max over RGB) from it are foreground. Opening removes
      noise and JPEG speckles, closing and hole-filling make the product solid, and a dilation by
      ``dilate`` x the image diagonal keeps the product's outline (where the alignment signal is).
    * When the background is not plain (the border is not one colour) or the "foreground" is
      nearly everything or nothing, the whole image is returned (everything counts).

    Args:
        image: ``(H, W[, C])`` uint8/uint16/float, C in 1, 3, 4.
    """
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    h, w = x.shape[:2]
    full = np.full((h, w), 255, np.uint8)
    top = 65535.0 if x.dtype == np.uint16 else (1.0 if x.dtype.kind == "f" else 255.0)
    scale = min(1.0, max_side / max(h, w))
    small = x if scale == 1.0 else cv2.resize(x, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = small[..., None]
    f = small.astype(np.float32) / top
    sh, sw = f.shape[:2]
    diag = float(np.hypot(sh, sw))
    if f.shape[2] == 4:
        alpha = f[..., 3]
        if alpha.min() < 0.98:
            mask = (alpha > 0.05).astype(np.uint8) * 255
            return _finish_mask(mask, diag, dilate, (w, h), full, solid=False)
        f = f[..., :3]
    elif f.shape[2] == 2:
        f = f[..., :1]
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    background = np.median(border, axis=0)
    border_distance = np.abs(border - background).max(axis=1)
    if np.mean(border_distance > threshold) > 0.25:  # the border is not one plain colour
        return full
    distance = np.abs(f - background).max(axis=2)
    distance = cv2.GaussianBlur(distance, (0, 0), 0.8)
    mask = (distance > threshold).astype(np.uint8) * 255
    return _finish_mask(mask, diag, dilate, (w, h), full, solid=True)


def _finish_mask(mask: np.ndarray, diag: float, dilate: float, size, full: np.ndarray, solid: bool) -> np.ndarray:
    k = max(1, round(diag * 0.004)) * 2 + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    if solid:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3 * k, 3 * k)))
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        mask = cv2.drawContours(np.zeros_like(mask), contours, -1, 255, thickness=cv2.FILLED)
    fraction = (mask > 0).mean()
    if fraction < 0.005 or fraction > 0.97:
        return full
    if dilate > 0:
        d = max(1, round(diag * dilate)) * 2 + 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        mask = cv2.resize(mask, tuple(size), interpolation=cv2.INTER_NEAREST)
    return mask


def load_mask(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask file (any image; alpha if present, else gray > 0) as ``(H, W)`` uint8 0/255, resized to ``size = (w, h)``."""
    from .io import read_image

    image = read_image(path)
    channel = image[..., 3] if image.shape[2] == 4 else image[..., :3].max(axis=2)
    mask = np.where(channel > 0, 255, 0).astype(np.uint8)
    return mask if size is None else _fit_mask(mask, size)


def resolve_mask(mask, reference: np.ndarray) -> np.ndarray | None:
    """``None``/``"none"`` -> None; ``"auto"`` -> :func:`foreground_mask` of the reference; a path -> the file;
    an array -> itself. Always sized like ``reference`` ``(H, W, ...)``."""
    if mask is None or (isinstance(mask, str) and mask == "none"):
        return None
    size = (reference.shape[1], reference.shape[0])
    if isinstance(mask, str) and mask == "auto":
        return foreground_mask(reference)
    if isinstance(mask, np.ndarray):
        return _fit_mask(mask, size)
    return load_mask(mask, size)


# --- the score -------------------------------------------------------------------------------------------


def overlap_mask(input_size: tuple[int, int], matrix: np.ndarray, ref_size: tuple[int, int], erode: int = 2) -> np.ndarray:
    """``(H_ref, W_ref)`` uint8 mask (255 inside) of the reference pixels that the warped input covers."""
    ones = np.full((input_size[1], input_size[0]), 255, np.uint8)
    mask = cv2.warpPerspective(ones, matrix, ref_size, flags=cv2.INTER_NEAREST, borderValue=0)
    if erode:
        mask = cv2.erode(mask, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8))
    return mask


def zncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of ``a`` and ``b`` ``(H, W[, C])`` over ``mask > 0``; -1..1.

    Each channel is centred on its own mean; the sums run over all channels together."""
    planes = (lambda x: [x] if x.ndim == 2 else cv2.split(np.ascontiguousarray(x)))
    return _zncc_planes(planes(a), planes(b), mask > 0)


def _zncc_planes(xs: list[np.ndarray], ys: list[np.ndarray], sel: np.ndarray) -> float:
    """:func:`zncc` of channel planes ``(H, W)`` over the boolean ``sel``. Planes, not interleaved
    ``(H, W, C)`` arrays: numpy's gathers and reductions over a last axis of 2 are ten times slower."""
    if np.count_nonzero(sel) < 16:
        return 0.0
    xx = yy = xy = 0.0
    for a, b in zip(xs, ys):
        x, y = a[sel].astype(np.float32, copy=False), b[sel].astype(np.float32, copy=False)
        x = x - np.float32(x.mean(dtype=np.float64))
        y = y - np.float32(y.mean(dtype=np.float64))
        xx, yy, xy = xx + float(np.dot(x, x)), yy + float(np.dot(y, y)), xy + float(np.dot(x, y))
    denom = np.sqrt(xx * yy)
    return float(np.clip(xy / denom, -1, 1)) if denom > 1e-12 else 0.0


def _gradients(gray: np.ndarray, sigma: float) -> list[np.ndarray]:
    """Smoothed image gradients: the planes ``[gx, gy]``, each ``(H, W)`` float32."""
    g = cv2.GaussianBlur(gray, (0, 0), sigma) if sigma > 0 else gray
    return [cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)]


def gradient_zncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray, sigma: float = 1.0) -> float:
    """ZNCC of the gradient fields of ``a`` and ``b`` over ``mask``: flat background contributes nothing,
    so it measures how well edges coincide (sharp for misalignments of a few pixels)."""
    return _zncc_planes(_gradients(a, sigma), _gradients(b, sigma), mask > 0)


def alignment_score(
    input_gray: np.ndarray,
    ref_gray: np.ndarray,
    matrix: np.ndarray,
    max_side: int = 384,
    mask: np.ndarray | None = None,
    min_coverage: float = 0.3,
    sigma: float = 0.7,
) -> float:
    """How well ``matrix`` aligns the two images, in ``[0, 1]``; ranks alignments by how likely they are right.

    The ZNCC of the **gradient fields** (Gaussian ``sigma`` px, Sobel) of the warped input and the
    reference over their overlap (restricted to ``mask``, a reference-frame region of interest), at most
    ``max_side`` pixels, clipped at 0, times ``min(1, coverage / min_coverage)`` where coverage is the
    fraction of the reference (or of the mask) that the warped input covers. Gradients make it sharp
    (a few pixels off lowers it clearly), blind to flat background and to brightness/contrast changes.
    On the benchmark pairs it separates alignments under 3 px from those over 10 px far better than
    intensity ZNCC (which stays high for a product slightly off on a white background).

    Args:
        input_gray, ref_gray: ``(H, W)`` float32.
        matrix: ``(3, 3)`` input -> reference pixels.
        mask: optional ``(H_ref, W_ref)`` uint8 region of interest in the reference.
    """
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-12:
        return 0.0
    ref_small, ref_to_small = _shrink(ref_gray, max_side)
    in_small, in_to_small = _shrink(input_gray, max_side)
    m = ref_to_small @ matrix @ np.linalg.inv(in_to_small)
    size = (ref_small.shape[1], ref_small.shape[0])
    warped = cv2.warpPerspective(in_small, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    valid = overlap_mask((in_small.shape[1], in_small.shape[0]), m, size, erode=3)
    region = _fit_mask(mask, size)
    if region is not None and (region > 0).sum() >= 16:
        valid = valid & region
        coverage = (valid > 0).sum() / max(1, (region > 0).sum())
    else:
        coverage = (valid > 0).mean()
    g = max(0.0, gradient_zncc(warped, ref_small, valid, sigma))
    return float(g * min(1.0, coverage / min_coverage))


# --- ECC refinement --------------------------------------------------------------------------------------


def ecc_align(
    input_gray: np.ndarray,
    ref_gray: np.ndarray,
    matrix: np.ndarray,
    transform: str,
    max_side: int = 640,
    coarsest: int = 64,
    iterations: tuple[int, int] = (40, 15),
    eps: float = 1e-4,
    gauss: tuple[int, int] = (5, 3),
    mask: np.ndarray | None = None,
    match: bool = True,
) -> np.ndarray | None:
    """Coarse-to-fine ECC from ``matrix`` (no acceptance test); returns the refined matrix or None if ECC failed.

    The pyramid runs from about ``coarsest`` pixels (longer side) up to ``max_side`` (both images are
    first shrunk to at most ``max_side``; the result is mapped back to full resolution). Iterations and
    ECC's Gaussian pre-filter go from ``iterations[0]``/``gauss[0]`` at the coarsest level to
    ``[1]`` at the finest (a good start converges in few iterations where they are expensive).
    ``transform``: ``projective`` (homography) or ``affine``.
    """
    ref, ref_to = _shrink(ref_gray, max_side)
    inp, in_to = _shrink(input_gray, max_side)
    current = ref_to @ matrix @ np.linalg.inv(in_to)
    # Bring the input to the reference's scale, so each pyramid level compares like with like.
    scale = np.sqrt(abs(np.linalg.det(current[:2, :2] / current[2, 2])))
    if scale < 0.8:
        size = (max(8, round(inp.shape[1] * scale)), max(8, round(inp.shape[0] * scale)))
        to_small = resize_matrix((inp.shape[1], inp.shape[0]), size)
        inp, in_to = cv2.resize(inp, size, interpolation=cv2.INTER_AREA), to_small @ in_to
        current = current @ np.linalg.inv(to_small)
    motion = cv2.MOTION_HOMOGRAPHY if transform == "projective" else cv2.MOTION_AFFINE
    ref_mask = _fit_mask(mask, (ref.shape[1], ref.shape[0]))
    levels = max(0, int(np.floor(np.log2(max(ref.shape) / coarsest))))
    pyr_r, pyr_i = [ref], [inp]
    for _ in range(levels):
        pyr_r.append(cv2.resize(pyr_r[-1], (max(8, round(pyr_r[-1].shape[1] / 2)), max(8, round(pyr_r[-1].shape[0] / 2))), interpolation=cv2.INTER_AREA))
        pyr_i.append(cv2.resize(pyr_i[-1], (max(8, round(pyr_i[-1].shape[1] / 2)), max(8, round(pyr_i[-1].shape[0] / 2))), interpolation=cv2.INTER_AREA))
    ok = False
    for level in range(levels, -1, -1):
        r_l, i_l = pyr_r[level], pyr_i[level]
        r_size, i_size = (r_l.shape[1], r_l.shape[0]), (i_l.shape[1], i_l.shape[0])
        to_r = resize_matrix((ref.shape[1], ref.shape[0]), r_size)
        to_i = resize_matrix((inp.shape[1], inp.shape[0]), i_size)
        m_l = to_r @ current @ np.linalg.inv(to_i)  # input_l -> ref_l
        valid = overlap_mask(i_size, m_l, r_size, erode=1)
        if ref_mask is not None:
            region = cv2.resize(ref_mask, r_size, interpolation=cv2.INTER_NEAREST)
            if ((valid & region) > 0).sum() >= 64:
                valid &= region
        if (valid > 0).sum() < 64:
            continue
        t = levels and level / levels  # 1 at the coarsest level, 0 at the finest
        its = round(iterations[1] + t * (iterations[0] - iterations[1]))
        filt = int(round(gauss[1] + t * (gauss[0] - gauss[1]))) | 1
        if match:  # re-estimated per level, with the current (improving) estimate
            i_l = match_intensities(i_l, r_l, m_l, valid)
        warp = np.linalg.inv(m_l)  # ECC's warp maps template (reference) pixels to input pixels
        warp = (warp / warp[2, 2]).astype(np.float32)
        if motion == cv2.MOTION_AFFINE:
            warp = np.ascontiguousarray(warp[:2])
        try:
            _, warp = _find_transform_ecc(r_l, i_l, valid, warp, motion,
                                          (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, its, eps), filt)
        except cv2.error:  # no convergence at this level: keep the estimate, try the finer levels
            continue
        warp = np.vstack([warp, [0, 0, 1]]) if warp.shape[0] == 2 else warp
        if not np.all(np.isfinite(warp)) or abs(np.linalg.det(warp)) < 1e-9:
            continue
        m_l = np.linalg.inv(warp.astype(np.float64))
        current = np.linalg.inv(to_r) @ m_l @ to_i
        current /= current[2, 2]
        ok = True
    return _to_full(current, ref_to, in_to) if ok else None


def _find_transform_ecc(template, image, template_mask, warp, motion, criteria, filt):
    """OpenCV's ECC with the mask in the *template* (reference) frame, for images of any sizes.

    ``findTransformECC``'s own mask belongs to the input image (OpenCV >= 4.13 checks its size), so use
    ``findTransformECCWithMask`` where it exists; older OpenCV took the mask as the template's.
    """
    if hasattr(cv2, "findTransformECCWithMask"):
        everywhere = np.full(image.shape[:2], 255, np.uint8)
        return cv2.findTransformECCWithMask(template, image, template_mask, everywhere, warp, motion, criteria, filt)
    return cv2.findTransformECC(template, image, warp, motion, criteria, template_mask, filt)


def match_intensities(inp: np.ndarray, ref: np.ndarray, matrix: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Map the input's gray levels monotonically onto the reference's (quantile matching over the overlap
    under ``matrix``), so gamma, contrast and brightness differences do not bias ECC."""
    size = (ref.shape[1], ref.shape[0])
    warped = cv2.warpPerspective(inp, matrix, size, flags=cv2.INTER_LINEAR)
    valid = overlap_mask((inp.shape[1], inp.shape[0]), matrix, size, erode=2) > 0
    if mask is not None and (valid & (mask > 0)).sum() >= 256:
        valid &= mask > 0
    if valid.sum() < 256:
        return inp
    q = np.linspace(0, 1, 129)
    step = max(1, int(valid.sum()) // 40_000)  # a subsample is plenty for 129 quantiles
    picked = np.flatnonzero(valid)[::step]  # subsample, then gather (not gather everything)
    src, dst = _quantiles(warped.ravel()[picked], q), _quantiles(ref.ravel()[picked], q)
    src = np.maximum.accumulate(src + np.arange(len(q)) * 1e-7)  # strictly increasing for interp
    return np.interp(inp, src, dst).astype(np.float32)


def _quantiles(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.quantile(values, q)`` (linear interpolation) by one sort: ten times faster for 129 quantiles."""
    x = np.sort(values)
    pos = q * (len(x) - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, len(x) - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


def _to_full(current: np.ndarray, ref_to: np.ndarray, in_to: np.ndarray) -> np.ndarray:
    refined = np.linalg.inv(ref_to) @ current @ in_to
    return refined / refined[2, 2]


def refine_ecc(
    input_gray: np.ndarray,
    ref_gray: np.ndarray,
    matrix: np.ndarray,
    transform: str,
    max_side: int = 640,
    coarsest: int = 64,
    iterations: tuple[int, int] = (40, 15),
    eps: float = 1e-4,
    mask: np.ndarray | None = None,
    max_move: float = 0.08,
) -> tuple[np.ndarray, bool]:
    """Polish ``matrix`` with coarse-to-fine ECC; returns ``(matrix, refined)``, the input unchanged unless ECC helps.

    The refined matrix is kept only if (1) ECC converged to a finite, non-degenerate matrix, (2) it
    moves the input's corners by at most ``max_move`` x the reference diagonal (ECC refines, it
    does not re-align), and (3) the photometric agreement over the overlap common to both estimates
    (and ``mask``) rises: intensity ZNCC (what ECC maximises) must increase and gradient ZNCC must not
    drop. So a failing ECC never makes a result worse than the network's. See :func:`ecc_align`.
    """
    matrix = np.asarray(matrix, np.float64)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-12:
        return matrix, False
    refined = ecc_align(input_gray, ref_gray, matrix, transform, max_side, coarsest, iterations, eps, mask=mask)
    if refined is None or not np.all(np.isfinite(refined)):
        return matrix, False
    h, w = input_gray.shape[:2]
    corners = pixel_corners(w, h)
    move = np.linalg.norm(transform_points(refined, corners) - transform_points(matrix, corners), axis=1).max()
    if not move <= max_move * np.hypot(*ref_gray.shape[:2]):
        return matrix, False
    if _better(input_gray, ref_gray, matrix, refined, mask):
        return refined, True
    return matrix, False


def _better(input_gray, ref_gray, before: np.ndarray, after: np.ndarray, mask, max_side: int = 320) -> bool:
    """True if ``after`` agrees better than ``before`` over their common overlap (at most ``max_side`` px)."""
    ref, ref_to = _shrink(ref_gray, max_side)
    inp, in_to = _shrink(input_gray, max_side)
    size, in_size = (ref.shape[1], ref.shape[0]), (inp.shape[1], inp.shape[0])
    m0 = ref_to @ before @ np.linalg.inv(in_to)
    m1 = ref_to @ after @ np.linalg.inv(in_to)
    valid = overlap_mask(in_size, m0, size, erode=2) & overlap_mask(in_size, m1, size, erode=2)
    region = _fit_mask(mask, size)
    if region is not None and ((valid & region) > 0).sum() >= 64:
        valid &= region
    if (valid > 0).sum() < 64:
        return False
    w0 = cv2.warpPerspective(inp, m0, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    w1 = cv2.warpPerspective(inp, m1, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    sel, grad_ref = valid > 0, _gradients(ref, 0.7)
    z0, z1 = _zncc_planes([w0], [ref], sel), _zncc_planes([w1], [ref], sel)
    g0, g1 = _zncc_planes(_gradients(w0, 0.7), grad_ref, sel), _zncc_planes(_gradients(w1, 0.7), grad_ref, sel)
    return z1 > z0 and g1 >= g0 - 1e-3
