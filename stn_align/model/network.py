"""The siamese spatial-transformer aligner: :class:`ModelConfig` and :class:`AlignerNet`.

Shapes: images are ``(B, 3, S, S)`` floats in ``[0, 1]`` at the working size ``S``; every estimate is a
normalised homography ``(B, 3, 3)`` mapping input to reference (:mod:`stn_align.geometry`).

The network is a spatial transformer in its three classic parts:

* **localisation net** -- the shared encoder, correlation and heads (:mod:`.encoder`, :mod:`.correlation`,
  :mod:`.update`) predict the transform;
* **grid generator** and **sampler** -- :func:`geometry.homography_grid` and :func:`geometry.sample`
  (the same code path as :class:`stn_align.stn.SpatialTransformer`) warp the *input image* by the
  current estimate, and also sample the correlation windows.

Two architectures (``ModelConfig.architecture``):

* ``global`` (0.1): ``iterations`` rounds of warp the input, re-encode, global correlation at 1/8,
  regress a residual, compose.
* ``iterative`` (0.2, IHN / RAFT style): ``coarse_rounds`` global rounds give a coarse estimate; the input warped by it
  is encoded at 1/4, an all-pairs correlation pyramid is built once, and ``iterations`` updates with
  shared weights look up ``(2r+1)^2`` windows around where the current residual sends each cell and
  add a residual to the four corner displacements. Affine models keep the corners a parallelogram.

Following Finnveden et al. (ICPR 2020), transforms act on the *image*, never on feature maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import NUM_PARAMS, TRANSFORMS, base_grid, corner_offsets_to_homography, transform_grid, warp_normalized
from .correlation import CorrelationPyramid, global_correlation
from .encoder import Encoder
from .update import RegressionHead, UpdateBlock

ARCHITECTURES = ("iterative", "global")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; stored in every checkpoint, so a checkpoint rebuilds its own network."""

    transform: str = "projective"
    size: int = 128  # working resolution (pixels, square)
    widths: tuple[int, int, int] = (24, 48, 96)
    head_width: int = 128
    architecture: str = "iterative"
    iterations: int = 6  # default inference rounds: global rounds (global) or updates (iterative)
    radius: int = 4  # iterative: lookup window radius, in cells of each pyramid level
    levels: int = 2  # iterative: correlation pyramid levels
    update_width: int = 64  # iterative: width of the update block
    coarse_rounds: int = 2  # iterative: global rounds (warp, re-encode, regress) before the updates

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; expected one of {TRANSFORMS}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.size % 32:
            raise ValueError(f"working size must be a multiple of 32, got {self.size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["widths"] = tuple(data["widths"])
        if "architecture" not in data:  # 0.1 checkpoints
            data.update(architecture="global", iterations=3)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def parallelogram(corners: torch.Tensor) -> torch.Tensor:
    """Closest corner displacements ``(B, 4, 2)`` (TL, TR, BR, BL) that keep a parallelogram.

    Orthogonal projection onto ``TL - TR + BR - BL = 0``: an affine map moves the corners that way.
    """
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], device=corners.device, dtype=corners.dtype).view(1, 4, 1)
    excess = (corners * sign).sum(dim=1, keepdim=True)
    return corners - excess * sign / 4


