"""The Python API with the shipped models: convention, image types, and real accuracy on held-out photos."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from stn_align import Aligner
from stn_align.align import shipped_models, warp_image
from stn_align.data import NO_PHOTOMETRIC, WarpRanges, crop_pair, is_held_out, load_photo, photometric, whole_pair
from stn_align.geometry import corner_error

from conftest import SHARED



@pytest.fixture(scope="module")
def default():
    return Aligner.load("default", device="cpu", refine="none")


def held_out_photos(folder, n, min_width=0):
    paths = [p for p in sorted((SHARED / folder).glob("*.jpg")) if is_held_out(p, 0.1)]
    photos = [load_photo(p) for p in paths]
    photos = [p for p in photos if p.shape[1] >= min_width][:n]
    if len(photos) < n:
        pytest.skip(f"needs {n} held-out photos in {SHARED / folder}")
    return photos


def test_shipped_models_exist_with_their_cards():
    models = shipped_models()
    assert {"default", "affine"} <= set(models)
    for path in models.values():
        assert path.stat().st_size < 20 * 2**20
        assert path.with_suffix(".md").exists()
    assert Aligner.load("affine", device="cpu").transform == "affine"
    assert Aligner.load("default", device="cpu").transform == "projective"


def test_default_model_beats_identity_on_held_out_pairs(default):
    """The trained network alone (no ECC) must be far better than doing nothing, on photos it never saw."""
    rng = np.random.default_rng(123)
    products = held_out_photos("products", 12)
    natural = held_out_photos("natural", 4)
    pairs = [whole_pair(p, rng, (224, 224), WarpRanges(max_perspective=0.08)) for p in products]
    pairs += [crop_pair(p, rng, (128, 128), 0.2) for p in natural for _ in range(3)]
    pairs = [(photometric(a, rng), photometric(b, rng), m) for a, b, m in pairs]
    inputs, refs, truths = zip(*pairs)
    predicted = default.estimate(list(inputs), list(refs))
    model_err = [corner_error(p, t, (a.shape[1], a.shape[0])) for p, t, a in zip(predicted, truths, inputs)]
    identity_err = [corner_error(np.eye(3), t, (a.shape[1], a.shape[0])) for t, a in zip(truths, inputs)]
    assert np.mean(model_err) < 0.35 * np.mean(identity_err), (np.mean(model_err), np.mean(identity_err))
    assert np.median(model_err) < 6


def test_result_matrix_reproduces_the_output_with_opencv(default):
    photo = held_out_photos("products", 1)[0]
    image_in, image_ref, _ = whole_pair(photo, np.random.default_rng(5), (200, 160), WarpRanges(), "projective")
    result = default.align(image_in, image_ref)
    assert result.image.shape == image_ref.shape and result.image.dtype == np.uint8
    expected = cv2.warpPerspective(image_in, result.matrix, (200, 160), borderValue=(255, 255, 255))
    assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1
    assert 0 <= result.score <= 1


def test_full_resolution_input_and_different_sizes(default):
    """The matrix is in full-resolution pixels of each image even when sizes and aspect ratios differ."""
    rng = np.random.default_rng(7)
    photo = held_out_photos("products", 2)[1]
    small_in, ref, truth = whole_pair(photo, rng, (224, 224), WarpRanges(max_rotation=10, max_scale=1.1, max_perspective=0))
    big_in = cv2.resize(small_in, (448, 336), interpolation=cv2.INTER_CUBIC)  # input at another size and aspect
    to_small = np.diag([224 / 448, 224 / 336, 1.0])
    to_small[:2, 2] = [0.5 * 224 / 448 - 0.5, 0.5 * 224 / 336 - 0.5]
    truth_big = truth @ to_small
    aligner = Aligner.load("default", device="cpu", refine="ecc")
    result = aligner.align(big_in, ref)
    assert corner_error(result.matrix, truth_big, (448, 336)) < 3
    assert result.image.shape == ref.shape


def test_image_types_paths_pil_gray_rgba_16bit(default, tmp_path):
    photo = held_out_photos("products", 1)[0]
    path = tmp_path / "in.png"
    cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    from_path = default.align(path, photo)
    from_pil = default.align(Image.fromarray(photo), photo)
    assert np.allclose(from_path.matrix, from_pil.matrix)
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    assert default.align(gray, photo).image.shape == (224, 224, 1)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 200, np.uint8)])
    out = default.align(rgba, photo).image
    assert out.shape == (224, 224, 4) and out[112, 112, 3] == 200
    deep = photo.astype(np.uint16) * 257
    out16 = default.align(deep, photo).image
    assert out16.dtype == np.uint16 and out16.max() > 255


def test_fills():
    image = np.full((20, 20, 3), 100, np.uint8)
    shift = np.array([[1, 0, 5.0], [0, 1, 0], [0, 0, 1]])
    assert (warp_image(image, shift, (20, 20), "white")[:, 0] == 255).all()
    assert (warp_image(image, shift, (20, 20), "black")[:, 0] == 0).all()
    assert (warp_image(image, shift, (20, 20), "edge")[:, 0] == 100).all()
    assert (warp_image(image, shift, (20, 20), (1, 2, 3))[:, 0] == [1, 2, 3]).all()
    clear = warp_image(image, shift, (20, 20), "transparent")
    assert clear.shape == (20, 20, 4) and (clear[:, 0, 3] == 0).all() and (clear[:, 10, 3] == 255).all()
    assert warp_image(image[..., :1], shift, (20, 20), "transparent").shape == (20, 20, 4)


def test_batch_api_matches_single(default):
    photos = held_out_photos("products", 3)
    rng = np.random.default_rng(9)
    pairs = [whole_pair(p, rng, (224, 224), WarpRanges()) for p in photos]
    batch = default.align_batch([a for a, _, _ in pairs], [b for _, b, _ in pairs], warp=False)
    single = [default.align(a, b, warp=False) for a, b, _ in pairs]
    for x, y in zip(batch, single):
        assert np.allclose(x.matrix, y.matrix, atol=1e-6)
        assert x.image is None


def test_unknown_model_and_bad_options():
    from stn_align.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="unknown model"):
        Aligner.load("nonexistent-model", device="cpu")
    with pytest.raises(ValueError, match="refine"):
        Aligner.load("default", device="cpu", refine="sift")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            Aligner.load("default", device="cuda")


def test_photometric_changes_do_not_break_alignment(default):
    photo = held_out_photos("products", 4)[3]
    rng = np.random.default_rng(11)
    image_in, image_ref, truth = whole_pair(photo, rng, (224, 224), WarpRanges(max_perspective=0))
    clean = corner_error(default.align(image_in, image_ref, warp=False).matrix, truth, (224, 224))
    darker = np.clip(image_in.astype(np.float32) * 0.6, 0, 255).astype(np.uint8)
    relit = corner_error(default.align(darker, image_ref, warp=False).matrix, truth, (224, 224))
    assert relit < max(3 * clean, 4.0)
    assert NO_PHOTOMETRIC.p_blur == 0
