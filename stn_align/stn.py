"""Spatial transformer layer, as in the ICPR 2020 STN study (its classifiers: :mod:`stn_align.icpr2020.networks`).

Finnveden, Jansson & Lindeberg, "Understanding when spatial transformer networks do not
support invariance, and what to do about it" (ICPR 2020, arXiv:2004.11678) compare where a
spatial transformer (ST) sits in a classifier:

* ``CNN``     - no transformer;
* ``STN-C0``  - the ST warps the input image, its localisation net sees the image;
* ``STN-CX``  - the ST warps the feature maps after conv block X, its localisation net sees them;
* ``STN-SLX`` - the ST warps the **input image**, but its localisation net reads the feature maps
  of the classifier's own first X conv blocks (shared weights). ``STN-SL0 == STN-C0``.

Conventions (kornia style):

* images / feature maps are ``(B, C, H, W)``;
* ``theta`` is a ``(B, 3, 3)`` matrix in **normalised** coordinates (``[-1, 1]``, pixel corners,
  i.e. ``align_corners=False``) that maps a location of the *output* grid to the location
  of the *input* it is sampled from (the usual STN convention, same as ``F.affine_grid``);
* :func:`theta_to_pixel_matrix` converts it to this package's convention: a pixel-space matrix
  mapping *input* pixels to *output* pixels, so that ``cv2.warpPerspective(img, M, (W, H))``
  reproduces the warp.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import homography_grid, sample

Transform = Literal["affine", "projective"]
Placement = Literal["none", "feature", "shared"]

__all__ = [
    "SpatialTransformer",
    "localisation_features",
    "rotation_theta",
    "warp_with_theta",
    "theta_to_pixel_matrix",
    "rotation_angle_deg",
    "identity_theta",
]


# --------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------


def rotation_theta(angle_deg: torch.Tensor) -> torch.Tensor:
    """Rotation about the image centre as a normalised ``theta``.

    Args:
        angle_deg: angles in degrees, ``(B,)``.

    Returns:
        ``(B, 3, 3)`` matrices ``[[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]``. Used as a sampling
        ``theta`` it rotates the *content* by ``-angle`` (x right, y down); its inverse,
        ``rotation_theta(-angle)``, rotates the content by ``+angle``.
    """
    a = torch.deg2rad(angle_deg.to(torch.float32))
    c, s = torch.cos(a), torch.sin(a)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    rows = [torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, dim=-2)


def rotation_angle_deg(theta: torch.Tensor) -> torch.Tensor:
    """Rotation angle (degrees) of the linear part ``A`` of ``theta``: the rotation closest to ``A``.

    ``atan2(A10 - A01, A00 + A11)`` is the angle of the rotation factor of ``A``'s polar
    decomposition (``A = R S``, ``S`` symmetric) for ``det A > 0``. Unlike the angle of ``A``'s
    first column, ``atan2(A10, A00)``, it is not moved by shear or anisotropic scale, which an
    affine transformer is free to add.

    Args:
        theta: ``(B, 3, 3)`` (or ``(B, 2, 3)``) normalised transforms.

    Returns:
        ``(B,)`` angles in ``(-180, 180]``; ``rotation_angle_deg(rotation_theta(a)) == a``.
    """
    return torch.rad2deg(torch.atan2(theta[:, 1, 0] - theta[:, 0, 1], theta[:, 0, 0] + theta[:, 1, 1]))


def warp_with_theta(
    x: torch.Tensor,
    theta: torch.Tensor,
    out_hw: tuple[int, int] | None = None,
    transform: Transform = "affine",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Differentiable bilinear warp (grid generator + sampler).

    Args:
        x: images or feature maps, ``(B, C, H, W)``.
        theta: ``(B, 3, 3)`` normalised output->input transforms (for ``affine`` only the top
            two rows are used).
        out_hw: output size ``(H', W')``; default ``(H, W)``.
        transform: ``"affine"`` (``F.affine_grid``) or ``"projective"``
            (:func:`stn_align.geometry.homography_grid`).
        padding_mode: padding of :func:`stn_align.geometry.sample` for samples outside the input.

    Returns:
        ``(B, C, H', W')``.
    """
    out_hw = tuple(out_hw or x.shape[-2:])
    if transform == "affine":  # the affine grid is exact and cheaper than the homography path
        grid = F.affine_grid(theta[:, :2, :], [x.shape[0], x.shape[1], *out_hw], align_corners=False)
    elif transform == "projective":
        grid = homography_grid(theta, out_hw, align_corners=False)
    else:
        raise ValueError(f"unknown transform {transform!r}; use 'affine' or 'projective'")
    return sample(x, grid, padding_mode, align_corners=False)


def _pixel_to_normalised(h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """``(3, 3)`` matrix mapping pixel coords (centres at integers) to ``[-1, 1]`` (corners)."""
    return torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]], dtype=dtype)


