"""ONNX export of the network's estimate, for inference without PyTorch (``stn-align export``).

The graph takes the two images already resized to the working size ``S`` and returns the transform in
the working frame, pixel convention (input pixels -> reference pixels, pixel centres at integers):

* inputs ``image_in``, ``image_ref``: ``(B, 3, S, S)`` float32 RGB in ``[0, 1]``;
* output ``matrix``: ``(B, 3, 3)`` float32, working input pixels -> working reference pixels, ``M[2, 2] = 1``;
* output ``corner_offsets``: ``(B, 4, 2)`` float32, where the working frame's corner pixels (TL, TR, BR,
  BL) move, in working pixels (DeTone's 4-point parameterisation of the same matrix).

The batch axis is dynamic; ``S`` and the number of refinement rounds are fixed in the graph. For full
resolution, :func:`stn_align.geometry.working_to_pixel` maps ``matrix`` exactly as
:meth:`stn_align.Aligner.estimate` does::

    M_full = working_to_pixel(matrix[i], (w_in, h_in), (w_ref, h_ref), S)

Opset: 18 or newer. ``GridSample`` alone would need 16, but torch's exporter writes 18 and its down-conversion
to 17 fails (``ReduceMean`` / ``ReduceSum`` take computed ``axes`` inputs from 18 on). ONNX has no matrix
inverse, so while exporting :func:`exportable_linalg` swaps ``torch.linalg.inv`` of ``(..., 3, 3)``
matrices (the warp's ``H^-1``) for the closed-form adjugate; every other operator exports as is (kornia's
``get_perspective_transform`` is closed-form, no ``linalg.solve``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .geometry import homography_to_corners, normalized_to_pixel, pixel_corners

MIN_OPSET = DEFAULT_OPSET = 18
INPUT_NAMES = ("image_in", "image_ref")
OUTPUT_NAMES = ("matrix", "corner_offsets")


class ExportError(Exception):
    """The export could not be written. ``str(err)`` is one line."""


def default_iterations(model: nn.Module) -> int:
    """The refinement rounds :class:`stn_align.Aligner` runs by default for ``model``."""
    from .align import Aligner

    default = {f.name: f.default for f in fields(Aligner)}["iterations"]
    return int(default if isinstance(default, int) else model.config.iterations)


class WorkingFrameEstimate(nn.Module):
    """The exported computation: ``model(image_in, image_ref, iterations)[-1]`` in working pixels.

    Args:
        model: an :class:`stn_align.model.AlignerNet` (any module with its forward signature and ``config.size``).
        iterations: refinement rounds baked into the graph.

    ``forward(image_in (B, 3, S, S), image_ref (B, 3, S, S))`` returns ``(matrix (B, 3, 3), corner_offsets (B, 4, 2))``.
    """

    def __init__(self, model: nn.Module, iterations: int):
        super().__init__()
        self.model, self.iterations, self.size = model, int(iterations), int(model.config.size)
        self.register_buffer("corners", torch.from_numpy(pixel_corners(self.size, self.size)).float(), persistent=False)

    def forward(self, image_in: torch.Tensor, image_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalized = self.model(image_in, image_ref, self.iterations)[-1].float()
        matrix = normalized_to_pixel(normalized, self.size)
        matrix = matrix / matrix[:, 2:3, 2:3]
        scale = (self.size - 1) / 2  # normalised corners (+-1) -> working pixels (0 .. S-1)
        offsets = (homography_to_corners(normalized) + 1) * scale - self.corners
        return matrix, offsets


def inverse_3x3(matrix: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse (adjugate over determinant) of ``(..., 3, 3)`` matrices: only elementwise ops."""
    m = [[matrix[..., i, j] for j in range(3)] for i in range(3)]

    def cofactor(i: int, j: int) -> torch.Tensor:
        r = [k for k in range(3) if k != i]
        c = [k for k in range(3) if k != j]
        minor = m[r[0]][c[0]] * m[r[1]][c[1]] - m[r[0]][c[1]] * m[r[1]][c[0]]
        return minor if (i + j) % 2 == 0 else -minor

    adjugate = torch.stack([torch.stack([cofactor(j, i) for j in range(3)], -1) for i in range(3)], -2)
    determinant = m[0][0] * adjugate[..., 0, 0] + m[0][1] * adjugate[..., 1, 0] + m[0][2] * adjugate[..., 2, 0]
    return adjugate / determinant[..., None, None]


