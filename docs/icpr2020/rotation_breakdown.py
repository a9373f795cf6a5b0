"""Check behind docs/icpr2020/README.md, section 1 item 9 and section 7: what keeps Figure 3's r below 0.9?

Figure 3's Pearson r mixes three things: how far the transformer turns (amplitude), whether it
turns in proportion to the applied angle (the shape of its mean curve) and how consistent it is
from digit to digit (scatter). For each STN checkpoint of a ``reproduce mnist-rot`` run, finished
or not, this prints, on Figure 3's 200 test digits at -90..90 deg:

- r over all angles and within +-30 / +-60 deg;
- r of the mean curve alone (every digit replaced by the mean prediction: no scatter);
- the median and 10th percentile of the per-digit r (each digit's 19 predictions vs the angles);
- the mean predicted angle at -90 / -60 / 0 / +60 / +90 deg (amplitude and bias);
- r per digit class, and r without the classes 0 and 1 (which look alike at many angles);
- the per-epoch r of the training log, averaged over blocks of 20 epochs, and its linear trend
  from epoch 60 on (how fast r still rises);
- the test error of the last 10 logged epochs, mean and range (one epoch's error is noisy at a
  high learning rate).

    python docs/icpr2020/rotation_breakdown.py runs/paper/checkpoints
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stn_align.icpr2020 import (
    ReproduceConfig,
    build_network,
    load_mnist,
    predicted_rotation_angles,
    rotation_r_per_class,
    rotation_tracking_r,
)

ANGLES = tuple(float(a) for a in range(-90, 91, 10))


def breakdown(predicted: np.ndarray, labels: np.ndarray) -> dict:
    """Statistics of ``predicted`` ``(A, N)`` angles (degrees) at :data:`ANGLES` for digits of class ``labels`` ``(N,)``."""
    applied = np.array(ANGLES)
    per_digit = np.array([np.corrcoef(applied, predicted[:, i])[0, 1] for i in range(predicted.shape[1])])
    mean_curve = np.repeat(predicted.mean(axis=1, keepdims=True), predicted.shape[1], axis=1)
    within = lambda lim: rotation_tracking_r(predicted[np.abs(applied) <= lim], tuple(applied[np.abs(applied) <= lim]))  # noqa: E731
    return {
        "r": rotation_tracking_r(predicted, ANGLES),
        "r_within_30": within(30),
        "r_within_60": within(60),
        "r_mean_curve": rotation_tracking_r(mean_curve, ANGLES),
        "per_digit_r_median": float(np.nanmedian(per_digit)),
        "per_digit_r_p10": float(np.nanpercentile(per_digit, 10)),
        "mean_at": {a: float(predicted[ANGLES.index(a)].mean()) for a in (-90.0, -60.0, 0.0, 60.0, 90.0)},
        "r_per_class": rotation_r_per_class(predicted, ANGLES, labels),
        "r_without_0_1": rotation_tracking_r(predicted[:, labels > 1], ANGLES),
    }


def epoch_r_trend(log: list[dict], block: int = 20, since: int = 60) -> tuple[dict, float | None]:
    """Mean per-epoch ``rotation_r`` of ``log`` per block of ``block`` epochs, and its slope per 100 epochs from ``since``."""
    r = np.array([e["rotation_r"] for e in log if "rotation_r" in e])
    blocks = {f"{i + 1}-{min(i + block, len(r))}": float(r[i:i + block].mean()) for i in range(0, len(r), block)}
    late = np.arange(len(r))[since - 1:]
    slope = float(np.polyfit(late, r[late], 1)[0] * 100) if len(late) >= 10 else None
    return blocks, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, help="a `reproduce mnist-rot` run's checkpoints folder")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    ap.add_argument("--networks", default="STN-C0,STN-C1,STN-SL1")
    args = ap.parse_args()
    names = [n for n in args.networks.split(",") if (args.checkpoints / f"{n}-seed0.pt").is_file()]
    if not names:
        ap.error(f"{args.checkpoints}: no checkpoint of {args.networks} (<network>-seed0.pt)")

    torch.set_num_threads(1)
    _, test = load_mnist(args.data, Path.home() / ".cache" / "stn-align")
    cfg = ReproduceConfig("mnist-rot", channels_last=False)
    for name in names:
        state = torch.load(args.checkpoints / f"{name}-seed0.pt", map_location="cpu", weights_only=True)
        model = build_network(name, "mnist-rot")
        model.load_state_dict(state["model"])
        log = state["result"]["epochs_log"] if state.get("result") else state["log"]
        epochs = len(log)
        predicted = predicted_rotation_angles(model, test.images[:200], ANGLES, torch.device("cpu"), cfg)
        s = breakdown(predicted, test.labels[:200].numpy())
        print(f"{name} (epoch {epochs}): r {s['r']:.3f}, within +-60 {s['r_within_60']:.3f}, within +-30 "
              f"{s['r_within_30']:.3f}; mean curve alone {s['r_mean_curve']:.3f}; per-digit r median "
              f"{s['per_digit_r_median']:.3f}, p10 {s['per_digit_r_p10']:.3f}; mean predicted at -90/-60/0/60/90: "
              + " / ".join(f"{v:+.0f}" for v in s["mean_at"].values()))
        print(f"  r per class: " + ", ".join(f"{d}: {r:.2f}" for d, r in s["r_per_class"].items())
              + f"; without 0 and 1: {s['r_without_0_1']:.3f}")
        blocks, slope = epoch_r_trend(log)
        print("  per-epoch r, mean per 20 epochs: " + ", ".join(f"{k}: {v:.3f}" for k, v in blocks.items())
              + ("" if slope is None else f"; trend from epoch 60: {slope:+.3f} per 100 epochs"))
        errors = np.array([e["test_error_pct"] for e in log[-10:]])
        print(f"  test error, last {len(errors)} epochs: mean {errors.mean():.2f} %, {errors.min():.2f}-{errors.max():.2f} %")


if __name__ == "__main__":
    main()
