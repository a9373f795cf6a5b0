"""Pilot runs behind docs/icpr2020/README.md, section 1: does a transformer learn to rotate?

Trains one rotated-MNIST network with the package's networks and data code and prints, every
``--eval-every`` steps, the Figure-3 Pearson r (200 test digits x 19 angles), the spread of
the predicted angles and the fraction of dead localisation units. Batches are drawn with
replacement (not epochs), so the numbers are close to, not identical with, a `reproduce` run.

    python docs/icpr2020/pilot.py STN-SL1 --momentum 0.9 --lr 1e-3 --loc-lr-scale 10 --ramp 3000 --warm 300

``--init`` starts from the weights of a ``reproduce`` checkpoint (``OUT/checkpoints/NET-seed0.pt``)
instead of the identity start, e.g. to see what a lower learning rate does to a long run.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stn_align.icpr2020 import (
    MNIST_NORM,
    ROT_MAX_DEG,
    build_network,
    load_mnist,
    predicted_rotation_angles,
    ReproduceConfig,
    rotate_images,
    rotation_tracking_r,
)
from stn_align.icpr2020 import ConvBlockSpec, build_stn_cx, build_stn_slx


def dead_fraction(model, x: torch.Tensor) -> float:
    """Fraction of the localisation net's FC units that are zero on every input ``x`` ``(N, 1, 28, 28)``."""
    with torch.no_grad():
        feats = x if model.depth == 0 else model.blocks[0](x)
        h = model.transformer.localisation(feats)
    return (h <= 0).all(0).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("network", help="STN-C0, STN-C1 or STN-SL1")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--loc-lr-scale", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--weight-decay", type=float, default=0.0, help="on the classifier's weights only")
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--ramp", type=int, default=0, help="steps over which the rotation range grows 0 -> 90 deg (0: off)")
    ap.add_argument("--warm", type=int, default=0, help="steps of unrotated digits before the ramp")
    ap.add_argument("--freeze", type=int, default=0,
                    help="steps after --warm during which the classifier is frozen (lr 0): only the transformer learns")
    ap.add_argument("--width", type=int, default=64, help="channels of both classifier conv blocks (paper: 64)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--init", type=Path, help="a reproduce checkpoint whose model weights to start from")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    args = ap.parse_args()
    if args.init is not None and not args.init.is_file():
        ap.error(f"{args.init}: no such checkpoint")

    torch.set_num_threads(1)
    train, test = load_mnist(args.data, Path.home() / ".cache" / "stn-align")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if args.width == 64:
        model = build_network(args.network, "mnist-rot")
    else:  # a narrower classifier (not the paper's): less room to absorb the residual rotation
        blocks = (ConvBlockSpec(args.width, 9), ConvBlockSpec(args.width, 7))
        depth = int(args.network[-1])
        build = build_stn_slx if args.network.startswith("STN-SL") else build_stn_cx
        model = build((1, 28, 28), depth, 10, blocks, padding_mode="border")
    if args.init is not None:
        try:
            model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True)["model"])
        except (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            ap.error(f"{args.init}: not a {args.network} checkpoint of `reproduce` ({type(e).__name__})")
    loc = list(model.transformer.parameters())
    loc_ids = {id(p) for p in loc}
    groups = [{"params": [p for p in model.parameters() if id(p) not in loc_ids], "lr": args.lr,
               "weight_decay": args.weight_decay},
              {"params": loc, "lr": args.lr * args.loc_lr_scale, "weight_decay": 0.0}]
    opt = torch.optim.Adam(groups) if args.optimizer == "adam" else torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    cfg = ReproduceConfig("mnist-rot", channels_last=False)
    mean, std = MNIST_NORM["mnist-rot"]
    probe = test.images[:200]
    start, smooth = time.time(), None
    for step in range(args.steps):
        frozen = args.warm <= step < args.warm + args.freeze
        opt.param_groups[0]["lr"] = 0.0 if frozen else args.lr
        frac = 1.0 if args.ramp == 0 else min(1.0, max(0.0, (step - args.warm) / args.ramp))
        idx = torch.randint(0, train.images.shape[0], (args.batch_size,), generator=gen)
        angles = (torch.rand(args.batch_size, generator=gen) * 2 - 1) * ROT_MAX_DEG * frac
        x = (rotate_images(train.images[idx].float() / 255.0, angles) - mean) / std
        loss = F.cross_entropy(model(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % args.eval_every == 0:
            pred = predicted_rotation_angles(model, probe, cfg.figure_angles, "cpu", cfg)
            x90 = (rotate_images(probe.float() / 255.0, torch.linspace(-90, 90, probe.shape[0])) - mean) / std
            print(f"step {step + 1} max rotation {ROT_MAX_DEG * frac:.0f} loss {smooth:.3f} "
                  f"r {rotation_tracking_r(pred, cfg.figure_angles):.3f} predicted std {pred.std():.1f} deg "
                  f"dead {dead_fraction(model, x90):.2f}{' frozen' if frozen else ''} ({time.time() - start:.0f} s)", flush=True)
            model.train()


if __name__ == "__main__":
    main()
