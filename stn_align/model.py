"""The siamese spatial-transformer aligner: encoder, correlation, regression head, iterations.

Shapes: images are ``(B, 3, S, S)`` floats in ``[0, 1]`` at the working size ``S``; features
``(B, C, S/8, S/8)``; the global correlation ``(B, (S/8)**2, S/8, S/8)``; the head predicts corner
displacements ``(B, 6)`` (affine) or ``(B, 8)`` (projective) in normalised coordinates.

Following Finnveden et al. (ICPR 2020), the transform is applied to the *image*, never to feature
maps: each iteration warps the input by the current estimate, re-encodes it, and predicts a
residual transform that is composed onto the estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import NUM_PARAMS, TRANSFORMS, corner_offsets_to_homography, warp_normalized


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; stored in every checkpoint, so a checkpoint rebuilds its own network."""

    transform: str = "projective"
    size: int = 128  # working resolution (pixels, square)
    widths: tuple[int, int, int] = (24, 48, 96)
    head_width: int = 128

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; expected one of {TRANSFORMS}")
        if self.size % 32:
            raise ValueError(f"working size must be a multiple of 32, got {self.size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["widths"] = tuple(data["widths"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Shared (siamese) feature extractor: ``(B, 3, S, S)`` -> unit-norm features ``(B, C, S/8, S/8)``."""

    def __init__(self, widths: tuple[int, int, int]):
        super().__init__()
        layers, cin = [], 3
        for width in widths:
            layers += [conv_bn_relu(cin, width, stride=2), conv_bn_relu(width, width)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.project = nn.Conv2d(cin, cin, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.layers(standardize(image))), dim=1)


def standardize(image: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel zero mean and unit variance: ``(B, C, H, W)`` -> same. Lighting-invariant input."""
    mean = image.mean(dim=(2, 3), keepdim=True)
    std = image.std(dim=(2, 3), keepdim=True)
    return (image - mean) / (std + 0.02)


def global_correlation(features_in: torch.Tensor, features_ref: torch.Tensor) -> torch.Tensor:
    """All-pairs feature correlation (Rocco et al. 2017).

    Args:
        features_in, features_ref: ``(B, C, h, w)``, unit-norm along ``C``.

    Returns:
        ``(B, h*w, h, w)``: channel ``i`` is input position ``i``; the spatial grid is the reference.
        Rectified and normalised over the channel axis, so each reference position holds a match
        distribution over input positions.
    """
    b, c, h, w = features_in.shape
    corr = torch.einsum("bci,bcj->bij", features_in.flatten(2), features_ref.flatten(2))
    corr = F.relu(corr).view(b, h * w, h, w)
    return F.normalize(corr, dim=1)


class RegressionHead(nn.Module):
    """Correlation ``(B, (S/8)**2, S/8, S/8)`` -> corner displacements ``(B, P)``; zero at init (identity)."""

    def __init__(self, size: int, num_params: int, width: int):
        super().__init__()
        cells = (size // 8) ** 2
        self.convs = nn.Sequential(
            conv_bn_relu(cells, width, stride=2),
            conv_bn_relu(width, width),
            conv_bn_relu(width, width // 2, stride=2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear((width // 2) * (size // 32) ** 2, 256), nn.ReLU(inplace=True))
        self.out = nn.Linear(256, num_params)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, correlation: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(self.convs(correlation)))


class AlignerNet(nn.Module):
    """Siamese STN: predicts normalised homographies ``(B, 3, 3)`` mapping input to reference."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.widths)
        self.head = RegressionHead(config.size, NUM_PARAMS[config.transform], config.head_width)

    def forward(
        self,
        image_in: torch.Tensor,
        image_ref: torch.Tensor,
        iterations: int = 1,
        initial: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Estimate the transform by ``iterations`` rounds of warp, re-encode and compose.

        Args:
            image_in, image_ref: ``(B, 3, S, S)`` in ``[0, 1]``.
            iterations: refinement rounds (>= 1).
            initial: optional starting estimate ``(B, 3, 3)`` (normalised), identity if None.

        Returns:
            One normalised homography ``(B, 3, 3)`` per iteration, the last being the estimate.
            Between iterations the estimate is detached (the warp is a fixed pre-alignment).
        """
        batch = image_in.shape[0]
        estimate = initial if initial is not None else torch.eye(3, device=image_in.device).expand(batch, 3, 3)
        features_ref = self.encoder(image_ref)
        estimates = []
        for step in range(iterations):
            warped = image_in if (step == 0 and initial is None) else warp_normalized(image_in, estimate.detach())
            offsets = self.head(global_correlation(self.encoder(warped), features_ref))
            residual = corner_offsets_to_homography(offsets, self.config.transform)
            estimate = residual @ estimate.detach()
            estimates.append(estimate)
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
