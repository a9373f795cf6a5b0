"""Smoke tests of the ICPR 2020 reproduction driver (small, CPU, one thread)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rich.console import Console

from stn_align.icpr2020 import (
    MNIST_NORM,
    PROTOCOLS,
    Dataset,
    ReproduceConfig,
    draw_figure3,
    draw_training_curves,
    lr_factor,
    prepare_mnist_root,
    rotate_images,
    rotation_r_per_class,
    rotation_slope,
    rotation_tracking_r,
    run_reproduce,
    RunResult,
    train_network,
    translate_with_clutter,
    augment_batch,
)
from stn_align.icpr2020 import ConvBlockSpec, build_stn_c0

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
@pytest.mark.slow
def test_smoke_run_mnist_rot_writes_table_plots_json_and_resumes(tmp_path, cache_dir):
    kwargs = dict(epochs=1, seeds=2, device="cpu", out_dir=tmp_path, limit=300, test_limit=200, cache_dir=cache_dir,
                  figure_images=20)
    report = run_reproduce("mnist-rot", MNIST_GZ, **kwargs)
    assert set(report["summary"]) == {"CNN", "STN-C0", "STN-C1", "STN-SL1"}
    assert all(s["n"] == 2 for s in report["summary"].values())
    table = (tmp_path / "results.md").read_text()
    assert "| STN-SL1 |" in table and "0.98" in table  # ours next to the paper's figure
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 8 and data["config"]["limit"] == 300
    assert set(data["figure3"]["pearson_r"]) == {"STN-C0", "STN-C1", "STN-SL1"}
    assert set(data["figure3"]["slope"]) == set(data["figure3"]["slope_within_60_deg"]) == {"STN-C0", "STN-C1", "STN-SL1"}
    per_class = data["figure3"]["pearson_r_per_class"]["STN-SL1"]
    assert set(per_class) <= {str(d) for d in range(10)} and len(per_class) >= 5  # 20 digits, most classes
    assert "r per digit class, STN-SL1:" in table
    assert all("rotation_r" in e and "test_error_pct" in e for r in data["runs"] if r["network"] != "CNN"
               for e in r["epochs_log"])
    for png in ("figure3.png", "figure2.png", "training_curves.png"):
        img = cv2.imread(str(tmp_path / png))
        assert img is not None and img.shape[2] == 3 and min(img.shape[:2]) > 100
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 8
    # a re-run resumes: every run is loaded from its finished checkpoint, same numbers
    again = run_reproduce("mnist-rot", MNIST_GZ, **kwargs)
    assert again["summary"] == report["summary"]
    assert all(r["train_seconds"] == q["train_seconds"] for r, q in zip(again["runs"], report["runs"]))
    # ... but not with another configuration
    with pytest.raises(ValueError, match="different configuration"):
        run_reproduce("mnist-rot", MNIST_GZ, **{**kwargs, "epochs": 2})


@needs_mnist
@pytest.mark.slow
def test_stop_after_ends_a_run_early_and_a_later_call_resumes_it(tmp_path, cache_dir):
    kwargs = dict(epochs=3, seeds=1, device="cpu", out_dir=tmp_path, limit=128, test_limit=50, cache_dir=cache_dir,
                  figure_images=10, networks=("STN-C0",))
    first = run_reproduce("mnist-rot", MNIST_GZ, stop_after_epochs=1, **kwargs)
    run = first["runs"][0]
    assert len(run["epochs_log"]) == 1 and run["steps"] == 2 and run["total_steps"] == 6
    # the learning rate is the full 3-epoch schedule's, not that of a 1-epoch run
    full = ReproduceConfig("mnist-rot", epochs=3, limit=128)
    assert run["epochs_log"][0]["lr_factor"] == pytest.approx(lr_factor(full, 1, 6)) and lr_factor(full, 1, 6) > 0.5
    assert first["summary"]["STN-C0"]["stopped_early"] and "figure3" in first
    assert "stopped early" in (tmp_path / "results.md").read_text()
    assert "--stop-after 1" in " ".join(first["protocol"])
    second = run_reproduce("mnist-rot", MNIST_GZ, stop_after_epochs=2, **kwargs)
    assert second["runs"][0]["epochs_log"][0] == run["epochs_log"][0]  # resumed, not restarted
    assert len(second["runs"][0]["epochs_log"]) == 2
    done = run_reproduce("mnist-rot", MNIST_GZ, **kwargs)
    assert len(done["runs"][0]["epochs_log"]) == 3 and not done["summary"]["STN-C0"]["stopped_early"]
    # a run already past the stop is reported as it is, never shortened
    again = run_reproduce("mnist-rot", MNIST_GZ, stop_after_epochs=1, **kwargs)
    assert again["runs"][0]["epochs_log"] == done["runs"][0]["epochs_log"]


@needs_mnist
def test_report_only_writes_outputs_from_checkpoints_without_training(tmp_path, cache_dir):
    kwargs = dict(epochs=3, seeds=1, device="cpu", out_dir=tmp_path, limit=128, test_limit=50, cache_dir=cache_dir,
                  figure_images=10, networks=("STN-C0",))
    with pytest.raises(ValueError, match="no checkpoint of STN-C0"):
        run_reproduce("mnist-rot", MNIST_GZ, report_only=True, **kwargs)
    trained = run_reproduce("mnist-rot", MNIST_GZ, stop_after_epochs=2, **kwargs)
    ckpt = tmp_path / "checkpoints" / "STN-C0-seed0.pt"
    before = ckpt.read_bytes()
    (tmp_path / "results.json").unlink()
    report = run_reproduce("mnist-rot", MNIST_GZ, report_only=True, **kwargs)
    assert report["runs"][0]["epochs_log"] == trained["runs"][0]["epochs_log"]  # epoch 2, nothing trained
    assert report["summary"]["STN-C0"]["stopped_early"] and ckpt.read_bytes() == before
    assert (tmp_path / "results.json").is_file() and "--report-only" in " ".join(report["protocol"])


@needs_mnist
@pytest.mark.slow
def test_paper_protocol_uses_the_authors_optimiser(tmp_path, cache_dir):
    report = run_reproduce("mnist-rot", MNIST_GZ, seeds=1, device="cpu", out_dir=tmp_path, limit=64, test_limit=50,
                           cache_dir=cache_dir, protocol="paper", iterations=3, networks=("STN-SL1",))
    cfg = report["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["momentum"], cfg["batch_size"]) == ("sgd", 0.01, 0.0, 256)
    assert (cfg["schedule"], cfg["iterations"], cfg["loc_lr_scale"]) == ("step", 3, 1.0)
    assert report["runs"][0]["epochs_log"][-1]["step"] == 3
    assert "SGD (momentum 0)" in (tmp_path / "results.md").read_text()


def test_paper_protocol_schedule_matches_the_authors_code():
    paper = PROTOCOLS["paper"]
    assert (paper.optimizer, paper.lr, paper.momentum, paper.batch_size, paper.iterations) == ("sgd", 0.01, 0.0, 256, 150_000)
    cfg = ReproduceConfig("mnist-rot", schedule="step", lr_drops=paper.lr_drops, iterations=150_000)
    # learntorch.py: lr x1, x0.1, x0.01 with a switch every 50 000 iterations
    assert [lr_factor(cfg, s, 150_000) for s in (0, 49_999, 50_000, 99_999, 100_000, 149_999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = ReproduceConfig("mnist-rot", schedule="cosine")
    assert lr_factor(cosine, 0, 100) == 1 and lr_factor(cosine, 50, 100) == pytest.approx(0.5)


def test_rotation_ramp_grows_the_training_rotations_to_90_degrees():
    cfg = ReproduceConfig("mnist-rot", batch_size=100, rotation_ramp_epochs=2)  # 10 steps per epoch of 1000
    assert [cfg.max_rotation_deg(s, 1000) for s in (0, 5, 10, 20, 500)] == pytest.approx([0, 22.5, 45, 90, 90])
    assert ReproduceConfig("mnist-rot").max_rotation_deg(0, 1000) == 90  # off by default: the paper's data
    # the angles drawn stay inside the current range: a bar's extent shows its rotation
    bar = torch.zeros(256, 1, 28, 28, dtype=torch.uint8)
    bar[:, 0, 4:24, 13:15] = 255
    mean, std = MNIST_NORM["mnist-rot"]
    width = lambda x: ((x * std + mean) > 0.3).any(dim=2).sum(dim=(1, 2)).float()  # noqa: E731 - columns hit
    small = width(augment_batch("mnist-rot", bar, torch.Generator().manual_seed(0), max_rotation_deg=5.0))
    full = width(augment_batch("mnist-rot", bar, torch.Generator().manual_seed(0)))
    assert small.max() <= 5 and full.max() >= 15


def test_curriculum_protocol_values():
    cur = PROTOCOLS["curriculum"]
    assert (cur.optimizer, cur.lr, cur.momentum, cur.loc_lr_scale, cur.batch_size) == ("sgd", 1e-3, 0.9, 10.0, 64)
    assert (cur.schedule, cur.lr_drops, cur.epochs, cur.rotation_ramp_epochs) == ("step", (0.8,), 20, 3.0)


@needs_mnist
def test_curriculum_on_translated_mnist_has_no_ramp_and_localisation_lr_x1(tmp_path, cache_dir):
    kwargs = dict(seeds=1, device="cpu", limit=64, test_limit=50, cache_dir=cache_dir, protocol="curriculum",
                  iterations=1, networks=("STN-C0",))
    cfg = run_reproduce("mnist-trans", MNIST_GZ, out_dir=tmp_path / "a", **kwargs)["config"]
    assert (cfg["loc_lr_scale"], cfg["rotation_ramp_epochs"], cfg["momentum"]) == (1.0, 0.0, 0.9)
    cfg = run_reproduce("mnist-trans", MNIST_GZ, out_dir=tmp_path / "b", loc_lr_scale=10.0, **kwargs)["config"]
    assert cfg["loc_lr_scale"] == 10.0  # an explicit value still wins


def test_rotation_ramp_is_recorded_and_part_of_the_checkpoint_fingerprint(tmp_path, cache_dir):
    if not (MNIST_GZ / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("MNIST .gz files not available")
    kwargs = dict(epochs=1, seeds=1, device="cpu", out_dir=tmp_path, limit=128, test_limit=50, cache_dir=cache_dir,
                  figure_images=10, networks=("STN-C0",), batch_size=64)
    report = run_reproduce("mnist-rot", MNIST_GZ, rotation_ramp_epochs=2, **kwargs)
    assert report["config"]["rotation_ramp_epochs"] == 2
    assert report["runs"][0]["epochs_log"][0]["max_rotation_deg"] == pytest.approx(22.5)  # step 1 of 4
    assert any("rotation curriculum" in line for line in report["protocol"])
    with pytest.raises(ValueError, match="different configuration"):
        run_reproduce("mnist-rot", MNIST_GZ, **kwargs)
    with pytest.raises(ValueError, match="mnist-rot only"):
        run_reproduce("mnist-trans", MNIST_GZ, rotation_ramp_epochs=1, **{**kwargs, "out_dir": tmp_path / "t"})
    # the curriculum protocol turns the ramp on by default
    cur = run_reproduce("mnist-rot", MNIST_GZ, protocol="curriculum", **{**kwargs, "out_dir": tmp_path / "c"})
    assert (cur["config"]["rotation_ramp_epochs"], cur["config"]["loc_lr_scale"], cur["config"]["epochs"]) == (3.0, 10.0, 1)


def test_rotation_slope_measures_how_much_of_the_rotation_is_undone():
    angles = [-90.0, -30.0, 0.0, 30.0, 90.0]
    half = np.array([[a / 2 + d for d in (-5.0, 5.0)] for a in angles])  # half of every angle, +-5 deg noise
    assert rotation_slope(half, angles) == pytest.approx(0.5)
    saturated = np.array([[max(-40.0, min(40.0, a))] * 2 for a in angles])
    assert rotation_slope(saturated, angles, max_abs_deg=30) == pytest.approx(1.0)
    assert rotation_slope(saturated, angles) < 0.6
    assert rotation_slope(np.full((5, 2), -0.32), angles) == pytest.approx(0.0, abs=1e-9)


def test_rotation_tracking_r():
    angles = [-90.0, 0.0, 90.0]
    assert rotation_tracking_r(np.array([[-85.0, -95], [2, -2], [88, 91]]), angles) > 0.99
    assert rotation_tracking_r(np.full((3, 2), -0.32), angles) == 0.0  # a collapsed localisation net
    assert rotation_tracking_r(np.array([[85.0, 95], [2, -2], [-88, -91]]), angles) < -0.99


def test_rotation_r_per_class_separates_tracked_and_untracked_classes():
    angles = [-90.0, 0.0, 90.0]
    predicted = np.array([[-80.0, -85, 0], [0, 1, 0], [82, 88, 0]])  # two tracked digits of class 3, a flat 1
    assert rotation_r_per_class(predicted, angles, np.array([3, 3, 1])) == pytest.approx({1: 0.0, 3: 0.9998}, abs=1e-3)


@needs_mnist
@pytest.mark.slow
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


def test_draw_figure3_and_training_curves(tmp_path):
    angles = [-90.0, 0.0, 90.0]
    draw_figure3(tmp_path / "f.png", angles, {"STN-SL1": np.array([[-80.0, -95], [0, 5], [85, 90]]),
                                              "STN-C1": np.full((3, 2), -0.32)})
    img = cv2.imread(str(tmp_path / "f.png"))
    assert img is not None and img.shape[1] > img.shape[0] > 200
    log = [{"epoch": 1, "step": 10, "train_loss": 1.0, "test_error_pct": 9.0, "rotation_r": 0.2},
           {"epoch": 2, "step": 20, "train_loss": 0.5, "test_error_pct": 5.0, "rotation_r": 0.9}]
    draw_training_curves(tmp_path / "c.png", [RunResult("STN-SL1", 0, 5.0, 1.0, 0.5, log)])
    with_r = cv2.imread(str(tmp_path / "c.png"))
    assert with_r is not None
    # translation runs have no rotation r: two panels, not an empty third one
    no_r = [{k: v for k, v in e.items() if k != "rotation_r"} for e in log]
    draw_training_curves(tmp_path / "t.png", [RunResult("STN-SL1", 0, 5.0, 1.0, 0.5, no_r)])
    assert cv2.imread(str(tmp_path / "t.png")).shape[1] < 0.8 * with_r.shape[1]


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ValueError, match=r"need matplotlib.*stn-align\[plots\]") as info:
        run_reproduce("mnist-rot", tmp_path, out_dir=tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # checked before any work


def test_cli_reproduce_without_svhn_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from stn_align.cli import app

    result = CliRunner().invoke(app, ["reproduce", "svhn", "--data", str(tmp_path)])
    assert result.exit_code == 1
    assert "SVHN must be supplied" in result.output and len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------
# Does the transformer learn to undo a rotation? (issue 10)
# --------------------------------------------------------------------------------------

GLYPHS = "FLPR47GJ"


def _glyph_set(copies: int, seed: int) -> Dataset:
    """Eight asymmetric characters over a common underline, slightly varied, uint8 ``(N, 1, 28, 28)``.

    The underline gives every class the same "up", so a transformer that un-rotates the input
    predicts the same angle for all of them.
    """
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, char in enumerate(GLYPHS):
        for _ in range(copies):
            img = np.zeros((28, 28), np.uint8)
            scale, thickness = rng.uniform(0.7, 0.9), int(rng.integers(2, 4))
            (w, h), _ = cv2.getTextSize(char, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
            dx, dy = rng.integers(-2, 3, 2)
            cv2.putText(img, char, ((28 - w) // 2 + dx, (26 + h) // 2 + dy - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                        thickness, cv2.LINE_AA)
            cv2.line(img, (5, 24), (22, 24), 255, 2)
            images.append(img)
            labels.append(k)
    return Dataset(torch.from_numpy(np.stack(images))[:, None].contiguous(), torch.tensor(labels))


def _train_stn_c0_on_rotated_glyphs(cfg: ReproduceConfig) -> RunResult:
    """STN-C0 (one-conv classifier) whose classifier first learns *upright* glyphs; then the
    package's training loop trains it on glyphs rotated by U(-90, 90) with ``cfg``."""
    torch.manual_seed(0)
    train, test = _glyph_set(32, seed=0), _glyph_set(8, seed=1)
    model = build_stn_c0((1, 28, 28), len(GLYPHS), blocks=(ConvBlockSpec(8, 5),))
    mean, std = MNIST_NORM["mnist-rot"]
    upright = (train.images.float() / 255 - mean) / std
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("transformer.")], 3e-3)
    for _ in range(60):  # the classifier knows upright glyphs only
        loss = torch.nn.functional.cross_entropy(model(upright), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_inputs = augment_batch("mnist-rot", test.images, torch.Generator().manual_seed(1))
    run, _ = train_network("STN-C0", 0, cfg, train, test_inputs, test.labels, torch.device("cpu"), Console(quiet=True),
                           probe_digits=test.images[::4], model=model)
    return run


#: Transformer-only training: the classifier's lr is 1e-3 x the localisation's.
LEARNS = dict(optimizer="adam", lr=1e-6, loc_lr_scale=1000.0, batch_size=64, schedule="step", epochs=30,
              figure_images=16)


@pytest.mark.slow
def test_stn_c0_learns_to_undo_rotation():
    """After a short run STN-C0's predicted angle tracks the applied rotation (Figure 3's measure)."""
    run = _train_stn_c0_on_rotated_glyphs(ReproduceConfig("mnist-rot", **LEARNS))
    assert abs(run.epochs_log[-1]["rotation_r"]) >= 0.8
    assert run.test_error_pct < 20  # and un-rotating is what lets the upright classifier work (64 % at epoch 1)


@pytest.mark.slow
def test_stn_c0_rotation_test_can_fail():
    """The same run with a frozen transformer (localisation lr 0) does not track the rotation."""
    run = _train_stn_c0_on_rotated_glyphs(ReproduceConfig("mnist-rot", **{**LEARNS, "loc_lr_scale": 0.0}))
    assert abs(run.epochs_log[-1]["rotation_r"]) < 0.8


@needs_mnist
def test_cli_reproduce_logs_one_line_per_epoch_when_not_a_terminal(tmp_path, cache_dir, monkeypatch):
    from typer.testing import CliRunner

    from stn_align.cli import app

    monkeypatch.setenv("STN_ALIGN_CACHE", str(cache_dir))
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(app, ["reproduce", "mnist-rot", "--data", str(MNIST_GZ), "--networks", "CNN",
                                      "--seeds", "1", "--iterations", "2", "--limit", "64", "--test-limit", "50",
                                      "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if "CNN seed 0 epoch 2 (step 2/2)" in ln]
    assert len(lines) == 1 and "test error" in lines[0]  # a redirected log can be grepped


def test_cli_reproduce_unknown_protocol_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from stn_align.cli import app

    result = CliRunner().invoke(app, ["reproduce", "mnist-rot", "--protocol", "fast", "--data", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown protocol 'fast'" in result.output and len(result.output.strip().splitlines()) == 1
