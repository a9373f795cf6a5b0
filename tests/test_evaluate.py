"""Tests for stn-align eval: pair sets, metrics, baselines, previews and the CLI command."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stn_align import baselines
from stn_align.checkpoint import save_model
from stn_align.cli import app
from stn_align.align import Aligner
from stn_align.evaluate import (Pair, PairResult, Synthetic, load_pair_set, model_methods, pair_error, roc_auc, run,
                                save_pair_set, summarize, synthetic_pairs)
from stn_align.geometry import corner_error
from stn_align.io import read_image, write_image
from stn_align.model import AlignerNet, ModelConfig
from stn_align.preview import GAP, LABEL_H, TILE, TITLE_H, make_sheet

torch.set_num_threads(1)
cv2.setNumThreads(1)
SHEET_SHAPE = (TITLE_H + LABEL_H + TILE + GAP, 5 * TILE + 6 * GAP, 3)


def textured(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = sum(cv2.GaussianBlur(rng.normal(size=(h, w, 3)).astype(np.float32), (0, 0), s) * s for s in (2, 5, 12))
    return ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "identity.safetensors"
    save_model(path, AlignerNet(ModelConfig(transform="projective")), {})
    return path


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(3):
        write_image(root / f"photo{i}.png", textured(200, 240, i))
    return root


@pytest.fixture(scope="module")
def pair_set(tmp_path_factory) -> Path:
    photos = [textured(200, 240, i) for i in range(3)]
    pairs = synthetic_pairs(photos, 4, Synthetic("crop", (96, 96), "projective", 0.1, photometric=False), seed=3)
    root = tmp_path_factory.mktemp("pairs")
    save_pair_set(pairs, root)
    return root


def invoke(*args: str):
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return result


def test_eval_on_a_pair_set_reports_the_ground_truth_error(identity_model, pair_set, tmp_path):
    out = tmp_path / "eval.json"
    result = invoke(str(pair_set), "--model", str(identity_model), "--refine", "none", "--baselines", "identity",
                    "--json", str(out), "--device", "cpu")
    for text in ("identity+none", "identity", "mean px", "<3px"):
        assert text in result.output
    report = json.loads(out.read_text())
    truth = {r["name"]: np.array(r["matrix"]) for r in map(json.loads, (pair_set / "gt.jsonl").read_text().splitlines())}
    expected = {name: corner_error(np.eye(3), m, (96, 96)) for name, m in truth.items()}
    for method in ("identity", "identity+none"):  # the fresh network is exactly the identity
        rows = report["pairs"][method]
        assert {r["name"] for r in rows} == set(expected)
        for r in rows:
            assert r["error"] == pytest.approx(expected[r["name"]], abs=1e-3)
            assert not r["failed"]
        summary = report["summary"][method]
        assert summary["pairs"] == 4 and summary["failures"] == 0
        assert summary["mean_px"] == pytest.approx(np.mean(list(expected.values())), abs=1e-3)
        assert 0 <= report["pairs"]["identity+none"][0]["score"] <= 1


def test_eval_synthetic_save_pairs_and_preview(identity_model, photos_dir, tmp_path):
    saved, previews = tmp_path / "saved", tmp_path / "previews"
    invoke(str(photos_dir), "--synthetic", "--n", "3", "--size", "80x64", "--seed", "1", "--model", str(identity_model),
           "--refine", "ecc", "--baselines", "", "--save-pairs", str(saved), "--preview", str(previews),
           "--preview-n", "1", "--device", "cpu")
    names = [json.loads(line)["name"] for line in (saved / "gt.jsonl").read_text().splitlines()]
    assert len(names) == 3
    assert sorted(p.name for p in (saved / "inputs").iterdir()) == sorted(names)
    assert sorted(p.name for p in (saved / "refs").iterdir()) == sorted(names)
    pairs = load_pair_set(saved)
    assert pairs[0].input.shape == (64, 80, 3) and pairs[0].matrix.shape == (3, 3)
    sheets = sorted(previews.iterdir())
    assert [p.name.split("_")[0] for p in sheets] == ["random", "worst"]
    for sheet in sheets:
        assert read_image(sheet).shape == SHEET_SHAPE


def test_eval_errors_are_one_line(tmp_path, identity_model):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--model", str(identity_model), "--device", "cpu"])
    assert result.exit_code != 0 and "not a pair set" in result.output
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--baselines", "surf"])
    assert result.exit_code == 2 and "unknown baseline" in result.output


def test_failures_count_with_the_identity_error_and_as_misses():
    truth = np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1]], np.float64)  # identity is 0.5 px off
    pair = Pair("p", np.zeros((50, 60, 3), np.uint8), np.zeros((50, 60, 3), np.uint8), truth)
    assert pair_error(None, pair) == (pytest.approx(0.5), True)
    assert pair_error(np.full((3, 3), np.nan), pair)[1]
    huge = np.array([[1e9, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    assert pair_error(huge, pair) == (pytest.approx(np.hypot(60, 50)), False)  # capped at the diagonal
    rows = [PairResult("a", "", 0.5, True, 0.1), PairResult("b", "", 0.2, False, 0.3)]
    s = summarize(rows)
    assert s["failures"] == 1 and s["under_1px"] == 0.5 and s["mean_px"] == pytest.approx(0.35)


def test_roc_auc():
    assert roc_auc([0.9, 0.8, 0.1], [1, 2, 20]) == 1.0
    assert roc_auc([0.1, 0.8, 0.9], [1, 2, 20]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 20]) == 0.5  # ties count half
    assert roc_auc([0.5, 0.5], [1, 2]) is None  # no bad pairs


def test_baselines_recover_a_known_motion():
    image_in = textured(160, 200, 7)
    truth = np.array([[1.02, 0.03, 4.0], [-0.02, 0.99, -3.0], [0, 0, 1]], np.float64)
    image_ref = cv2.warpPerspective(image_in, truth, (200, 160), borderMode=cv2.BORDER_REFLECT)
    for name in ("sift", "ecc"):
        for transform in ("projective", "affine"):
            m = baselines.get(name)(image_in, image_ref, transform)
            assert m is not None and corner_error(m, truth, (200, 160)) < 1.0, (name, transform)
    assert baselines.orb(image_in, image_ref) is None or baselines.orb(image_in, image_ref).shape == (3, 3)
    assert baselines.sift(np.full((64, 64, 3), 255, np.uint8), np.full((64, 64, 3), 255, np.uint8)) is None
    assert np.array_equal(baselines.identity(image_in, image_ref), np.eye(3))


@pytest.mark.parametrize("transform", ["projective", "affine"])
def test_sift_on_shrunk_copies_returns_full_resolution_matrices(transform):
    big_in = cv2.resize(textured(160, 200, 7), (600, 480), interpolation=cv2.INTER_CUBIC)
    truth = np.array([[0.98, 0.05, 12.0], [-0.04, 1.01, -9.0], [0, 0, 1]], np.float64)
    big_ref = cv2.warpPerspective(big_in, truth, (600, 480), borderMode=cv2.BORDER_REFLECT)
    m = baselines.sift(big_in, big_ref, transform, max_side=300)
    assert m is not None and corner_error(m, truth, (600, 480)) < 2.0
    if transform == "affine":
        assert np.array_equal(m[2], [0, 0, 1])


class IdentityNet(torch.nn.Module):
    """Stand-in for AlignerNet (same call surface) that always predicts the identity."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(transform="projective", size=64)

    def forward(self, image_in, image_ref, iterations=None, initial=None):
        return [torch.eye(3).expand(image_in.shape[0], 3, 3)] * (iterations or 1)


