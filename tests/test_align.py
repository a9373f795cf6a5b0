"""The Python API with the shipped models: convention, image types, and real accuracy on held-out photos;
and the safety net (``fallback``), tested with a stand-in network so it never depends on a trained one."""

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stn_align import Aligner, baselines
from stn_align.align import METHODS, quarter_turn, shipped_models, warp_image
from stn_align.batch import MANIFEST_NAME, align_directory
from stn_align.cli import app
from stn_align.data import NO_PHOTOMETRIC, WarpRanges, crop_pair, is_held_out, load_photo, photometric, whole_pair
from stn_align.geometry import corner_error
from stn_align.io import write_image

from conftest import SHARED, base_image


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


# --- the safety net (fallback) ---------------------------------------------------------------------------
# These tests never depend on a trained network: IdentityNet always answers the identity, so the network's
# estimate is wrong for a turned input, and a turned start is exactly right (the turn is composed back).

class IdentityNet(torch.nn.Module):
    """A stand-in for AlignerNet (same call surface) that always predicts the identity."""

    def __init__(self, transform="projective", size=64):
        super().__init__()
        self.config = SimpleNamespace(transform=transform, size=size)

    def forward(self, image_in, image_ref, iterations=None, initial=None):
        return [torch.eye(3, dtype=image_in.dtype).expand(image_in.shape[0], 3, 3)] * (iterations or 1)


def identity_aligner(transform="projective", **options) -> Aligner:
    aligner = Aligner(model=IdentityNet(transform), device=torch.device("cpu"), **options)
    aligner._check()
    return aligner


W, H = 160, 120
TURNED = {  # input -> reference pixels, and the reference's size
    90: (np.array([[0.0, 1, 0], [-1, 0, W - 1], [0, 0, 1]]), (H, W)),
    180: (np.array([[-1.0, 0, W - 1], [0, -1, H - 1], [0, 0, 1]]), (W, H)),
}
GOOD = np.array([[1.0, 0, 3], [0, 1, -2], [0, 0, 1]])


def turned_pair(angle: int, seed: int = 0):
    image = base_image(seed, (W, H))
    matrix, size = TURNED[angle]
    return image, cv2.warpPerspective(image, matrix, size), matrix


def good_pair(seed: int = 0):
    image = base_image(seed, (W, H))
    return image, cv2.warpPerspective(image, GOOD, (W, H), borderMode=cv2.BORDER_REFLECT), GOOD


def refuse(*args, **kwargs):
    raise AssertionError("the safety net must not run here")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quarter_turn_is_np_rot90(k):
    image = base_image(1, (64, 64))
    turned = cv2.warpPerspective(image, quarter_turn(k, 64), (64, 64), flags=cv2.INTER_NEAREST)
    assert np.array_equal(turned, np.rot90(image, k))


@pytest.mark.parametrize("transform", ["projective", "affine"])
@pytest.mark.parametrize("angle", [90, 180])
def test_safety_net_recovers_a_turned_input(transform, angle):
    image_in, image_ref, truth = turned_pair(angle)
    aligner = identity_aligner(transform)
    result = aligner.finish(image_in, image_ref, np.eye(3))  # the network's (wrong) estimate
    assert result.fallback_fired and list(result.hypotheses)[0] == "network"
    assert set(result.hypotheses) <= {"network", "rotated90", "rotated180", "rotated270", "features"}
    assert len(result.hypotheses) == 2  # the likeliest hypothesis reached min_score: nothing more was polished
    assert result.hypotheses["network"] < aligner.min_score
    assert result.method in METHODS and result.method.split("+")[0] in ("rotated", "features")
    assert result.score == max(result.hypotheses.values()) and not result.suspect
    assert result.to_record()["method"] == result.method
    assert corner_error(result.matrix, truth, (W, H)) < 1.0
    assert result.image.shape == image_ref.shape
    if transform == "affine":  # every hypothesis of an affine model stays affine
        assert np.array_equal(result.matrix[2], [0, 0, 1])


def test_turned_starts_are_composed_back_into_the_matrix():
    image_in, image_ref, truth = turned_pair(90)
    estimates = identity_aligner().estimate_turned(image_in, image_ref)
    assert estimates.shape == (3, 3, 3)
    assert corner_error(estimates[0], truth, (W, H)) < 1e-6  # the 90 degree start is exact


def test_features_path_wins_when_the_turned_starts_are_wrong(monkeypatch):
    image_in, image_ref, truth = turned_pair(180)
    aligner = identity_aligner()
    monkeypatch.setattr(aligner, "estimate_turned", lambda a, b: np.repeat(np.eye(3)[None], 3, axis=0))
    result = aligner.finish(image_in, image_ref, np.eye(3))
    assert result.method == "features+ecc" and result.refined and not result.suspect
    assert corner_error(result.matrix, truth, (W, H)) < 1.0


