"""`stn-align train`: the loss falls, checkpoints are complete, resume is exact, bad data is reported."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stn_align.checkpoint import load_model, read_metadata, state_path
from stn_align.cli import app
from stn_align.data import PairSampler, WarpRanges, crop_pair, whole_pair
from stn_align.geometry import corner_error
from stn_align.train import TrainConfig, train


def small_config(photo_dir, out, **changes):
    base = dict(data_dir=str(photo_dir), out=str(out), size=64, steps=30, batch_size=8, lr=3e-3, warmup=3,
                eval_every=30, checkpoint_every=1000, log_every=1, val_pairs=16, workers=0, val_fraction=0.2, threads=1)
    base.update(changes)
    return TrainConfig(**base)


def test_pairs_have_exact_ground_truth():
    rng = np.random.default_rng(0)
    photo = (np.random.default_rng(1).random((300, 400, 3)) * 255).astype(np.uint8)
    import cv2

    photo = cv2.GaussianBlur(photo, (0, 0), 3)
    for image_in, image_ref, matrix in (crop_pair(photo, rng, (96, 96), 0.25), whole_pair(photo, rng, (96, 96), WarpRanges())):
        warped = cv2.warpPerspective(image_in, matrix, (96, 96)).astype(float)
        covered = cv2.warpPerspective(np.ones((96, 96), np.uint8), matrix, (96, 96)) > 0
        covered = cv2.erode(covered.astype(np.uint8), np.ones((5, 5))) > 0
        assert np.abs(warped - image_ref)[covered].mean() < 3
        assert corner_error(matrix, np.eye(3), (96, 96)) > 0.5


def test_sampler_is_a_function_of_seed_and_step():
    photos = [(np.random.default_rng(i).random((160, 160, 3)) * 255).astype(np.uint8) for i in range(3)]
    sampler = PairSampler("projective", 64, seed=3)
    a, b = sampler.batch(photos, 7, 4), sampler.batch(photos, 7, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], sampler.batch(photos, 8, 4)[0])


@pytest.mark.slow
def test_loss_falls_and_checkpoint_describes_itself(photo_dir, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "m.safetensors"
    # A well-posed small task (whole-image translations) so that 30 steps show real learning.
    easy = WarpRanges(max_rotation=0, max_scale=1.0, max_shear=0, max_translation=0.15, max_perspective=0,
                      p_identity=0, p_translation=1.0)
    result = train(small_config(photo_dir, out, ranges=easy, p_crop=0.0, photometric=False, iterations=1), log=lambda *_: None)
    losses = [loss for _, loss in result["history"]]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8])
    meta = read_metadata(out)
    assert meta["model"]["transform"] == "projective" and meta["model"]["size"] == 64
    assert meta["training"]["data"]["train_photos"] + meta["training"]["data"]["val_photos"] == 30
    assert meta["validation"]["pairs"] == 16 and 0 <= meta["validation"]["under_3px"] <= 1
    assert meta["training"]["args"]["steps"] == 30
    model, _ = load_model(out)
    assert not model.training
    assert state_path(out).exists()


@pytest.mark.slow
def test_resume_continues_exactly(photo_dir, tmp_path):
    straight = tmp_path / "straight.safetensors"
    chunked = tmp_path / "chunked.safetensors"
    train(small_config(photo_dir, straight, steps=12), log=lambda *_: None)
    train(small_config(photo_dir, chunked, steps=12, stop_after=5), log=lambda *_: None)
    assert read_metadata(state_path(chunked))["step"] == 5
    train(small_config(photo_dir, chunked, steps=12, resume=str(chunked)), log=lambda *_: None)
    a, _ = load_model(straight)
    b, _ = load_model(chunked)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_affine_training_and_init_from_another_model(photo_dir, tmp_path):
    proj = tmp_path / "p.safetensors"
    train(small_config(photo_dir, proj, steps=3), log=lambda *_: None)
    aff = tmp_path / "a.safetensors"
    train(small_config(photo_dir, aff, steps=3, transform="affine", init=str(proj)), log=lambda *_: None)
    model, meta = load_model(aff)
    assert meta["model"]["transform"] == "affine"
    assert model.head.out.out_features == 6
    h = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))[-1]
    assert torch.allclose(h[0, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_cli_train_runs_and_reports(photo_dir, tmp_path):
    (photo_dir / "products" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(app, ["train", str(photo_dir), "-o", str(out), "--size", "64", "--steps", "3",
                                      "--batch-size", "4", "--workers", "0", "--eval-every", "3"])
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and out.exists()


def test_cli_train_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["train", str(empty), "-o", str(tmp_path / "m.safetensors"), "--workers", "0"])
    assert result.exit_code == 1 and "no readable training photos" in result.output
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing"), "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1 and "missing" in result.output
    result = CliRunner().invoke(app, ["train", str(empty), "-o", str(tmp_path / "m.safetensors"), "--transform", "rigid"])
    assert result.exit_code == 1 and "affine or projective" in result.output


# --- the ML engineer's workflow (#19): resume keeps the run's settings, best weights, group-aware split ---------


def _cli_train(photos, out, *extra):
    base = ["train", str(photos), "-o", str(out), "--size", "64", "--batch-size", "2", "--warmup", "1",
            "--workers", "0", "--threads", "1"]
    return CliRunner().invoke(app, [*base, *[str(a) for a in extra]])


def test_resume_restores_the_runs_settings_and_keeps_the_best_weights(tmp_path):
    from stn_align.io import write_image
    from stn_align.train import best_path

    from conftest import base_image

    photos = tmp_path / "photos"
    for i in range(6):
        write_image(photos / f"{i}.jpg", base_image(i))
    out = tmp_path / "m.safetensors"
    first = _cli_train(photos, out, "--steps", "2", "--lr", "0.002", "--max-rotation", "10")
    assert first.exit_code == 0, first.output
    assert "validation at step 2" in first.stdout
    best = best_path(out)
    assert read_metadata(best)["best_step"] == 2 and "best validated weights" in first.stdout
    resumed = _cli_train(photos, out, "--steps", "3", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    args = read_metadata(out)["training"]["args"]
    assert args["lr"] == 0.002 and args["ranges"]["max_rotation"] == 10 and args["steps"] == 3  # kept; --steps given
    assert "--steps 3 overrides the resumed run's 2" in resumed.stderr
    assert "validation at step 3" in resumed.stdout


def test_validation_split_keeps_a_products_views_together(tmp_path):
    from stn_align.train import split_photos

    paths = [tmp_path / f"sku{i:03d}" / f"{view}.jpg" for i in range(200) for view in ("front", "back", "side")]
    train_paths, val_paths = split_photos(paths, 0.1, tmp_path)  # auto: names repeat, so by folder
    val_skus = {p.parent.name for p in val_paths}
    assert 8 <= len(val_skus) <= 35 and len(val_paths) == 3 * len(val_skus)
    assert not val_skus & {p.parent.name for p in train_paths}
    flat = [tmp_path / f"SKU{i:03d}_{view}.jpg" for i in range(200) for view in ("front", "back")]
    _, val_flat = split_photos(flat, 0.1, tmp_path, group_by=r"^(SKU\d+)_")
    groups = {p.name.split("_")[0] for p in val_flat}
    assert groups and len(val_flat) == 2 * len(groups)
    unique = [tmp_path / f"photo{i}.jpg" for i in range(300)]
    from stn_align.data import is_held_out

    assert split_photos(unique, 0.1, tmp_path)[1] == [p for p in unique if is_held_out(p, 0.1)]  # 0.2's split


def test_val_dir_and_bad_group_by(tmp_path):
    from stn_align.io import write_image

    from conftest import base_image

    photos, val = tmp_path / "photos", tmp_path / "val"
    for i in range(4):
        write_image(photos / f"{i}.jpg", base_image(i))
    write_image(val / "v.jpg", base_image(5))
    result = _cli_train(photos, tmp_path / "m.safetensors", "--steps", "1", "--val-dir", val)
    assert result.exit_code == 0, result.output
    assert "photos: 4 train, 1 held out" in result.stdout
    bad = _cli_train(photos, tmp_path / "n.safetensors", "--steps", "1", "--group-by", "([")
    assert bad.exit_code == 2 and "--group-by" in bad.stderr