def test_model_methods_with_the_safety_net_report_method_and_firing():
    """The +ecc+fallback variant records the winning path and whether the net fired; the others have no net."""
    image = textured(120, 160, 4)
    half_turn = np.array([[-1.0, 0, 159], [0, -1, 119], [0, 0, 1]])
    turned = Pair("turned", image, cv2.warpPerspective(image, half_turn, (160, 120)), half_turn)
    shift = np.array([[1.0, 0, 2], [0, 1, -1], [0, 0, 1]])
    shifted = Pair("shifted", image, cv2.warpPerspective(image, shift, (160, 120), borderMode=cv2.BORDER_REFLECT), shift)
    aligner = Aligner(model=IdentityNet(), device=torch.device("cpu"), name="fake")
    methods = model_methods(aligner, ("none", "ecc"), fallbacks=("none", "features"))
    assert [m.name for m in methods] == ["fake+none", "fake+ecc", "fake+none+fallback", "fake+ecc+fallback"]
    results = run([shifted, turned], methods, warmup=False)
    net = results["fake+ecc+fallback"]
    assert [r.fired for r in net] == [False, True] and net[0].method == "network+ecc"
    assert net[1].method.split("+")[0] in ("rotated", "features") and net[1].error < 1.0
    assert results["fake+ecc"][1].fired is None and results["fake+ecc"][1].error > 50  # no net: stays wrong
    assert aligner.refine == "ecc" and aligner.fallback == "features"  # the variants restore the aligner's options
    summary = summarize(net)["safety_net"]
    assert summary["fired"] == 0.5 and summary["fallback_won"] == 0.5
    assert summary["seconds_fired"] == net[1].seconds and summary["seconds_not_fired"] == net[0].seconds
    assert sum(summary["methods"].values()) == 2 and "safety_net" not in summarize(results["fake+ecc"])


