"""Reproduce the ICPR 2020 "where should a spatial transformer sit?" experiment.

Finnveden, Jansson & Lindeberg, "Understanding when spatial transformer networks do not
support invariance, and what to do about it", ICPR 2020 (arXiv:2004.11678); authors' code:
github.com/luuf/stn-placement. Networks are built by :mod:`stn_align.stn`.

Protocol (choices follow the paper's text and, where the text is silent, the authors' code;
every choice is also written into ``results.md`` / ``results.json``):

``mnist-rot``
    MNIST digits (28x28, values in [0, 1]) rotated about the centre by an angle drawn
    uniformly from [-90, 90] degrees (bilinear, black fill), a fresh angle every time an image
    is drawn for training; the test set is rotated once with a fixed generator (seed 12345) so
    every network is scored on the same images. Normalised with MNIST's (0.1307, 0.3081).
``mnist-trans``
    Each digit pasted into a black 60x60 canvas at a uniformly random integer offset of up to
    +-16 px from the centre, plus the authors' clutter: six random 6x6 crops of random MNIST
    training digits added at random places (clamped to 1). Normalised with (0.0363, 0.1870).
    As in the authors' code the transformers output a 30x30 image (``out_scale=0.5``); the
    plain CNN sees the full 60x60 canvas.
``svhn``
    The 32x32 cropped-digit SVHN files (``train_32x32.mat``/``test_32x32.mat``, user-supplied,
    read with scipy), per-channel scaled to [-1, 1]. The paper used a different SVHN set-up
    (multi-digit crops) and a deeper network, so its Table 2 is a reference, not a target.

Networks: the MNIST CNN is Jaderberg et al.'s conv9x9(64)-pool-ReLU-conv7x7(64)-pool-ReLU-FC10,
as in the authors' code; STN-C1 / STN-SL1 use depth 1 (after the first conv block). Every
localisation net is ``localisation_features`` (two 5x5 convs with 20 filters + FC20) followed
by the identity-initialised affine regression; sampler padding ``border`` for MNIST, ``zeros``
for SVHN (as in the authors' code). Training: Adam, cosine-annealed to 0 per step, localisation
nets at ``loc_lr_scale`` (default 1) x lr, cross-entropy; lr / batch per experiment in
:data:`DEFAULT_OPTIMISER` (rotation 3e-3 / 64, translation 1e-3 / 16), picked in short pilots
for small CPU budgets. The paper trained far longer with SGD - see ``docs/icpr2020/README.md``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from .stn import (
    MNIST_BLOCKS,
    SVHN_BLOCKS,
    STNClassifier,
    build_cnn,
    build_stn_c0,
    build_stn_cx,
    build_stn_slx,
    rotation_angle_deg,
    rotation_theta,
    warp_with_theta,
)

EXPERIMENTS = ("mnist-rot", "mnist-trans", "svhn")
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")

#: Classification error (%) reported by Finnveden et al., Tables 1 and 2.
PAPER_ERROR_PCT: dict[str, dict[str, float]] = {
    "mnist-rot": {"CNN": 1.71, "STN-C0": 1.08, "STN-C1": 1.32, "STN-SL1": 0.98},
    "mnist-trans": {"CNN": 1.72, "STN-C0": 1.08, "STN-C1": 1.15, "STN-SL1": 1.10},
    "svhn": {
        "STN-C0": 3.81, "STN-C3": 3.70, "STN-C6": 3.91, "STN-C8": 4.00,
        "STN-SL3": 3.54, "STN-SL6": 3.29, "STN-SL8": 3.27,
    },
}

#: (Adam lr, batch size) per experiment. 3e-3 beat 1e-3 in a short rotated-MNIST pilot; on the
#: cluttered 60x60 canvas 3e-3 (and batch 32) stayed at chance for 190 steps, so translation uses
#: lr 1e-3 and batch 16 (more steps from few images).
DEFAULT_OPTIMISER: dict[str, tuple[float, int]] = {
    "mnist-rot": (3e-3, 64),
    "mnist-trans": (1e-3, 16),
    "svhn": (1e-3, 64),
}

TEST_SEED = 12345  # fixed augmentation of the test set
SUBSET_SEED = 0  # fixed choice of the `limit` training images
ROT_MAX_DEG = 90.0
CANVAS = 60
MAX_SHIFT = 16
CLUTTER_PIECES, CLUTTER_SIZE = 6, 6
MNIST_NORM = {"mnist-rot": (0.1307, 0.3081), "mnist-trans": (0.0363, 0.1870)}


@dataclass
class ReproduceConfig:
    """Everything that defines a run (plain data, stored in ``results.json``)."""

    experiment: str
    epochs: int = 3
    seeds: int = 3
    limit: int | None = None  # number of training images (None = all)
    test_limit: int | None = None  # number of test images (None = all)
    batch_size: int = 64
    lr: float = 3e-3
    loc_lr_scale: float = 1.0
    networks: tuple[str, ...] = ()  # filled from the experiment when empty
    figure_angles: tuple[float, ...] = tuple(float(a) for a in range(-90, 91, 10))
    figure_images: int = 200
    threads: int = 1
    channels_last: bool = True


@dataclass
class Dataset:
    """In-memory split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class RunResult:
    network: str
    seed: int
    test_error_pct: float
    train_seconds: float
    final_train_loss: float
    epochs_log: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def default_data_dir(experiment: str) -> Path:
    """``../shared/data/<mnist|svhn>`` relative to the working directory."""
    return Path("..") / "shared" / "data" / ("svhn" if experiment == "svhn" else "mnist")


