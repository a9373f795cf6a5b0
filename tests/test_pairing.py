"""Pairing the way catalogues are organised: one reference per product folder, a pairs CSV, case-insensitive
names. Real files; the CLI in process."""

from __future__ import annotations

from typer.testing import CliRunner

from stn_align.cli import app
from stn_align.io import write_image
from stn_align.manifest import MANIFEST_NAME

from conftest import SHIFT, base_image, corner_error, jsonl, shifted


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_one_reference_per_product_folder(tmp_path, model_file):
    src = tmp_path / "skus"
    for sku, seed in (("sku1", 0), ("sku2", 1)):
        ref_image = base_image(seed)
        write_image(src / sku / "REF.jpg", ref_image)
        for view in ("front", "back"):
            write_image(src / sku / f"{view}.jpg", shifted(ref_image))
    write_image(src / "sku3" / "front.jpg", base_image(2))  # no reference there
    out = tmp_path / "out"
    common = ("--model", model_file, "--device", "cpu")
    result = invoke("batch", src, "-o", out, "--ref-in-folder", "ref.*", "--ignore-case", *common)
    assert result.exit_code == 1, result.output
    records = {r["input"]: r for r in jsonl(out / MANIFEST_NAME)}
    assert sorted(records) == ["sku1/back.jpg", "sku1/front.jpg", "sku2/back.jpg", "sku2/front.jpg", "sku3/front.jpg"]
    assert records["sku2/front.jpg"]["reference"] == "sku2/REF.jpg"
    assert all(corner_error(records[k]["matrix"], SHIFT) < 1.0 for k in records if k.startswith(("sku1", "sku2")))
    assert "no reference matching 'ref.*'" in records["sku3/front.jpg"]["error"]
    assert not (out / "sku1" / "REF.jpg").exists()  # the references are not aligned
    case = invoke("batch", src, "-o", tmp_path / "out2", "--ref-in-folder", "ref.*", *common)
    assert "no reference matching" in case.stderr  # without --ignore-case, REF.jpg does not match


def test_pairs_csv(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0)
    write_image(src / "a.png", shifted(ref_image))
    write_image(src / "b.png", shifted(ref_image))
    write_image(src / "not_listed.png", shifted(ref_image))
    write_image(tmp_path / "refs" / "r.png", ref_image)
    csv = tmp_path / "pairs.csv"
    csv.write_text("input,reference\na.png,refs/r.png\nb.png,refs/r.png\n")
    out = tmp_path / "out"
    result = invoke("batch", src, "-o", out, "--pairs", csv, "--model", model_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(r["input"] for r in jsonl(out / MANIFEST_NAME)) == ["a.png", "b.png"]
    csv.write_text("a.png\n")
    bad = invoke("batch", src, "-o", out, "--pairs", csv, "--model", model_file, "--device", "cpu")
    assert bad.exit_code == 2 and "row 1" in bad.stderr


def test_ref_dir_ignore_case(tmp_path, model_file):
    src, refs = tmp_path / "in", tmp_path / "refs"
    ref_image = base_image(0)
    write_image(src / "Shot.PNG", shifted(ref_image))
    write_image(refs / "shot.png", ref_image)
    common = ("--ref-dir", refs, "--model", model_file, "--device", "cpu")
    assert invoke("batch", src, "-o", tmp_path / "o1", *common).exit_code == 1
    assert invoke("batch", src, "-o", tmp_path / "o2", *common, "--ignore-case").exit_code == 0
