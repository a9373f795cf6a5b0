"""The matrix convention, checked against OpenCV directly."""

import cv2
import numpy as np
import pytest
import torch

from stn_align import geometry as g


def textured(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.float32), (0, 0), 1.5)


RANDOM_H = np.array([[0.92, 0.08, 4.0], [-0.05, 1.07, -3.0], [2e-4, -3e-4, 1.0]])


def test_warp_pixels_matches_cv2_warpPerspective():
    image = textured()
    expected = cv2.warpPerspective(image, RANDOM_H, (70, 50), flags=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    got = g.warp_pixels(tensor, torch.from_numpy(RANDOM_H).float()[None], (50, 70))[0].permute(1, 2, 0).numpy()
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(got[inner] - expected[inner]).max() < 0.05


def test_matrix_maps_input_points_to_reference_points():
    # A bright dot at input (20, 10) lands at M(20, 10) in the output of warpPerspective.
    image = np.zeros((60, 80), np.float32)
    image[10, 20] = 1.0
    m = np.array([[1, 0, 7.0], [0, 1, 5.0], [0, 0, 1]])
    out = cv2.warpPerspective(image, m, (80, 60), flags=cv2.INTER_LINEAR)
    assert np.unravel_index(out.argmax(), out.shape) == (15, 27)
    assert np.allclose(g.transform_points(m, np.array([[20.0, 10.0]])), [[27, 15]])


def test_resize_matrix_matches_cv2_resize_pixel_centres():
    image = np.zeros((40, 40), np.float32)
    image[10:30, 10:30] = 1
    small = cv2.resize(image, (20, 20), interpolation=cv2.INTER_LINEAR)
    m = g.resize_matrix((40, 40), (20, 20))
    assert np.allclose(cv2.warpPerspective(image, m, (20, 20), flags=cv2.INTER_LINEAR), small, atol=0.26)
    assert np.allclose(g.transform_points(m, np.array([[-0.5, -0.5], [39.5, 39.5]])), [[-0.5, -0.5], [19.5, 19.5]])


def test_working_frame_round_trip():
    for size in ((80, 60), (640, 480), (37, 91)):
        work = g.pixel_to_working(RANDOM_H, size, (70, 50), 128)
        assert np.allclose(g.working_to_pixel(work, size, (70, 50), 128), RANDOM_H)


def test_working_matrix_is_the_same_map_seen_at_working_size():
    image = textured(120, 160)
    ref_size, work = (100, 90), 64
    full = cv2.warpPerspective(image, RANDOM_H, ref_size)
    m_work = g.pixel_to_working(RANDOM_H, (160, 120), ref_size, work)
    small_in = cv2.resize(image, (work, work), interpolation=cv2.INTER_AREA)
    via_work = cv2.warpPerspective(small_in, m_work, (work, work))
    expected = cv2.resize(full, (work, work), interpolation=cv2.INTER_AREA)
    assert np.abs(via_work - expected)[8:-8, 8:-8].mean() < 6  # same content, different resampling


@pytest.mark.parametrize("transform", ["affine", "projective"])
def test_corner_offsets_round_trip(transform):
    offsets = torch.randn(5, g.NUM_PARAMS[transform]) * 0.1
    homography = g.corner_offsets_to_homography(offsets, transform)
    corners = g.homography_to_corners(homography) - g.unit_corners(5)
    assert torch.allclose(corners.reshape(5, -1)[:, : offsets.shape[1]], offsets, atol=1e-5)
    if transform == "affine":
        assert torch.allclose(homography[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(5, 3))


def test_zero_offsets_are_the_identity():
    assert torch.allclose(g.corner_offsets_to_homography(torch.zeros(2, 8), "projective"), torch.eye(3).expand(2, 3, 3), atol=1e-6)


def test_normalized_pixel_round_trip_and_warp_normalized_matches_pixels():
    m = torch.from_numpy(g.pixel_to_working(RANDOM_H, (80, 60), (80, 60), 32)).float()[None]
    n = g.pixel_to_normalized(m, 32)
    assert torch.allclose(g.normalized_to_pixel(n, 32), m, atol=1e-4)
    image = torch.rand(1, 3, 32, 32)
    a = g.warp_normalized(image, n, padding_mode="zeros")
    b = g.warp_pixels(image, m, (32, 32))
    assert torch.allclose(a, b, atol=1e-4)


def test_corner_error():
    shift = np.array([[1, 0, 3.0], [0, 1, 4.0], [0, 0, 1]])
    assert g.corner_error(shift, np.eye(3), (100, 50)) == pytest.approx(5.0)
    assert g.corner_error(RANDOM_H, RANDOM_H, (100, 50)) == 0.0


def test_unknown_transform_rejected():
    with pytest.raises(ValueError, match="unknown transform"):
        g.corner_offsets_to_homography(torch.zeros(1, 8), "similarity")
