"""Check behind docs/icpr2020/README.md, section 6: do the translated-MNIST transformers find the digit?

The translation analogue of Figure 3. Pastes 1 000 test digits into empty 60x60 canvases at known
offsets (U{-16..16} px per axis, no clutter) and prints, for each finished STN checkpoint, the
Pearson r between the translation in theta and the digit's offset, and theta's mean scale
(sqrt |det A|; < 1 zooms in).

    python docs/icpr2020/translation_tracking.py runs/icpr-trans/checkpoints
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stn_align.icpr2020 import CANVAS, MAX_SHIFT, MNIST_NORM, build_network, load_mnist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, help="a `reproduce mnist-trans` run's checkpoints folder")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    missing = [n for n in ("STN-C0", "STN-C1", "STN-SL1") if not (args.checkpoints / f"{n}-seed0.pt").is_file()]
    if missing:
        ap.error(f"{args.checkpoints}: no finished checkpoint of {', '.join(missing)} (<network>-seed0.pt)")

    _, test = load_mnist(args.data, Path.home() / ".cache" / "stn-align")
    digits = test.images[: args.n].float() / 255.0
    top_left = torch.randint(0, 2 * MAX_SHIFT + 1, (args.n, 2), generator=torch.Generator().manual_seed(3))
    canvas = torch.zeros(args.n, 1, CANVAS, CANVAS)
    for i, (r, c) in enumerate(top_left.tolist()):
        canvas[i, :, r : r + 28, c : c + 28] = digits[i]
    mean, std = MNIST_NORM["mnist-trans"]
    offset = (top_left - MAX_SHIFT).float().numpy()  # (N, 2): rows, cols from the centre
    for name in ("STN-C0", "STN-C1", "STN-SL1"):
        model = build_network(name, "mnist-trans")
        model.load_state_dict(torch.load(args.checkpoints / f"{name}-seed0.pt", weights_only=True)["model"])
        model.eval()
        with torch.no_grad():
            _, theta = model.forward_with_theta((canvas - mean) / std)
        rx = np.corrcoef(theta[:, 0, 2].numpy(), offset[:, 1])[0, 1]
        ry = np.corrcoef(theta[:, 1, 2].numpy(), offset[:, 0])[0, 1]
        scale = torch.linalg.det(theta[:, :2, :2]).abs().sqrt().mean().item()
        print(f"{name}: r(theta x-translation, x offset) {rx:.3f}, r(y-translation, y offset) {ry:.3f}, "
              f"mean scale {scale:.2f}")


if __name__ == "__main__":
    main()
