"""Shared fixtures: photos from ../shared/data (read in place, never copied into the repository)."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stn_align.checkpoint import save_model
from stn_align.model import AlignerNet, ModelConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
PHOTOS = SHARED / "products"
TINY = dict(size=64, widths=(8, 16, 32), head_width=32)  # a tiny network for fast CLI and batch tests
SHIFT = np.array([[1.0, 0, 3], [0, 1.0, -2], [0, 0, 1]])  # input -> reference pixels


def corner_error(m, expected=SHIFT, size=(160, 120)) -> float:
    """Largest distance (px) between where ``m`` and ``expected`` send the image corners."""
    w, h = size
    pts = np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]).reshape(-1, 1, 2)
    a = cv2.perspectiveTransform(pts, np.asarray(m, np.float64))
    b = cv2.perspectiveTransform(pts, np.asarray(expected, np.float64))
    return float(np.linalg.norm(a - b, axis=2).max())


def base_image(seed=0, size=(160, 120)) -> np.ndarray:
    """A textured RGB uint8 image: a product photo when the shared data is there, else smooth noise."""
    w, h = size
    photos = sorted(PHOTOS.glob("*.jpg"))[:8] if PHOTOS.is_dir() else []
    if photos:
        img = cv2.cvtColor(cv2.imread(str(photos[seed % len(photos)])), cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA))
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((h, w, 3), np.float32), (0, 0), 3)
    return ((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny networks: one thread is as fast and immune to a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """A fresh tiny network saved as a checkpoint: exactly the identity (zero-initialised head)."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(0)
    save_model(path, AlignerNet(ModelConfig(**TINY)), {"validation": {"mean_px": 1.5, "under_3px": 0.9, "pairs": 64}})
    return path


def shared_photos(folder: str, n: int) -> list[Path]:
    paths = sorted((SHARED / folder).glob("*.jpg"))[:n]
    if len(paths) < n:
        pytest.skip(f"needs {n} photos in {SHARED / folder}")
    return paths


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """A folder of a few dozen photos (24 products, 6 natural) in two sub-folders."""
    root = tmp_path / "photos"
    for folder, n in (("products", 24), ("natural", 6)):
        (root / folder).mkdir(parents=True)
        for path in shared_photos(folder, n):
            shutil.copy(path, root / folder / path.name)
    return root


def run_cli(*args, timeout: float = 300, **kwargs):
    """``stn-align ARGS`` in a real subprocess (``python -m stn_align.cli``); returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stn_align.cli", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def shifted(image: np.ndarray, matrix: np.ndarray = SHIFT) -> np.ndarray:
    """The input whose alignment onto ``image`` is ``matrix``."""
    h, w = image.shape[:2]
    out = cv2.warpPerspective(image, np.linalg.inv(matrix), (w, h), borderMode=cv2.BORDER_REFLECT)
    return out.reshape(image.shape)


def jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
