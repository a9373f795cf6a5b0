"""The daily work around an alignment: suspects listed and gathered, model cards, the Python API's
conveniences. Real files; the CLI in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import stn_align
from stn_align.align import Aligner
from stn_align.batch import SUSPECTS_NAME
from stn_align.cli import app
from stn_align.io import write_image

from conftest import SHIFT, base_image, corner_error, shifted


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_suspects_are_listed_gathered_and_warned_about(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0)
    write_image(src / "good.png", shifted(ref_image))
    for i in (3, 4, 5, 6):
        write_image(src / "other" / f"p{i}.png", base_image(i))  # other products: suspect
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    out, review = tmp_path / "out", tmp_path / "review"
    common = ("--ref", ref, "--model", model_file, "--device", "cpu", "--fallback", "none")
    result = invoke("batch", src, "-o", out, *common, "--suspect-dir", review)
    assert result.exit_code == 0, result.output
    listed = (out / SUSPECTS_NAME).read_text().splitlines()
    assert listed == [f"other/p{i}.png" for i in (3, 4, 5, 6)]
    assert sorted(p.relative_to(review).as_posix() for p in review.rglob("*.png")) == listed
    assert (review / "other/p3.png").read_bytes() == (out / "other/p3.png").read_bytes()
    assert "4 of 5 alignments are suspect: is --ref the right image?" in result.stderr
    # the job changes: a pair is no longer suspect; its copy leaves the review folder, the user's files stay
    (review / "mine.txt").write_text("my notes")
    write_image(src / "other" / "p3.png", shifted(ref_image))
    result = invoke("batch", src, "-o", out, *common, "--suspect-dir", review)
    assert result.exit_code == 0, result.output
    assert (out / SUSPECTS_NAME).read_text().splitlines() == [f"other/p{i}.png" for i in (4, 5, 6)]
    assert not (review / "other/p3.png").exists() and (review / "mine.txt").read_text() == "my notes"
    assert invoke("batch", src, "-o", out, *common, "--suspect-dir", out).exit_code == 2


def test_models_prints_a_checkpoint_card(model_file):
    result = invoke("models", model_file)
    assert result.exit_code == 0, result.output
    assert "projective" in result.stdout and "(verified)" in result.stdout and str(model_file) in result.stdout
    shipped = invoke("models", "default")
    assert shipped.exit_code == 0 and "default.md" in shipped.stdout
    missing = invoke("models", "nope.safetensors")
    assert missing.exit_code == 1 and "no such checkpoint file" in missing.stderr


def test_api_takes_paths_and_broadcasts_one_reference(tmp_path, model_file):
    ref_image = base_image(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"in{i}.png")
        write_image(paths[-1], shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    aligner = Aligner.load(model_file, "cpu")
    matrices = aligner.estimate(paths, ref)
    assert matrices.shape == (3, 3, 3)
    results = aligner.align_batch([str(p) for p in paths], str(ref))
    assert len(results) == 3 and all(corner_error(r.matrix, SHIFT) < 1.0 for r in results)
    pil = aligner.align_batch([Image.open(paths[0])], Image.open(ref))[0]
    assert np.allclose(pil.matrix, results[0].matrix)


def test_short_repr_and_typed_package(model_file):
    text = repr(Aligner.load(model_file, "cpu"))
    assert text.startswith("Aligner(name='tiny'") and len(text) < 300
    assert (Path(stn_align.__file__).parent / "py.typed").is_file()


def test_memory_budget_bounds_the_pairs_in_flight(tmp_path, model_file):
    """Chunks are cut by estimated bytes (from the headers), not only by count; one pair always runs."""
    from stn_align.batch import BYTES_PER_PIXEL, align_directory, pair_bytes, plan_pairs

    src = tmp_path / "in"
    ref_image = base_image(0)
    for i in range(5):
        write_image(src / f"{i}.png", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    pairs, _ = plan_pairs(src, tmp_path / "x", ref=ref)
    assert pair_bytes(pairs[0], shared_reference=True) == BYTES_PER_PIXEL * 160 * 120
    assert pair_bytes(pairs[0], shared_reference=False) == 2 * BYTES_PER_PIXEL * 160 * 120
    results = {}
    for budget in (10**9, 1, 3 * BYTES_PER_PIXEL * 160 * 120):
        aligner = Aligner.load(model_file, "cpu")
        sizes, estimate = [], aligner.estimate
        aligner.estimate = lambda a, b, _e=estimate, _s=sizes: (_s.append(len(a)), _e(a, b))[1]
        out = tmp_path / f"out{budget}"
        summary = align_directory(aligner, src, out, ref=ref, batch_size=4, workers=1, memory_budget=budget)
        assert summary.aligned == 5
        results[budget] = sizes
    assert results[10**9] == [4, 1] and results[1] == [1, 1, 1, 1, 1] and max(results[3 * BYTES_PER_PIXEL * 160 * 120]) <= 3
