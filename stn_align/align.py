"""The Python API: ``Aligner.load("default").align(input, reference)``.

Images are numpy arrays ``(H, W, C)`` (C in 1, 3, 4; uint8, uint16 or float in ``[0, 1]``), file
paths, or PIL images. The network sees both images resized to its working size; the matrix is mapped
back to the original pixel sizes and the warp is applied to the **full-resolution input** (on the
GPU with kornia when the model runs there, else with OpenCV). Every result's ``matrix`` maps input
pixels to reference pixels: ``cv2.warpPerspective(input, matrix, (ref_w, ref_h))`` gives ``image``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import cv2
import numpy as np
import torch

from . import baselines
from .checkpoint import CheckpointError, load_model, read_metadata
from .geometry import normalized_to_pixel, working_to_pixel
from .model import AlignerNet, resolve_device
from .refine import alignment_score, refine_ecc, resolve_mask, to_gray

ImageLike = Union[str, Path, np.ndarray, "PIL.Image.Image"]  # noqa: F821

FILLS = ("white", "black", "edge", "transparent")
REFINES = ("none", "ecc")
FALLBACKS = ("features", "rotations", "none")
#: Quarter turns of the input (``np.rot90``'s k: 90, 180, 270 degrees) the safety net starts the network from.
TURNS = (1, 2, 3)
#: Which path produced a result (:attr:`AlignResult.method`); ``+ecc``: the ECC polish was kept.
#: ``identity``: the identity matrix (same-size images where nothing moved scores best; exact when the input is
#: pixel for pixel the reference).
METHODS = ("network", "network+ecc", "rotated", "rotated+ecc", "features", "features+ecc", "identity", "identity+ecc")


@dataclass
class AlignResult:
    """One alignment. ``matrix`` ``(3, 3)`` float64 maps input pixels to reference pixels.

    ``method`` says which hypothesis won (one of :data:`METHODS`): ``network`` (the network's estimate),
    ``rotated`` (the network started from the input turned by 90, 180 or 270 degrees) or ``features``
    (SIFT + MAGSAC), with ``+ecc`` when the ECC polish was kept (then ``refined`` is True).
    ``hypotheses`` holds the score of every hypothesis tried (``network``, ``identity`` when it beat the network,
    ``rotated90``, ``rotated180``, ``rotated270``, ``features``), after its polish, in the order tried (the safety
    net stops at the first that reaches ``min_score``); :attr:`fallback_fired` says whether the safety net fired.
    """

    matrix: np.ndarray
    score: float
    transform: str
    image: np.ndarray | None = None  # aligned input, (H_ref, W_ref, C), the input's dtype
    suspect: bool = False
    refined: bool = False
    input_size: tuple[int, int] = (0, 0)  # (w, h)
    ref_size: tuple[int, int] = (0, 0)
    method: str = "network"
    hypotheses: dict[str, float] = field(default_factory=dict)
    output_matrix: np.ndarray | None = None  # (3, 3) input -> output pixels when the canvas is not the reference's

    def __repr__(self) -> str:
        return (f"AlignResult(score={self.score:.3f}, suspect={self.suspect}, method={self.method!r}, "
                f"transform={self.transform!r}, input_size={self.input_size}, ref_size={self.ref_size})")

    @property
    def fallback_fired(self) -> bool:
        """True if the score of the network's result was below ``min_score`` and the safety net tried more."""
        return any(name.startswith(("rotated", "features")) for name in self.hypotheses)

    def to_record(self) -> dict:
        """JSON-ready summary (no pixels)."""
        record = {"matrix": [[float(v) for v in row] for row in self.matrix], "transform": self.transform,
                  "score": round(float(self.score), 4), "suspect": bool(self.suspect), "refined": bool(self.refined),
                  "method": self.method, "input_size": list(self.input_size), "ref_size": list(self.ref_size)}
        if self.output_matrix is not None:
            record["output_matrix"] = [[float(v) for v in row] for row in self.output_matrix]
        return record


class _Candidate(NamedTuple):
    matrix: np.ndarray
    score: float
    refined: bool
    method: str


def quarter_turn(k: int, size: int) -> np.ndarray:
    """``(3, 3)`` matrix mapping pixels of a ``size x size`` image to those of ``np.rot90(image, k)``."""
    turn = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, size - 1.0], [0.0, 0.0, 1.0]])
    return np.linalg.matrix_power(turn, k % 4)


# --- shipped models -----------------------------------------------------------------------------------


