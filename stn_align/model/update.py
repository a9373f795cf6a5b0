"""The localisation heads: what turns correlation into a transform.

* :class:`RegressionHead` -- the coarse stage: the global correlation ``(B, (S/8)^2, S/8, S/8)`` -> corner
  displacements ``(B, P)`` (DeTone et al. 2016).
* :class:`UpdateBlock` -- the fine stage, applied ``K`` times with shared weights: local correlation windows
  and the current motion field -> a residual displacement of the 4 corners ``(B, 4, 2)``, one per image
  quadrant (IHN's 2x2 output).

Both output layers start at zero: at initialisation every stage predicts the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .encoder import conv_bn_relu


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


def conv_gn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class UpdateBlock(nn.Module):
    """``(B, L, h, w)`` correlation windows + ``(B, 2, h, w)`` motion -> residual corner displacements ``(B, 4, 2)``.

    A 1x1 mixing convolution, then stride-2 convolutions down to a 2x2 map whose cells are the
    corners' quadrants (adaptive pooling makes it work at any working size). Corners are in the
    order TL, TR, BR, BL, displacements in normalised working coordinates.
    """

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        self.mix = conv_gn_relu(in_channels + 2, width, kernel=1)
        self.down = nn.Sequential(conv_gn_relu(width, width, 2), conv_gn_relu(width, width, 2), conv_gn_relu(width, width, 2))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.out = nn.Conv2d(width, 2, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, windows: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        quadrants = self.out(self.pool(self.down(self.mix(torch.cat([windows, motion], dim=1)))))  # (B, 2, 2, 2)
        tl, tr, bl, br = quadrants.flatten(2).unbind(-1)  # raster order of the 2x2 map
        return torch.stack([tl, tr, br, bl], dim=1)
