"""Transforms between pixel frames, corner parameterisations and warps.

Convention (the only one in stn-align): a transform is a 3x3 matrix ``M`` mapping
**input pixel coordinates to reference pixel coordinates**. Pixel centres sit at
integer coordinates, x right and y down, as in OpenCV, so
``cv2.warpPerspective(input, M, (ref_w, ref_h))`` reproduces the aligned output.

The network works on both images resized to a square *working* frame of ``S x S``
pixels, and predicts the displacement of the working-frame corners in normalised
coordinates (``-1..1``, corner pixel centres at +-1, kornia's ``align_corners=True``).
Sizes are ``(width, height)`` unless a docstring says ``(H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch
from kornia.geometry.conversions import denormalize_homography, normalize_homography
from kornia.geometry.transform import get_perspective_transform, warp_perspective

TRANSFORMS = ("affine", "projective")
NUM_PARAMS = {"affine": 6, "projective": 8}

# Working-frame corners in normalised coordinates: top-left, top-right, bottom-right, bottom-left.
UNIT_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def pixel_corners(width: int, height: int) -> np.ndarray:
    """Corner pixel centres of a ``width x height`` image, ``(4, 2)`` float64, TL TR BR BL."""
    return np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)


def resize_matrix(src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """``(3, 3)`` matrix mapping pixels of an image of ``src_size`` to the same image resized to ``dst_size``.

    Pixel-centre convention: ``x' = (x + 0.5) * dst_w / src_w - 0.5`` (as ``cv2.resize``).
    """
    sx, sy = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], np.float64)


def working_to_pixel(
    matrix_work: np.ndarray, input_size: tuple[int, int], ref_size: tuple[int, int], work_size: int
) -> np.ndarray:
    """Map a working-frame matrix ``(3, 3)`` (``work_size`` square, both images) to full-resolution pixels."""
    to_work = resize_matrix(input_size, (work_size, work_size))
    from_work = resize_matrix((work_size, work_size), ref_size)
    return normalized(from_work @ matrix_work @ to_work)


def pixel_to_working(
    matrix: np.ndarray, input_size: tuple[int, int], ref_size: tuple[int, int], work_size: int
) -> np.ndarray:
    """Inverse of :func:`working_to_pixel`: full-resolution ``(3, 3)`` to the working frame."""
    to_work = resize_matrix(ref_size, (work_size, work_size))
    from_work = resize_matrix((work_size, work_size), input_size)
    return normalized(to_work @ matrix @ from_work)


def normalized(matrix: np.ndarray) -> np.ndarray:
    """Scale a homography ``(..., 3, 3)`` so that its bottom-right entry is 1."""
    return matrix / matrix[..., 2:3, 2:3]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply ``(3, 3)`` to points ``(N, 2)``; returns ``(N, 2)`` (float64)."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def corner_error(matrix_pred: np.ndarray, matrix_true: np.ndarray, input_size: tuple[int, int]) -> float:
    """Mean distance (pixels) between the input's four corners mapped by the predicted and true matrices."""
    corners = pixel_corners(*input_size)
    diff = transform_points(matrix_pred, corners) - transform_points(matrix_true, corners)
    return float(np.linalg.norm(diff, axis=1).mean())


def is_affine(matrix: np.ndarray, tol: float = 1e-9) -> bool:
    """True if the ``(3, 3)`` matrix has bottom row ``[0, 0, 1]`` (after normalisation)."""
    m = normalized(matrix)
    return bool(abs(m[2, 0]) < tol and abs(m[2, 1]) < tol)


# --- torch: batched, differentiable, normalised coordinates -------------------------------------


