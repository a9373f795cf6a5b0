"""ONNX export: onnxruntime reproduces PyTorch's estimate (corners within 1e-3 px) for any batch size."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import TINY, base_image, corner_error  # noqa: E402
from stn_align.align import Aligner, network_view, resolve_model  # noqa: E402
from stn_align.checkpoint import load_model  # noqa: E402
from stn_align.cli import app  # noqa: E402
from stn_align.export import ExportError, WorkingFrameEstimate, default_iterations, export_onnx, inverse_3x3  # noqa: E402
from stn_align.geometry import working_to_pixel  # noqa: E402
from stn_align.model import AlignerNet, ModelConfig  # noqa: E402

pytestmark = pytest.mark.slow  # CI runs these too: python -m pytest -q -m slow


def photo_pairs(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` pairs of 160 x 160 photos: a crop and a shifted, slightly rotated crop of the same photo."""
    import cv2

    inputs, refs = [], []
    for k in range(n):
        image = base_image(k, (200, 200))
        turn = cv2.getRotationMatrix2D((100, 100), 4.0 * (k - 1), 1.0)
        turn[:, 2] += (5 + k, -3 * k)
        inputs.append(np.ascontiguousarray(image[20:180, 20:180]))
        refs.append(np.ascontiguousarray(cv2.warpAffine(image, turn, (200, 200), borderMode=cv2.BORDER_REFLECT)[20:180, 20:180]))
    return inputs, refs


def views(images: list[np.ndarray], size: int) -> np.ndarray:
    """The network's inputs ``(B, 3, S, S)`` float32, resized as the Aligner does."""
    return np.ascontiguousarray(np.stack([network_view(x, size) for x in images]).transpose(0, 3, 1, 2))


def run_both(model, path, iterations, image_in, image_ref):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["matrix", "corner_offsets"], {"image_in": image_in, "image_ref": image_ref})
    with torch.no_grad():
        expected = WorkingFrameEstimate(model, iterations)(torch.from_numpy(image_in), torch.from_numpy(image_ref))
    return got, [x.numpy() for x in expected]


def test_shipped_default_model_exports_through_the_cli(tmp_path):
    out = tmp_path / "default.onnx"
    result = CliRunner().invoke(app, ["export", "default", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "largest corner difference" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["default.onnx"]  # written atomically, no leftovers
    model, _ = load_model(resolve_model("default"))
    proto = onnx.load(str(out))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    props = {p.key: p.value for p in proto.metadata_props}
    size, iterations = int(props["size"]), int(props["iterations"])
    assert size == model.config.size and iterations == default_iterations(model)

    photos_in, photos_ref = photo_pairs(3)  # exported with a batch of 2: the batch axis is really dynamic
    (matrix, offsets), (_, offsets_pt) = run_both(model, out, iterations, views(photos_in, size), views(photos_ref, size))
    assert offsets.shape == (3, 4, 2) and matrix.shape == (3, 3, 3)
    assert np.abs(offsets - offsets_pt).max() < 1e-3
    assert np.abs(offsets_pt).max() > 1.0  # the pairs really move
    # The README's recipe (working matrix -> full resolution) gives what the Aligner estimates.
    expected = Aligner.load("default", device="cpu").estimate(photos_in, photos_ref)
    for m, e in zip(matrix, expected):
        assert corner_error(working_to_pixel(m.astype(np.float64), (160, 160), (160, 160), size), e, (160, 160)) < 2e-3


def test_random_iterative_network_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = AlignerNet(ModelConfig(**TINY)).eval()  # the default architecture, at 64 px
    with torch.no_grad():  # small random output layers, so that no stage predicts the identity
        for layer in [model.head.out, *([model.update.out] if hasattr(model, "update") else [])]:
            layer.weight.normal_(0, 0.02)
            layer.bias.normal_(0, 0.02)
    path = export_onnx(model, tmp_path / "random.onnx", iterations=2)
    for batch in (1, 4):
        image_in, image_ref = (views(x, 64) for x in photo_pairs(batch))
        (matrix, offsets), (matrix_pt, offsets_pt) = run_both(model, path, 2, image_in, image_ref)
        assert np.abs(offsets_pt).max() > 0.5  # not the identity
        assert np.abs(offsets - offsets_pt).max() < 1e-3
        assert np.allclose(matrix, matrix_pt, atol=1e-4) and np.allclose(matrix[:, 2, 2], 1)


def test_matrix_and_corner_offsets_agree():
    """``corner_offsets`` are where ``matrix`` moves the working frame's corner pixels."""
    import cv2

    torch.manual_seed(1)
    model = AlignerNet(ModelConfig(**TINY)).eval()
    with torch.no_grad():
        model.head.out.bias.normal_(0, 0.05)
    image_in, image_ref = (views(x, 64) for x in photo_pairs(2))
    with torch.no_grad():
        matrix, offsets = WorkingFrameEstimate(model, 2)(torch.from_numpy(image_in), torch.from_numpy(image_ref))
    corners = np.float64([[0, 0], [63, 0], [63, 63], [0, 63]])
    for m, d in zip(matrix.numpy(), offsets.numpy()):
        moved = cv2.perspectiveTransform(corners[None], m.astype(np.float64))[0]
        assert np.abs(moved - corners - d).max() < 1e-3


def test_closed_form_inverse_matches_torch():
    matrices = torch.eye(3) + 0.3 * torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(inverse_3x3(matrices), torch.linalg.inv(matrices), atol=1e-5)


def test_bad_requests_are_one_line_errors(tmp_path):
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(AlignerNet(ModelConfig(**TINY)), tmp_path / "x.onnx", opset=17)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code != 0 and "missing.safetensors" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