def models_dir() -> Path:
    """Folder holding the shipped models (``models/`` in the repository, ``stn_align.models`` when installed).

    The environment variable ``STN_ALIGN_MODELS_DIR`` overrides it (tests, site-wide model folders).
    """
    override = os.environ.get("STN_ALIGN_MODELS_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("stn_align.models")))


def shipped_models() -> dict[str, Path]:
    """``{name: path}`` of the shipped ``*.safetensors`` models."""
    return {p.name.removesuffix(".safetensors"): p for p in sorted(models_dir().glob("*.safetensors"))
            if not p.name.endswith(".state.safetensors")}


def resolve_model(model: str | Path) -> Path:
    """A shipped model's name (``default``, ``affine``) or a checkpoint path -> the file."""
    path = Path(model)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise CheckpointError(path, "no such checkpoint file")
        return path
    shipped = shipped_models()
    if str(model) in shipped:
        return shipped[str(model)]
    names = ", ".join(shipped) or "none installed"
    raise CheckpointError(model, f"unknown model (shipped models: {names}; or give a .safetensors path)")


# --- images ---------------------------------------------------------------------------------------------


def as_array(image: ImageLike) -> np.ndarray:
    """Anything image-like -> ``(H, W, C)`` array (paths are read with :func:`io.read_image`)."""
    if isinstance(image, (str, Path)):
        from .io import read_image

        return read_image(image)
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)  # PIL
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1|3|4), got {image.shape}")
    return image


def network_view(image: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, C)`` any dtype -> ``(size, size, 3)`` float32 in ``[0, 1]`` RGB, alpha on white, anti-aliased."""
    from .io import to_float_rgb
    from .refine import LARGE_PIXELS

    if image.shape[0] * image.shape[1] > LARGE_PIXELS and image.dtype in (np.uint8, np.uint16):
        # shrink in the image's own dtype first (to 4x the working size): no full-size float copy
        h, w = image.shape[:2]
        k = 4 * size / max(h, w)
        image = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
        image = image.reshape(image.shape[0], image.shape[1], -1)
    x = to_float_rgb(image)
    interp = cv2.INTER_AREA if max(x.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(x), (size, size), interpolation=interp)


def fill_value(fill: str | Sequence[int], image: np.ndarray) -> tuple:
    """The border colour for ``fill`` in ``image``'s dtype and channel count (``edge``/``transparent``: special)."""
    top = 65535 if image.dtype == np.uint16 else (1.0 if image.dtype.kind == "f" else 255)
    scale = top / 255
    channels = image.shape[2]
    if fill == "white":
        rgb = (255, 255, 255)
    elif fill == "black":
        rgb = (0, 0, 0)
    elif isinstance(fill, str):
        raise ValueError(f"unknown fill {fill!r}; use white, black, edge, transparent or R,G,B")
    else:
        rgb = tuple(int(v) for v in fill)
    if channels == 1:
        value = [0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]]
    else:
        value = list(rgb)
        if channels == 4:
            value.append(0)  # an input with alpha: outside it is transparent (the colour shows where alpha is dropped)
    return tuple(v * scale for v in value)


def parse_fill(text: str) -> str | tuple[int, int, int]:
    """``white|black|edge|transparent|R,G,B`` -> the fill option; ValueError on anything else."""
    if text in FILLS:
        return text
    parts = text.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and 0 <= int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)
    raise ValueError(f"invalid fill {text!r}: use white, black, edge, transparent or R,G,B with values 0-255")


#: ``--interpolation``: OpenCV's sampling kernel of the final warp (``area``: linear after the area prefilter).
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_LINEAR,
                  "lanczos": cv2.INTER_LANCZOS4, "nearest": cv2.INTER_NEAREST}  # nearest: masks and labels


def shrink_factor(matrix: np.ndarray, out_size: tuple[int, int]) -> float:
    """Input pixels per output pixel at the centre of the output (``> 1``: the warp shrinks the input)."""
    inv = np.linalg.inv(matrix)
    c = np.float64([[out_size[0] / 2, out_size[1] / 2], [out_size[0] / 2 + 1, out_size[1] / 2],
                    [out_size[0] / 2, out_size[1] / 2 + 1]])
    p = np.c_[c, np.ones(3)] @ inv.T
    p = p[:, :2] / p[:, 2:]
    jacobian = np.stack([p[1] - p[0], p[2] - p[0]], axis=1)
    return float(np.sqrt(abs(np.linalg.det(jacobian))))


