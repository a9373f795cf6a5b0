"""Benchmark: the shipped models vs OpenCV baselines on synthetic pairs from HELD-OUT photos.

    python benchmarks/benchmark.py --models default,affine --out benchmarks/results.md [--pairs 100] [--device cpu]

Settings (pairs drawn deterministically from ``--seed``; photos: ``is_held_out(path, 0.1)``, the split
training never sees):

* ``a``: 128x128 crops, corner jitter +-25 % of the size, projective, products and natural photos;
* ``b``: whole product photos at 448 px (the 224 px photo upscaled), affine (rotation +-30 deg, scale
  x0.78-1.28, shear, translation), white fill;
* ``c``: whole product photos at 448 px, projective, perspective corner jitter +-12 %, white fill;
* ``d``: 512x384 crops of natural photos at least 700 px wide, +-20 %, projective;

all with photometric jitter on both sides; and

* ``r``: the real pair set ``../shared/data/real/hpatches6`` (from the repository root; ``--real``; every pair,
  read by :func:`stn_align.evaluate.load_pair_set` as ``stn-align eval`` does; projective baselines),
  skipped with a note when the folder is missing. The pooled score figures (``all`` AUC, thresholds)
  stay over the synthetic settings when any ran.

Methods: every model with ``refine=none`` and ``refine=ecc``
(no safety net: the network's and ECC's own figures), the CLI default ``refine=ecc`` + ``fallback=features``
(``+ecc+fallback``; for the models in ``--fallback-models``, default the first), identity, ORB + RANSAC,
SIFT + MAGSAC++, ECC from identity (baselines use the setting's motion model).
Metrics and rules: :mod:`stn_align.evaluate`. Writes the Markdown report to ``--out`` and the raw
numbers to the same path with ``.json``, and prints the tables. The report starts with the network alone,
the CLI default and SIFT + MAGSAC side by side, and says how often the CLI default's safety net fired,
how often a fallback path won, and what it cost per pair.

``--models`` takes shipped model names or checkpoint paths (``label=path`` to name one; ``path@256`` runs an
iterative model's update stage at a 256-px working size).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from stn_align.align import Aligner
from stn_align.data import WarpRanges, is_held_out, load_photo
from stn_align.evaluate import (BaselineMethod, Synthetic, load_pair_set, method_label, model_methods, markdown_table,
                                rich_table, roc_auc, run, summarize_all, synthetic_pairs, threshold_table)
from stn_align.io import list_images

DATA = Path("/work/shared/data/photos")
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "hpatches6"  # setting r
WHITE = (255, 255, 255)
SETTINGS = {
    "a": ("128x128 crops, +-25 % projective (products + natural)", "mixed",
          Synthetic("crop", (128, 128), "projective", 0.25)),
    "b": ("whole product 448 px, affine (rot +-30 deg, scale 0.78-1.28, shear, shift), white fill", "products",
          Synthetic("whole", (448, 448), "affine", None, fill=WHITE, ranges=WarpRanges())),
    "c": ("whole product 448 px, projective +-12 %, white fill", "products",
          Synthetic("whole", (448, 448), "projective", 0.12, fill=WHITE, ranges=WarpRanges())),
    "d": ("512x384 crops of large natural photos, +-20 % projective", "natural_large",
          Synthetic("crop", (512, 384), "projective", 0.20)),
}
BASELINES = ("identity", "orb", "sift", "ecc")


def held_out_photos(data: Path) -> dict[str, list[np.ndarray]]:
    products = [load_photo(p) for p in list_images(data / "products") if is_held_out(p, 0.1)]
    natural = [load_photo(p) for p in list_images(data / "natural") if is_held_out(p, 0.1)]
    return {"products": products, "natural": natural,
            "natural_large": [p for p in natural if p.shape[1] >= 700]}


def make_pairs(photos: dict, n: int, seed: int, settings: str) -> dict:
    out = {}
    for index, key in enumerate(SETTINGS):
        if key not in settings:
            continue
        _, source, spec = SETTINGS[key]
        pool = [photos["products"], photos["natural"]] if source == "mixed" else photos[source]
        out[key] = synthetic_pairs(pool, n, spec, seed=seed * 100 + index, group=key, prefix=f"{key}_")
    return out


def real_pairs(directory: Path) -> list | None:
    """Setting ``r``: every pair of the real pair set (group ``r``), or None with a note when it is missing."""
    if not (directory / "gt.jsonl").is_file():
        print(f"note: setting r skipped: no pair set at {directory}", file=sys.stderr)
        return None
    pairs = load_pair_set(directory)
    for pair in pairs:
        pair.group = "r"
    return pairs


def describe(key: str, pairs: dict, real: Path) -> str:
    """The setting's one-line description (the synthetic spec, or the real set's name and size)."""
    return SETTINGS[key][0] if key in SETTINGS else f"real pairs: all {len(pairs[key])} of {real.name}, projective ground truth"


def parse_models(text: str) -> list[tuple[str, str]]:
    models = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        label, _, path = item.partition("=") if "=" in item else (Path(item).name.removesuffix(".safetensors"), "", item)
        models.append((label, path))
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,affine", help="comma-separated shipped names or paths (label=path)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.md"))
    parser.add_argument("--pairs", type=int, default=100, help="pairs per setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (timings are per pair at this count)")
    parser.add_argument("--settings", default="abcdr", help="a-d: synthetic; r: the real pair set (--real)")
    parser.add_argument("--baselines", default=",".join(BASELINES))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--real", type=Path, default=REAL, help="setting r's pair set (inputs/, refs/, gt.jsonl)")
    parser.add_argument("--mask", default=None, help="mask option for the models (none/auto)")
    parser.add_argument("--fallback-models", default=None,
                        help="comma-separated model labels that also run as the CLI default (ecc + fallback features); "
                             "default: the first model ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    started = time.perf_counter()

    synthetic = any(key in args.settings for key in SETTINGS)
    photos = held_out_photos(args.data) if synthetic else {}
    pairs = make_pairs(photos, args.pairs, args.seed, args.settings) if synthetic else {}
    if "r" in args.settings and (real := real_pairs(args.real)) is not None:
        pairs["r"] = real
    aligners = []
    for label, path in parse_models(args.models):
        path, _, size = path.partition("@")  # path@256: an iterative model's update stage at another working size
        aligner = Aligner.load(path, device=args.device, working_size=int(size) if size else None)
        aligners.append((label, aligner))
    baselines = [b for b in args.baselines.split(",") if b]
    labels = [label for label, _ in aligners]
    fallback_models = labels[:1] if args.fallback_models is None else [m for m in args.fallback_models.split(",") if m]
    unknown = [m for m in fallback_models if m not in labels]
    if unknown:
        parser.error(f"--fallback-models: {unknown[0]!r} is not one of the --models labels ({', '.join(labels)})")

    results, summaries = {}, {}
    for key, setting_pairs in pairs.items():
        transform = SETTINGS[key][2].transform if key in SETTINGS else "projective"
        methods = []
        for label, a in aligners:
            methods += model_methods(a, ("none", "ecc"), args.mask, label)
            if label in fallback_models:  # the CLI default; shares the network estimate through its own cache
                methods += model_methods(a, ("ecc",), args.mask, label, fallbacks=("features",))
        methods += [BaselineMethod(b, transform) for b in baselines]
        t0 = time.perf_counter()
        results[key] = run(setting_pairs, methods)
        summaries[key] = summarize_all(results[key])
        print(f"setting {key}: {len(setting_pairs)} pairs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    # The score: AUC per setting and overall, and what min_score thresholds would flag (first model, both refines).
    confidence = {}
    if aligners:
        first = aligners[0][0]
        variants = [("none", "none"), ("ecc", "none")] + ([("ecc", "features")] if first in fallback_models else [])
        for refine, fallback in variants:
            name = method_label(first, refine, fallback)
            rows = {key: results[key][name] for key in results}
            pooled = [k for k in rows if k in SETTINGS] or list(rows)  # r joins the pooled figures only alone
            every = [r for k in pooled for r in rows[k]]
            scores, errors = np.array([r.score for r in every]), np.array([r.error for r in every])
            confidence[name] = {
                "auc": {**{key: roc_auc([r.score for r in rs], [r.error for r in rs]) for key, rs in rows.items()},
                        "all": roc_auc(scores, errors)},
                "thresholds": threshold_table(scores, errors, np.round(np.arange(0.1, 0.95, 0.1), 2)),
                "youden_min_score": youden(scores, errors),
                "good_pairs": int((errors < 3).sum()), "bad_pairs": int((errors > 10).sum()),
            }
    elapsed = time.perf_counter() - started
    info = {"pairs_per_setting": args.pairs, "seed": args.seed, "threads": args.threads, "device": args.device,
            "models": dict(parse_models(args.models)), "cpu": platform.processor() or platform.machine(),
            "seconds_total": round(elapsed, 1), "settings": {k: describe(k, pairs, args.real) for k in pairs},
            "fallback_models": fallback_models}
    comparison = side_by_side(summaries, labels[0] if labels else None, fallback_models)
    safety = {label: {key: safety_net_effect(results[key], label) for key in results} for label in fallback_models}

    report = render(summaries, confidence, info, comparison, safety)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    raw = {"info": info, "summary": summaries, "confidence": confidence, "side_by_side": comparison,
           "safety_net": safety,
           "pairs": {k: {m: [{"name": r.name, "error": r.error, "failed": r.failed, "seconds": r.seconds, "score": r.score,
                              "refined": r.refined, **({} if r.method is None else {"method": r.method}),
                              **({} if r.fired is None else {"fired": r.fired})} for r in rs]
                         for m, rs in v.items()} for k, v in results.items()}}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))

    from rich.console import Console

    console = Console()
    for key, summary in summaries.items():
        console.print(rich_table(summary, f"({key}) {info['settings'][key]}"))
    print("\n".join(render_side_by_side(comparison, info, summaries) + render_safety(safety)), flush=True)
    for name, c in confidence.items():
        console.print(f"score ROC AUC ({name}, <3 px vs >10 px): " + ", ".join(
            f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in c["auc"].items()))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {elapsed:.0f} s ({args.threads} thread(s))")
    return 0


def youden(scores: np.ndarray, errors: np.ndarray) -> float | None:
    """The min_score (0.05 grid) maximising bad-flagged minus good-flagged (Youden's J), or None."""
    rows = [r for r in threshold_table(scores, errors, np.round(np.arange(0.05, 1.0, 0.05), 2))
            if r["bad_flagged"] is not None and r["good_flagged"] is not None]
    return max(rows, key=lambda r: r["bad_flagged"] - r["good_flagged"])["min_score"] if rows else None


def side_by_side(summaries: dict, first: str | None, fallback_models: list[str]) -> list[tuple[str, str]]:
    """``[(row title, method name)]`` of the headline comparison: the network alone, the CLI default, SIFT + MAGSAC."""
    rows = []
    if first is not None:
        rows.append((f"{first}, network only (refine none, fallback none)", method_label(first, "none")))
        if first in fallback_models:
            rows.append((f"{first} + ECC + fallback features (CLI default)", method_label(first, "ecc", "features")))
        rows.append((f"{first} + ECC, no fallback", method_label(first, "ecc")))
    rows.append(("SIFT + MAGSAC", "sift"))
    return [(title, name) for title, name in rows if any(name in s for s in summaries.values())]


def safety_net_effect(results: dict, label: str) -> dict:
    """The CLI default's safety net in one setting: :func:`evaluate.safety_net_summary` plus, for the pairs
    where a fallback path won, how many ended >= 1 px better or worse than network + ECC without it."""
    with_net, without = results[method_label(label, "ecc", "features")], results[method_label(label, "ecc")]
    from stn_align.evaluate import safety_net_summary

    out = safety_net_summary(with_net)
    won = [(a.error, b.error) for a, b in zip(with_net, without) if not str(a.method).startswith("network")]
    out.update(pairs=len(with_net), won=len(won), won_better=sum(a <= b - 1 for a, b in won),
               won_worse=sum(a >= b + 1 for a, b in won),
               seconds_per_pair=float(np.mean([r.seconds for r in with_net])),
               seconds_per_pair_without=float(np.mean([r.seconds for r in without])))
    return out


def _cell(summary: dict) -> str:
    return (f"{summary['mean_px']:.2f}, {summary['median_px']:.2f}; {summary['under_1px']:.0%} / "
            f"{summary['under_3px']:.0%}; {summary['seconds_per_pair']:.3f} s")


def render_side_by_side(comparison: list[tuple[str, str]], info: dict, summaries: dict) -> list[str]:
    keys = list(info["settings"])
    lines = ["## Side by side", "",
             "Each cell: mean, median corner error (px); fraction under 1 px / under 3 px; seconds per pair.", "",
             "| method | " + " | ".join(f"({k})" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for title, name in comparison:
        cells = [_cell(summaries[k][name]) if name in summaries[k] else "-" for k in keys]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_safety(safety: dict) -> list[str]:
    lines = []
    for label, per_setting in safety.items():
        lines += [f"## Safety net ({method_label(label, 'ecc', 'features')}, the CLI default)", "",
                  "It fires when network + ECC scores below min_score (0.75): the network started from the input "
                  "turned by 90/180/270 deg and SIFT + MAGSAC, each polished by ECC, likeliest first until one reaches "
                  "min_score; the highest score wins. "
                  "`better`/`worse`: pairs where a fallback path won and the error is >= 1 px lower/higher than "
                  "network + ECC without the net. Seconds per pair of this row, on the pairs where the net fired "
                  "and where it did not; `without`: the `+ecc` row.", "",
                  "| setting | fired | fallback won | better | worse | s/pair not fired | s/pair fired | s/pair | s/pair without | winners |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for key, s in per_setting.items():
            sec = ["-" if s[k] is None else f"{s[k]:.3f}" for k in ("seconds_not_fired", "seconds_fired")]
            winners = ", ".join(f"{m} {n}" for m, n in s["methods"].items())
            lines.append(f"| ({key}) | {s['fired']:.0%} | {s['fallback_won']:.0%} | {s['won_better']} | {s['won_worse']} | "
                         f"{sec[0]} | {sec[1]} | {s['seconds_per_pair']:.3f} | {s['seconds_per_pair_without']:.3f} | {winners} |")
        lines.append("")
    return lines


def render(summaries: dict, confidence: dict, info: dict, comparison: list | None = None, safety: dict | None = None) -> str:
    lines = ["# stn-align benchmark", "",
             (f"{info['pairs_per_setting']} synthetic pairs per setting from held-out photos (seed {info['seed']}), "
              if set(info["settings"]) - {"r"} else "Real pairs only (setting r), ") +
             f"device {info['device']}, {info['threads']} thread(s) for torch and OpenCV ({info['cpu']}); "
             f"models: {', '.join(f'{k} = {v}' for k, v in info['models'].items())}; total run {info['seconds_total']:.0f} s.", "",
             "Corner error in reference pixels (mean over the 4 input corners). A failure (no matrix) counts as a miss "
             "and, in mean/median, with the identity's error; errors are capped at the input diagonal. "
             "`+none` = network only, `+ecc` = network + ECC refinement (both without the safety net), "
             "`+ecc+fallback` = the CLI default (ECC and `fallback=features`). Baselines estimate the setting's motion "
             "model (homography, or affine in (b)). Seconds per pair: the method's own work on CPU (model: resize, "
             "network, refinement, safety net, score; no final warp).", ""]
    if "r" in info["settings"]:
        lines += [f"Setting (r) is not synthetic: {info['settings']['r']} (read as `stn-align eval` reads a pair set); "
                  "the pooled score figures (`all`, thresholds) cover " +
                  ("the synthetic settings only." if len(info["settings"]) > 1 else "these pairs."), ""]
    lines += render_side_by_side(comparison or [], info, summaries) + render_safety(safety or {})
    for key, summary in summaries.items():
        lines += [f"## ({key}) {info['settings'][key]}", "", markdown_table(summary), ""]
    for name, c in confidence.items():
        lines += [f"## Confidence score ({name})", "",
                  f"ROC AUC of the score separating pairs with error < 3 px ({c['good_pairs']}) from > 10 px ({c['bad_pairs']}):", "",
                  "| setting | " + " | ".join(c["auc"]) + " |", "|---|" + "---:|" * len(c["auc"]),
                  "| AUC | " + " | ".join("-" if v is None else f"{v:.3f}" for v in c["auc"].values()) + " |", "",
                  "| min_score | bad (>10 px) flagged | good (<3 px) flagged | all flagged |", "|---:|---:|---:|---:|"]
        for row in c["thresholds"]:
            cells = ["-" if row[k] is None else f"{row[k]:.1%}" for k in ("bad_flagged", "good_flagged", "flagged")]
            lines.append(f"| {row['min_score']:.1f} | " + " | ".join(cells) + " |")
        if c.get("youden_min_score") is not None:
            lines += ["", f"Threshold maximising (bad flagged - good flagged): {c['youden_min_score']:.2f}."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
