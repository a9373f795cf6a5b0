"""ICPR 2020 report: the run over networks and seeds (:func:`run_reproduce`), results.md / results.json and the table."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .data import Dataset, EXPERIMENTS, SUBSET_SEED, TEST_SEED, _prepare_test_inputs, default_data_dir, load_mnist, load_svhn
from .networks import STNClassifier, network_names
from .train import DEFAULT_OPTIMISER, PROTOCOLS, ReproduceConfig, RunResult, predicted_rotation_angles, resolve_device, rotation_r_per_class, rotation_slope, rotation_tracking_r, train_network
from .figures import FIGURE2_ANGLES, FIGURE2_DIGIT, draw_figure2, draw_figure3, draw_training_curves, require_matplotlib


#: Classification error (%) reported by Finnveden et al., Tables 1 and 2.
PAPER_ERROR_PCT: dict[str, dict[str, float]] = {
    "mnist-rot": {"CNN": 1.71, "STN-C0": 1.08, "STN-C1": 1.32, "STN-SL1": 0.98},
    "mnist-trans": {"CNN": 1.72, "STN-C0": 1.08, "STN-C1": 1.15, "STN-SL1": 1.10},
    "svhn": {
        "STN-C0": 3.81, "STN-C3": 3.70, "STN-C6": 3.91, "STN-C8": 4.00,
        "STN-SL3": 3.54, "STN-SL6": 3.29, "STN-SL8": 3.27,
    },
}


def summarise(results: list[RunResult], names: tuple[str, ...]) -> dict[str, dict]:
    """Per network: mean and sample std (ddof=1) of the test error over seeds, and the epochs
    each seed trained (``stopped_early``: some seed ended before its schedule, ``--stop-after``)."""
    out = {}
    for name in names:
        runs = [r for r in results if r.network == name]
        errs = [r.test_error_pct for r in runs]
        if errs:
            out[name] = {
                "mean": float(np.mean(errs)),
                "std": float(np.std(errs, ddof=1)) if len(errs) > 1 else float("nan"),
                "n": len(errs),
                "per_seed": errs,
                "epochs_per_seed": [len(r.epochs_log) for r in runs],
                "stopped_early": any(r.steps < r.total_steps for r in runs),
            }
    return out


def optimiser_line(cfg: ReproduceConfig, n_train: int) -> str:
    """One line stating optimiser, learning rates, schedule and length of a run."""
    opt = f"SGD (momentum {cfg.momentum:g})" if cfg.optimizer == "sgd" else "Adam"
    total = cfg.total_steps(n_train)
    if cfg.schedule == "step":
        drops = ", ".join(str(round(f * total)) for f in cfg.lr_drops) or "never"
        sched = f"divided by {cfg.lr_divisor:g} at steps {drops}"
    else:
        sched = "cosine-annealed to 0 per step"
    return (f"{opt}, lr {cfg.lr:g} {sched}, localisation lr x{cfg.loc_lr_scale:g}, batch {cfg.batch_size}, "
            f"{total} steps per network ({total * cfg.batch_size / n_train:.1f} epochs of {n_train} images)")


def protocol_lines(cfg: ReproduceConfig, n_train: int, n_test: int, device: torch.device) -> list[str]:
    """Human-readable statement of every protocol choice of this run."""
    data = {
        "mnist-rot": "MNIST 28x28, rotated by U(-90, 90) deg (bilinear, black fill); fresh angle per training draw; "
        f"test set rotated once with seed {TEST_SEED}; normalised (0.1307, 0.3081)",
        "mnist-trans": "MNIST pasted into a 60x60 canvas at U{-16..16} px offset per axis + six 6x6 clutter crops "
        f"of random training digits (clamped to 1); fresh per training draw, test set fixed (seed {TEST_SEED}); "
        "normalised (0.0363, 0.1870); transformers output 30x30, the CNN sees 60x60",
        "svhn": "SVHN 32x32 cropped digits, scaled to [-1, 1]; no synthetic transformation",
    }[cfg.experiment]
    return [
        f"data: {data}",
        f"training images: {n_train}" + (f" (fixed random subset, seed {SUBSET_SEED})" if cfg.limit else " (all)"),
        f"test images: {n_test}",
        f"protocol '{cfg.protocol}': " + optimiser_line(cfg, n_train) + f", seeds 0..{cfg.seeds - 1}",
        *([f"--stop-after {cfg.stop_after_epochs}: each network trains at most to epoch {cfg.stop_after_epochs} of "
           "the schedule (one already past it is reported as it stands; the table says where each stopped); the "
           "learning rates follow the full run's schedule, so these are the run's results at that point, not those "
           "of a shorter run"]
          if cfg.stop_after_epochs and not cfg.report_only else []),
        *(["--report-only: no training in this call; each network is reported as its checkpoint stands (the table "
           "says at which epoch); the learning rates follow the full run's schedule, so an unfinished run is the "
           "long run seen part-way, not a shorter run"] if cfg.report_only else []),
        *([f"rotation curriculum (not in the paper): training rotations U(-m, m) with m growing linearly "
           f"0 -> 90 deg over the first {cfg.rotation_ramp_epochs:g} epochs, then 90 deg"]
          if cfg.rotation_ramp_epochs > 0 else []),
        "networks: CNN conv9x9(64)-pool-ReLU-conv7x7(64)-pool-ReLU-FC10 (MNIST) / 8 conv3x3 blocks (SVHN); "
        "localisation conv5x5(20)-conv5x5(20)-FC20-affine (identity init); sampler padding "
        + ("zeros" if cfg.experiment == "svhn" else "border"),
        f"device: {device} ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}",
    ]


def write_results_markdown(
    path: Path, cfg: ReproduceConfig, summary: dict, protocol: list[str], wall: float, figure3: dict | None = None,
    train_seconds: float = float("nan"),
) -> None:
    """Markdown table: our mean +- std test error next to the paper's figure."""
    paper = PAPER_ERROR_PCT[cfg.experiment]
    lines = [
        f"# ICPR 2020 STN placement - {cfg.experiment}",
        "",
        "Test classification error (%), mean +- sample std over seeds; paper: Finnveden et al. "
        + ("Table 2 (different SVHN set-up)." if cfg.experiment == "svhn" else "Table 1."),
        "",
        "| network | ours: error % (mean ± std) | seeds | per seed | epochs trained | paper error % |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        std = "n/a" if math.isnan(s["std"]) else f"{s['std']:.2f}"
        per = ", ".join(f"{e:.2f}" for e in s["per_seed"])
        ref = paper.get(name)
        ref_s = f"{ref:.2f}" if ref is not None else "-"
        if cfg.experiment == "svhn" and name == "STN-C0":
            ref_s += " (= STN-SL0)"
        epochs = ", ".join(str(e) for e in s.get("epochs_per_seed", [])) + (" (stopped early)" if s.get("stopped_early") else "")
        lines.append(f"| {name} | {s['mean']:.2f} ± {std} | {s['n']} | {per} | {epochs} | {ref_s} |")
    if figure3:
        lines += ["", "Figure 3 (seed 0): Pearson r between applied and predicted rotation over "
                  f"{figure3['n_digits']} test digits x {len(figure3['applied_deg'])} angles: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in figure3["pearson_r"].items()) + ". Slope of predicted on "
                  "applied angle (1 = exact un-rotation), all angles / within +-60 deg: "
                  + ", ".join(f"{k} {figure3['slope'][k]:.2f} / {figure3['slope_within_60_deg'][k]:.2f}"
                              for k in figure3["pearson_r"]) + "."]
        for k, per_class in figure3.get("pearson_r_per_class", {}).items():
            lines += ["", f"r per digit class, {k}: " + ", ".join(f"{d}: {r:.2f}" for d, r in per_class.items())]
    lines += ["", "## Protocol", ""] + [f"- {line}" for line in protocol]
    lines += [f"- training time (sum over runs, resumed runs included): {train_seconds / 60:.1f} min; "
              f"wall time of the last invocation: {wall / 60:.1f} min", ""]
    path.write_text("\n".join(lines))


def run_reproduce(
    experiment: str,
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    seeds: int = 3,
    device: str = "auto",
    out_dir: str | Path = "icpr2020-results",
    limit: int | None = None,
    *,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = 1,
    protocol: str = "short",
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    loc_lr_scale: float | None = None,
    batch_size: int | None = None,
    schedule: str | None = None,
    lr_drops: tuple[float, ...] | None = None,
    iterations: int | None = None,
    rotation_ramp_epochs: float | None = None,
    networks: tuple[str, ...] | None = None,
    stop_after_epochs: int | None = None,
    report_only: bool = False,
    resume: bool = True,
    figure_images: int = 200,
    console: Console | None = None,
) -> dict:
    """Train the experiment's networks over ``seeds`` seeds; write results, logs and figures.

    Writes into ``out_dir``: ``results.md``, ``results.json`` (config, per-run per-epoch logs,
    Figure-3 statistics), ``training_curves.png`` and, for ``mnist-rot``, ``figure3.png`` and
    ``figure2.png``; checkpoints go to ``out_dir/checkpoints`` after every epoch, so an
    interrupted run resumes where it stopped (``resume=False`` starts over).

    Args:
        experiment: ``"mnist-rot"``, ``"mnist-trans"`` or ``"svhn"``.
        data_dir: MNIST dir (four IDX ``.gz`` files, unpacked files, or a torchvision root) or
            SVHN dir (``train_32x32.mat``, ``test_32x32.mat``); default ``../shared/data/<name>``.
        epochs: passes over the (possibly limited) training set; ``None``: 3, or the protocol's
            ``iterations`` / ``epochs`` (``paper``, ``curriculum``). Giving ``epochs`` overrides the iterations.
        seeds: number of seeds (0 .. seeds-1) per network.
        device: ``auto``, ``cpu`` or ``cuda``.
        out_dir: output folder.
        limit: number of training images (a fixed random subset) for quick runs.
        test_limit: number of test images (default all).
        cache_dir: where gzipped MNIST is unpacked (default ``~/.cache/stn-align``).
        threads: ``torch.set_num_threads`` value (``None`` leaves it alone).
        protocol: ``"paper"`` (the authors' SGD schedule), ``"short"`` or ``"curriculum"`` (:data:`PROTOCOLS`).
        optimizer, lr, momentum, loc_lr_scale, batch_size, schedule, lr_drops, iterations:
            override the protocol's value (``None`` keeps it).
        rotation_ramp_epochs: ``mnist-rot`` curriculum (not in the paper): the largest training
            rotation grows linearly from 0 to 90 deg over this many epochs; 0 is off (``None``: the
            protocol's; only ``curriculum`` has one).
        networks: subset of the experiment's networks (default all).
        stop_after_epochs: end each network's training at this epoch of its schedule and report
            it as it stands (a checkpoint already past it is reported as it is); the schedule stays
            the full run's, so a later call with a larger value, or none, resumes the same run.
        report_only: train nothing; write the outputs from the checkpoints as they stand (every
            network needs one).
        resume: continue from checkpoints in ``out_dir/checkpoints``.
        figure_images: test digits behind Figure 3 and the per-epoch ``rotation_r``.
        console: rich console for progress.

    Returns:
        the dict written to ``results.json``.

    Raises:
        ValueError / FileNotFoundError: with a one-line message for user errors (unknown
        experiment or protocol, missing data, missing scipy / matplotlib, bad arguments).
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if (epochs is not None and epochs < 1) or seeds < 1 or (limit is not None and limit < 1) or (
        iterations is not None and iterations < 1
    ) or (stop_after_epochs is not None and stop_after_epochs < 1):
        raise ValueError("epochs, iterations, seeds, limit and --stop-after must be positive")
    if report_only and not resume:
        raise ValueError("--report-only reports the checkpoints; it cannot be combined with --restart")
    all_names = network_names(experiment)
    names = tuple(networks) if networks else all_names
    if unknown := [n for n in names if n not in all_names]:
        raise ValueError(f"unknown network(s) for {experiment}: {', '.join(unknown)}")
    require_matplotlib()  # fail before hours of training, not after
    console = console or Console(highlight=False)
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    proto = PROTOCOLS[protocol]
    default_lr, default_batch = DEFAULT_OPTIMISER[experiment]
    pick = lambda given, from_protocol, fallback: given if given is not None else (  # noqa: E731
        from_protocol if from_protocol is not None else fallback)
    if iterations is None and epochs is None:
        iterations = proto.iterations
    cfg = ReproduceConfig(
        experiment, epochs if epochs is not None else (proto.epochs or 3), seeds, limit, test_limit,
        pick(batch_size, proto.batch_size, default_batch), pick(lr, proto.lr, default_lr),
        pick(loc_lr_scale, 1.0 if proto.loc_lr_scale_rotation_only and experiment != "mnist-rot" else proto.loc_lr_scale,
             1.0), names,
        threads=torch.get_num_threads(), channels_last=dev.type == "cpu", protocol=protocol,
        optimizer=pick(optimizer, proto.optimizer, "adam"), momentum=pick(momentum, proto.momentum, 0.0),
        schedule=pick(schedule, proto.schedule, "cosine"), lr_drops=tuple(pick(lr_drops, proto.lr_drops, ())),
        lr_divisor=proto.lr_divisor, iterations=iterations if epochs is None else None, figure_images=figure_images,
        rotation_ramp_epochs=pick(rotation_ramp_epochs, proto.rotation_ramp_epochs if experiment == "mnist-rot" else 0.0, 0.0),
        stop_after_epochs=stop_after_epochs, report_only=report_only,
    )
    ramp = cfg.rotation_ramp_epochs
    if ramp < 0 or (ramp > 0 and experiment != "mnist-rot"):
        raise ValueError(f"--rotation-ramp takes epochs >= 0 and applies to mnist-rot only, got {ramp:g}")
    if cfg.optimizer not in ("sgd", "adam") or cfg.schedule not in ("step", "cosine"):
        raise ValueError(f"optimizer must be sgd or adam and schedule step or cosine, got {cfg.optimizer!r}, {cfg.schedule!r}")
    if any(not 0 < f < 1 for f in cfg.lr_drops):
        raise ValueError(f"lr drops are fractions of the run in (0, 1), got {cfg.lr_drops}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(experiment)
    cache = Path(cache_dir) if cache_dir is not None else Path(os.environ.get("STN_ALIGN_CACHE", Path.home() / ".cache" / "stn-align"))
    train, test = load_svhn(data_dir) if experiment == "svhn" else load_mnist(data_dir, cache)
    if limit is not None and limit < len(train.labels):
        keep = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit]
        train = Dataset(train.images[keep], train.labels[keep])
    if test_limit is not None and test_limit < len(test.labels):
        test = Dataset(test.images[:test_limit], test.labels[:test_limit])
    test_inputs = _prepare_test_inputs(experiment, test, train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    if not resume and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir)
    protocol_text = protocol_lines(cfg, len(train.labels), len(test.labels), dev)
    console.rule(f"ICPR 2020 reproduction: {experiment}")
    for line in protocol_text:
        console.print(f"  {line}", soft_wrap=True)

    probe = test.images[: cfg.figure_images] if experiment == "mnist-rot" else None
    results: list[RunResult] = []
    figure: dict[str, np.ndarray] = {}
    figure2_models: dict[str, STNClassifier] = {}
    start = time.perf_counter()
    report: dict = {}
    for seed in range(seeds):
        for name in names:
            run, model = train_network(name, seed, cfg, train, test_inputs, test.labels, dev, console, ckpt_dir, probe)
            results.append(run)
            if experiment == "mnist-rot" and seed == 0 and name != "CNN":
                figure[name] = predicted_rotation_angles(model, probe, cfg.figure_angles, dev, cfg)
                if name in ("STN-C1", "STN-SL1"):
                    figure2_models[name] = model
            report = _write_outputs(out, cfg, results, names, figure, protocol_text, time.perf_counter() - start,
                                    test.labels[: cfg.figure_images])
            if len(figure2_models) == 2 or (figure2_models and name == names[-1]):
                order = ["STN-C1", "STN-SL1"]
                draw_figure2(out / "figure2.png", {k: figure2_models[k] for k in order if k in figure2_models},
                             test.images[FIGURE2_DIGIT : FIGURE2_DIGIT + 1], FIGURE2_ANGLES, dev, cfg)
    _print_table(console, report["summary"], PAPER_ERROR_PCT[experiment])
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'} and figures in {out}", soft_wrap=True)
    return report


def _write_outputs(out: Path, cfg, results, names, figure, protocol, wall, figure_labels=None) -> dict:
    """(Re)write all outputs; called after every run so partial results survive an interruption.

    ``figure`` maps a network to its Figure-3 angles ``(A, N)``; ``figure_labels`` ``(N,)`` are the
    classes of those N digits (for the per-class r).
    """
    summary = summarise(results, names)
    report = {
        "paper": "Finnveden, Jansson & Lindeberg, ICPR 2020 (arXiv:2004.11678)",
        "config": asdict(cfg),
        "protocol": protocol,
        "wall_seconds": wall,
        "train_seconds_total": sum(r.train_seconds for r in results),
        "summary": summary,
        "paper_error_pct": PAPER_ERROR_PCT[cfg.experiment],
        "runs": [asdict(r) for r in results],
    }
    if figure:
        report["figure3"] = {
            "applied_deg": list(cfg.figure_angles),
            "n_digits": cfg.figure_images,
            "pearson_r": {k: rotation_tracking_r(v, cfg.figure_angles) for k, v in figure.items()},
            "slope": {k: rotation_slope(v, cfg.figure_angles) for k, v in figure.items()},
            "slope_within_60_deg": {k: rotation_slope(v, cfg.figure_angles, 60.0) for k, v in figure.items()},
            "pearson_r_per_class": {} if figure_labels is None else {
                k: {str(d): r for d, r in rotation_r_per_class(v, cfg.figure_angles, figure_labels.numpy()).items()}
                for k, v in figure.items()},
            "predicted_deg_mean": {k: v.mean(axis=1).tolist() for k, v in figure.items()},
            "predicted_deg_std": {k: v.std(axis=1).tolist() for k, v in figure.items()},
            "predicted_deg_p10_p50_p90": {
                k: np.percentile(v, [10, 50, 90], axis=1).T.tolist() for k, v in figure.items()
            },
        }
        draw_figure3(out / "figure3.png", list(cfg.figure_angles), figure)
    draw_training_curves(out / "training_curves.png", results)
    tmp = out / "results.json.part"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "results.json")
    write_results_markdown(out / "results.md", cfg, summary, protocol, wall, report.get("figure3"),
                           sum(r.train_seconds for r in results))
    return report


def _print_table(console: Console, summary: dict, paper: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title="test error (%)")
    for col in ("network", "ours (mean ± std)", "seeds", "epochs", "paper"):
        table.add_column(col)
    for name, s in summary.items():
        std = "n/a" if math.isnan(s["std"]) else f"{s['std']:.2f}"
        ref = paper.get(name)
        epochs = ", ".join(str(e) for e in s["epochs_per_seed"]) + (" (stopped)" if s["stopped_early"] else "")
        table.add_row(name, f"{s['mean']:.2f} ± {std}", str(s["n"]), epochs, "-" if ref is None else f"{ref:.2f}")
    console.print(table)
