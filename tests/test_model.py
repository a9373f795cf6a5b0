"""The network: shapes, identity at initialisation, the correlation lookup, the affine constraint, learning, checkpoints."""

import json

import pytest
import torch
import torch.nn.functional as F

from stn_align.checkpoint import CheckpointError, load_model, read_metadata, save_model
from stn_align.geometry import homography_to_corners, sample
from stn_align.model import AlignerNet, CorrelationPyramid, ModelConfig, global_correlation
from stn_align.model.network import corners_to_homography, parallelogram

SMALL = dict(size=64, widths=(8, 16, 32), head_width=32)


@pytest.mark.parametrize("architecture", ["iterative", "global"])
@pytest.mark.parametrize("transform", ["affine", "projective"])
def test_identity_at_init_and_shapes(transform, architecture):
    torch.manual_seed(0)
    net = AlignerNet(ModelConfig(transform=transform, architecture=architecture, **SMALL)).eval()
    a, b = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    estimates = net(a, b, iterations=3)
    # iterative: the coarse rounds, then one estimate per update
    assert len(estimates) == (3 if architecture == "global" else net.config.coarse_rounds + 3)
    for h in estimates:
        assert h.shape == (3, 3, 3)
        assert torch.allclose(h, torch.eye(3).expand(3, 3, 3), atol=1e-6)
    assert len(net(a, b)) == (net.config.iterations + (0 if architecture == "global" else net.config.coarse_rounds))


def test_global_correlation_shape_and_peak():
    f = F.normalize(torch.randn(2, 16, 8, 8), dim=1)
    corr = global_correlation(f, f)
    assert corr.shape == (2, 64, 8, 8)
    # identical features: each reference cell matches its own input cell best
    assert torch.equal(corr.flatten(2).argmax(1)[0], torch.arange(64))


def test_correlation_lookup_matches_direct_computation():
    """Bilinear lookups in the pooled volume equal dot products with the bilinearly sampled, pooled features."""
    torch.manual_seed(0)
    b, c, h, w, radius = 2, 5, 8, 8, 2
    f_in, f_ref = torch.randn(b, c, h, w, dtype=torch.float64), torch.randn(b, c, h, w, dtype=torch.float64)
    pyramid = CorrelationPyramid(f_in, f_ref, levels=2, radius=radius)
    positions = torch.rand(b, h, w, 2, dtype=torch.float64) * 1.6 - 0.8  # anywhere, sub-cell
    windows = pyramid.lookup(positions)
    side = 2 * radius + 1
    assert windows.shape == (b, 2 * side * side, h, w) and pyramid.channels == 2 * side * side
    for level, ref in enumerate([f_ref, F.avg_pool2d(f_ref, 2)]):
        lh, lw = ref.shape[-2:]
        for (n, i, j) in [(0, 0, 0), (1, 3, 5), (0, 7, 2)]:
            for (dy, dx) in [(0, 0), (-2, 1), (2, -2)]:
                point = positions[n, i, j] + torch.tensor([dx * 2.0 / lw, dy * 2.0 / lh], dtype=torch.float64)
                sampled = sample(ref[n : n + 1], point.view(1, 1, 1, 2), "zeros", align_corners=False).view(c)
                direct = (f_in[n, :, i, j] * sampled).sum()
                channel = level * side * side + (dy + radius) * side + (dx + radius)
                assert torch.allclose(windows[n, channel, i, j], direct, atol=1e-10)


def test_lookup_window_peaks_where_the_features_moved():
    """A reference that is the input shifted by one cell: the window's best match is one cell off centre."""
    torch.manual_seed(1)
    f = F.normalize(torch.randn(1, 16, 8, 8), dim=1)
    shifted = torch.roll(f, shifts=1, dims=3)  # reference content = input content moved right by one cell
    pyramid = CorrelationPyramid(f, shifted, levels=1, radius=2)
    cells = F.affine_grid(torch.eye(2, 3)[None], [1, 1, 8, 8], align_corners=False)
    best = pyramid.lookup(cells)[0, :, 3, 3].argmax()
    assert (int(best) // 5 - 2, int(best) % 5 - 2) == (0, 1)  # (dy, dx)


def test_affine_constraint_holds():
    torch.manual_seed(0)
    corners = torch.randn(5, 4, 2)
    projected = parallelogram(corners)
    assert torch.allclose(projected[:, 3], projected[:, 0] + projected[:, 2] - projected[:, 1], atol=1e-6)
    assert torch.allclose(parallelogram(projected), projected, atol=1e-6)  # a projection
    h = corners_to_homography(corners * 0.1, "affine")
    assert torch.equal(h[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(5, 3))
    # the network itself: after training steps, affine estimates stay affine
    net = AlignerNet(ModelConfig(transform="affine", **SMALL))
    for p in (net.update.out.weight, net.update.out.bias, net.head.out.weight):
        torch.nn.init.normal_(p, std=0.05)
    for h in net.eval()(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), iterations=3):
        assert torch.allclose(h[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(2, 3), atol=1e-6)


def test_gradients_reach_encoder_heads_and_update():
    net = AlignerNet(ModelConfig(**SMALL))
    out = net(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), iterations=2)
    sum(h[:, 0, 2].sum() for h in out).backward()
    assert net.head.out.weight.grad.abs().sum() > 0 and net.update.out.weight.grad.abs().sum() > 0
    # the output layers start at zero, so only they get gradient before the first update
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    net.zero_grad()
    sum(h[:, 0, 2].sum() for h in net(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), iterations=2)).backward()
    assert net.encoder.layers[0][0].weight.grad.abs().sum() > 0
    assert net.encoder.project_fine.weight.grad.abs().sum() > 0  # through the correlation volume