def prefiltered(image: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Antialiasing before a shrinking warp: ``(image, matrix)`` with the input first resized (OpenCV's area
    filter) to about one input pixel per output pixel, and the matrix composed to match. Unchanged when the
    warp shrinks by less than 1.5x (then bilinear sampling does not alias)."""
    factor = shrink_factor(matrix, out_size) if np.all(np.isfinite(matrix)) else 1.0
    if not factor > 1.5:
        return image, matrix
    h, w = image.shape[:2]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    resized = cv2.resize(image, small, interpolation=cv2.INTER_AREA).reshape(small[1], small[0], image.shape[2])
    from .geometry import resize_matrix

    return resized, matrix @ np.linalg.inv(resize_matrix((w, h), small))


def warp_image(
    image: np.ndarray, matrix: np.ndarray, ref_size: tuple[int, int], fill="white", device: torch.device | None = None,
    interpolation: str = "linear",
) -> np.ndarray:
    """Warp the full-resolution input ``(H, W, C)`` onto a ``ref_size = (w, h)`` canvas; keeps the dtype.

    ``fill="transparent"`` adds (or keeps) an alpha channel that is 0 outside the input; an input that has an
    alpha channel gets alpha 0 outside it with any fill (transparent in, transparent out). A warp that shrinks
    the input is antialiased first (:func:`prefiltered`); ``interpolation`` is one of :data:`INTERPOLATIONS`.
    Runs on CUDA with kornia when ``device`` is a GPU (``linear`` and ``area``), else with OpenCV.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")
    if interpolation != "nearest":  # a label map must keep its values
        image, matrix = prefiltered(image, matrix, ref_size)
    if fill == "transparent" and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)  # gray + alpha has no common file format: go RGBA
    if fill == "transparent" and image.shape[2] == 3:
        top = 65535 if image.dtype == np.uint16 else (1.0 if image.dtype.kind == "f" else 255)
        image = np.concatenate([image, np.full(image.shape[:2] + (1,), top, image.dtype)], axis=2)
    if device is not None and device.type == "cuda" and interpolation in ("linear", "area"):
        return _warp_torch(image, matrix, ref_size, fill, device)
    if fill == "edge":
        border, value = cv2.BORDER_REPLICATE, 0
    elif fill == "transparent":
        border, value = cv2.BORDER_CONSTANT, 0
    else:
        border, value = cv2.BORDER_CONSTANT, fill_value(fill, image)
    src = image if image.dtype != np.float64 else image.astype(np.float32)
    out = cv2.warpPerspective(src, matrix, ref_size, flags=INTERPOLATIONS[interpolation], borderMode=border,
                              borderValue=value)
    return out.reshape(ref_size[1], ref_size[0], image.shape[2])


def _warp_torch(image: np.ndarray, matrix: np.ndarray, ref_size, fill, device) -> np.ndarray:
    from .geometry import warp_pixels

    dtype = image.dtype
    x = torch.from_numpy(image.astype(np.float32) if dtype != np.float32 else image).to(device).permute(2, 0, 1)[None]
    m = torch.from_numpy(matrix).float().to(device)[None]
    if fill == "edge":
        out = warp_pixels(x, m, (ref_size[1], ref_size[0]), padding_mode="border")
    elif fill == "transparent":
        out = warp_pixels(x, m, (ref_size[1], ref_size[0]), padding_mode="zeros")
    else:
        value = torch.tensor(fill_value(fill, image), dtype=torch.float32, device=device)
        out = warp_pixels(x, m, (ref_size[1], ref_size[0]), padding_mode="fill", fill_value=value)
    out = out[0].permute(1, 2, 0)
    if dtype.kind != "f":
        out = out.round_().clamp_(0, np.iinfo(dtype).max)
    return out.cpu().numpy().astype(dtype)


# --- the aligner ----------------------------------------------------------------------------------------


