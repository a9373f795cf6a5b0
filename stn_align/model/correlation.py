"""Correlation of input and reference features.

* :func:`global_correlation` -- every input cell against every reference cell, laid out for a CNN head
  (Rocco et al. 2017): large motions in one step, coarse.
* :class:`CorrelationPyramid` -- RAFT's all-pairs volume, computed once per pair and average-pooled into a
  pyramid; :meth:`CorrelationPyramid.lookup` samples a ``(2r+1)^2`` window around where the current
  estimate sends each input cell (IHN, CVPR 2022). Precise, local.

Coordinates: the lookup takes reference positions in the feature map's normalised extent coordinates
(``align_corners=False``: ``-1``/``+1`` are the map's outer edges), which average pooling preserves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import sample


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


class CorrelationPyramid:
    """All-pairs correlation volume of two ``(B, C, h, w)`` feature maps and its average-pooled levels.

    Level ``l`` is ``(B*h*w, 1, h/2^l, w/2^l)``: for every input cell, its correlation with every
    reference cell, pooled ``2^l`` times. Built once per pair; looked up once per iteration.
    """

    def __init__(self, features_in: torch.Tensor, features_ref: torch.Tensor, levels: int = 2, radius: int = 4):
        b, c, h, w = features_in.shape
        corr = torch.einsum("bci,bcj->bij", features_in.flatten(2), features_ref.flatten(2))
        volume = corr.reshape(b * h * w, 1, h, w)
        self.levels = [volume]
        for _ in range(levels - 1):
            volume = F.avg_pool2d(volume, 2)
            self.levels.append(volume)
        self.radius, self.shape = radius, (b, h, w)
        k = torch.arange(-radius, radius + 1, device=features_in.device, dtype=features_in.dtype)
        dy, dx = torch.meshgrid(k, k, indexing="ij")
        self.window = torch.stack([dx, dy], dim=-1)  # (2r+1, 2r+1, 2) in level cells, x first

    @property
    def channels(self) -> int:
        """Channels of :meth:`lookup`'s output: ``levels * (2r+1)^2``."""
        return len(self.levels) * (2 * self.radius + 1) ** 2

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """Correlation windows around ``positions``.

        Args:
            positions: ``(B, h, w, 2)`` where each input cell lands in the reference, normalised extent
                coordinates of the feature map (``align_corners=False``).

        Returns:
            ``(B, levels*(2r+1)^2, h, w)``: level-major, then window row (dy), then column (dx).
        """
        b, h, w = self.shape
        side = 2 * self.radius + 1
        centres = positions.reshape(b * h * w, 1, 1, 2)
        out = []
        for level, volume in enumerate(self.levels):
            lh, lw = volume.shape[-2:]
            step = torch.tensor([2.0 / lw, 2.0 / lh], device=positions.device, dtype=positions.dtype)
            grid = centres + self.window * step  # (B*h*w, 2r+1, 2r+1, 2)
            window = sample(volume, grid, padding_mode="zeros", align_corners=False)
            out.append(window.view(b, h, w, side * side))
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2)
