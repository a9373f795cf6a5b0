"""Tests of the spatial transformer layer and the CNN / STN-C0 / STN-CX / STN-SLX builders."""

import cv2
import numpy as np
import pytest
import torch

from stn_align.icpr2020 import MNIST_BLOCKS, SVHN_BLOCKS, build_cnn, build_stn_c0, build_stn_cx, build_stn_slx
from stn_align.stn import (
    SpatialTransformer,
    localisation_features,
    rotation_angle_deg,
    rotation_theta,
    theta_to_pixel_matrix,
    warp_with_theta,
)

torch.set_num_threads(1)


def _smooth_image(h: int = 32, w: int = 32) -> np.ndarray:
    """A smooth, asymmetric float32 test image ``(H, W)`` in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-((xx - 0.35 * w) ** 2 + (yy - 0.6 * h) ** 2) / (2 * (0.12 * w) ** 2))
    return (0.7 * blob + 0.3 * xx / w).astype(np.float32)


@pytest.mark.parametrize("transform", ["affine", "projective"])
def test_identity_at_init_reproduces_input(transform):
    torch.manual_seed(0)
    st = SpatialTransformer(localisation_features(3, (28, 28)), 20, transform=transform)
    x = torch.rand(4, 3, 28, 28)
    warped, theta = st(x)
    assert theta.shape == (4, 3, 3)
    torch.testing.assert_close(theta, torch.eye(3).expand(4, 3, 3))
    torch.testing.assert_close(warped, x, atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_is_rot90():
    x = torch.rand(2, 1, 16, 16)
    out = warp_with_theta(x, rotation_theta(torch.full((2,), 90.0)))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform", ["affine", "projective"])
def test_known_theta_matches_opencv(transform):
    img = _smooth_image()
    h, w = img.shape
    theta = rotation_theta(torch.tensor([30.0]))
    if transform == "projective":
        theta = theta.clone()
        theta[0, 2, :2] = torch.tensor([0.08, -0.05])  # perspective row
        theta[0, 0, 2] = 0.1  # and a shift
    out = warp_with_theta(torch.from_numpy(img)[None, None], theta, transform=transform)[0, 0].numpy()
    m = theta_to_pixel_matrix(theta, (h, w), (h, w))[0].numpy()
    ref = cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inner = (slice(3, -3), slice(3, -3))  # the two samplers treat the outermost half pixel differently
    assert np.abs(out[inner] - ref[inner]).max() < 0.02
    assert rotation_angle_deg(rotation_theta(torch.tensor([30.0]))).item() == pytest.approx(30.0, abs=1e-4)


def test_rotation_angle_ignores_symmetric_stretch():
    """The read-out angle is the rotation factor of theta's polar decomposition, not its first column."""
    angles = torch.tensor([-75.0, 30.0, 89.0])
    stretch = torch.tensor([[1.4, 0.3, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])  # symmetric, positive definite
    theta = rotation_theta(angles) @ stretch
    torch.testing.assert_close(rotation_angle_deg(theta), angles, atol=1e-3, rtol=0)
    first_column = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert (first_column - angles).abs().min() > 5  # the old read-out is pulled off by the stretch


def test_gradients_reach_the_localisation_net():
    torch.manual_seed(0)
    model = build_stn_c0((1, 28, 28))
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    reg = model.transformer.regression
    assert reg.weight.grad is not None and reg.weight.grad.abs().sum() > 0
    assert reg.bias.grad.abs().sum() > 0
    # the trunk gets gradient through the regression weights, which start at zero
    with torch.no_grad():
        reg.weight.normal_(0, 1e-2)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    trunk_conv = model.transformer.localisation[0][0]
    assert trunk_conv.weight.grad.abs().sum() > 0


def test_slx_gradients_reach_shared_blocks_through_localisation():
    torch.manual_seed(0)
    model = build_stn_slx((1, 28, 28), 1)
    with torch.no_grad():
        model.transformer.regression.weight.normal_(0, 1e-2)
    _, theta = model.forward_with_theta(torch.rand(4, 1, 28, 28))
    theta.sum().backward()  # only the localisation path reaches theta
    assert model.blocks[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "build, in_shape",
    [
        (lambda s: build_cnn(s), (1, 28, 28)),
        (lambda s: build_stn_c0(s), (1, 28, 28)),
        (lambda s: build_stn_cx(s, 1), (1, 28, 28)),
        (lambda s: build_stn_slx(s, 1), (1, 28, 28)),
        (lambda s: build_cnn(s), (1, 60, 60)),
        (lambda s: build_stn_c0(s, out_scale=0.5), (1, 60, 60)),
        (lambda s: build_stn_cx(s, 1, out_scale=0.5), (1, 60, 60)),
        (lambda s: build_stn_slx(s, 1, out_scale=0.5), (1, 60, 60)),
        (lambda s: build_stn_slx(s, 1, transform="projective"), (1, 28, 28)),
    ],
)
def test_mnist_builders_output_shapes(build, in_shape):
    torch.manual_seed(0)
    model = build(in_shape)
    logits, theta = model.forward_with_theta(torch.rand(3, *in_shape))
    assert logits.shape == (3, 10)
    assert theta.shape == (3, 3, 3)


@pytest.mark.parametrize("depth", [0, 3, 6, 8])
def test_svhn_builders_output_shapes(depth):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    for build in (build_stn_cx, build_stn_slx):
        model = build((3, 32, 32), depth, blocks=SVHN_BLOCKS, padding_mode="zeros")
        logits, theta = model.forward_with_theta(x)
        assert logits.shape == (2, 10) and theta.shape == (2, 3, 3)


def test_slx_shares_the_classifier_layers():
    c1, sl1 = build_stn_cx((1, 28, 28), 1), build_stn_slx((1, 28, 28), 1)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(sl1) == n(c1)  # no copy of the first block
    assert sl1.transformer.localisation[0][0].in_channels == MNIST_BLOCKS[0].out_channels
    assert n(build_cnn((1, 28, 28))) < n(c1)


def test_stn_cx_warps_feature_maps_and_slx_warps_input():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    for model, expected in ((build_stn_cx((1, 28, 28), 1), 64), (build_stn_slx((1, 28, 28), 1), 1)):
        seen = {}
        model.transformer.register_forward_hook(lambda m, inp, out: seen.update(c=out[0].shape[1]))
        model(x)
        assert seen["c"] == expected