def test_make_sheet_layout():
    sheet = make_sheet(textured(100, 150, 1), np.dstack([textured(120, 90, 2), np.full((120, 90), 255, np.uint8)]),
                       textured(120, 90, 3)[..., 0], title="a title")
    assert sheet.shape == SHEET_SHAPE and sheet.dtype == np.uint8


def test_the_examples_folder_is_a_pair_set():
    root = Path(__file__).resolve().parents[1] / "examples"
    if not (root / "ground_truth.json").is_file():
        pytest.skip("no examples/ground_truth.json")
    pairs = load_pair_set(root)
    assert len(pairs) == 3 and all(p.matrix.shape == (3, 3) and p.matrix[2, 2] == 1 for p in pairs)
    assert pairs[0].reference.shape[:2] == (256, 384)


# --- eval --fallback / --min-score and benchmark setting r (issue #17) -----------------------------------

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "hpatches6"


@pytest.fixture(scope="module")
def turned_pair_set(tmp_path_factory) -> Path:
    """One pair the identity network gets badly wrong (the reference is the input turned half round)."""
    image = textured(120, 160, 4)
    half_turn = np.array([[-1.0, 0, 159], [0, -1, 119], [0, 0, 1]])
    root = tmp_path_factory.mktemp("turned")
    save_pair_set([Pair("turned.png", image, cv2.warpPerspective(image, half_turn, (160, 120)), half_turn)], root)
    return root


