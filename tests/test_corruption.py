"""Corruption is detected, never aligned silently: damaged JPEG scans, damaged model files, non-finite
matrices. Identity is exact. Files get the umask's permissions. Real files and real subprocesses."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stn_align.align import Aligner
from stn_align.checkpoint import META_KEY, CheckpointError, load_model, save_model
from stn_align.io import ImageError, read_image, write_image
from stn_align.manifest import MANIFEST_NAME
from stn_align.model import AlignerNet, ModelConfig

from conftest import TINY, base_image, corner_error, jsonl, run_cli, shared_photos, shifted


def damaged_jpeg(path, where=0.5):
    """A JPEG that lost 400 bytes of its entropy-coded scan (a bad copy or transfer); every marker intact."""
    buf = io.BytesIO()
    Image.fromarray(base_image(0, (320, 240))).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    start = data.find(b"\xff\xda")
    cut = int(start + (len(data) - start) * where)
    path.write_bytes(data[:cut] + data[cut + 400:])
    return path


def test_damaged_jpeg_scan_is_a_failure_of_that_file(tmp_path, model_file):
    (tmp_path / "in").mkdir()
    bad = damaged_jpeg(tmp_path / "in" / "bad.jpg")
    Image.open(bad).load()  # Pillow alone decodes it without a word
    for where in (0.2, 0.5, 0.8):
        with pytest.raises(ImageError, match="corrupt JPEG data"):
            read_image(damaged_jpeg(tmp_path / f"cut{where}.jpg", where))
    write_image(tmp_path / "in" / "good.jpg", shifted(base_image(0, (320, 240))))
    ref = tmp_path / "ref.jpg"
    write_image(ref, base_image(0, (320, 240)))
    result = run_cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--ref", ref, "--model", model_file,
                     "--device", "cpu")
    assert result.returncode == 1
    assert f"{bad}: corrupt JPEG data (libjpeg: " in result.stderr
    records = {r["input"]: r for r in jsonl(tmp_path / "out" / MANIFEST_NAME)}
    assert records["bad.jpg"]["status"] == "failed" and records["good.jpg"]["status"] == "ok"
    single = run_cli(bad, "--ref", ref, "--model", model_file, "--device", "cpu")
    assert single.returncode == 1 and single.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: corrupt JPEG")


def test_clean_jpegs_pass(tmp_path):
    for path in shared_photos("products", 5) + shared_photos("natural", 5):
        assert read_image(path).ndim == 3, path


def flip_a_bit(path, tmp_path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 1000] ^= 0x40  # inside the tensor data
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    return damaged


def test_bit_flipped_model_is_refused(tmp_path, model_file):
    damaged = flip_a_bit(model_file, tmp_path)
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(damaged)
    ref = tmp_path / "ref.png"
    write_image(ref, base_image(0))
    result = run_cli(ref, "--ref", ref, "-o", tmp_path / "o.png", "--model", damaged, "--device", "cpu")
    assert result.returncode == 1 and not (tmp_path / "o.png").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {damaged}: corrupt checkpoint")


def test_shipped_models_carry_and_pass_their_checksum():
    for name in ("default", "affine"):
        aligner = Aligner.load(name, "cpu")
        assert len(aligner.weights_sha256) == 64


def test_non_finite_matrix_is_an_error_never_a_white_image(tmp_path):
    """An older model file (no checksum) whose weights went bad gives NaN: the pair fails, the safety net
    (SIFT) does not hide it, and no output is written."""
    net = AlignerNet(ModelConfig(**TINY))
    save_model(tmp_path / "tmp.safetensors", net, {})
    tensors = load_file(tmp_path / "tmp.safetensors")
    name = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    meta = {"format": 1, "model": net.config.to_dict()}
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad, metadata={META_KEY: json.dumps(meta)})
    src = tmp_path / "in"
    write_image(src / "a.png", shifted(base_image(0)))
    ref = tmp_path / "ref.png"
    write_image(ref, base_image(0))
    result = run_cli("batch", src, "-o", tmp_path / "out", "--ref", ref, "--model", bad, "--device", "cpu")
    assert result.returncode == 1
    assert "not finite" in result.stderr and not (tmp_path / "out" / "a.png").exists()
    single = run_cli(src / "a.png", "--ref", ref, "-o", tmp_path / "o.png", "--model", bad, "--device", "cpu")
    assert single.returncode == 1 and "not finite" in single.stderr and not (tmp_path / "o.png").exists()


def test_identical_input_and_reference_give_the_identity():
    aligner = Aligner.load("default", "cpu")
    for path in shared_photos("products", 8):
        image = read_image(path)
        result = aligner.align(image, image.copy())
        assert result.method == "identity" and np.array_equal(result.matrix, np.eye(3))
        assert corner_error(result.matrix, np.eye(3), (image.shape[1], image.shape[0])) < 0.1
        assert np.array_equal(result.image, image)


def test_a_resaved_copy_of_the_reference_comes_back_as_the_identity():
    """Not pixel-identical (JPEG q95 once more), the same frame: "nothing moved" competes and wins."""
    aligner = Aligner.load("default", "cpu")
    for path in shared_photos("products", 6):
        ref = read_image(path)
        buf = io.BytesIO()
        Image.fromarray(ref).save(buf, "JPEG", quality=95)
        result = aligner.align(np.asarray(Image.open(buf).convert("RGB")), ref, warp=False)
        assert corner_error(result.matrix, np.eye(3), (ref.shape[1], ref.shape[0])) < 0.25, (path, result.method)


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_respect_the_umask(tmp_path, model_file, umask):
    saved = os.umask(umask)
    try:
        model = tmp_path / "m.safetensors"
        save_model(model, load_model(model_file)[0], {})
        src = tmp_path / "in"
        write_image(src / "a.png", shifted(base_image(0)))
        ref = tmp_path / "ref.png"
        write_image(ref, base_image(0))
        result = run_cli("batch", src, "-o", tmp_path / "out", "--ref", ref, "--model", model, "--device", "cpu")
        assert result.returncode == 0, result.stderr
        single = run_cli(src / "a.png", "--ref", ref, "-o", tmp_path / "o.png", "--json", tmp_path / "o.json",
                         "--model", model, "--device", "cpu")
        assert single.returncode == 0, single.stderr
    finally:
        os.umask(saved)
    expected = 0o666 & ~umask
    for path in (model, tmp_path / "out" / "a.png", tmp_path / "out" / MANIFEST_NAME, tmp_path / "o.png",
                 tmp_path / "o.json"):
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))
    shutil.rmtree(tmp_path / "out")