def _find_mnist_source(data_dir: Path) -> dict[str, Path]:
    """Map each MNIST file name to an existing ``name`` or ``name.gz`` under ``data_dir``."""
    found: dict[str, Path] = {}
    for folder in (data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"):
        for name in MNIST_FILES:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if name not in found and candidate.is_file():
                    found[name] = candidate
    return found


def prepare_mnist_root(data_dir: Path, cache_dir: Path) -> Path:
    """Make a torchvision MNIST root (``<root>/MNIST/raw/<4 IDX files>``) from ``data_dir``.

    ``data_dir`` may hold the four ``.gz`` files, the unpacked IDX files, or be a torchvision
    root already. Gzipped files are unpacked into ``cache_dir`` (never next to the source,
    which may be read-only). Raises ``FileNotFoundError`` with a one-line message if missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {data_dir} (pass --data DIR with the four MNIST IDX .gz files)")
    found = _find_mnist_source(data_dir)
    missing = [n for n in MNIST_FILES if n not in found]
    if missing:
        raise FileNotFoundError(f"MNIST files missing in {data_dir}: {', '.join(missing)} (.gz or unpacked)")
    if all(p.suffix != ".gz" and p.parent.name == "raw" and p.parent.parent.name == "MNIST" for p in found.values()):
        return next(iter(found.values())).parent.parent.parent  # already a torchvision root
    raw = Path(cache_dir) / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in found.items():
        dst = raw / name
        if dst.is_file() and dst.stat().st_size > 0:
            continue
        tmp = dst.with_suffix(".part")
        with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)
    return raw.parent.parent


def load_mnist(data_dir: Path, cache_dir: Path) -> tuple[Dataset, Dataset]:
    """Train / test MNIST as uint8 ``(N, 1, 28, 28)`` images and int64 ``(N,)`` labels."""
    from torchvision.datasets import MNIST

    root = prepare_mnist_root(data_dir, cache_dir)
    splits = []
    for train in (True, False):
        ds = MNIST(str(root), train=train, download=False)
        splits.append(Dataset(ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return splits[0], splits[1]


def load_svhn(data_dir: Path) -> tuple[Dataset, Dataset]:
    """Train / test SVHN (cropped digits) as uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)`` labels."""
    data_dir = Path(data_dir)
    missing = [n for n in SVHN_FILES if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SVHN must be supplied by you: {', '.join(missing)} not found in {data_dir} "
            "(download train_32x32.mat and test_32x32.mat and pass --data DIR)"
        )
    try:
        import scipy.io  # noqa: F401  (torchvision's SVHN reader needs it)
    except ImportError:
        raise ValueError("reading SVHN .mat files needs scipy, which is not installed (pip install scipy)") from None
    from torchvision.datasets import SVHN

    splits = []
    for split in ("train", "test"):
        ds = SVHN(str(data_dir), split=split, download=False)  # reads <dir>/<split>_32x32.mat
        splits.append(Dataset(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).long()))
    return splits[0], splits[1]


def rotate_images(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, C, H, W)`` images (float) about their centre by ``angles_deg`` ``(B,)``.

    Bilinear, black outside. An STN that undoes the rotation exactly predicts
    ``rotation_angle_deg(theta) == angles_deg`` (see :func:`stn_align.stn.rotation_theta`).
    """
    return warp_with_theta(images, rotation_theta(-angles_deg).to(images.device), padding_mode="zeros")