@dataclass
class Aligner:
    """A loaded model plus inference options. Build with :meth:`load`.

    Attributes:
        iterations: refinement rounds of the network (warp, re-predict, compose).
        refine: ``"ecc"`` polishes the network's estimate with OpenCV's ECC (kept only if it helps), or ``"none"``.
        fill: border of the aligned image: ``white``, ``black``, ``edge``, ``transparent`` or ``(R, G, B)``.
        min_score: results scoring below this are flagged ``suspect``; below it the safety net fires.
        fallback: the safety net, tried when the network's result scores below ``min_score``: ``"features"``
            (the network started from the input turned by 90, 180 and 270 degrees, and SIFT + MAGSAC),
            ``"rotations"`` (the turned starts only) or ``"none"``. Each hypothesis gets the same ``refine``
            polish, likeliest first, until one reaches ``min_score``; the highest score wins (the network's
            result on ties) and sets ``suspect``. See :meth:`finish`.
        mask: region of the reference that refinement and the score look at: None (everything), ``"auto"``
            (the product on a plain background, or the alpha channel; see :func:`refine.foreground_mask`),
            a mask file path or an ``(H_ref, W_ref)`` array (non-zero = use).
    """

    model: AlignerNet
    device: torch.device
    iterations: int | None = None  # None: the model's own default (its config.iterations)
    refine: str = "ecc"
    fill: str | tuple = "white"
    min_score: float = 0.75  # benchmark: flags all >10 px results, no <3 px ones (see benchmarks/results.md)
    fallback: str = "features"
    mask: str | np.ndarray | None = None  # None, "auto" (foreground of the reference), a file path or an (H_ref, W_ref) array
    metadata: dict = field(default_factory=dict)
    name: str = "custom"
    working_size: int | None = None  # iterative models: run the update stage at this size (multiple of 32)
    interpolation: str = "linear"  # the final warp's kernel (see INTERPOLATIONS); shrinking warps are prefiltered
    canvas: str = "reference"  # reference, input or union (see canvas.output_canvas)
    crop: str = "none"  # none or common

    @classmethod
    def load(cls, model: str | Path = "default", device: str = "auto", **options) -> "Aligner":
        """Load a shipped model by name or a checkpoint by path, on ``auto``/``cpu``/``cuda``."""
        dev = resolve_device(device)
        path = resolve_model(model)
        net, meta = load_model(path, dev)
        if options.get("working_size") is None:  # a model may recommend one (its card says why)
            options["working_size"] = (meta.get("inference") or {}).get("working_size")
        name = path.name.removesuffix(".safetensors")
        aligner = cls(model=net, device=dev, metadata=meta, name=name, **options)
        aligner._check()
        return aligner

    def _check(self) -> None:
        if self.refine not in REFINES:
            raise ValueError(f"unknown refine {self.refine!r}; use one of {REFINES}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {self.fallback!r}; use one of {FALLBACKS}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if self.working_size is not None and self.working_size != self.model.config.size and (
                self.working_size % 32 or self.working_size < 64 or self.model.config.architecture != "iterative"):
            raise ValueError(f"working size {self.working_size}: must be a multiple of 32 (at least 64), and other than "
                             f"{self.model.config.size} only for iterative models")
        if isinstance(self.fill, str) and self.fill not in FILLS:
            self.fill = parse_fill(self.fill)
        from .canvas import CANVASES, CROPS

        if self.interpolation not in INTERPOLATIONS or self.canvas not in CANVASES or self.crop not in CROPS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, canvas one of {CANVASES}, "
                             f"crop one of {CROPS}")

    @property
    def transform(self) -> str:
        return self.model.config.transform

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the model's tensors (:func:`checkpoint.tensors_sha256`): what batch resume compares."""
        digest = self.metadata.get("tensors_sha256")
        if digest is None:
            from .checkpoint import tensors_sha256

            digest = self.metadata["tensors_sha256"] = tensors_sha256(self.model.state_dict())
        return digest

    @property
    def size(self) -> int:
        """The network's working size: :attr:`working_size`, else the size the model was trained at."""
        return self.working_size or self.model.config.size

    def __repr__(self) -> str:
        mask = self.mask if self.mask is None or isinstance(self.mask, str) else "array"
        return (f"Aligner(name={self.name!r}, transform={self.transform!r}, size={self.size}, device='{self.device}', "
                f"iterations={self.iterations}, refine={self.refine!r}, fallback={self.fallback!r}, "
                f"min_score={self.min_score}, fill={self.fill!r}, mask={mask!r})")

    @torch.inference_mode()
    def estimate(self, inputs: Sequence[ImageLike], references: Sequence[ImageLike] | ImageLike) -> np.ndarray:
        """The network's matrices for a batch of pairs, ``(B, 3, 3)`` float64 in each pair's full-resolution pixels.

        ``inputs``: images (arrays ``(H, W[, C])``, paths or PIL images); ``references``: one per input, or a
        single image for all of them."""
        inputs, references = _pairs(inputs, references)
        if len(inputs) != len(references):
            raise ValueError("inputs and references differ in length")
        if not len(inputs):
            return np.zeros((0, 3, 3))
        s = self.size
        views: dict[int, np.ndarray] = {}  # one reference shared by many pairs is resized once

        def view(image: np.ndarray) -> np.ndarray:
            if id(image) not in views:
                views[id(image)] = network_view(image, s)
            return views[id(image)]

        a = torch.from_numpy(np.stack([network_view(x, s) for x in inputs])).permute(0, 3, 1, 2).to(self.device)
        b = torch.from_numpy(np.stack([view(x) for x in references])).permute(0, 3, 1, 2).to(self.device)
        normalized = self.model(a, b, self.iterations)[-1]
        working = normalized_to_pixel(normalized.double(), s).cpu().numpy()
        return np.stack([
            working_to_pixel(m, (x.shape[1], x.shape[0]), (r.shape[1], r.shape[0]), s)
            for m, x, r in zip(working, inputs, references)
        ])

    @torch.inference_mode()
    def estimate_turned(self, image_in: np.ndarray, image_ref: np.ndarray, turns: Sequence[int] = TURNS) -> np.ndarray:
        """The network's matrices for one pair started from turned inputs, ``(len(turns), 3, 3)`` float64.

        Hypothesis ``k``: the network sees its working view of the input turned by ``np.rot90(view, k)``
        (k x 90 degrees, exact on the square working frame); the turn is composed back into the matrix,
        so every result maps the original input's pixels to the reference's. An affine model's results stay affine.
        """
        s = self.size
        view_in, view_ref = network_view(image_in, s), network_view(image_ref, s)
        a = np.stack([np.ascontiguousarray(np.rot90(view_in, k)) for k in turns])
        b = np.repeat(view_ref[None], len(turns), axis=0)
        a = torch.from_numpy(a).permute(0, 3, 1, 2).to(self.device)
        b = torch.from_numpy(b).permute(0, 3, 1, 2).to(self.device)
        working = normalized_to_pixel(self.model(a, b, self.iterations)[-1].double(), s).cpu().numpy()
        in_size, ref_size = (image_in.shape[1], image_in.shape[0]), (image_ref.shape[1], image_ref.shape[0])
        return np.stack([working_to_pixel(m @ quarter_turn(k, s), in_size, ref_size, s) for m, k in zip(working, turns)])

    def finish(self, image_in: np.ndarray, image_ref: np.ndarray, matrix: np.ndarray, warp: bool = True,
               mask=None, ref_gray: np.ndarray | None = None) -> AlignResult:
        """Refinement, score, safety net and full-resolution warp for one pair whose network estimate is ``matrix``.

        The estimate is polished (``refine``) and scored. If the score is below :attr:`min_score` and
        :attr:`fallback` is not ``none``, the safety net fires: the turned network starts
        (:meth:`estimate_turned`) and, with ``features``, SIFT + MAGSAC (:func:`baselines.sift`, at most
        1024 px) are polished and scored the same way, likeliest first (by their unpolished score), until
        one reaches :attr:`min_score` (with ``refine="none"`` all are scored); the highest score wins
        (the network's on ties). ``mask`` overrides
        :attr:`mask` for this pair (same forms).
        ``ref_gray`` is ``refine.to_gray(image_ref)`` when the caller already has it (one reference, many inputs)."""
        gray_in = to_gray(image_in)
        gray_ref = to_gray(image_ref) if ref_gray is None else ref_gray
        region = resolve_mask(self.mask if mask is None else mask, image_ref)
        exact = image_in.shape == image_ref.shape and image_in.dtype == image_ref.dtype and np.array_equal(image_in, image_ref)
        if exact:
            identity = np.eye(3)  # the same pixels: nothing to estimate, and the exact answer is known
            score = alignment_score(gray_in, gray_ref, identity, mask=region)
            best, hypotheses = _Candidate(identity, score, False, "identity"), {"identity": score}
        else:
            if not np.all(np.isfinite(matrix)):
                raise ValueError("the network's estimate is not finite (is the model file damaged?)")
            best = self._polish("network", matrix, gray_in, gray_ref, region)
            hypotheses = {"network": best.score}
            if image_in.shape[:2] == image_ref.shape[:2]:  # the same frame: "nothing moved" is a hypothesis too
                still = alignment_score(gray_in, gray_ref, np.eye(3), mask=region)
                if still > best.score:  # e.g. a re-saved copy of the reference, where the network is a pixel off
                    best = max(best, self._polish("identity", np.eye(3), gray_in, gray_ref, region), key=lambda c: c.score)
                    hypotheses["identity"] = best.score
        if best.score < self.min_score and self.fallback != "none" and not exact:
            starts = [(f"rotated{90 * k}", "rotated", m) for k, m in zip(TURNS, self.estimate_turned(image_in, image_ref))]
            if self.fallback == "features":
                found = baselines.sift(gray_in, gray_ref, self.transform, max_side=1024)
                starts += [] if found is None else [("features", "features", found)]
            polishing = self.refine != "none"
            if polishing:  # polish the likeliest first: order by the unpolished score
                rough = [alignment_score(gray_in, gray_ref, m, mask=region) for _, _, m in starts]
                starts = [starts[i] for i in np.argsort(rough, kind="stable")[::-1]]
            for name, kind, start in starts:
                candidate = self._polish(kind, start, gray_in, gray_ref, region)
                hypotheses[name] = candidate.score
                if candidate.score > best.score:
                    best = candidate
                if polishing and best.score >= self.min_score:  # good enough: more polishing would only cost time
                    break
        if not np.all(np.isfinite(best.matrix)):
            raise ValueError(f"the {best.method} estimate is not finite")
        ref_size = (image_ref.shape[1], image_ref.shape[0])
        in_size = (image_in.shape[1], image_in.shape[0])
        output_matrix, out_size = best.matrix, ref_size
        if (self.canvas, self.crop) != ("reference", "none"):
            from .canvas import output_canvas

            frame, out_size = output_canvas(best.matrix, in_size, ref_size, self.canvas, self.crop)
            output_matrix = frame @ best.matrix
        aligned = warp_image(image_in, output_matrix, out_size, self.fill, self.device, self.interpolation) if warp else None
        return AlignResult(matrix=best.matrix, score=best.score, transform=self.transform, image=aligned,
                           suspect=best.score < self.min_score, refined=best.refined,
                           input_size=in_size, ref_size=ref_size, method=best.method, hypotheses=hypotheses,
                           output_matrix=None if output_matrix is best.matrix else output_matrix)

    def _polish(self, kind: str, matrix: np.ndarray, gray_in, gray_ref, region) -> _Candidate:
        """One hypothesis through ``refine`` and the score; ``kind`` is ``network``, ``rotated`` or ``features``."""
        refined = False
        if self.refine == "ecc":
            matrix, refined = refine_ecc(gray_in, gray_ref, matrix, self.transform, mask=region)
        score = alignment_score(gray_in, gray_ref, matrix, mask=region)
        return _Candidate(matrix, score, refined, f"{kind}+ecc" if refined else kind)

    def align(self, input: ImageLike, reference: ImageLike, warp: bool = True, mask=None) -> AlignResult:
        """Align one ``input`` to ``reference``; returns matrix, score and (if ``warp``) the aligned image."""
        return self.align_batch([input], [reference], warp=warp, mask=mask)[0]

    def align_batch(self, inputs: Sequence[ImageLike], references: Sequence[ImageLike] | ImageLike, warp: bool = True,
                    mask=None) -> list[AlignResult]:
        """Align pairs in one network batch; returns one :class:`AlignResult` per pair (``mask``: see :meth:`finish`).

        ``references``: one per input, or a single image (array, path or PIL image) for all of them."""
        inputs, references = _pairs(inputs, references)
        matrices = self.estimate(inputs, references)
        return [self.finish(a, b, m, warp, mask) for a, b, m in zip(inputs, references, matrices)]


def _is_one_image(x) -> bool:
    return isinstance(x, (str, Path, np.ndarray)) or hasattr(x, "getbands")  # a path, an array or a PIL image


def _pairs(inputs, references) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(inputs, references)`` as lists of arrays; a single reference is read once and shared by every input."""
    if _is_one_image(inputs):
        raise TypeError("inputs must be a sequence of images (a list of arrays, paths or PIL images)")
    inputs = [as_array(x) for x in inputs]
    if _is_one_image(references):
        shared = as_array(references)
        return inputs, [shared] * len(inputs)
    return inputs, [as_array(x) for x in references]


def model_summary(path: Path) -> dict:
    """Name, transform, working size and validation figures of a checkpoint, for ``stn-align models``."""
    meta = read_metadata(path)
    val = meta.get("validation") or {}
    return {"name": path.name.removesuffix(".safetensors"), "path": str(path), "transform": meta["model"]["transform"],
            "size": meta["model"]["size"], "validation": val, "training": meta.get("training", {})}