@pytest.mark.slow
def test_overfits_one_pair_below_half_a_pixel():
    """A few hundred CPU steps on one textured pair drive the final estimate under 0.5 px (working frame)."""
    from stn_align.data import NO_PHOTOMETRIC, WarpRanges, crop_pair
    from stn_align.train import corner_loss, normalized_targets

    import numpy as np

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    noise = rng.random((96, 96, 3)).astype(np.float32)
    import cv2

    photo = (cv2.GaussianBlur(noise, (0, 0), 2) * 255 / cv2.GaussianBlur(noise, (0, 0), 2).max()).astype(np.uint8)
    image_in, image_ref, matrix = crop_pair(photo, rng, (64, 64), 0.08)
    a = torch.from_numpy(image_in).permute(2, 0, 1)[None].float() / 255
    b = torch.from_numpy(image_ref).permute(2, 0, 1)[None].float() / 255
    target = normalized_targets(matrix[None], 64)
    net = AlignerNet(ModelConfig(**SMALL)).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(300):
        loss = corner_loss(net(a, b, 3), target, 64, 0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # train mode: batch-norm statistics of this pair, as it was fitted
        estimate = net(a, b, 3)[-1]
    error = float((homography_to_corners(estimate) - target).norm(dim=-1).mean() * (64 - 1) / 2)
    assert error < 0.5, f"overfit error {error:.2f} px"


@pytest.mark.parametrize("architecture", ["iterative", "global"])
def test_checkpoint_round_trip(tmp_path, architecture):
    net = AlignerNet(ModelConfig(transform="affine", architecture=architecture, **SMALL))
    torch.nn.init.normal_(net.head.out.weight, std=0.01)
    save_model(tmp_path / "m.safetensors", net, {"validation": {"mean_px": 1.5}})
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert loaded.config == net.config
    assert meta["validation"]["mean_px"] == 1.5
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(a, b)[-1], net.eval()(a, b)[-1])


def test_version_01_checkpoints_load_as_global():
    """A 0.1 checkpoint (no ``architecture`` in its metadata) rebuilds the 0.1 network."""
    config = ModelConfig.from_dict({"transform": "projective", "size": 128, "widths": [24, 48, 96], "head_width": 128})
    assert config.architecture == "global" and config.iterations == 3


def test_bad_checkpoints_are_clear_errors(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a safetensors"):
        load_model(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no stn-align metadata"):
        read_metadata(foreign)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong), metadata={"stn_align": json.dumps({"model": ModelConfig().to_dict()})})
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(wrong)
    truncated = tmp_path / "truncated.safetensors"
    save_model(truncated, AlignerNet(ModelConfig(size=64)), {})
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_model(truncated)


def test_rescale_homography_is_the_same_transform_in_pixels():
    """A normalised estimate at one working size and its rescaled twin map full-resolution pixels identically."""
    import numpy as np

    from stn_align.geometry import normalized_to_pixel, working_to_pixel
    from stn_align.model.network import rescale_homography

    h128 = corners_to_homography(torch.randn(1, 4, 2, dtype=torch.float64) * 0.1, "projective")
    h256 = rescale_homography(h128, 128, 256)
    full = [working_to_pixel(normalized_to_pixel(h, s)[0].numpy(), (640, 480), (500, 400), s) for h, s in ((h128, 128), (h256, 256))]
    assert np.allclose(full[0], full[1], atol=1e-9)
    assert torch.allclose(rescale_homography(h256, 256, 128), h128, atol=1e-12)


def test_iterative_model_runs_at_a_larger_working_size():
    net = AlignerNet(ModelConfig(**SMALL)).eval()
    torch.nn.init.normal_(net.update.out.weight, std=0.01)
    estimates = net(torch.rand(2, 3, 96, 96), torch.rand(2, 3, 96, 96), iterations=2)
    assert len(estimates) == net.config.coarse_rounds + 2 and estimates[-1].shape == (2, 3, 3)
    assert not torch.allclose(estimates[-1], torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="global model works at 64 px only"):
        AlignerNet(ModelConfig(architecture="global", **SMALL))(torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96))