def theta_to_pixel_matrix(theta: torch.Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Convert a normalised sampling ``theta`` to the package's pixel convention.

    Args:
        theta: ``(B, 3, 3)`` normalised output->input transforms.
        in_hw: input size ``(H, W)``.
        out_hw: output size ``(H', W')``.

    Returns:
        ``(B, 3, 3)`` float64 matrices ``M`` mapping *input* pixel coordinates to *output* pixel
        coordinates: ``cv2.warpPerspective(img, M, (W', H'))`` equals :func:`warp_with_theta`.
    """
    n_in = _pixel_to_normalised(*in_hw)
    n_out = _pixel_to_normalised(*out_hw)
    return torch.linalg.inv(n_out) @ torch.linalg.inv(theta.to(torch.float64)) @ n_in


# --------------------------------------------------------------------------------------
# The spatial transformer
# --------------------------------------------------------------------------------------


def localisation_features(in_channels: int, in_hw: tuple[int, int], hidden: int = 20) -> nn.Sequential:
    """Small conv localisation trunk (after Finnveden et al.'s MNIST localisation nets).

    ``conv5x5(hidden) [maxpool2 if side > 20] ReLU conv5x5(hidden) [maxpool2 if side > 20] ReLU
    flatten Linear(hidden) ReLU``. Pooling only where the map is large keeps it usable on
    28x28 / 60x60 images and on 10x10 / 26x26 feature maps alike; maps smaller than 9x9 get
    padded 3x3 convs instead of 5x5.

    Args:
        in_channels: ``C`` of the ``(B, C, H, W)`` input.
        in_hw: ``(H, W)`` of the input.
        hidden: filters per conv and width of the output feature.

    Returns:
        module mapping ``(B, C, H, W)`` -> ``(B, hidden)``.
    """
    layers: list[nn.Module] = []
    c, side = in_channels, min(in_hw)
    for _ in range(2):
        if side >= 9:
            layers.append(nn.Conv2d(c, hidden, kernel_size=5))
            side -= 4
        else:  # small deep feature maps (e.g. SVHN depth 6/8): size-preserving 3x3
            layers.append(nn.Conv2d(c, hidden, kernel_size=3, padding=1))
        if side > 20:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        layers.append(nn.ReLU())
        c = hidden
    trunk = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        n_flat = trunk(torch.zeros(1, in_channels, *in_hw)).shape[1]
    return nn.Sequential(trunk, nn.Linear(n_flat, hidden), nn.ReLU())


class SpatialTransformer(nn.Module):
    """Localisation net + regression layer + grid generator + bilinear sampler.

    The regression layer starts at the identity (zero weights, identity bias), so at
    initialisation the layer reproduces its input (up to resampling when ``out_scale != 1``).

    Args:
        localisation: module mapping the localisation input ``(B, C', H', W')`` to ``(B, F)``.
        n_features: ``F``.
        transform: ``"affine"`` (6 parameters) or ``"projective"`` (8, ``theta[2, 2] = 1``).
        out_scale: output side = ``round(side * out_scale)`` (e.g. 0.5 to downsample 60 -> 30).
        padding_mode: ``F.grid_sample`` padding (``"border"`` as in the paper's MNIST runs).
    """

    def __init__(
        self,
        localisation: nn.Module,
        n_features: int,
        transform: Transform = "affine",
        out_scale: float = 1.0,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        if transform not in ("affine", "projective"):
            raise ValueError(f"unknown transform {transform!r}; use 'affine' or 'projective'")
        self.localisation = localisation
        self.transform = transform
        self.out_scale = out_scale
        self.padding_mode = padding_mode
        n_params = 6 if transform == "affine" else 8
        self.regression = nn.Linear(n_features, n_params)
        nn.init.zeros_(self.regression.weight)
        with torch.no_grad():
            self.regression.bias.copy_(torch.eye(3).flatten()[:n_params])

    def predict_theta(self, loc_input: torch.Tensor) -> torch.Tensor:
        """Regress the transform.

        Args:
            loc_input: ``(B, C', H', W')`` what the localisation net looks at.

        Returns:
            ``(B, 3, 3)`` normalised output->input transform.
        """
        p = self.regression(self.localisation(loc_input))  # (B, 6) or (B, 8)
        ones = torch.ones_like(p[:, :1])
        if self.transform == "affine":
            zeros = torch.zeros_like(p[:, :2])
            return torch.cat([p, zeros, ones], dim=1).view(-1, 3, 3)
        return torch.cat([p, ones], dim=1).view(-1, 3, 3)

    def output_size(self, in_hw: Sequence[int]) -> tuple[int, int]:
        """Output ``(H', W')`` for an input of size ``in_hw = (H, W)``."""
        return tuple(max(1, round(s * self.out_scale)) for s in in_hw)  # type: ignore[return-value]

    def warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Sample ``x`` ``(B, C, H, W)`` with ``theta`` ``(B, 3, 3)`` -> ``(B, C, H', W')``."""
        return warp_with_theta(x, theta, self.output_size(x.shape[-2:]), self.transform, self.padding_mode)

    def forward(self, x: torch.Tensor, loc_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``x`` with the transform predicted from ``loc_input`` (default ``x`` itself).

        Args:
            x: ``(B, C, H, W)`` tensor to warp.
            loc_input: ``(B, C', H'', W'')`` localisation input, or ``None`` for ``x``.

        Returns:
            ``(warped (B, C, H', W'), theta (B, 3, 3))``.
        """
        theta = self.predict_theta(x if loc_input is None else loc_input)
        return self.warp(x, theta), theta


def identity_theta(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(B, 3, 3)`` identity transforms."""
    return torch.eye(3, device=device).expand(batch, 3, 3).clone()