class exportable_linalg(TorchFunctionMode):  # noqa: N801 -- used as a context manager
    """Within this context, ``torch.linalg.inv`` / ``torch.inverse`` of ``(..., 3, 3)`` use :func:`inverse_3x3`.

    ONNX has no inverse operator (``aten.linalg_inv`` fails with "No ONNX function found"); other calls pass through.
    """

    INVERSES = (torch.linalg.inv, torch.inverse, torch.Tensor.inverse)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INVERSES and not kwargs and len(args) == 1 and args[0].shape[-2:] == (3, 3):
            return inverse_3x3(args[0])
        return func(*args, **kwargs)


def export_onnx(model: nn.Module, out: str | Path, iterations: int | None = None, opset: int = DEFAULT_OPSET,
                metadata: dict | None = None) -> Path:
    """Write ``model``'s estimate as an ONNX graph (see the module docstring for inputs and outputs).

    Args:
        model: an :class:`stn_align.model.AlignerNet`; a copy is exported on the CPU in eval mode, float32.
        out: the ``.onnx`` file, written atomically as one file (weights included).
        iterations: refinement rounds in the graph; default :func:`default_iterations`.
        opset: ONNX opset, 18 or newer.
        metadata: extra ``key: value`` pairs for the model's ``metadata_props``.

    Returns:
        ``out`` as a :class:`Path`. Raises :class:`ExportError` (one line) when the exporter is missing or fails.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: torch's exporter writes opset {MIN_OPSET} and up "
                          "(its conversion to 17 fails on ReduceMean/ReduceSum)")
    try:
        import onnx
        import onnxscript  # noqa: F401 -- torch.onnx's exporter needs it
    except ImportError as err:
        raise ExportError(f"ONNX export needs the onnx extra ({err.name} is missing): pip install 'stn-align[onnx]'") from None
    model = copy.deepcopy(model).to("cpu").float().eval()  # the caller's model stays where and as it was
    iterations = default_iterations(model) if iterations is None else int(iterations)
    if iterations < 1:
        raise ExportError("iterations must be at least 1")
    size = int(model.config.size)
    wrapper = WorkingFrameEstimate(model, iterations).eval()
    example = (torch.rand(2, 3, size, size), torch.rand(2, 3, size, size))  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()  # the exporter prints progress lines; keep them out of the caller's output
    try:
        with torch.no_grad(), exportable_linalg(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's and its optimizer's notes are not the user's concern
            program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch}, {0: batch}),
                                        external_data=False)
    except Exception as err:  # the exporter's errors are long reports: keep the first line
        raise ExportError(f"torch.onnx.export failed: {str(err).strip().splitlines()[0]}") from None
    proto = program.model_proto
    props = {"stn_align": json.dumps({"model": model.config.to_dict(), "iterations": iterations, **(metadata or {})}),
             "size": str(size), "iterations": str(iterations), "transform": str(model.config.transform),
             "convention": "matrix: working input pixels -> working reference pixels; "
                           "full resolution: stn_align.geometry.working_to_pixel(matrix, input_wh, ref_wh, size)"}
    onnx.helper.set_model_props(proto, props)
    return _atomic_write(proto.SerializeToString(), Path(out))


def _atomic_write(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def compare_with_torch(model: nn.Module, onnx_path: str | Path, iterations: int | None = None,
                       inputs: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Largest corner difference (working pixels) between onnxruntime on ``onnx_path`` and PyTorch on ``model``.

    Args:
        inputs: ``(image_in, image_ref)`` ``(B, 3, S, S)`` float32 in ``[0, 1]``; default: a smooth random
            image and a shifted copy of it.
    """
    import onnxruntime as ort

    model = copy.deepcopy(model).to("cpu").float().eval()
    iterations = default_iterations(model) if iterations is None else int(iterations)
    if inputs is None:
        inputs = _example_pair(int(model.config.size))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    _, offsets = session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: inputs[0], INPUT_NAMES[1]: inputs[1]})
    with torch.no_grad():
        _, expected = WorkingFrameEstimate(model, iterations)(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1]))
    return float(np.abs(offsets - expected.numpy()).max())


def _example_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image ``(1, 3, S, S)`` and the same shifted by a few pixels."""
    import cv2

    noise = np.random.default_rng(seed).random((size + 16, size + 16, 3)).astype(np.float32)
    image = cv2.GaussianBlur(noise, (0, 0), 3)
    image = (image - image.min()) / (image.max() - image.min())
    a, b = image[4 : 4 + size, 4 : 4 + size], image[7 : 7 + size, 2 : 2 + size]
    return tuple(np.ascontiguousarray(x.transpose(2, 0, 1)[None]) for x in (a, b))
