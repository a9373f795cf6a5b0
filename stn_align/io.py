"""Reading and writing users' photos as numpy arrays.

Arrays are ``(H, W, C)`` with ``C`` in {1, 3, 4} (gray, RGB, RGBA), dtype ``uint8`` or
``uint16``. Every failure to read or write a file is an :class:`ImageError` whose text is
one line, ``"PATH: reason"``. This module must not import torch (CLI start-up time).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "UNSUPPORTED_EXTENSIONS",
    "from_float",
    "is_image_file",
    "list_images",
    "read_image",
    "read_info",
    "to_float",
    "write_image",
]

#: Largest image (width x height) read_image decodes by default: Pillow's own hard limit,
#: 2 * ``Image.MAX_IMAGE_PIXELS`` = 178,956,970 pixels (about a 13,400 x 13,400 photo,
#: ~0.5 GB as 8-bit RGB). Larger files are refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 178_956_970

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp"}
)
#: Image formats a photo folder may hold that stn-align does not read; listings name them as skipped.
UNSUPPORTED_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys((".gif", ".apng"), "animated/palette format, convert to PNG"),
    **dict.fromkeys((".heic", ".heif", ".avif"), "HEIF/AVIF, convert to JPEG or PNG"),
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw", ".srw", ".pef"),
                    "camera RAW, develop to TIFF or JPEG first"),
    **dict.fromkeys((".psd", ".psb", ".svg", ".eps", ".pdf", ".jp2", ".jxl", ".exr", ".hdr"), "not a supported image format"),
}

_WRITE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jfif": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_ORIENTATION_TAG = 0x0112
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow's bomb limit is a process-wide global; we lower/raise it only under this lock.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageError(Exception):
    """A file that cannot be read or written as an image.

    ``str(err)`` is one line, ``'PATH: reason'``; attributes ``.path`` and ``.reason``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())  # always a single line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- reading


