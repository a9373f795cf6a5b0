"""ICPR 2020 data: MNIST and SVHN loading, the rotated and translated-with-clutter augmentations."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..stn import rotation_theta, warp_with_theta


EXPERIMENTS = ("mnist-rot", "mnist-trans", "svhn")


MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


TEST_SEED = 12345  # fixed augmentation of the test set


SUBSET_SEED = 0  # fixed choice of the `limit` training images


ROT_MAX_DEG = 90.0


CANVAS = 60


MAX_SHIFT = 16


CLUTTER_PIECES, CLUTTER_SIZE = 6, 6


MNIST_NORM = {"mnist-rot": (0.1307, 0.3081), "mnist-trans": (0.0363, 0.1870)}


@dataclass
class Dataset:
    """In-memory split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor


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
    experiment: str, images: torch.Tensor, gen: torch.Generator, clutter_source: torch.Tensor | None = None,
    max_rotation_deg: float = ROT_MAX_DEG,
) -> torch.Tensor:
    """Apply the experiment's random transformation and normalisation.

    Args:
        experiment: one of :data:`EXPERIMENTS`.
        images: uint8 ``(B, C, H, W)``.
        gen: random generator (CPU).
        clutter_source: uint8 MNIST images for the translation clutter.
        max_rotation_deg: ``mnist-rot`` angles are drawn from U(-max, max).

    Returns:
        float ``(B, C, H', W')`` network input.
    """
    x = images.float() / 255.0
    if experiment == "mnist-rot":
        angles = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * max_rotation_deg
        x = rotate_images(x, angles)
    elif experiment == "mnist-trans":
        x = translate_with_clutter(x, clutter_source, gen)
    else:  # svhn: no synthetic transformation
        return (x - 0.5) / 0.5
    mean, std = MNIST_NORM[experiment]
    return (x - mean) / std


def _prepare_test_inputs(experiment: str, test: Dataset, train: Dataset) -> torch.Tensor:
    """Augment the test set once, with a fixed generator, so all networks see the same images."""
    gen = torch.Generator().manual_seed(TEST_SEED)
    parts = [augment_batch(experiment, test.images[i : i + 1000], gen, train.images) for i in range(0, len(test.labels), 1000)]
    return torch.cat(parts)