def unit_corners(batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised working-frame corners repeated over the batch, ``(B, 4, 2)``."""
    return torch.tensor(UNIT_CORNERS, device=device, dtype=dtype).expand(batch, 4, 2)


def corner_offsets_to_homography(offsets: torch.Tensor, transform: str) -> torch.Tensor:
    """Homographies ``(B, 3, 3)`` from corner displacements in normalised coordinates.

    Args:
        offsets: ``(B, 8)`` for ``projective`` (4 corners x (dx, dy)) or ``(B, 6)`` for
            ``affine`` (TL, TR, BR; the fourth corner completes the parallelogram).

    Returns:
        ``(B, 3, 3)`` mapping normalised input coordinates to normalised reference coordinates.
    """
    batch = offsets.shape[0]
    if transform == "affine":
        d = offsets.view(batch, 3, 2)
        d = torch.cat([d, (d[:, 0] + d[:, 2] - d[:, 1]).unsqueeze(1)], dim=1)  # BL = TL + BR - TR
    elif transform == "projective":
        d = offsets.view(batch, 4, 2)
    else:
        raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")
    src = unit_corners(batch, offsets.device, torch.float32)
    homography = get_perspective_transform(src, src + d.float())
    if transform == "affine":  # exact bottom row despite round-off in the solve
        bottom = torch.tensor([0.0, 0.0, 1.0], device=offsets.device).expand(batch, 1, 3)
        homography = torch.cat([homography[:, :2] / homography[:, 2:3, 2:3], bottom], dim=1)
    return homography.to(offsets.dtype)


def homography_to_corners(homography: torch.Tensor) -> torch.Tensor:
    """Where ``(B, 3, 3)`` sends the normalised working corners: ``(B, 4, 2)``."""
    corners = unit_corners(homography.shape[0], homography.device, homography.dtype)
    homogeneous = torch.cat([corners, torch.ones_like(corners[..., :1])], dim=-1) @ homography.transpose(1, 2)
    return homogeneous[..., :2] / homogeneous[..., 2:3]


def normalized_to_pixel(homography: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised ``(B, 3, 3)`` to working-pixel ``(B, 3, 3)`` for a square ``size`` frame."""
    return denormalize_homography(homography, (size, size), (size, size))


def pixel_to_normalized(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """Working-pixel ``(B, 3, 3)`` to normalised ``(B, 3, 3)`` for a square ``size`` frame."""
    return normalize_homography(matrix, (size, size), (size, size))


# --- the spatial transformer's grid generator and sampler (one code path for every network) ------


def transform_grid(homography: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Map normalised points ``(B, H, W, 2)`` (or ``(B, N, 2)``) by ``(B, 3, 3)``; same shape out."""
    flat = grid.reshape(grid.shape[0], -1, 2)
    homogeneous = torch.cat([flat, torch.ones_like(flat[..., :1])], dim=-1) @ homography.transpose(1, 2)
    z = homogeneous[..., 2:]
    z = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)  # keep the division finite
    return (homogeneous[..., :2] / z).reshape(grid.shape)


def base_grid(batch: int, out_hw: tuple[int, int], align_corners: bool = True, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised pixel-centre coordinates ``(B, H, W, 2)`` (x, y) of an ``out_hw = (H, W)`` frame.

    ``align_corners=True``: corner pixel centres at +-1 (the aligner's frame); ``False``: pixel corners
    at +-1 (``F.affine_grid``'s default, used by the ICPR 2020 classifiers).
    """
    identity = torch.eye(2, 3, device=device, dtype=dtype).expand(batch, 2, 3)
    return torch.nn.functional.affine_grid(identity, [batch, 1, *out_hw], align_corners=align_corners)


def homography_grid(homography: torch.Tensor, out_hw: tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """Grid generator: where each output pixel samples its source, ``(B, H, W, 2)`` normalised.

    Args:
        homography: ``(B, 3, 3)`` normalised **output -> source** transforms (the STN's ``theta``).
        out_hw: output size ``(H, W)``.
    """
    grid = base_grid(homography.shape[0], out_hw, align_corners, homography.device, homography.dtype)
    return transform_grid(homography, grid)


def sample(image: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros", align_corners: bool = True) -> torch.Tensor:
    """Sampler: bilinear ``(B, C, H, W)`` at ``grid (B, H', W', 2)`` -> ``(B, C, H', W')``."""
    return torch.nn.functional.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding_mode,
                                           align_corners=align_corners)


def warp_normalized(
    image: torch.Tensor, homography: torch.Tensor, padding_mode: str = "border"
) -> torch.Tensor:
    """Warp ``(B, C, S, S)`` by normalised ``(B, 3, 3)`` (input -> reference) into the same frame.

    Output pixel ``p`` samples the input at ``H^-1 p``, exactly like ``cv2.warpPerspective``.
    """
    source = torch.linalg.inv(homography.float()).to(image.dtype)
    return sample(image, homography_grid(source, tuple(image.shape[-2:])), padding_mode)


def warp_pixels(
    image: torch.Tensor,
    matrix: torch.Tensor,
    ref_hw: tuple[int, int],
    padding_mode: str = "zeros",
    fill_value: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Warp ``(B, C, H, W)`` by pixel matrices ``(B, 3, 3)`` onto a ``ref_hw = (H_ref, W_ref)`` canvas.

    Same result as ``cv2.warpPerspective(image, M, (W_ref, H_ref))`` with bilinear sampling.
    ``padding_mode`` is ``zeros``, ``border``, ``reflection`` or ``fill`` (with ``fill_value (C,)``).
    """
    return warp_perspective(
        image, matrix, ref_hw, mode=mode, padding_mode=padding_mode, align_corners=True, fill_value=fill_value
    )