def translate_with_clutter(digits: torch.Tensor, clutter_source: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Paste ``(B, 1, 28, 28)`` digits (float, [0, 1]) into cluttered 60x60 canvases.

    Offset: uniform integer in [-16, 16] px per axis. Clutter: six 6x6 crops of random
    ``clutter_source`` images ``(N, 1, 28, 28)`` (uint8) added at random places, clamped to 1.

    Returns:
        ``(B, 1, 60, 60)`` in [0, 1].
    """
    b, s = digits.shape[0], digits.shape[-1]
    canvas = torch.zeros(b, 1, CANVAS, CANVAS)
    top_left = torch.randint(0, 2 * MAX_SHIFT + 1, (b, 2), generator=gen)  # centre +- 16
    for i, (r, c) in enumerate(top_left.tolist()):
        canvas[i, :, r : r + s, c : c + s] = digits[i]
    src = torch.randint(0, clutter_source.shape[0], (b, CLUTTER_PIECES), generator=gen)
    crop = torch.randint(0, s - CLUTTER_SIZE + 1, (b, CLUTTER_PIECES, 2), generator=gen)
    place = torch.randint(0, CANVAS - CLUTTER_SIZE + 1, (b, CLUTTER_PIECES, 2), generator=gen)
    k = CLUTTER_SIZE
    for i in range(b):
        for j in range(CLUTTER_PIECES):
            (cr, cc), (pr, pc) = crop[i, j].tolist(), place[i, j].tolist()
            piece = clutter_source[src[i, j], :, cr : cr + k, cc : cc + k].float() / 255.0
            canvas[i, :, pr : pr + k, pc : pc + k] += piece
    return canvas.clamp_(max=1.0)


def augment_batch(
    experiment: str, images: torch.Tensor, gen: torch.Generator, clutter_source: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the experiment's random transformation and normalisation.

    Args:
        experiment: one of :data:`EXPERIMENTS`.
        images: uint8 ``(B, C, H, W)``.
        gen: random generator (CPU).
        clutter_source: uint8 MNIST images for the translation clutter.

    Returns:
        float ``(B, C, H', W')`` network input.
    """
    x = images.float() / 255.0
    if experiment == "mnist-rot":
        angles = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * ROT_MAX_DEG
        x = rotate_images(x, angles)
    elif experiment == "mnist-trans":
        x = translate_with_clutter(x, clutter_source, gen)
    else:  # svhn: no synthetic transformation
        return (x - 0.5) / 0.5
    mean, std = MNIST_NORM[experiment]
    return (x - mean) / std


# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def _make_optimizer(model: STNClassifier, cfg: ReproduceConfig) -> torch.optim.Optimizer:
    """Adam; the localisation net + regression layer train at ``loc_lr_scale * lr``."""
    loc = list(model.transformer.parameters()) if model.transformer is not None else []
    loc_ids = {id(p) for p in loc}
    rest = [p for p in model.parameters() if id(p) not in loc_ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if loc:
        groups.append({"params": loc, "lr": cfg.lr * cfg.loc_lr_scale})
    return torch.optim.Adam(groups)


def _to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def test_error_pct(model: STNClassifier, inputs: torch.Tensor, labels: torch.Tensor, device, cfg) -> float:
    """Classification error (%) on prepared ``inputs`` ``(N, C, H, W)``, ``labels`` ``(N,)``."""
    model.eval()
    wrong = 0
    for i in range(0, inputs.shape[0], 500):
        logits = model(_to_input(inputs[i : i + 500], device, cfg.channels_last))
        wrong += (logits.argmax(1).cpu() != labels[i : i + 500]).sum().item()
    return 100.0 * wrong / inputs.shape[0]


def train_network(
    name: str,
    seed: int,
    cfg: ReproduceConfig,
    train: Dataset,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    device: torch.device,
    console: Console,
) -> tuple[RunResult, STNClassifier]:
    """Train one network from scratch with ``seed`` and score it on the prepared test set."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)  # data order + augmentation
    model = build_network(name, cfg.experiment).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    optimizer = _make_optimizer(model, cfg)
    n = train.images.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, log, start = 0, [], time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum = wrong = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = augment_batch(cfg.experiment, train.images[idx], gen, train.images)
            y = train.labels[idx].to(device)
            # cosine annealing from lr to 0 over all steps
            for g, lr0 in zip(optimizer.param_groups, base_lrs):
                g["lr"] = 0.5 * lr0 * (1 + math.cos(math.pi * step / total_steps))
            logits = model(_to_input(x, device, cfg.channels_last))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            wrong += (logits.argmax(1) != y).sum().item()
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / n,
            "train_error_pct": 100.0 * wrong / n,
            "seconds": time.perf_counter() - start,
        }
        log.append(entry)
        console.log(
            f"{cfg.experiment} {name} seed {seed} epoch {epoch + 1}/{cfg.epochs}: "
            f"loss {entry['train_loss']:.4f}, train error {entry['train_error_pct']:.2f} % ({entry['seconds']:.0f} s)"
        )
    train_seconds = time.perf_counter() - start
    err = test_error_pct(model, test_inputs, test_labels, device, cfg)
    console.log(f"[bold]{cfg.experiment} {name} seed {seed}: test error {err:.2f} %[/bold]")
    return RunResult(name, seed, err, train_seconds, log[-1]["train_loss"] if log else float("nan"), log), model


@torch.no_grad()
def predicted_rotation_angles(
    model: STNClassifier, digits: torch.Tensor, angles_deg: tuple[float, ...], device, cfg: ReproduceConfig
) -> np.ndarray:
    """Rotation angle in the STN's ``theta`` for each applied rotation (Figure 3).

    Args:
        model: a trained MNIST STN.
        digits: uint8 ``(N, 1, 28, 28)`` unrotated test digits.
        angles_deg: applied rotations ``(A,)``.

    Returns:
        ``(A, N)`` predicted angles (degrees) - :func:`stn_align.stn.rotation_angle_deg` of theta.
        For STN-C1 theta acts on feature maps, for STN-SL1 on the image.
    """
    model.eval()
    x0 = digits.float() / 255.0
    mean, std = MNIST_NORM["mnist-rot"]
    out = []
    for a in angles_deg:
        x = (rotate_images(x0, torch.full((x0.shape[0],), float(a))) - mean) / std
        _, theta = model.forward_with_theta(_to_input(x, device, cfg.channels_last))
        out.append(rotation_angle_deg(theta.float().cpu()).numpy())
    return np.stack(out)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def summarise(results: list[RunResult], names: tuple[str, ...]) -> dict[str, dict]:
    """Per network: mean and sample std (ddof=1) of the test error over seeds."""
    out = {}
    for name in names:
        errs = [r.test_error_pct for r in results if r.network == name]
        if errs:
            out[name] = {
                "mean": float(np.mean(errs)),
                "std": float(np.std(errs, ddof=1)) if len(errs) > 1 else float("nan"),
                "n": len(errs),
                "per_seed": errs,
            }
    return out


def protocol_lines(cfg: ReproduceConfig, n_train: int, n_test: int, device: torch.device) -> list[str]:
    """Human-readable statement of every protocol choice of this run."""
    data = {
        "mnist-rot": "MNIST 28x28, rotated by U(-90, 90) deg (bilinear, black fill); fresh angle per training draw; "
        f"test set rotated once with seed {TEST_SEED}; normalised (0.1307, 0.3081)",
        "mnist-trans": "MNIST pasted into a 60x60 canvas at U{-16..16} px offset per axis + six 6x6 clutter crops "
        f"of random training digits (clamped to 1); fresh per training draw, test set fixed (seed {TEST_SEED}); "
        "normalised (0.0363, 0.1870); transformers output 30x30, the CNN sees 60x60",
        "svhn": "SVHN 32x32 cropped digits, scaled to [-1, 1]; no synthetic transformation",
    }[cfg.experiment]
    return [
        f"data: {data}",
        f"training images: {n_train}" + (f" (fixed random subset, seed {SUBSET_SEED})" if cfg.limit else " (all)"),
        f"test images: {n_test}",
        f"optimiser: Adam, lr {cfg.lr} cosine-annealed to 0 per step, localisation lr x{cfg.loc_lr_scale}, "
        f"batch {cfg.batch_size}, {cfg.epochs} epoch(s), seeds 0..{cfg.seeds - 1}",
        "networks: CNN conv9x9(64)-pool-ReLU-conv7x7(64)-pool-ReLU-FC10 (MNIST) / 8 conv3x3 blocks (SVHN); "
        "localisation conv5x5(20)-conv5x5(20)-FC20-affine (identity init); sampler padding "
        + ("zeros" if cfg.experiment == "svhn" else "border"),
        f"device: {device} ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}",
    ]


def write_results_markdown(path: Path, cfg: ReproduceConfig, summary: dict, protocol: list[str], wall: float) -> None:
    """Markdown table: our mean +- std test error next to the paper's figure."""
    paper = PAPER_ERROR_PCT[cfg.experiment]
    lines = [
        f"# ICPR 2020 STN placement - {cfg.experiment}",
        "",
        "Test classification error (%), mean +- sample std over seeds; paper: Finnveden et al. "
        + ("Table 2 (different SVHN set-up)." if cfg.experiment == "svhn" else "Table 1."),
        "",
        "| network | ours: error % (mean ± std) | seeds | per seed | paper error % |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        std = "n/a" if math.isnan(s["std"]) else f"{s['std']:.2f}"
        per = ", ".join(f"{e:.2f}" for e in s["per_seed"])
        ref = paper.get(name)
        ref_s = f"{ref:.2f}" if ref is not None else "-"
        if cfg.experiment == "svhn" and name == "STN-C0":
            ref_s += " (= STN-SL0)"
        lines.append(f"| {name} | {s['mean']:.2f} ± {std} | {s['n']} | {per} | {ref_s} |")
    lines += ["", "## Protocol", ""] + [f"- {line}" for line in protocol]
    lines += [f"- total wall time: {wall / 60:.1f} min", ""]
    path.write_text("\n".join(lines))


def draw_figure3(path: Path, angles: list[float], predicted: dict[str, np.ndarray]) -> None:
    """Predicted vs applied rotation angle (mean +- std over test digits), drawn with OpenCV.

    Args:
        path: PNG to write.
        angles: applied angles ``(A,)``.
        predicted: network name -> ``(A, N)`` predicted angles.
    """
    import cv2

    w, h, left, right, top, bottom = 720, 540, 80, 30, 50, 70
    img = np.full((h, w, 3), 255, np.uint8)
    x_lo, x_hi = min(angles), max(angles)
    y_lo, y_hi = -180.0, 180.0

    def px(ax: float, ay: float) -> tuple[int, int]:
        u = left + (ax - x_lo) / (x_hi - x_lo) * (w - left - right)
        v = top + (y_hi - np.clip(ay, y_lo, y_hi)) / (y_hi - y_lo) * (h - top - bottom)
        return int(round(u)), int(round(v))

    font, grey, black = cv2.FONT_HERSHEY_SIMPLEX, (200, 200, 200), (0, 0, 0)
    for yt in range(-180, 181, 45):  # horizontal grid + y ticks
        cv2.line(img, px(x_lo, yt), px(x_hi, yt), grey, 1)
        cv2.putText(img, f"{yt}", (px(x_lo, yt)[0] - 45, px(x_lo, yt)[1] + 5), font, 0.45, black, 1, cv2.LINE_AA)
    for xt in range(int(x_lo), int(x_hi) + 1, 30):  # vertical grid + x ticks
        cv2.line(img, px(xt, y_lo), px(xt, y_hi), grey, 1)
        cv2.putText(img, f"{xt}", (px(xt, y_lo)[0] - 12, px(xt, y_lo)[1] + 20), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, px(x_lo, y_hi), px(x_hi, y_lo), black, 1)
    # dashed y = x: the angle an STN that exactly undoes the rotation would predict
    for a in np.arange(x_lo, x_hi, 6.0):
        cv2.line(img, px(a, a), px(min(a + 3.0, x_hi), min(a + 3.0, x_hi)), (120, 120, 120), 1, cv2.LINE_AA)
    colours = [(200, 80, 0), (0, 100, 230), (0, 160, 0), (160, 0, 160)]  # BGR
    for k, (name, pred) in enumerate(predicted.items()):
        colour = colours[k % len(colours)]
        mean, std = pred.mean(axis=1), pred.std(axis=1)
        band = [px(a, m + s) for a, m, s in zip(angles, mean, std)] + [
            px(a, m - s) for a, m, s in reversed(list(zip(angles, mean, std)))
        ]
        overlay = img.copy()
        cv2.fillPoly(overlay, [np.array(band, np.int32)], colour)
        img = cv2.addWeighted(overlay, 0.15, img, 0.85, 0)
        pts = np.array([px(a, m) for a, m in zip(angles, mean)], np.int32)
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, tuple(int(v) for v in p), 3, colour, -1, cv2.LINE_AA)
        ly = top + 20 + 22 * k
        cv2.line(img, (left + 15, ly), (left + 45, ly), colour, 2, cv2.LINE_AA)
        cv2.putText(img, f"{name} (mean +- std)", (left + 52, ly + 5), font, 0.5, black, 1, cv2.LINE_AA)
    ly = top + 20 + 22 * len(predicted)
    cv2.line(img, (left + 15, ly), (left + 45, ly), (120, 120, 120), 1, cv2.LINE_AA)
    cv2.putText(img, "exact un-rotation", (left + 52, ly + 5), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, "Predicted vs applied rotation (MNIST-rot test digits)", (left, 30), font, 0.6, black, 1, cv2.LINE_AA)
    cv2.putText(img, "applied rotation (deg)", (w // 2 - 90, h - 18), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, "predicted (deg)", (5, top - 8), font, 0.45, black, 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def _prepare_test_inputs(experiment: str, test: Dataset, train: Dataset) -> torch.Tensor:
    """Augment the test set once, with a fixed generator, so all networks see the same images."""
    gen = torch.Generator().manual_seed(TEST_SEED)
    parts = [augment_batch(experiment, test.images[i : i + 1000], gen, train.images) for i in range(0, len(test.labels), 1000)]
    return torch.cat(parts)


def run_reproduce(
    experiment: str,
    data_dir: str | Path | None = None,
    epochs: int = 3,
    seeds: int = 3,
    device: str = "auto",
    out_dir: str | Path = "icpr2020-results",
    limit: int | None = None,
    *,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = 1,
    lr: float | None = None,
    loc_lr_scale: float = 1.0,
    batch_size: int | None = None,
    networks: tuple[str, ...] | None = None,
    console: Console | None = None,
) -> dict:
    """Train the experiment's networks over ``seeds`` seeds; write results.md/.json (+ figure3.png).

    Args:
        experiment: ``"mnist-rot"``, ``"mnist-trans"`` or ``"svhn"``.
        data_dir: MNIST dir (four IDX ``.gz`` files, unpacked files, or a torchvision root) or
            SVHN dir (``train_32x32.mat``, ``test_32x32.mat``); default ``../shared/data/<name>``.
        epochs: passes over the (possibly limited) training set.
        seeds: number of seeds (0 .. seeds-1) per network.
        device: ``auto``, ``cpu`` or ``cuda``.
        out_dir: where ``results.md``, ``results.json`` and (mnist-rot) ``figure3.png`` go.
        limit: number of training images (a fixed random subset) for quick runs.
        test_limit: number of test images (default all).
        cache_dir: where gzipped MNIST is unpacked (default ``~/.cache/stn-align``).
        threads: ``torch.set_num_threads`` value (``None`` leaves it alone).
        lr, batch_size: Adam learning rate and batch size; ``None`` takes the experiment's
            default from :data:`DEFAULT_OPTIMISER` (what docs/icpr2020 used).
        loc_lr_scale: localisation-net learning rate / ``lr``.
        networks: subset of the experiment's networks (default all).
        console: rich console for progress.

    Returns:
        the dict written to ``results.json``.

    Raises:
        ValueError / FileNotFoundError: with a one-line message for user errors (unknown
        experiment, missing data, missing scipy for SVHN, bad arguments).
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    if epochs < 1 or seeds < 1 or (limit is not None and limit < 1):
        raise ValueError("epochs, seeds and limit must be positive")
    all_names = network_names(experiment)
    names = tuple(networks) if networks else all_names
    if unknown := [n for n in names if n not in all_names]:
        raise ValueError(f"unknown network(s) for {experiment}: {', '.join(unknown)}")
    console = console or Console()
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    default_lr, default_batch = DEFAULT_OPTIMISER[experiment]
    lr = default_lr if lr is None else lr
    batch_size = default_batch if batch_size is None else batch_size
    cfg = ReproduceConfig(
        experiment, epochs, seeds, limit, test_limit, batch_size, lr, loc_lr_scale, names,
        threads=torch.get_num_threads(), channels_last=dev.type == "cpu",
    )
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(experiment)
    cache = Path(cache_dir) if cache_dir is not None else Path(os.environ.get("STN_ALIGN_CACHE", Path.home() / ".cache" / "stn-align"))
    train, test = load_svhn(data_dir) if experiment == "svhn" else load_mnist(data_dir, cache)
    if limit is not None and limit < len(train.labels):
        keep = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit]
        train = Dataset(train.images[keep], train.labels[keep])
    if test_limit is not None and test_limit < len(test.labels):
        test = Dataset(test.images[:test_limit], test.labels[:test_limit])
    test_inputs = _prepare_test_inputs(experiment, test, train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocol = protocol_lines(cfg, len(train.labels), len(test.labels), dev)
    console.rule(f"ICPR 2020 reproduction: {experiment}")
    for line in protocol:
        console.print(f"  {line}")

    results: list[RunResult] = []
    figure: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    report: dict = {}
    for seed in range(seeds):
        for name in names:
            run, model = train_network(name, seed, cfg, train, test_inputs, test.labels, dev, console)
            results.append(run)
            if experiment == "mnist-rot" and seed == 0 and name in ("STN-C1", "STN-SL1"):
                digits = test.images[: cfg.figure_images]
                figure[name] = predicted_rotation_angles(model, digits, cfg.figure_angles, dev, cfg)
            report = _write_outputs(out, cfg, results, names, figure, protocol, time.perf_counter() - start)
    _print_table(console, report["summary"], PAPER_ERROR_PCT[experiment])
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {out / 'figure3.png'}" if figure else ""))
    return report


def _write_outputs(out: Path, cfg, results, names, figure, protocol, wall) -> dict:
    """(Re)write all outputs; called after every run so partial results survive an interruption."""
    summary = summarise(results, names)
    report = {
        "paper": "Finnveden, Jansson & Lindeberg, ICPR 2020 (arXiv:2004.11678)",
        "config": asdict(cfg),
        "protocol": protocol,
        "wall_seconds": wall,
        "summary": summary,
        "paper_error_pct": PAPER_ERROR_PCT[cfg.experiment],
        "runs": [asdict(r) for r in results],
    }
    if figure:
        report["figure3"] = {
            "applied_deg": list(cfg.figure_angles),
            "predicted_deg_mean": {k: v.mean(axis=1).tolist() for k, v in figure.items()},
            "predicted_deg_std": {k: v.std(axis=1).tolist() for k, v in figure.items()},
            "n_digits": cfg.figure_images,
        }
        draw_figure3(out / "figure3.png", list(cfg.figure_angles), figure)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    write_results_markdown(out / "results.md", cfg, summary, protocol, wall)
    return report


def _print_table(console: Console, summary: dict, paper: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title="test error (%)")
    for col in ("network", "ours (mean ± std)", "seeds", "paper"):
        table.add_column(col)
    for name, s in summary.items():
        std = "n/a" if math.isnan(s["std"]) else f"{s['std']:.2f}"
        ref = paper.get(name)
        table.add_row(name, f"{s['mean']:.2f} ± {std}", str(s["n"]), "-" if ref is None else f"{ref:.2f}")
    console.print(table)
