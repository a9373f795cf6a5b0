"""Spatial transformer layer and the four classifier layouts of the ICPR 2020 STN study.

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

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import homography_grid, sample

Transform = Literal["affine", "projective"]
Placement = Literal["none", "feature", "shared"]

__all__ = [
    "ConvBlockSpec",
    "MNIST_BLOCKS",
    "SVHN_BLOCKS",
    "SpatialTransformer",
    "STNClassifier",
    "build_cnn",
    "build_stn_c0",
    "build_stn_cx",
    "build_stn_slx",
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


# --------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvBlockSpec:
    """One classifier conv block: ``Conv2d(k x k, out_channels, padding) [MaxPool2d(2)] ReLU``."""

    out_channels: int
    kernel_size: int
    pool: bool = True
    padding: int = 0


#: Jaderberg et al.'s / Finnveden et al.'s MNIST CNN: conv9x9(64)-pool-conv7x7(64)-pool-FC(10).
MNIST_BLOCKS: tuple[ConvBlockSpec, ...] = (ConvBlockSpec(64, 9), ConvBlockSpec(64, 7))

#: An 8-block SVHN CNN (3x3 convs, pooling after blocks 2, 4, 6), so depths 0/3/6/8 exist.
SVHN_BLOCKS: tuple[ConvBlockSpec, ...] = tuple(
    ConvBlockSpec(c, 3, pool=i in (1, 3, 5), padding=1) for i, c in enumerate((32, 32, 64, 64, 96, 96, 128, 128))
)


def _conv_blocks(in_channels: int, specs: Sequence[ConvBlockSpec]) -> nn.ModuleList:
    """One ``nn.Sequential`` per spec, each mapping ``(B, C, H, W)`` -> ``(B, C_out, H_out, W_out)``."""
    blocks, c = [], in_channels
    for s in specs:
        layers: list[nn.Module] = [nn.Conv2d(c, s.out_channels, s.kernel_size, padding=s.padding)]
        if s.pool:
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.ReLU())
        blocks.append(nn.Sequential(*layers))
        c = s.out_channels
    return nn.ModuleList(blocks)


class STNClassifier(nn.Module):
    """A conv classifier with an optional spatial transformer at depth ``depth``.

    Args:
        blocks: conv blocks; ``blocks[:depth]`` run before the transformer.
        num_classes: ``K``.
        in_shape: ``(C, H, W)`` of one input image.
        transformer: the :class:`SpatialTransformer`, or ``None`` for a plain CNN.
        depth: ``X`` - number of conv blocks before the transformer (CX) / shared with the
            localisation net (SLX).
        placement: ``"none"`` (CNN), ``"feature"`` (STN-CX: warp the depth-X feature maps) or
            ``"shared"`` (STN-SLX: warp the input, localise from the depth-X feature maps).

    ``forward(x)`` maps ``(B, C, H, W)`` -> logits ``(B, K)``; :meth:`forward_with_theta`
    also returns the transform ``(B, 3, 3)`` (identity for the CNN).
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        num_classes: int,
        in_shape: tuple[int, int, int],
        transformer: SpatialTransformer | None = None,
        depth: int = 0,
        placement: Placement = "none",
    ):
        super().__init__()
        if (transformer is None) != (placement == "none"):
            raise ValueError("a transformer needs placement 'feature' or 'shared', and vice versa")
        if not 0 <= depth <= len(blocks):
            raise ValueError(f"depth must be in [0, {len(blocks)}], got {depth}")
        self.blocks = blocks
        self.transformer = transformer
        self.depth = depth
        self.placement = placement
        # set True after ``model.to(memory_format=torch.channels_last)``: the sampler returns
        # NCHW tensors, which would drop the following convs onto their slow CPU path
        self.channels_last = False
        with torch.no_grad():
            n_flat = self._features(torch.zeros(2, *in_shape))[0].flatten(1).shape[1]
        self.head = nn.Linear(n_flat, num_classes)

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> (last feature maps ``(B, C_L, H_L, W_L)``, theta ``(B, 3, 3)``)."""
        b = x.shape[0]
        if self.transformer is None:
            return self._run(x, 0, len(self.blocks)), torch.eye(3, device=x.device).expand(b, 3, 3)
        early = self._run(x, 0, self.depth)  # (B, C_X, H_X, W_X); the input itself when depth == 0
        if self.placement == "feature":  # STN-CX: warp the feature maps, continue from depth X
            warped, theta = self.transformer(early)
            warped = self._memory_format(warped)
            return self._run(warped, self.depth, len(self.blocks)), theta
        # STN-SLX: localise from the shared early features, warp the input, run all blocks
        warped, theta = self.transformer(x, loc_input=early)
        warped = self._memory_format(warped)
        return self._run(warped, 0, len(self.blocks)), theta

    def forward_with_theta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> (logits ``(B, K)``, theta ``(B, 3, 3)``)."""
        features, theta = self._features(x)
        return self.head(features.flatten(1)), theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, K)``."""
        return self.forward_with_theta(x)[0]


def _feature_shape(blocks: nn.ModuleList, in_shape: tuple[int, int, int], depth: int) -> tuple[int, int, int]:
    """``(C_X, H_X, W_X)`` after the first ``depth`` blocks for an input of ``in_shape``."""
    with torch.no_grad():
        x = torch.zeros(1, *in_shape)
        for block in blocks[:depth]:
            x = block(x)
    return tuple(x.shape[1:])  # type: ignore[return-value]


def build_cnn(
    in_shape: tuple[int, int, int], num_classes: int = 10, blocks: Sequence[ConvBlockSpec] = MNIST_BLOCKS
) -> STNClassifier:
    """Plain CNN: ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
    return STNClassifier(_conv_blocks(in_shape[0], blocks), num_classes, in_shape)


