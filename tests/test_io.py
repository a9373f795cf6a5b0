"""Tests for stn_align.io: reading/writing photos, error reporting, listing."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from stn_align import io as sio
from stn_align.io import ImageError, list_images, read_image, write_image

RNG = np.random.default_rng(1234)


def rand(shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth colour image (JPEG/WebP-friendly), (h, w, 3) uint8."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1)
    return np.rint(img * 255).astype(np.uint8)


def assert_one_line_error(excinfo: pytest.ExceptionInfo, path: Path, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert excinfo.value.path == str(path)
    reason = excinfo.value.reason
    assert reason and reason[0] == reason[0].lower()
    for n in needles:
        assert n in msg, msg


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def insert_png_exif(data: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk with the given orientation right after IHDR."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body
    return data[:33] + png_chunk(b"eXIf", body) + data[33:]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".bmp", ".webp"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_lossless_round_trip_uint8(tmp_path: Path, suffix: str, channels: int) -> None:
    img = rand((9, 13, channels))
    path = tmp_path / f"img{suffix}"
    write_image(path, img, quality=100)  # WebP: quality 100 = lossless
    out = read_image(path)
    assert out.dtype == np.uint8
    if suffix == ".bmp" and channels == 4:  # BMP drops alpha by compositing onto white
        assert out.shape == (9, 13, 3)
        a = img[:, :, 3:].astype(np.float32) / 255
        expected = np.rint(img[:, :, :3] * a + 255 * (1 - a)).astype(np.uint8)
        np.testing.assert_array_equal(out, expected)
    elif suffix == ".webp" and channels == 1:  # WebP has no gray mode: comes back RGB
        assert out.shape == (9, 13, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], img[:, :, 0])
    else:
        np.testing.assert_array_equal(out, img)


def test_two_dimensional_input_is_gray(tmp_path: Path) -> None:
    img = rand((5, 6))
    write_image(tmp_path / "g.png", img)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (5, 6, 1)
    np.testing.assert_array_equal(out[:, :, 0], img)


def test_jpeg_round_trip_is_close(tmp_path: Path) -> None:
    img = smooth_rgb()
    write_image(tmp_path / "a.jpg", img, quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 2.0


def test_lossy_webp_round_trip_is_close(tmp_path: Path) -> None:
    img = smooth_rgb()
    write_image(tmp_path / "a.webp", img, quality=90)
    out = read_image(tmp_path / "a.webp")
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() < 4.0


def test_jpeg_drops_alpha_onto_white_and_16_bit_to_8(tmp_path: Path) -> None:
    img = np.zeros((16, 16, 4), np.uint16)
    img[..., 0] = 65535  # red, fully transparent on the left, opaque on the right
    img[:, 8:, 3] = 65535
    write_image(tmp_path / "a.JPEG", img)
    out = read_image(tmp_path / "a.JPEG")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.all(np.abs(out[4:12, 1:5].astype(int) - 255) <= 3)  # white
    assert np.all(np.abs(out[4:12, 11:15].astype(int) - [255, 0, 0]) <= 3)  # red


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_round_trip_is_exact(tmp_path: Path, suffix: str, channels: int) -> None:
    img = rand((7, 11, channels), np.uint16)
    path = tmp_path / f"deep{suffix}"
    write_image(path, img)
    out = read_image(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16_bit_rgb_written_by_opencv_reads_exactly(tmp_path: Path, ext: str) -> None:
    rgb = rand((6, 10, 3), np.uint16)
    src = tmp_path / f"cv{ext}"
    assert cv2.imwrite(str(src), rgb[:, :, ::-1])  # OpenCV stores BGR
    out = read_image(src)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, rgb)
    dst = tmp_path / f"again{ext}"
    write_image(dst, out)
    np.testing.assert_array_equal(cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)[:, :, ::-1], rgb)
    np.testing.assert_array_equal(read_image(dst), rgb)


def test_16_bit_gray_alpha_png_becomes_16_bit_rgba(tmp_path: Path) -> None:
    la = rand((4, 6, 2), np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in la)
    ihdr = struct.pack(">IIBBBBB", 6, 4, 16, 4, 0, 0, 0)  # 16-bit gray + alpha
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
    (tmp_path / "la.png").write_bytes(data)
    out = read_image(tmp_path / "la.png")
    assert out.shape == (4, 6, 4) and out.dtype == np.uint16
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], la[:, :, 0])
    np.testing.assert_array_equal(out[:, :, 3], la[:, :, 1])


def test_palette_and_bilevel_and_cmyk_modes(tmp_path: Path) -> None:
    rgb = smooth_rgb(8, 10)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    p = Image.fromarray(rgb).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    Image.fromarray(rgb).convert("1").save(tmp_path / "b.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(rgb[:, :, 0]).convert("LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "p.png").shape == (8, 10, 3)
    assert read_image(tmp_path / "pt.png").shape == (8, 10, 4)
    assert read_image(tmp_path / "b.png").shape == (8, 10, 1)
    c = read_image(tmp_path / "c.jpg")
    assert c.shape == (8, 10, 3) and np.abs(c.astype(int) - rgb).mean() < 6
    la = read_image(tmp_path / "la.png")
    assert la.shape == (8, 10, 4)
    np.testing.assert_array_equal(la[:, :, 1], rgb[:, :, 0])


# --------------------------------------------------------------------------- orientation


def test_exif_orientation_6_rotates_jpeg(tmp_path: Path) -> None:
    img = np.zeros((40, 60, 3), np.uint8)  # stored landscape: 40 high, 60 wide
    img[:20, :30] = [255, 0, 0]  # red top-left block
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (60, 40, 3)  # portrait after rotation
    # top-left of the stored image ends up top-right after a clockwise turn
    assert out[5:25, 25:35, 0].mean() > 200 and out[5:25, 25:35, 1].mean() < 40
    assert out[5:25, 5:15, 0].mean() < 40


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pillow(orientation: int) -> None:
    img = rand((3, 5, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", exif=exif.tobytes())
    expected = np.array(ImageOps.exif_transpose(Image.open(buf)))
    np.testing.assert_array_equal(sio._apply_orientation(img, orientation), expected)


def test_exif_orientation_applied_on_16_bit_rgb_path(tmp_path: Path) -> None:
    rgb = rand((4, 6, 3), np.uint16)
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    (tmp_path / "o.png").write_bytes(insert_png_exif(buf.tobytes(), 6))
    out = read_image(tmp_path / "o.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))  # clockwise


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "z.png"
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "no such file")


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.png"
    path.mkdir()
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "is a directory")


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "y.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "empty file (0 bytes)")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_text("hello, I am not a picture\nsecond line\n")
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "not an image file")


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif", ".bmp"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    write_image(full, rand((64, 80, 3)))
    data = full.read_bytes()
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "truncated or corrupt image data")


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_truncated_16_bit_rgb(tmp_path: Path, ext: str) -> None:
    ok, buf = cv2.imencode(ext, rand((64, 80, 3), np.uint16))
    assert ok
    path = tmp_path / f"x{ext}"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "truncated or corrupt image data")


def test_decompression_bomb_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (10000, 10000), 7).save(path)  # 100 MP of one colour: a tiny file
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError) as ei:
        read_image(path, max_pixels=1_000_000)
    assert_one_line_error(ei, path, "10000x10000 (100.0 MP)", "1.0 MP limit", "--max-pixels")


def test_huge_header_over_pillows_own_limit_is_our_error(tmp_path: Path) -> None:
    """A PNG header claiming 50000x50000 (over Pillow's hard limit) gets our message."""
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    path = tmp_path / "claims_huge.png"
    path.write_bytes(data)
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line_error(ei, path, "50000x50000 (2500.0 MP)", "179.0 MP limit")
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # global restored


def test_max_pixels_above_pillow_limit_and_none(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    write_image(path, rand((10, 10, 1)))
    assert read_image(path, max_pixels=None).shape == (10, 10, 1)
    assert read_image(path, max_pixels=10**12).shape == (10, 10, 1)
    with pytest.raises(ImageError):
        read_image(path, max_pixels=99)
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores modes")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    write_image(path, rand((4, 4, 3)))
    path.chmod(0)
    try:
        with pytest.raises(ImageError) as ei:
            read_image(path)
        assert_one_line_error(ei, path, "permission denied")
    finally:
        path.chmod(0o644)


def test_image_error_pickles_and_is_single_line() -> None:
    import pickle

    err = ImageError("a.png", "bad\nthing")
    assert str(err) == "a.png: bad thing"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))


