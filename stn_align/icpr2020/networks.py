"""The four classifier layouts of the ICPR 2020 study (CNN, STN-C0, STN-CX, STN-SLX) and the networks of each experiment.

The spatial transformer layer itself is :class:`stn_align.stn.SpatialTransformer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..stn import Placement, Transform, SpatialTransformer, localisation_features
from .data import CANVAS


def network_names(experiment: str) -> tuple[str, ...]:
    """Networks of the experiment's table."""
    if experiment == "svhn":
        return ("STN-C0", "STN-C3", "STN-C6", "STN-C8", "STN-SL3", "STN-SL6", "STN-SL8")
    return ("CNN", "STN-C0", "STN-C1", "STN-SL1")


def build_network(name: str, experiment: str) -> STNClassifier:
    """Build ``CNN``, ``STN-C<X>`` or ``STN-SL<X>`` for the experiment's input size."""
    if experiment == "svhn":
        shape, blocks, scale, pad = (3, 32, 32), SVHN_BLOCKS, 1.0, "zeros"
    elif experiment == "mnist-trans":
        shape, blocks, scale, pad = (1, CANVAS, CANVAS), MNIST_BLOCKS, 0.5, "border"
    else:
        shape, blocks, scale, pad = (1, 28, 28), MNIST_BLOCKS, 1.0, "border"
    if name == "CNN":
        return build_cnn(shape, 10, blocks)
    if name == "STN-C0":
        return build_stn_c0(shape, 10, blocks, out_scale=scale, padding_mode=pad)
    if name.startswith("STN-SL"):
        return build_stn_slx(shape, int(name[6:]), 10, blocks, out_scale=scale, padding_mode=pad)
    if name.startswith("STN-C"):
        return build_stn_cx(shape, int(name[5:]), 10, blocks, out_scale=scale, padding_mode=pad)
    raise ValueError(f"unknown network {name!r}")


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
