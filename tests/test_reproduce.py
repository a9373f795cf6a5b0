"""Smoke tests of the ICPR 2020 reproduction driver (small, CPU, one thread)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stn_align.reproduce import (
    draw_figure3,
    prepare_mnist_root,
    rotate_images,
    run_reproduce,
    translate_with_clutter,
)

torch.set_num_threads(1)

MNIST_GZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (MNIST_GZ / "train-images-idx3-ubyte.gz").is_file(), reason="MNIST .gz files not available"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stn-cache")


@needs_mnist
def test_prepare_mnist_root_from_gz_and_from_unpacked_root(cache_dir):
    root = prepare_mnist_root(MNIST_GZ, cache_dir)
    raw = root / "MNIST" / "raw"
    assert raw.is_relative_to(cache_dir)
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 28 * 28
    assert prepare_mnist_root(root, cache_dir / "unused") == root  # already a torchvision root


@needs_mnist
def test_smoke_run_mnist_rot_writes_table_plot_and_json(tmp_path, cache_dir):
    report = run_reproduce(
        "mnist-rot", MNIST_GZ, epochs=1, seeds=2, device="cpu", out_dir=tmp_path, limit=300,
        test_limit=200, cache_dir=cache_dir,
    )
    assert set(report["summary"]) == {"CNN", "STN-C0", "STN-C1", "STN-SL1"}
    assert all(s["n"] == 2 for s in report["summary"].values())
    table = (tmp_path / "results.md").read_text()
    assert "| STN-SL1 |" in table and "0.98" in table  # ours next to the paper's figure
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 8 and data["config"]["limit"] == 300
    assert set(data["figure3"]["predicted_deg_mean"]) == {"STN-C1", "STN-SL1"}
    png = cv2.imread(str(tmp_path / "figure3.png"))
    assert png is not None and png.shape[2] == 3


@needs_mnist
def test_smoke_run_mnist_trans(tmp_path, cache_dir):
    report = run_reproduce(
        "mnist-trans", MNIST_GZ, epochs=1, seeds=1, device="cpu", out_dir=tmp_path, limit=64,
        test_limit=50, cache_dir=cache_dir,
    )
    assert set(report["summary"]) == {"CNN", "STN-C0", "STN-C1", "STN-SL1"}
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "figure3.png").exists()


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST"):
        run_reproduce("mnist-rot", tmp_path / "nowhere", out_dir=tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="SVHN must be supplied"):
        run_reproduce("svhn", tmp_path, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown experiment"):
        run_reproduce("cifar", tmp_path)


def test_rotate_and_translate_augmentations():
    digit = torch.zeros(1, 1, 28, 28)
    digit[0, 0, 4:10, 12:16] = 1.0  # a bar above the centre
    up = rotate_images(digit, torch.tensor([180.0]))
    torch.testing.assert_close(up, torch.flip(digit, dims=(-2, -1)), atol=1e-5, rtol=0)
    gen = torch.Generator().manual_seed(0)
    canvas = translate_with_clutter(digit, (digit * 255).to(torch.uint8), gen)
    assert canvas.shape == (1, 1, 60, 60) and canvas.max() <= 1.0 and canvas.sum() >= digit.sum()


def test_draw_figure3(tmp_path):
    angles = [-90.0, 0.0, 90.0]
    draw_figure3(tmp_path / "f.png", angles, {"STN-SL1": np.array([[-80.0, -95], [0, 5], [85, 90]])})
    assert cv2.imread(str(tmp_path / "f.png")).shape == (540, 720, 3)


def test_cli_reproduce_without_svhn_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from stn_align.cli import app

    result = CliRunner().invoke(app, ["reproduce", "svhn", "--data", str(tmp_path)])
    assert result.exit_code == 1
    assert "SVHN must be supplied" in result.output and len(result.output.strip().splitlines()) == 1