def read_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read an image file as ``(H, W, C)``, C in {1, 3, 4}, dtype uint8 or uint16.

    EXIF orientation is applied. 16-bit PNG/TIFF keep 16 bits. Palette images become RGB
    (RGBA if they have transparency), gray+alpha becomes RGBA, CMYK becomes RGB. The first
    frame of a multi-frame file is read. ``max_pixels=None`` disables the size limit.
    Raises :class:`ImageError` for anything that is not a complete, decodable image.
    """
    p = Path(path)
    _check_readable_file(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data"
            with _pillow_pixel_limit(None):  # header only; we check the size ourselves
                im = Image.open(p)
            with im:
                _check_size(p, im.size, max_pixels)
                raise_limit = max_pixels is None or max_pixels > _pillow_hard_limit()
                limit = _pillow_pixel_limit(max_pixels) if raise_limit else contextlib.nullcontext()
                with limit:
                    im.load()  # full decode: this is what detects truncated data
                if im.format == "JPEG":
                    damage = jpeg_damage(p)
                    if damage:
                        raise ImageError(p, f"corrupt JPEG data (libjpeg: {damage})")
                if _needs_opencv(p, im):
                    arr = _decode_opencv(p)
                    arr = _apply_orientation(arr, _orientation(im))
                else:
                    arr = _pil_to_array(p, _exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        if _has_image_signature(p):  # e.g. a TIFF cut before its directory
            raise ImageError(p, "truncated or corrupt image data") from e
        raise ImageError(p, "not an image file (cannot identify image format)") from e
    except PermissionError as e:
        raise ImageError(p, "permission denied") from e
    except Image.DecompressionBombError as e:  # only if a plugin checks again at decode time
        raise ImageError(p, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(p, "truncated or corrupt image data") from e
    return np.ascontiguousarray(arr)


_JPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid JPEG file structure")
_STDERR_LOCK = threading.Lock()


def jpeg_damage(path: str | os.PathLike[str]) -> str | None:
    """libjpeg's first corrupt-data warning for a JPEG file (e.g. ``bad Huffman code``), or None if it decodes cleanly.

    Pillow decodes damaged scans without a word (grey blocks, shifted colours); libjpeg warns. The file
    is decoded once more by OpenCV's libjpeg at 1/8 scale (the entropy decoding, where damage shows,
    in full; about 1/7 of a full decode), with the process's stderr captured meanwhile; other text
    written to stderr in that window is passed on.
    """
    import tempfile

    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        with contextlib.suppress(Exception):
            import sys

            sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            cv2.imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_8)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
    lines = text.splitlines()
    found = [line.strip() for line in lines if line.startswith(_JPEG_WARNINGS)]
    others = [line for line in lines if not line.startswith(_JPEG_WARNINGS)]
    if others:
        os.write(2, ("\n".join(others) + "\n").encode())
    return found[0].removeprefix("Corrupt JPEG data: ") if found else None


def _check_readable_file(p: Path) -> None:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageError(p, "no such file") from None
    except PermissionError:
        raise ImageError(p, "permission denied") from None
    except OSError as e:
        raise ImageError(p, f"cannot access file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(p, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(p, "not a regular file")
    if st.st_size == 0:
        raise ImageError(p, "empty file (0 bytes)")
    if not os.access(p, os.R_OK):
        raise ImageError(p, "permission denied")


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")


def _has_image_signature(p: Path) -> bool:
    """True if the file starts like a JPEG, PNG, TIFF, BMP, GIF or WebP file."""
    try:
        with open(p, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _pillow_hard_limit() -> float:
    limit = Image.MAX_IMAGE_PIXELS
    return float("inf") if limit is None else 2 * limit


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Temporarily make Pillow's own bomb check accept ``max_pixels`` (None: no check)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else -(-max_pixels // 2)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(p: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(p, f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            p,
            f"image is {w}x{h} ({w * h / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP "
            "limit; raise --max-pixels to allow it",
        )


def _needs_opencv(p: Path, im: Image.Image) -> bool:
    """True for 16-bit colour / gray+alpha files, which Pillow would reduce to 8 bits."""
    if im.format == "PNG":
        with open(p, "rb") as f:
            ihdr = f.read(26)
        return len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in (2, 4, 6)
    if im.format == "TIFF" and im.mode not in _GRAY16_MODES:
        bits = getattr(im, "tag_v2", {}).get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(bits, default=8) == 16
    return False


def _decode_opencv(p: Path) -> np.ndarray:
    import cv2  # only needed for 16-bit colour

    data = np.fromfile(p, dtype=np.uint8)
    saved = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # libtiff chatter
    try:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        cv2.utils.logging.setLogLevel(saved)
    if arr is None or arr.dtype not in (np.uint8, np.uint16):
        raise ImageError(p, "truncated or corrupt image data")
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.shape[2] == 3:
        return arr[:, :, ::-1]
    if arr.shape[2] == 4:
        return arr[:, :, [2, 1, 0, 3]]
    raise ImageError(p, f"unsupported number of channels ({arr.shape[2]})")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # malformed EXIF must not make a photo unreadable
        return 1


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, C) array, as ImageOps.exif_transpose does."""
    if orientation in (5, 6, 7, 8):
        arr = arr.transpose(1, 0, 2)  # now [x, y]
    flip_rows = orientation in (3, 4, 7, 8)
    flip_cols = orientation in (2, 3, 6, 7)
    return arr[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not make a photo unreadable
        return im


def _pil_to_array(p: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in _GRAY16_MODES:
        a = np.asarray(im)
        if mode == "I":  # 32-bit int container for 16-bit gray
            a = np.clip(a, 0, 65535)
        return a.astype(np.uint16)[:, :, None]
    if mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode == "CMYK":
        im = _cmyk_to_srgb(im)
    elif mode in ("YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    elif mode not in ("L", "RGB", "RGBA"):
        raise ImageError(p, f"unsupported image mode {mode!r}")
    a = np.array(im, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _cmyk_to_srgb(im: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the file's ICC profile with LittleCMS (Pillow's ImageCms); without a profile (or
    without ImageCms), Pillow's plain conversion."""
    profile = im.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile must not make the photo unreadable
            pass
    return im.convert("RGB")


def _srgb_profile() -> bytes | None:
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except Exception:  # noqa: BLE001
        return None


_EXIF_STALE = (0x0112, 0xA002, 0xA003, 0x0100, 0x0101, 0xA005)  # orientation (applied), sizes (changed), pointers
#: IFD0 tags an aligned copy keeps: description, camera, authorship, dates.
_EXIF_KEPT = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x8298, 0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F)


def read_info(path: str | os.PathLike[str]) -> dict:
    """What an aligned copy of the file should keep: ``{"icc_profile", "exif", "dpi"}`` (each None if absent).

    ``icc_profile`` describes the pixels :func:`read_image` returns (a CMYK file's pixels are converted to
    sRGB, so it is the sRGB profile then); ``exif`` is the file's EXIF with the orientation (already applied)
    and the pixel dimensions removed; ``dpi`` as ``(x, y)``. Reads headers only; never raises on odd metadata.
    """
    info: dict = {"icc_profile": None, "exif": None, "dpi": None}
    try:
        with Image.open(path) as im:
            info["icc_profile"] = _srgb_profile() if im.mode == "CMYK" else im.info.get("icc_profile")
            dpi = im.info.get("dpi")
            if dpi and len(dpi) == 2 and all(float(v) > 0 for v in dpi):
                info["dpi"] = (float(dpi[0]), float(dpi[1]))
            source = im.getexif()
            kept = Image.Exif()
            for tag in _EXIF_KEPT:  # descriptive tags only: a TIFF's IFD0 also holds its strip layout
                if tag in source:
                    kept[tag] = source[tag]
            for pointer in (0x8769, 0x8825):  # the Exif (camera settings) and GPS sub-IFDs
                with contextlib.suppress(Exception):
                    sub = {k: v for k, v in source.get_ifd(pointer).items() if k not in _EXIF_STALE}
                    if sub:
                        kept[pointer] = sub
            if len(kept):
                info["exif"] = kept.tobytes()
    except Exception:  # noqa: BLE001 - metadata is kept when it can be; the pixels decide readability
        pass
    return info


# --------------------------------------------------------------------------- writing


def write_image(path: str | os.PathLike[str], image: np.ndarray, quality: int = 95, info: dict | None = None) -> None:
    """Write ``(H, W, C)`` or ``(H, W)`` uint8/uint16 atomically; format from the suffix.

    PNG/TIFF keep 16 bits and alpha; WebP keeps alpha (8-bit; ``quality >= 100`` means
    lossless); JPEG/BMP are 8-bit and composite alpha onto white. ``info`` (see :func:`read_info`):
    the ICC profile, EXIF and DPI to embed where the format holds them (JPEG, PNG, TIFF, WebP; not
    16-bit colour PNG/TIFF, which OpenCV encodes). The file is encoded in
    memory, written to a hidden temp file beside ``path`` and moved into place with
    ``os.replace``; on failure nothing is left behind and an existing file is untouched.
    """
    p = Path(path)
    fmt = _WRITE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        known = " ".join(sorted(_WRITE_FORMATS))
        suffix = p.suffix or "(no suffix)"
        raise ImageError(p, f"unsupported output format {suffix!r} (use one of: {known})")
    if not 1 <= int(quality) <= 100:
        raise ImageError(p, f"quality must be in 1..100, got {quality}")
    arr = _check_array(p, image)
    try:
        try:
            data = _encode(arr, fmt, int(quality), info)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError):
            if not info:
                raise
            data = _encode(arr, fmt, int(quality), None)  # metadata is kept when it can be; the pixels must be
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ImageError(p, f"cannot encode as {fmt}: {e}") from e
    _atomic_write(p, data)


def _check_array(p: Path, image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    ok_shape = arr.ndim == 3 and arr.shape[2] in (1, 3, 4) and arr.shape[0] > 0 and arr.shape[1] > 0
    if not ok_shape or arr.dtype not in (np.uint8, np.uint16):
        raise ImageError(
            p, f"cannot write an array of shape {arr.shape} and dtype {arr.dtype}; "
            "expected (H, W) or (H, W, 1|3|4) uint8/uint16"
        )
    return arr


def _encode(arr: np.ndarray, fmt: str, quality: int, info: dict | None = None) -> bytes:
    """Encode an (H, W, C) uint8/uint16 array to file bytes in ``fmt``, with ``info``'s metadata where it fits."""
    if fmt in ("JPEG", "BMP") and arr.shape[2] == 4:
        arr = _composite_on_white(arr)
    if fmt in ("JPEG", "BMP", "WEBP") and arr.dtype == np.uint16:
        arr = _to_uint8(arr)
    if arr.dtype == np.uint16 and arr.shape[2] > 1:  # Pillow has no 16-bit colour modes
        return _encode_opencv(arr, ".png" if fmt == "PNG" else ".tiff")
    im = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
    buf = io.BytesIO()
    meta = {}
    if info and fmt != "BMP":
        if info.get("icc_profile") and not (arr.shape[2] == 1 and fmt == "JPEG"):
            meta["icc_profile"] = info["icc_profile"]
        if info.get("exif"):
            meta["exif"] = info["exif"]
        if info.get("dpi") and fmt in ("JPEG", "PNG", "TIFF"):
            meta["dpi"] = tuple(info["dpi"])
    if fmt == "JPEG":
        im.save(buf, format=fmt, quality=quality, subsampling=0 if quality >= 90 else 2, **meta)
    elif fmt == "WEBP":
        im.save(buf, format=fmt, quality=quality, lossless=quality >= 100, exact=True, **meta)
    elif fmt == "TIFF":
        im.save(buf, format=fmt, compression="tiff_deflate", **meta)
    elif fmt == "PNG":
        im.save(buf, format=fmt, compress_level=6, **meta)
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


def _encode_opencv(arr: np.ndarray, ext: str) -> bytes:
    import cv2

    bgr = arr[:, :, ::-1] if arr.shape[2] == 3 else arr[:, :, [2, 1, 0, 3]]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"OpenCV could not encode {ext}")
    return buf.tobytes()


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_white(arr: np.ndarray) -> np.ndarray:
    top = np.iinfo(arr.dtype).max
    rgb = arr[:, :, :3].astype(np.float32)
    alpha = arr[:, :, 3:].astype(np.float32) / top
    out = rgb * alpha + top * (1.0 - alpha)
    return np.clip(np.rint(out), 0, top).astype(arr.dtype)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file (UTF-8) atomically, with the umask's permissions; OSError on failure."""
    p = Path(path)
    try:
        _atomic_write(p, text.encode("utf-8"))
    except ImageError as err:
        raise OSError(err.reason) from err


def _atomic_write(p: Path, data: bytes) -> None:
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(p, f"cannot create directory {parent} ({e.strerror or e})") from e
    if p.is_dir():
        raise ImageError(p, "is a directory")
    tmp: Path | None = None
    try:
        while True:  # O_EXCL + 0o666 so the final file gets the user's umask, like open()
            tmp = parent / f".{p.name}.{secrets.token_hex(4)}.tmp"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                fd = os.open(tmp, flags, 0o666)
                break
            except FileExistsError:
                continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        if isinstance(e, PermissionError):
            reason = "permission denied"
        else:
            reason = f"cannot write file ({e.strerror or e})"
        raise ImageError(p, reason) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------- conversions


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 array (any shape, e.g. (H, W, C)) -> float32 in [0, 1], same shape."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535)
    raise TypeError(f"to_float expects uint8 or uint16, got {image.dtype}")


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` uint8/uint16/float -> ``(H, W, 3)`` float32 in ``[0, 1]``: gray replicated, alpha on white."""
    x = to_float(image) if image.dtype in (np.uint8, np.uint16) else image.astype(np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[2] == 4:
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    elif x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return np.ascontiguousarray(x)


def from_float(image: np.ndarray, dtype: Any) -> np.ndarray:
    """Float array in [0, 1] -> ``dtype`` (uint8/uint16), rounded and clipped; NaN -> 0."""
    dt = np.dtype(dtype)
    if dt not in (np.uint8, np.uint16):
        raise TypeError(f"from_float expects dtype uint8 or uint16, got {dt}")
    top = float(np.iinfo(dt).max)
    x = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(x, 0.0, 1.0) * top).astype(dt)


# --------------------------------------------------------------------------- listing


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True if the name has a readable image suffix (case-insensitive) and is not hidden."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_images(
    root: str | os.PathLike[str],
    recursive: bool = True,
    exclude: Path | None = None,
    problems: list[tuple[Path, str]] | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """Image files under ``root`` (``root / relative``), sorted by relative path parts.

    Hidden files and directories (name starting with '.') are skipped; symlinked files are
    listed, symlinked directories are not entered (no loops); ``exclude`` (a resolved folder,
    e.g. an output folder inside the input folder) is not entered. Raises :class:`ImageError`
    for a root that is missing, not a directory or not readable; a sub-directory that cannot be
    listed raises too, unless ``problems`` is a list, which then collects ``(folder, reason)``.
    ``skipped`` collects ``(path, reason)`` for every other non-hidden entry left out: files of
    another type or an unsupported image format, dangling links, FIFOs and other special files,
    symlinked folders, and sub-folders when not ``recursive``.
    """
    base = Path(root)
    found: list[tuple[str, ...]] = []

    def walk(directory: Path, rel: tuple[str, ...]) -> None:
        if rel and exclude is not None and directory.resolve() == exclude:
            return
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                reason = "no such directory"
            elif isinstance(e, NotADirectoryError):
                reason = "not a directory"
            elif isinstance(e, PermissionError):
                reason = "permission denied"
            else:
                reason = f"cannot list directory ({e.strerror or e})"
            if rel and problems is not None:
                problems.append((directory, reason))
                return
            raise ImageError(directory, reason) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            reason = None
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        walk(Path(entry.path), (*rel, entry.name))
                    else:
                        reason = "sub-folder (not searched without recursion)"
                elif entry.is_symlink() and entry.is_dir():
                    reason = "symlinked folder (not followed)"
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    reason = "dangling symlink"
                elif not entry.is_file():
                    reason = "not a regular file (FIFO, socket or device)"
                elif is_image_file(entry.name):
                    found.append((*rel, entry.name))
                else:
                    suffix = Path(entry.name).suffix.lower()
                    reason = (f"unsupported image format {suffix} ({UNSUPPORTED_EXTENSIONS[suffix]})"
                              if suffix in UNSUPPORTED_EXTENSIONS else "not an image file name")
            except OSError as e:
                reason = f"cannot access ({e.strerror or e})"
            if reason is not None and skipped is not None:
                skipped.append((Path(entry.path), reason))

    walk(base, ())
    return [base.joinpath(*parts) for parts in sorted(found)]