def corners_to_homography(corners: torch.Tensor, transform: str) -> torch.Tensor:
    """Normalised ``(B, 3, 3)`` from corner displacements ``(B, 4, 2)`` (affine: projected to a parallelogram)."""
    if transform == "affine":
        return corner_offsets_to_homography(parallelogram(corners)[:, :3].flatten(1), "affine")
    return corner_offsets_to_homography(corners.flatten(1), "projective")


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, C, size, size)``, anti-aliased, pixel-centre convention (as ``cv2.resize``)."""
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def rescale_homography(homography: torch.Tensor, size_from: int, size_to: int) -> torch.Tensor:
    """The same transform ``(B, 3, 3)`` in the normalised coordinates of another working size.

    Both frames are the same image resized (pixel-centre convention), so their normalised coordinates
    differ by a scaling about the centre: ``u_to = k * u_from`` with ``k = to (from - 1) / (from (to - 1))``.
    """
    if size_from == size_to:
        return homography
    k = size_to * (size_from - 1) / (size_from * (size_to - 1))
    scale = torch.tensor([k, k, 1.0], device=homography.device, dtype=homography.dtype)
    return scale.view(1, 3, 1) * homography / scale.view(1, 1, 3)


class AlignerNet(nn.Module):
    """Siamese STN: predicts normalised homographies ``(B, 3, 3)`` mapping input to reference."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        iterative = config.architecture == "iterative"
        self.encoder = Encoder(config.widths, fine=iterative)
        self.head = RegressionHead(config.size, NUM_PARAMS[config.transform], config.head_width)
        if iterative:
            window_channels = config.levels * (2 * config.radius + 1) ** 2
            self.update = UpdateBlock(window_channels, config.update_width)

    def forward(
        self,
        image_in: torch.Tensor,
        image_ref: torch.Tensor,
        iterations: int | None = None,
        initial: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Estimate the transform.

        Args:
            image_in, image_ref: ``(B, 3, S, S)`` in ``[0, 1]``; ``S`` is ``config.size``, or for iterative
                models any multiple of 32 (the global stage then sees them resized to ``config.size``).
            iterations: rounds (``global``) or updates (``iterative``); default ``config.iterations``.
            initial: optional starting estimate ``(B, 3, 3)`` (normalised), identity if None.

        Returns:
            One normalised homography ``(B, 3, 3)`` per round (``iterative``: the coarse estimate, then one
            per update), the last being the estimate. Estimates are detached between rounds.
        """
        iterations = self.config.iterations if iterations is None else iterations
        if iterations < 1:
            raise ValueError("iterations must be at least 1")
        size, batch = image_in.shape[-1], image_in.shape[0]
        if size != self.config.size and self.config.architecture == "global":
            raise ValueError(f"a global model works at {self.config.size} px only, got {size} px images")
        # The global stage works at config.size; the iterative stage at any multiple of 32 (see rescale_homography).
        coarse_in, coarse_ref_image = (image_in, image_ref) if size == self.config.size else (
            resize_square(image_in, self.config.size), resize_square(image_ref, self.config.size))
        estimate = torch.eye(3, device=image_in.device).expand(batch, 3, 3) if initial is None else \
            rescale_homography(initial, size, self.config.size)
        quarter_ref = self.encoder.quarter(image_ref)
        coarse_ref = self.encoder.coarse(quarter_ref if size == self.config.size else self.encoder.quarter(coarse_ref_image))
        rounds = iterations if self.config.architecture == "global" else self.config.coarse_rounds
        estimates = []
        for step in range(rounds):
            warped = coarse_in if (step == 0 and initial is None) else warp_normalized(coarse_in, estimate.detach())
            offsets = self.head(global_correlation(self.encoder(warped), coarse_ref))
            estimate = corner_offsets_to_homography(offsets, self.config.transform) @ estimate.detach()
            estimates.append(rescale_homography(estimate, self.config.size, size))
        if self.config.architecture == "iterative":  # coarse_rounds=0: the updates alone, from `initial` or identity
            coarse = rescale_homography(estimate.detach(), self.config.size, size)
            estimates += self.refine(image_in, self.encoder.fine(quarter_ref), coarse, iterations)
        return estimates

    def refine(self, image_in: torch.Tensor, fine_ref: torch.Tensor, coarse: torch.Tensor, iterations: int) -> list[torch.Tensor]:
        """The iterative stage: ``iterations`` residual updates on top of ``coarse`` ``(B, 3, 3)``.

        The input is warped once by ``coarse`` (grid generator + sampler on the image); the residual
        ``R`` maps the warped input to the reference, so each estimate is ``R @ coarse``.
        """
        size = image_in.shape[-1]
        fine_in = self.encoder.fine(self.encoder.quarter(warp_normalized(image_in, coarse)))
        pyramid = CorrelationPyramid(fine_in, fine_ref, self.config.levels, self.config.radius)
        batch, _, h, w = fine_in.shape
        cells = base_grid(batch, (h, w), align_corners=False, device=fine_in.device)  # cell centres, extent coords
        to_image = size / (size - 1)  # extent coords of the map -> the image's align_corners=True coords
        corners = torch.zeros(batch, 4, 2, device=fine_in.device)
        estimates = []
        for _ in range(iterations):
            corners = corners.detach()
            residual = corners_to_homography(corners, self.config.transform)
            landing = transform_grid(residual, cells * to_image) / to_image  # (B, h, w, 2)
            motion = (landing - cells).permute(0, 3, 1, 2) * (w / 2)  # in cells
            corners = corners + self.update(pyramid.lookup(landing), motion)
            estimates.append(corners_to_homography(corners, self.config.transform) @ coarse)
        return estimates


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