def _build_stn(
    in_shape: tuple[int, int, int],
    depth: int,
    placement: Placement,
    num_classes: int,
    blocks: Sequence[ConvBlockSpec],
    transform: Transform,
    out_scale: float,
    padding_mode: str,
    loc_hidden: int,
) -> STNClassifier:
    conv = _conv_blocks(in_shape[0], blocks)
    c, h, w = _feature_shape(conv, in_shape, depth)
    loc = localisation_features(c, (h, w), loc_hidden)
    st = SpatialTransformer(loc, loc_hidden, transform, out_scale, padding_mode)
    return STNClassifier(conv, num_classes, in_shape, st, depth, placement)


def build_stn_cx(
    in_shape: tuple[int, int, int],
    depth: int,
    num_classes: int = 10,
    blocks: Sequence[ConvBlockSpec] = MNIST_BLOCKS,
    transform: Transform = "affine",
    out_scale: float = 1.0,
    padding_mode: str = "border",
    loc_hidden: int = 20,
) -> STNClassifier:
    """STN-CX: the transformer warps the ``(B, C_X, H_X, W_X)`` feature maps after block ``depth``.

    Args:
        in_shape: ``(C, H, W)`` of one input.
        depth: ``X`` (0 = warp the input image: STN-C0).
        num_classes: ``K``.
        blocks: classifier conv blocks.
        transform: ``"affine"`` or ``"projective"``.
        out_scale: transformer output side / input side (0.5 for translated MNIST).
        padding_mode: sampler padding.
        loc_hidden: localisation width.

    Returns:
        model mapping ``(B, C, H, W)`` -> logits ``(B, K)``.
    """
    return _build_stn(in_shape, depth, "feature", num_classes, blocks, transform, out_scale, padding_mode, loc_hidden)


def build_stn_c0(
    in_shape: tuple[int, int, int],
    num_classes: int = 10,
    blocks: Sequence[ConvBlockSpec] = MNIST_BLOCKS,
    transform: Transform = "affine",
    out_scale: float = 1.0,
    padding_mode: str = "border",
    loc_hidden: int = 20,
) -> STNClassifier:
    """STN-C0: the transformer warps the input ``(B, C, H, W)``; see :func:`build_stn_cx`."""
    return build_stn_cx(in_shape, 0, num_classes, blocks, transform, out_scale, padding_mode, loc_hidden)


def build_stn_slx(
    in_shape: tuple[int, int, int],
    depth: int,
    num_classes: int = 10,
    blocks: Sequence[ConvBlockSpec] = MNIST_BLOCKS,
    transform: Transform = "affine",
    out_scale: float = 1.0,
    padding_mode: str = "border",
    loc_hidden: int = 20,
) -> STNClassifier:
    """STN-SLX: warp the input ``(B, C, H, W)``; localise from the classifier's first ``depth`` blocks.

    The localisation net sees ``(B, C_X, H_X, W_X)`` feature maps computed by the *same*
    (shared-weight) blocks the classifier later applies to the warped image. ``depth=0`` is
    STN-C0. Arguments as in :func:`build_stn_cx`; returns a ``(B, C, H, W)`` -> ``(B, K)`` model.
    """
    return _build_stn(in_shape, depth, "shared", num_classes, blocks, transform, out_scale, padding_mode, loc_hidden)


def identity_theta(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(B, 3, 3)`` identity transforms."""
    return torch.eye(3, device=device).expand(batch, 3, 3).clone()

