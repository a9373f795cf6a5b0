"""Output fidelity: metadata kept, format and quality chosen, shrinking warps antialiased, alpha respected,
the canvas chosen. Real files; the CLI in process."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageCms
from typer.testing import CliRunner

from stn_align.align import warp_image
from stn_align.canvas import largest_rectangle, output_canvas
from stn_align.cli import app
from stn_align.io import read_image, read_info, write_image
from stn_align.manifest import MANIFEST_NAME

from conftest import base_image, jsonl, shifted


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_jpeg(path, image, orientation=1):
    exif = Image.Exif()
    exif[0x013B] = "Ana Photographer"  # Artist
    exif[0x8298] = "(c) Shop"  # Copyright
    exif[0x0110] = "Camera X"  # Model
    exif[0x0112] = orientation
    Image.fromarray(image).save(path, "JPEG", quality=95, exif=exif.tobytes(), icc_profile=SRGB, dpi=(300, 300))
    return path


def test_icc_exif_and_dpi_are_kept_orientation_normalised(tmp_path, model_file):
    src = tmp_path / "in"
    src.mkdir()
    ref_image = base_image(0)
    camera_jpeg(src / "a.jpg", np.ascontiguousarray(np.rot90(shifted(ref_image), 1)), orientation=6)  # stored turned
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    result = invoke("batch", src, "-o", tmp_path / "out", "--ref", ref, "--model", model_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "a.jpg") as im:
        exif = im.getexif()
        assert im.info.get("icc_profile") == SRGB
        assert exif.get(0x013B) == "Ana Photographer" and exif.get(0x8298) == "(c) Shop" and exif.get(0x0110) == "Camera X"
        assert exif.get(0x0112, 1) == 1  # the turn is in the pixels now
        assert tuple(round(v) for v in im.info["dpi"]) == (300, 300)
        assert im.size == (160, 120)


def test_cmyk_is_converted_to_srgb_and_tagged(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(base_image(0)).convert("CMYK").save(path, "JPEG", quality=95)
    assert read_image(path).shape == (120, 160, 3)
    profile = ImageCms.ImageCmsProfile(io.BytesIO(read_info(path)["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


def test_format_and_quality(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0, (320, 240))
    write_image(src / "a.jpg", shifted(ref_image))
    write_image(src / "b.png", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    common = ("--ref", ref, "--model", model_file, "--device", "cpu", "--refine", "none")
    result = invoke("batch", src, "-o", tmp_path / "webp", "--format", "webp", "--quality", "40", *common)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "webp").glob("*.webp")) == ["a.webp", "b.webp"]
    low = (tmp_path / "webp" / "a.webp").stat().st_size
    assert invoke("batch", src, "-o", tmp_path / "webp", "--format", "webp", "--quality", "95", *common).exit_code == 0
    assert (tmp_path / "webp" / "a.webp").stat().st_size > low  # quality changed: redone, larger
    write_image(src / "a.png", shifted(ref_image))  # a.jpg and a.png would both be a.webp
    clash = invoke("batch", src, "-o", tmp_path / "webp2", "--format", "webp", *common)
    assert clash.exit_code == 1 and "would also be" in clash.stderr
    bad = invoke("batch", src, "-o", tmp_path / "x", "--format", "gif", *common)
    assert bad.exit_code == 2 and "--format" in bad.stderr


def test_shrinking_warp_is_antialiased():
    """A fine weave (2-px stripes) shrunk 8x must come out a flat grey, not moire."""
    x = np.arange(4800)
    weave = np.where(((x[None, :] // 2) + (np.arange(3200)[:, None] // 2)) % 2, 255, 0).astype(np.uint8)
    weave = np.repeat(weave[..., None], 3, axis=2)
    scale = np.array([[0.1237, 0, 0], [0, 0.1237, 0], [0, 0, 1.0]])
    for interpolation in ("linear", "cubic", "area", "lanczos"):
        out = warp_image(weave, scale, (590, 390), interpolation=interpolation)
        assert out.shape == (390, 590, 3)
        inside = out[20:-20, 20:-20]
        assert inside.std() < 8 and abs(inside.mean() - 127.5) < 5, (interpolation, inside.std(), inside.mean())
    plain = cv2.warpPerspective(weave, scale, (590, 390), flags=cv2.INTER_LINEAR)
    assert plain[20:-20, 20:-20].std() > 30  # what it looked like before: strong aliasing


def test_transparent_cut_out_stays_transparent(tmp_path, model_file):
    cut = np.zeros((120, 160, 4), np.uint8)
    cut[..., :3] = base_image(0)
    cut[30:90, 40:120, 3] = 255  # the product; transparent around it
    src = tmp_path / "in"
    write_image(src / "a.png", shifted(cut))
    ref = tmp_path / "ref.png"
    write_image(ref, cut)
    result = invoke("batch", src, "-o", tmp_path / "out", "--ref", ref, "--model", model_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = read_image(tmp_path / "out" / "a.png")
    assert out.shape[2] == 4 and out[0, :, 3].max() == 0 and out[:, -1, 3].max() == 0  # no opaque wedges


def test_largest_rectangle():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:8, 3:11] = 1
    mask[5, 6] = 0
    x0, y0, x1, y1 = largest_rectangle(mask)
    assert (x1 - x0) * (y1 - y0) == max(8 * 3, 4 * 6, 3 * 6)  # around the hole
    assert mask[y0:y1, x0:x1].all()


def test_canvas_geometry():
    rotate = cv2.getRotationMatrix2D((79.5, 59.5), 20, 1.0)
    m = np.r_[rotate, [[0, 0, 1]]]
    c, size = output_canvas(m, (160, 120), (160, 120), "union")
    corners = cv2.perspectiveTransform(np.float64([[[0, 0]], [[159, 0]], [[159, 119]], [[0, 119]]]), c @ m)
    assert size[0] > 160 and size[1] > 120 and corners.min() >= -1e-6 and (corners.max(0) <= np.array(size) - 1 + 1e-6).all()
    c, size = output_canvas(m, (640, 480), (160, 120), "input")
    assert size == (640, 480)
    c, size = output_canvas(m, (160, 120), (160, 120), "reference", "common")
    covered = cv2.warpPerspective(np.full((120, 160), 255, np.uint8), c @ m, size, flags=cv2.INTER_NEAREST)
    assert size[0] * size[1] > 0.4 * 160 * 120 and covered.min() == 255  # every pixel comes from the input


def test_canvas_and_crop_from_the_cli(tmp_path, model_file):
    src = tmp_path / "in"
    ref_image = base_image(0)
    write_image(src / "a.png", shifted(ref_image))
    ref = tmp_path / "ref.png"
    write_image(ref, ref_image)
    common = ("--ref", ref, "--model", model_file, "--device", "cpu", "--fill", "black")
    result = invoke("batch", src, "-o", tmp_path / "u", "--canvas", "union", *common)
    assert result.exit_code == 0, result.output
    record = jsonl(tmp_path / "u" / MANIFEST_NAME)[0]
    out = read_image(tmp_path / "u" / "a.png")
    expected = cv2.warpPerspective(read_image(src / "a.png"), np.array(record["output_matrix"]), (out.shape[1], out.shape[0]))
    assert np.abs(expected.astype(int) - out.astype(int)).max() <= 1
    assert out.shape[1] >= 160 and out.shape[0] >= 120
    result = invoke("batch", src, "-o", tmp_path / "c", "--crop", "common", *common)
    assert result.exit_code == 0, result.output
    cropped = read_image(tmp_path / "c" / "a.png")
    assert cropped.shape[0] < 120 and cropped.shape[1] < 160 and cropped.shape[0] > 100
    assert cropped.reshape(-1, 3).sum(1).min() > 0  # no black fill left in the crop
