"""Check behind docs/icpr2020/README.md, section 1.8: does applying a trained transformer again
finish the un-rotation it started?

Loads finished ``reproduce`` checkpoints of STN-C0 and STN-SL1 and applies each transformer
k = 1, 2, 3 times, composing the thetas (``theta_1 @ theta_2 @ ...``: each pass looks at the input
warped by all previous ones). Prints the Figure-3 r, the slope of predicted on applied angle, and
the test error of the classifier on the k-times warped input (2 000 test digits rotated by
U(-90, 90) deg). k = 1 is the network as trained.

    python docs/icpr2020/iterate_transformer.py runs/icpr/checkpoints
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stn_align.icpr2020 import (
    MNIST_NORM,
    ReproduceConfig,
    build_network,
    load_mnist,
    rotate_images,
    rotation_slope,
    rotation_tracking_r,
)
from stn_align.stn import rotation_angle_deg


def theta_after(model, x: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose ``passes`` transformer passes on ``x`` ``(B, 1, 28, 28)`` -> (theta ``(B, 3, 3)``, warped input)."""
    theta, warped = None, x
    for _ in range(passes):
        loc_input = warped if model.depth == 0 else model.blocks[0](warped)
        step = model.transformer.predict_theta(loc_input)
        theta = step if theta is None else theta @ step
        warped = model.transformer.warp(x, theta)
    return theta, warped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, help="a reproduce run's checkpoints folder")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    args = ap.parse_args()
    missing = [n for n in ("STN-C0", "STN-SL1") if not (args.checkpoints / f"{n}-seed0.pt").is_file()]
    if missing:
        ap.error(f"{args.checkpoints}: no finished checkpoint of {', '.join(missing)} (<network>-seed0.pt)")

    torch.set_num_threads(1)
    _, test = load_mnist(args.data, Path.home() / ".cache" / "stn-align")
    angles = ReproduceConfig("mnist-rot").figure_angles
    mean, std = MNIST_NORM["mnist-rot"]
    probe = test.images[:200].float() / 255.0
    n = 2000
    applied = (torch.rand(n, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 90
    x_test = (rotate_images(test.images[:n].float() / 255.0, applied) - mean) / std
    for name in ("STN-C0", "STN-SL1"):
        model = build_network(name, "mnist-rot")
        state = torch.load(args.checkpoints / f"{name}-seed0.pt", weights_only=True)
        model.load_state_dict(state["model"])
        model.eval()
        for passes in (1, 2, 3):
            with torch.no_grad():
                pred = np.stack([
                    rotation_angle_deg(theta_after(model, (rotate_images(probe, torch.full((200,), a)) - mean) / std,
                                                   passes)[0]).numpy()
                    for a in angles
                ])  # (A, N)
                _, warped = theta_after(model, x_test, passes)
                h = warped
                for block in model.blocks:
                    h = block(h)
                err = 100.0 * (model.head(h.flatten(1)).argmax(1) != test.labels[:n]).float().mean().item()
            print(f"{name} passes {passes}: r {rotation_tracking_r(pred, angles):.3f} "
                  f"slope {rotation_slope(pred, angles):.2f} (within 60 deg {rotation_slope(pred, angles, 60):.2f}) "
                  f"test error {err:.2f} % | mean predicted {np.round(pred.mean(1)).astype(int).tolist()}", flush=True)


if __name__ == "__main__":
    main()
