"""Validation figures of a checkpoint at several update counts, on the training run's own held-out pairs.

The model cards' "updates at inference" and "coarse stage measured" figures come from this script:

    python benchmarks/validation_sweep.py models/default.safetensors --iterations 4,6,8
    python benchmarks/validation_sweep.py models/default.safetensors --iterations 6 --set coarse_rounds=0
    python benchmarks/validation_sweep.py 0.1-default.safetensors --iterations 3      # a 0.1 (global) model

The pairs are ``train.make_validation_set`` with the default TrainConfig (seed 0, 256 pairs, wider 0.2 motions)
drawn from the photos ``--data`` holds out (file-name hash), i.e. the pairs every training run validates on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stn_align.checkpoint import load_model  # noqa: E402
from stn_align.train import TrainConfig, evaluate, find_photos, load_photos, make_validation_set, split_photos  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--iterations", default="6", help="comma-separated update (or round) counts")
    parser.add_argument("--set", default=None, help="override one ModelConfig field, e.g. coarse_rounds=0")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, _ = load_model(args.checkpoint)
    if args.set:
        key, value = args.set.split("=")
        net.config = replace(net.config, **{key: int(value)})
    config = TrainConfig(data_dir=args.data, out="-", transform=net.config.transform)
    _, val_paths = split_photos(find_photos(config.data_dir), config.val_fraction)
    photos, groups, _ = load_photos(val_paths, 512)
    val = make_validation_set(photos, groups, config)
    results = {}
    for iterations in (int(x) for x in args.iterations.split(",")):
        results[iterations] = evaluate(net, val, torch.device("cpu"), iterations)
        r = results[iterations]
        print(f"{iterations}: mean {r['mean_px']:.2f} px, median {r['median_px']:.2f}, "
              f"<1 px {r['under_1px']:.1%}, <3 px {r['under_3px']:.1%} ({r['pairs']} pairs)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