# --------------------------------------------------------------------------- writing


def test_unknown_output_suffix(tmp_path: Path) -> None:
    path = tmp_path / "out.gifx"
    with pytest.raises(ImageError) as ei:
        write_image(path, rand((4, 4, 3)))
    assert_one_line_error(ei, path, "unsupported output format", ".gifx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4), np.uint8)]
)
def test_bad_arrays_rejected(tmp_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(ImageError) as ei:
        write_image(tmp_path / "o.png", bad)
    assert_one_line_error(ei, tmp_path / "o.png", "cannot write an array")
    assert list(tmp_path.iterdir()) == []


def test_creates_parent_dirs_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.png"
    write_image(path, rand((4, 4, 3)))
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.png"]


def test_encoding_failure_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.webp"
    path.write_bytes(b"precious")
    wide = np.zeros((1, 17000, 3), np.uint8)  # over WebP's 16383-pixel limit
    with pytest.raises(ImageError) as ei:
        write_image(path, wide)
    assert_one_line_error(ei, path, "cannot encode as WEBP")
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.webp"]


def test_failed_replace_cleans_temp_and_keeps_existing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "keep.png"
    path.write_bytes(b"precious")

    def boom(src, dst):
        assert Path(src).exists() and Path(src).parent == tmp_path  # temp beside target
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(ImageError) as ei:
        write_image(path, rand((4, 4, 3)))
    assert_one_line_error(ei, path, "cannot write file", "No space left on device")
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_overwrite_replaces_content(tmp_path: Path) -> None:
    path = tmp_path / "o.png"
    write_image(path, rand((4, 4, 3)))
    img = rand((5, 3, 3))
    write_image(path, img)
    np.testing.assert_array_equal(read_image(path), img)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_write_onto_directory_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    path.mkdir()
    with pytest.raises(ImageError) as ei:
        write_image(path, rand((4, 4, 3)))
    assert_one_line_error(ei, path, "is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["d.png"]


# --------------------------------------------------------------------------- conversions


def test_float_conversions() -> None:
    a8 = np.array([[0, 1, 128, 255]], np.uint8)
    f = sio.to_float(a8)
    assert f.dtype == np.float32 and f.min() == 0.0 and f.max() == 1.0
    np.testing.assert_array_equal(sio.from_float(f, np.uint8), a8)
    a16 = rand((3, 4, 3), np.uint16)
    np.testing.assert_array_equal(sio.from_float(sio.to_float(a16), np.uint16), a16)
    clipped = sio.from_float(np.array([-0.5, 0.5, 1.5, np.nan], np.float32), np.uint8)
    np.testing.assert_array_equal(clipped, [0, 128, 255, 0])
    with pytest.raises(TypeError):
        sio.to_float(np.zeros(3, np.float32))
    with pytest.raises(TypeError):
        sio.from_float(np.zeros(3, np.float32), np.int32)


# --------------------------------------------------------------------------- listing


def test_is_image_file() -> None:
    assert sio.is_image_file("a/B.JPG")
    assert sio.is_image_file(Path("x.tiff"))
    assert not sio.is_image_file("a/.hidden.png")
    assert not sio.is_image_file("notes.txt")
    assert not sio.is_image_file("png")
    assert sio.IMAGE_EXTENSIONS == frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp"})


def test_list_images_order_recursion_hidden(tmp_path: Path) -> None:
    for rel in ["b.png", "a.JPG", "c.txt", ".hidden.png", "sub/z.png", "sub/deeper/y.tif",
                ".git/x.png", "a/m.webp", "dir.png/inside.bmp"]:
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    # sorted by path parts: a directory's contents stay together ("a/..." before "a.JPG")
    assert names == ["a/m.webp", "a.JPG", "b.png", "dir.png/inside.bmp", "sub/deeper/y.tif", "sub/z.png"]
    assert all(p.is_absolute() == tmp_path.is_absolute() for p in list_images(tmp_path))
    flat = [p.name for p in list_images(tmp_path, recursive=False)]
    assert flat == ["a.JPG", "b.png"]  # "dir.png" is a directory, not an image
    assert list_images(tmp_path / "sub" / "deeper") == [tmp_path / "sub" / "deeper" / "y.tif"]


def test_list_images_errors(tmp_path: Path) -> None:
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ImageError) as ei:
        list_images(f)
    assert_one_line_error(ei, f, "not a directory")
    with pytest.raises(ImageError) as ei:
        list_images(tmp_path / "nope")
    assert_one_line_error(ei, tmp_path / "nope", "no such directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores modes")
def test_list_images_unreadable_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.png").write_bytes(b"x")
    locked.chmod(0)
    try:
        with pytest.raises(ImageError) as ei:
            list_images(locked)
        assert_one_line_error(ei, locked, "permission denied")
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- import cost


def test_module_does_not_import_torch() -> None:
    code = "import sys, stn_align.io; assert 'torch' not in sys.modules; assert 'cv2' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_list_images_permission_error_mapping(tmp_path: Path, monkeypatch) -> None:
    """Same as the chmod test, but also runs as root: simulate the PermissionError."""
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    (tmp_path / "locked").mkdir()
    (tmp_path / "ok.png").write_bytes(b"x")
    monkeypatch.setattr(sio.os, "scandir", scandir)
    with pytest.raises(ImageError) as ei:
        list_images(tmp_path / "locked")
    assert_one_line_error(ei, tmp_path / "locked", "permission denied")
    with pytest.raises(ImageError) as ei:  # an unreadable sub-directory is reported too
        list_images(tmp_path)
    assert_one_line_error(ei, tmp_path / "locked", "permission denied")