def test_rotations_fallback_does_not_run_features(monkeypatch):
    image_in, image_ref, truth = turned_pair(180)
    monkeypatch.setattr(baselines, "sift", refuse)
    result = identity_aligner(fallback="rotations").finish(image_in, image_ref, np.eye(3))
    assert result.method.startswith("rotated") and "features" not in result.hypotheses
    assert corner_error(result.matrix, truth, (W, H)) < 1.0


def test_fallback_none_never_tries(monkeypatch):
    image_in, image_ref, _ = turned_pair(180)
    aligner = identity_aligner(fallback="none")
    monkeypatch.setattr(aligner, "estimate_turned", refuse)
    monkeypatch.setattr(baselines, "sift", refuse)
    result = aligner.finish(image_in, image_ref, np.eye(3))
    assert result.method in ("network", "network+ecc") and result.suspect
    assert list(result.hypotheses) == ["network"] and not result.fallback_fired


def test_a_good_estimate_does_not_fire_the_safety_net(monkeypatch):
    image_in, image_ref, truth = good_pair()
    aligner = identity_aligner()
    monkeypatch.setattr(aligner, "estimate_turned", refuse)
    monkeypatch.setattr(baselines, "sift", refuse)
    start = np.array([[1.0, 0, 1.5], [0, 1, -1], [0, 0, 1]]) @ truth  # a network estimate 1.8 px off
    result = aligner.finish(image_in, image_ref, start)
    assert result.method == "network+ecc" and not result.fallback_fired and not result.suspect
    assert corner_error(result.matrix, truth, (W, H)) < 0.5


def test_refine_none_compares_unpolished_hypotheses():
    image_in, image_ref, truth = turned_pair(180)
    result = identity_aligner(refine="none").finish(image_in, image_ref, np.eye(3))
    assert result.method in ("rotated", "features") and not result.refined
    assert corner_error(result.matrix, truth, (W, H)) < 2.0


def test_bad_fallback_option():
    with pytest.raises(ValueError, match="fallback"):
        identity_aligner(fallback="sift")


@pytest.mark.parametrize("fallback", ["features", "none"])
def test_batch_manifest_records_the_method(tmp_path, fallback):
    """One reference; a.png is a small shift of it (the network path wins), b.png is it turned by 180 degrees."""
    reference, good_in = good_pair()[1], good_pair()[0]
    turned_in = cv2.warpPerspective(reference, TURNED[180][0], (W, H))  # turned about the centre: its own inverse
    write_image(tmp_path / "ref.png", reference)
    write_image(tmp_path / "in" / "a.png", good_in)
    write_image(tmp_path / "in" / "b.png", turned_in)
    aligner = identity_aligner(fallback=fallback)
    summary = align_directory(aligner, tmp_path / "in", tmp_path / "out", ref=tmp_path / "ref.png", workers=1)
    records = {r["input"]: r for r in map(json.loads, (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines())}
    assert summary.aligned == 2 and records["a.png"]["method"] == "network+ecc"
    if fallback == "none":
        assert records["b.png"]["method"] in ("network", "network+ecc") and records["b.png"]["suspect"]
    else:
        assert records["b.png"]["method"].split("+")[0] in ("rotated", "features") and not records["b.png"]["suspect"]
        assert corner_error(np.array(records["b.png"]["matrix"]), TURNED[180][0], (W, H)) < 1.0


def test_cli_fallback_option_and_json_method(tmp_path, model_file):
    """A freshly built network (not trained) cannot align a turned input: the safety net must, unless disabled."""
    image_in, image_ref, truth = turned_pair(180)
    write_image(tmp_path / "in.png", image_in)
    write_image(tmp_path / "ref.png", image_ref)

    def run(out, *options):
        return CliRunner().invoke(app, [str(tmp_path / "in.png"), "--ref", str(tmp_path / "ref.png"), "-o", str(tmp_path / out),
                                        "--model", str(model_file), "--device", "cpu", "--json", "-", *options])

    default = run("a.png")
    assert default.exit_code == 0, default.output
    record = json.loads(default.stdout)
    assert record["method"].split("+")[0] in ("rotated", "features") and not record["suspect"]
    assert corner_error(np.array(record["matrix"]), truth, (W, H)) < 1.0
    off = run("b.png", "--fallback", "none")
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout)["method"] in ("network", "network+ecc")
    bad = run("c.png", "--fallback", "sift")
    assert bad.exit_code == 2 and "--fallback must be" in bad.stderr
