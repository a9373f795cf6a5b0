"""Validation corner error against wall time for training runs: the controlled comparison of architectures.

Reads each checkpoint's ``curve`` (``[step, seconds, val mean px, val under 3 px]``, written by ``stn-align train
--eval-every-seconds``), plots mean error against minutes, and prints a markdown table of the error each run had
reached at equal wall times. Needs matplotlib (``pip install -e ".[plots]"``).

    python benchmarks/learning_curves.py runs/iterative.safetensors runs/global.safetensors \\
        --labels "0.2 iterative,0.1 global" --every 5 --until 45 --png docs/training/comparison.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stn_align.checkpoint import read_metadata  # noqa: E402


def reached(curve: list, seconds: float) -> list | None:
    """The last validation point at or before ``seconds`` of wall time."""
    points = [p for p in curve if p[1] <= seconds]
    return points[-1] if points else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--labels", default=None, help="comma-separated labels (default: file names)")
    parser.add_argument("--every", type=float, default=5.0, help="table step, minutes")
    parser.add_argument("--until", type=float, default=None, help="last table row, minutes (default: the shortest run)")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    parser.add_argument("--json", type=Path, default=None, help="write the curves here")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [p.stem for p in args.checkpoints]
    metas = [read_metadata(p) for p in args.checkpoints]
    curves = [m.get("curve") or [] for m in metas]
    if not all(curves):
        sys.exit("error: a checkpoint has no validation curve (train with --eval-every-seconds)")
    until = args.until or min(c[-1][1] for c in curves) / 60
    print("| wall time | " + " | ".join(f"{label}: mean px (step, < 3 px)" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    minute = args.every
    while minute <= until + 1e-9:
        cells = []
        for curve in curves:
            point = reached(curve, minute * 60)
            if minute * 60 > curve[-1][1] + args.every * 60:
                cells.append("(stopped)")
            else:
                cells.append("–" if point is None else f"{point[2]:.2f} ({point[0]}, {point[3]:.0%})")
        print(f"| {minute:g} min | " + " | ".join(cells) + " |")
        minute += args.every
    if args.json:
        args.json.write_text(json.dumps({label: {"curve": c, "device": m["training"].get("device"),
                                                  "args": m["training"].get("args")} for label, c, m in zip(labels, curves, metas)}, indent=1))
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit('error: --png needs matplotlib: pip install -e ".[plots]"')
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for label, curve in zip(labels, curves):
            ax.plot([p[1] / 60 for p in curve], [p[2] for p in curve], marker="o", ms=3, label=label)
        ax.axvline(until, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("wall time (minutes)")
        ax.set_ylabel("validation mean corner error (px, 128-px frame)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
