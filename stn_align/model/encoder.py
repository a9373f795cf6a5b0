"""The shared (siamese) encoder: one set of weights reads the input and the reference.

``(B, 3, S, S)`` in ``[0, 1]`` -> features at 1/4 (``(B, C2, S/4, S/4)``, the fine stage's correlation) and
1/8 (``(B, C3, S/8, S/8)``, the coarse stage's global correlation), both unit-norm along the channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def standardize(image: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel zero mean and unit variance: ``(B, C, H, W)`` -> same. Lighting-invariant input."""
    mean = image.mean(dim=(2, 3), keepdim=True)
    std = image.std(dim=(2, 3), keepdim=True)
    return (image - mean) / (std + 0.02)


class Encoder(nn.Module):
    """Three stages of two 3x3 convolutions (stride 2 each stage): widths ``(C1, C2, C3)``.

    ``layers[:4]`` end at 1/4 resolution, ``layers[4:]`` at 1/8. ``project`` (1/8) and ``project_fine``
    (1/4, only built when ``fine=True``) are the 1x1 projections into the correlation spaces.
    """

    def __init__(self, widths: tuple[int, int, int], fine: bool = False):
        super().__init__()
        layers, cin = [], 3
        for width in widths:
            layers += [conv_bn_relu(cin, width, stride=2), conv_bn_relu(width, width)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.project = nn.Conv2d(cin, cin, 1)
        self.project_fine = nn.Conv2d(widths[1], widths[1], 1) if fine else None

    def quarter(self, image: torch.Tensor) -> torch.Tensor:
        """Un-projected features at 1/4: ``(B, 3, S, S)`` -> ``(B, C2, S/4, S/4)``."""
        return self.layers[:4](standardize(image))

    def coarse(self, quarter: torch.Tensor) -> torch.Tensor:
        """Unit-norm 1/8 features ``(B, C3, S/8, S/8)`` from :meth:`quarter`'s output."""
        return F.normalize(self.project(self.layers[4:](quarter)), dim=1)

    def fine(self, quarter: torch.Tensor) -> torch.Tensor:
        """Unit-norm 1/4 features ``(B, C2, S/4, S/4)`` from :meth:`quarter`'s output."""
        return F.normalize(self.project_fine(quarter), dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Unit-norm 1/8 features ``(B, C3, S/8, S/8)`` (the coarse stage's input)."""
        return self.coarse(self.quarter(image))