def test_eval_fallback_none_vs_features_differ_in_what_runs(model_file, turned_pair_set, tmp_path):
    common = [str(turned_pair_set), "--model", str(model_file), "--refine", "none", "--baselines", "", "--device", "cpu"]
    off, on = tmp_path / "none.json", tmp_path / "features.json"
    result = invoke(*common, "--fallback", "none", "--json", str(off))
    assert "safety net" not in result.output and "--fallback none" in result.output
    report = json.loads(off.read_text())
    assert list(report["pairs"]) == ["tiny+none"] and report["fallback"] == "none"
    assert report["pairs"]["tiny+none"][0]["fired"] is None and report["pairs"]["tiny+none"][0]["error"] > 50

    result = invoke(*common, "--json", str(on))  # the default: --fallback features --min-score 0.75, as batch
    assert "safety net of tiny+none+fallback" in result.output and "fired on 1/1" in result.output
    report = json.loads(on.read_text())
    assert report["fallback"] == "features" and report["min_score"] == 0.75
    assert list(report["pairs"]) == ["tiny+none", "tiny+none+fallback"]  # without the net, then what batch runs
    net = report["pairs"]["tiny+none+fallback"][0]
    assert net["fired"] is True and net["method"].split("+")[0] in ("rotated", "features") and net["error"] < 3
    assert report["summary"]["tiny+none+fallback"]["safety_net"]["fired"] == 1.0
    assert report["pairs"]["tiny+none"][0]["error"] > 50  # the row without the net is unchanged

    invoke(*common, "--min-score", "0", "--json", str(on))  # nothing scores below 0: the net never fires
    net = json.loads(on.read_text())["pairs"]["tiny+none+fallback"][0]
    assert net["fired"] is False and net["method"] == "network" and net["error"] > 50


@pytest.mark.parametrize("extra", [["--min-score", "1.5"], ["--min-score", "-0.1"], ["--fallback", "sift"]])
def test_eval_min_score_and_fallback_are_checked(tmp_path, extra):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), *extra])
    assert result.exit_code == 2, result.output
    assert extra[0] in result.output


def _benchmark_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("stn_align_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_setting_r_loads_the_real_pairs(model_file, tmp_path, capsys):
    bench = _benchmark_module()
    assert bench.real_pairs(tmp_path / "missing") is None and "setting r skipped" in capsys.readouterr().err
    if not (REAL / "gt.jsonl").is_file():
        pytest.skip(f"no real pair set at {REAL}")
    assert bench.REAL == REAL  # the default --real
    pairs = bench.real_pairs(REAL)
    expected = load_pair_set(REAL)
    assert [p.name for p in pairs] == [p.name for p in expected] and {p.group for p in pairs} == {"r"}
    assert all(np.array_equal(a.matrix, b.matrix) and np.array_equal(a.input, b.input) for a, b in zip(pairs, expected))

    out = tmp_path / "bench.md"
    assert bench.main(["--models", f"tiny={model_file}", "--settings", "r", "--baselines", "identity",
                       "--out", str(out), "--device", "cpu"]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert list(raw["summary"]) == ["r"] and "hpatches6" in raw["info"]["settings"]["r"]
    rows = raw["summary"]["r"]
    assert set(rows) == {"tiny+none", "tiny+ecc", "tiny+ecc+fallback", "identity"}
    assert all(s["pairs"] == len(expected) for s in rows.values())
    assert raw["safety_net"]["tiny"]["r"]["pairs"] == len(expected)
    report = out.read_text()
    assert "| method | (r) |" in report and "| (r) |" in report and f"## (r) real pairs: all {len(expected)} of hpatches6" in report


def test_eval_plots_and_threshold_suggestion(tmp_path, model_file):
    """--plots writes the error CDF and score-against-error figures and suggests a --min-score."""
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from stn_align.cli import app
    from stn_align.evaluate import suggest_threshold

    from conftest import base_image

    photos = tmp_path / "photos"
    for i in range(3):
        write_image(photos / f"p{i}.jpg", base_image(i, (320, 240)))
    result = CliRunner().invoke(app, ["eval", str(photos), "--synthetic", "--n", "6", "--model", str(model_file),
                                      "--device", "cpu", "--baselines", "identity", "--size", "64",
                                      "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    for name in ("errors_cdf.png", "score_vs_error.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert "suggested --min-score" in result.stdout or "threshold: no suggestion" in result.stdout
    best = suggest_threshold(np.array([0.9, 0.8, 0.3, 0.2]), np.array([0.5, 1.0, 20.0, 30.0]))
    assert best["bad_flagged"] == 1.0 and best["good_flagged"] == 0.0 and 0.3 < best["min_score"] <= 0.8
