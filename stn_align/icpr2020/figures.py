"""ICPR 2020 figures (matplotlib, the ``plots`` extra): Figure 2, Figure 3 and the training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..stn import warp_with_theta
from .data import MNIST_NORM, rotate_images
from .networks import STNClassifier
from .train import RunResult, _to_input, rotation_tracking_r


FIGURE2_DIGIT = 0  # test image shown in Figure 2 (a 7)


FIGURE2_ANGLES = (-90.0, -60.0, -30.0, 0.0, 30.0, 60.0, 90.0)


def require_matplotlib():
    """Import ``matplotlib.pyplot`` (Agg backend) or raise a one-line ``ValueError``."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "the ICPR 2020 figures need matplotlib, which is not installed: pip install 'stn-align[plots]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (temp file + rename) and close it."""
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def draw_figure3(path: Path, angles: list[float], predicted: dict[str, np.ndarray]) -> None:
    """The paper's Figure 3: predicted vs applied rotation, one panel per network.

    Each panel is a 2-D histogram over (applied angle, predicted angle) of every test digit, so
    the per-digit spread is visible, plus the mean per applied angle and the line ``y = x`` that
    a transformer exactly undoing the rotation would follow.

    Args:
        path: PNG to write.
        angles: applied angles ``(A,)`` in degrees.
        predicted: network name -> ``(A, N)`` predicted angles (:func:`predicted_rotation_angles`).
    """
    plt = require_matplotlib()
    angles_arr = np.asarray(angles, dtype=np.float64)
    step = float(np.min(np.diff(angles_arr))) if len(angles_arr) > 1 else 10.0
    x_edges = np.concatenate([angles_arr - step / 2, angles_arr[-1:] + step / 2])
    y_edges = np.arange(-180.0, 180.1, 5.0)
    fig, axes = plt.subplots(1, len(predicted), figsize=(4.2 * len(predicted), 4.0), squeeze=False, sharey=True)
    for ax, (name, pred) in zip(axes[0], predicted.items()):
        applied = np.repeat(angles_arr[:, None], pred.shape[1], axis=1)
        counts, _, _ = np.histogram2d(applied.ravel(), np.clip(pred.ravel(), -180, 180), [x_edges, y_edges])
        frac = counts / counts.sum(axis=1, keepdims=True)
        mesh = ax.pcolormesh(x_edges, y_edges, frac.T, cmap="Blues", vmin=0, vmax=max(frac.max(), 1e-9))
        ax.plot(angles_arr, pred.mean(axis=1), "o-", color="tab:orange", ms=3, lw=1.5, label="mean")
        ax.plot([-90, 90], [-90, 90], "--", color="0.3", lw=1, label="exact un-rotation")
        ax.set_title(f"{name}  (r = {rotation_tracking_r(pred, angles):.2f})")
        ax.set_xlabel("applied rotation (deg)")
        ax.set_xlim(x_edges[0], x_edges[-1])
        ax.set_ylim(-180, 180)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("predicted rotation (deg)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.colorbar(mesh, ax=axes[0].tolist(), shrink=0.8, label="fraction of digits per applied angle")
    fig.suptitle(f"Predicted vs applied rotation, {pred.shape[1]} rotated MNIST test digits per angle", y=1.02)
    _save_figure(fig, path)


def draw_training_curves(path: Path, runs: list[RunResult]) -> None:
    """Per-epoch train loss, test error and (STNs) rotation-tracking r of every run.

    Args:
        path: PNG to write.
        runs: finished or partial runs with ``epochs_log`` entries.
    """
    plt = require_matplotlib()
    tracked = any(run.epochs_log and all("rotation_r" in e for e in run.epochs_log) for run in runs)
    fig, axes = plt.subplots(1, 3 if tracked else 2, figsize=(14 if tracked else 9.5, 3.8))  # no r panel: translation
    colours = {}
    for run in runs:
        if not run.epochs_log:
            continue
        colour = colours.setdefault(run.network, f"C{len(colours)}")
        label = f"{run.network} s{run.seed}"
        steps = [e["step"] if "step" in e else e["epoch"] for e in run.epochs_log]
        axes[0].plot(steps, [e["train_loss"] for e in run.epochs_log], "-o", ms=2, color=colour, label=label)
        if all("test_error_pct" in e for e in run.epochs_log):
            axes[1].plot(steps, [e["test_error_pct"] for e in run.epochs_log], "-o", ms=2, color=colour, label=label)
        if tracked and all("rotation_r" in e for e in run.epochs_log):
            axes[2].plot(steps, [e["rotation_r"] for e in run.epochs_log], "-o", ms=2, color=colour, label=label)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("train loss", "test error (%)", "rotation tracking: Pearson r")):
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(bottom=0)
    if tracked:
        axes[2].axhline(0.9, color="0.4", ls="--", lw=1)
        axes[2].set_ylim(-1, 1)
    axes[0].legend(fontsize=7)
    _save_figure(fig, path)


@torch.no_grad()
def draw_figure2(path: Path, models: dict[str, STNClassifier], digits: torch.Tensor, angles: tuple[float, ...], device, cfg) -> None:
    """The paper's Figure 2: rotated test digits (top row) and what each transformer makes of them.

    For an input-warping STN (C0, SLX) the row is its transformer's output image. STN-C1 warps
    64 feature maps, not the image; its row shows the *input image* warped with the same
    (normalised) ``theta``, i.e. the spatial part of what it does to its feature maps.

    Args:
        path: PNG to write.
        models: row name -> trained mnist-rot STN.
        digits: uint8 ``(1, 1, 28, 28)`` one unrotated test digit (or ``(K, ...)``: one per column).
        angles: applied rotation per column.
    """
    plt = require_matplotlib()
    mean, std = MNIST_NORM["mnist-rot"]
    x0 = digits.float() / 255.0
    if x0.shape[0] == 1:
        x0 = x0.expand(len(angles), -1, -1, -1)
    rotated = rotate_images(x0, torch.tensor(angles, dtype=torch.float32))
    rows = {"input (rotated)": rotated}
    for name, model in models.items():
        model.eval()
        _, theta = model.forward_with_theta(_to_input((rotated - mean) / std, device, cfg.channels_last))
        rows[f"{name}" + (" (its theta on the image)" if model.placement == "feature" else " output")] = warp_with_theta(
            rotated, theta.float().cpu(), padding_mode="zeros"
        )
    fig, axes = plt.subplots(len(rows), len(angles), figsize=(1.05 * len(angles), 1.25 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows.items()):
        for c in range(len(angles)):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{angles[c]:+.0f}°", fontsize=8)
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    _save_figure(fig, path)
