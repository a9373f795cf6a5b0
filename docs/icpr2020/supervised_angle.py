"""Capacity check behind docs/icpr2020/README.md, section 1.8: can STN-C0's localisation net
read the orientation of a handwritten digit at all?

Trains the localisation net + regression layer of STN-C0 (``localisation_features`` + the
identity-initialised ``SpatialTransformer`` head) to output the rotation that undoes the applied
one: MSE between theta's 2x2 linear part and ``rotation_theta(angle)``, on training digits rotated
by U(-90, 90) deg. Every ``--eval-every`` steps it prints the Figure-3 r and slope (200 test digits
x 19 angles), read out exactly as for the trained classifiers, and at the end r per digit class.

    python docs/icpr2020/supervised_angle.py --steps 4000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stn_align.icpr2020 import (
    MNIST_NORM,
    ROT_MAX_DEG,
    ReproduceConfig,
    load_mnist,
    rotate_images,
    rotation_r_per_class,
    rotation_slope,
    rotation_tracking_r,
)
from stn_align.stn import SpatialTransformer, localisation_features, rotation_angle_deg, rotation_theta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = load_mnist(args.data, Path.home() / ".cache" / "stn-align")
    gen = torch.Generator().manual_seed(1)
    st = SpatialTransformer(localisation_features(1, (28, 28)), 20)
    opt = torch.optim.SGD(st.parameters(), lr=args.lr, momentum=args.momentum)
    angles = ReproduceConfig("mnist-rot").figure_angles
    mean, std = MNIST_NORM["mnist-rot"]
    probe = test.images[:200].float() / 255.0
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, train.images.shape[0], (args.batch_size,), generator=gen)
        a = (torch.rand(args.batch_size, generator=gen) * 2 - 1) * ROT_MAX_DEG
        x = (rotate_images(train.images[idx].float() / 255.0, a) - mean) / std
        loss = F.mse_loss(st.predict_theta(x)[:, :2, :2], rotation_theta(a)[:, :2, :2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            with torch.no_grad():
                pred = torch.stack([
                    rotation_angle_deg(st.predict_theta((rotate_images(probe, torch.full((200,), a)) - mean) / std))
                    for a in angles
                ]).numpy()  # (A, N)
            print(f"step {step} loss {loss.item():.4f} r {rotation_tracking_r(pred, angles):.3f} "
                  f"slope {rotation_slope(pred, angles):.2f} ({time.time() - start:.0f} s)", flush=True)
    labels = test.labels[:200].numpy()
    print("r per digit class: " + ", ".join(f"{d}: {r:.2f}" for d, r in rotation_r_per_class(pred, angles, labels).items()),
          flush=True)


if __name__ == "__main__":
    main()
