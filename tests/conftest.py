"""Shared fixtures: photos from ../shared/data (read in place, never copied into the repository)."""

import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


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
