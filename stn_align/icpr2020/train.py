"""ICPR 2020 training: protocols and configuration, optimisers and schedules, checkpoints, the training loop and its metrics
(test error, rotation tracking)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from ..stn import rotation_angle_deg
from .data import Dataset, MNIST_NORM, ROT_MAX_DEG, augment_batch, rotate_images
from .networks import STNClassifier, build_network


#: (Adam lr, batch size) per experiment for the short CPU protocol. 3e-3 beat 1e-3 in a short
#: rotated-MNIST pilot; on the cluttered 60x60 canvas 3e-3 (and batch 32) stayed at chance for 190
#: steps, so translation uses lr 1e-3 and batch 16 (more steps from few images).
DEFAULT_OPTIMISER: dict[str, tuple[float, int]] = {
    "mnist-rot": (3e-3, 64),
    "mnist-trans": (1e-3, 16),
    "svhn": (1e-3, 64),
}


@dataclass(frozen=True)
class TrainingProtocol:
    """Optimiser, learning rates and schedule of a run (``None`` = the experiment's default).

    ``lr_drops`` are fractions of the run at which every learning rate is divided by
    ``lr_divisor`` (``schedule="step"``); ``schedule="cosine"`` anneals to 0 per step instead.
    """

    name: str
    optimizer: str  # "sgd" | "adam"
    lr: float | None
    batch_size: int | None
    momentum: float = 0.0
    loc_lr_scale: float = 1.0
    schedule: str = "cosine"  # "cosine" | "step"
    lr_drops: tuple[float, ...] = ()
    lr_divisor: float = 10.0
    iterations: int | None = None  # None: use epochs
    epochs: int | None = None  # None: 3 (when iterations is None too)
    rotation_ramp_epochs: float = 0.0  # mnist-rot curriculum, see ReproduceConfig.max_rotation_deg
    loc_lr_scale_rotation_only: bool = False  # True: loc_lr_scale on mnist-rot, x1 on the other experiments


#: The protocols ``reproduce --protocol`` knows. ``paper`` = the defaults of the authors' code
#: (``luuf/stn-placement``: ``stn/parser.py``, ``stn/learn.py``, ``stn/learntorch.py``): plain SGD
#: (momentum 0), lr 0.01, batch 256, 150 000 iterations, every lr divided by 10 after 50 000 and
#: 100 000 iterations, localisation lr multiplier 1. ``short`` = the earlier CPU budget (Adam,
#: cosine), kept for comparison. ``curriculum`` = what makes the transformers learn to rotate in 20
#: CPU epochs (docs/icpr2020/README.md): SGD with momentum 0.9, classifier lr 1e-3 and localisation
#: lr x10 (the authors' ``--loc-lr-multiplier``), batch 64, lr / 10 at 80 %, and training rotations
#: growing from 0 to +-90 deg over the first 3 epochs (not in the paper). On mnist-trans it has no
#: ramp and localisation lr x1: at x10 the translated localisation nets die within 1-3 epochs.
PROTOCOLS: dict[str, TrainingProtocol] = {
    "paper": TrainingProtocol("paper", "sgd", 0.01, 256, 0.0, 1.0, "step", (1 / 3, 2 / 3), 10.0, 150_000),
    "short": TrainingProtocol("short", "adam", None, None, 0.0, 1.0, "cosine"),
    "curriculum": TrainingProtocol("curriculum", "sgd", 1e-3, 64, 0.9, 10.0, "step", (0.8,), 10.0, None, 20, 3.0,
                                   loc_lr_scale_rotation_only=True),
}


@dataclass
class ReproduceConfig:
    """Everything that defines a run (plain data, stored in ``results.json``)."""

    experiment: str
    epochs: int = 3
    seeds: int = 3
    limit: int | None = None  # number of training images (None = all)
    test_limit: int | None = None  # number of test images (None = all)
    batch_size: int = 64
    lr: float = 3e-3
    loc_lr_scale: float = 1.0
    networks: tuple[str, ...] = ()  # filled from the experiment when empty
    figure_angles: tuple[float, ...] = tuple(float(a) for a in range(-90, 91, 10))
    figure_images: int = 200
    threads: int = 1
    channels_last: bool = True
    protocol: str = "short"
    optimizer: str = "adam"
    momentum: float = 0.0
    schedule: str = "cosine"
    lr_drops: tuple[float, ...] = ()
    lr_divisor: float = 10.0
    iterations: int | None = None  # total optimiser steps per network; None = epochs x steps/epoch
    rotation_ramp_epochs: float = 0.0  # mnist-rot: max rotation grows 0 -> 90 deg over these epochs (0: off)
    stop_after_epochs: int | None = None  # end this call at that epoch of the schedule (not in the fingerprint)
    report_only: bool = False  # train nothing: report every network's checkpoint as it stands

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of one network for ``n_train`` training images."""
        return self.iterations if self.iterations is not None else self.epochs * math.ceil(n_train / self.batch_size)

    def fingerprint(self) -> dict:
        """The fields a checkpoint must agree on to be resumed."""
        keys = ("experiment", "limit", "batch_size", "lr", "loc_lr_scale", "optimizer", "momentum", "schedule",
                "lr_drops", "lr_divisor", "epochs", "iterations", "rotation_ramp_epochs")
        return {k: getattr(self, k) for k in keys}

    def max_rotation_deg(self, step: int, n_train: int) -> float:
        """Largest training rotation at optimiser ``step``: 90 deg, or linearly 0 -> 90 deg over the
        first ``rotation_ramp_epochs`` (a curriculum; not in the paper)."""
        ramp_steps = self.rotation_ramp_epochs * math.ceil(n_train / self.batch_size)
        return ROT_MAX_DEG if ramp_steps <= 0 else ROT_MAX_DEG * min(1.0, step / ramp_steps)


@dataclass
class RunResult:
    network: str
    seed: int
    test_error_pct: float
    train_seconds: float
    final_train_loss: float
    epochs_log: list[dict] = field(default_factory=list)
    steps: int = 0  # optimiser steps taken
    total_steps: int = 0  # steps of the whole schedule; steps < total_steps: stopped early (--stop-after)


def _make_optimizer(model: STNClassifier, cfg: ReproduceConfig) -> torch.optim.Optimizer:
    """SGD (with ``cfg.momentum``) or Adam; the localisation net + regression layer train at
    ``loc_lr_scale * lr`` (the authors' ``--loc-lr-multiplier``; for STN-SLX the shared conv
    blocks belong to the classifier, as in their code)."""
    loc = list(model.transformer.parameters()) if model.transformer is not None else []
    loc_ids = {id(p) for p in loc}
    rest = [p for p in model.parameters() if id(p) not in loc_ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if loc:
        groups.append({"params": loc, "lr": cfg.lr * cfg.loc_lr_scale})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")


def lr_factor(cfg: ReproduceConfig, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` of ``total_steps``.

    ``step``: divided by ``lr_divisor`` at each of ``lr_drops`` (fractions of the run; the paper
    protocol's 1/3, 2/3 of 150 000 are the authors' 50 000 and 100 000 iterations); ``cosine``:
    ``0.5 (1 + cos(pi step / total))``.
    """
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total_steps))
    if cfg.schedule == "step":
        drops = sum(step >= round(f * total_steps) for f in cfg.lr_drops)
        return cfg.lr_divisor ** (-drops)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use step or cosine")


def _to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def test_error_pct(model: STNClassifier, inputs: torch.Tensor, labels: torch.Tensor, device, cfg) -> float:
    """Classification error (%) on prepared ``inputs`` ``(N, C, H, W)``, ``labels`` ``(N,)``."""
    model.eval()
    wrong = 0
    for i in range(0, inputs.shape[0], 500):
        logits = model(_to_input(inputs[i : i + 500], device, cfg.channels_last))
        wrong += (logits.argmax(1).cpu() != labels[i : i + 500]).sum().item()
    return 100.0 * wrong / inputs.shape[0]


def rotation_tracking_r(predicted: np.ndarray, angles_deg) -> float:
    """Pearson r between applied and predicted angles over all (angle, digit) pairs.

    Args:
        predicted: ``(A, N)`` predicted angles, as from :func:`predicted_rotation_angles`.
        angles_deg: ``(A,)`` applied angles.

    Returns:
        r in [-1, 1]; 0 when the prediction does not vary at all (a collapsed localisation net).
    """
    applied = np.repeat(np.asarray(angles_deg, dtype=np.float64)[:, None], predicted.shape[1], axis=1)
    pred = predicted.astype(np.float64)
    if pred.std() == 0 or applied.std() == 0:
        return 0.0
    return float(np.corrcoef(pred.ravel(), applied.ravel())[0, 1])


def rotation_r_per_class(predicted: np.ndarray, angles_deg, labels: np.ndarray) -> dict[int, float]:
    """:func:`rotation_tracking_r` over the digits of each class present in ``labels`` ``(N,)``."""
    return {int(d): rotation_tracking_r(predicted[:, labels == d], angles_deg) for d in np.unique(labels)}


def rotation_slope(predicted: np.ndarray, angles_deg, max_abs_deg: float | None = None) -> float:
    """Least-squares slope of predicted on applied angle: 1 = exact un-rotation, 0 = none.

    Pearson r measures how consistently the angle is tracked; the slope measures how much of it.

    Args:
        predicted: ``(A, N)`` predicted angles, as from :func:`predicted_rotation_angles`.
        angles_deg: ``(A,)`` applied angles.
        max_abs_deg: use only applied angles with ``|angle| <= max_abs_deg``.
    """
    applied = np.asarray(angles_deg, dtype=np.float64)
    keep = np.ones_like(applied, dtype=bool) if max_abs_deg is None else np.abs(applied) <= max_abs_deg
    x = np.repeat(applied[keep][:, None], predicted.shape[1], axis=1).ravel()
    y = predicted[keep].astype(np.float64).ravel()
    return float(np.polyfit(x, y, 1)[0])


def _log(console: Console, message: str) -> None:
    """A time-stamped progress line, never wrapped (a redirected log keeps one line per event)."""
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", soft_wrap=True)


def _checkpoint_path(checkpoint_dir: Path | None, name: str, seed: int) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name}-seed{seed}.pt"


def _save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic ``torch.save`` (write a sibling temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, cfg: ReproduceConfig) -> dict | None:
    """The checkpoint at ``path`` (tensors and plain data only: ``weights_only=True``), or ``None``."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to start over") from None
    same = lambda fp: json.dumps(fp, sort_keys=True)  # noqa: E731 - tuples and lists compare equal
    saved = {"rotation_ramp_epochs": 0.0, **(state.get("fingerprint") or {})}  # checkpoints from before the ramp
    if same(saved) != same(cfg.fingerprint()):
        raise ValueError(f"{path}: checkpoint of a different configuration; delete it or use another --out")
    return state


def train_network(
    name: str,
    seed: int,
    cfg: ReproduceConfig,
    train: Dataset,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    device: torch.device,
    console: Console,
    checkpoint_dir: Path | None = None,
    probe_digits: torch.Tensor | None = None,
    model: STNClassifier | None = None,
) -> tuple[RunResult, STNClassifier]:
    """Train one network from scratch with ``seed`` (or resume it) and score it on the test set.

    Args:
        checkpoint_dir: where ``<name>-seed<k>.pt`` is written after every epoch; an existing
            one (same configuration) is resumed, a finished one is loaded without training.
        probe_digits: uint8 ``(N, 1, 28, 28)`` unrotated digits; for an STN on ``mnist-rot``
            every epoch's log gets ``rotation_r``, the Pearson r of the Figure-3 angles.
        model: train this (freshly built) network instead of ``build_network(name, ...)``.

    Returns:
        the run's result (with per-epoch ``epochs_log``) and the trained model.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)  # data order + augmentation
    model = (model if model is not None else build_network(name, cfg.experiment)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    optimizer = _make_optimizer(model, cfg)
    n = train.images.shape[0]
    total_steps = cfg.total_steps(n)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, log, trained_seconds = 0, [], 0.0
    ckpt_path = _checkpoint_path(checkpoint_dir, name, seed)
    state = _load_checkpoint(ckpt_path, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        if state.get("result") is not None:  # finished earlier: nothing to train
            _log(console, f"{cfg.experiment} {name} seed {seed}: loaded finished run from {ckpt_path}")
            return RunResult(**state["result"]), model
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, log, trained_seconds = state["step"], list(state["log"]), state["seconds"]
        _log(console, f"{cfg.experiment} {name} seed {seed}: "
             + ("checkpoint at" if cfg.report_only else "resuming at") + f" step {step}/{total_steps}")
    track = probe_digits is not None and model.transformer is not None and cfg.experiment == "mnist-rot"
    epoch = len(log)
    if cfg.report_only and state is None:
        raise ValueError(f"--report-only: no checkpoint of {name} seed {seed} in {checkpoint_dir}; train it first")
    stop = 0 if cfg.report_only else cfg.stop_after_epochs
    while step < total_steps and (stop is None or epoch < stop):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum = wrong = seen = 0.0
        for i in range(0, n, cfg.batch_size):
            if step >= total_steps:
                break
            idx = order[i : i + cfg.batch_size]
            x = augment_batch(cfg.experiment, train.images[idx], gen, train.images, cfg.max_rotation_deg(step, n))
            y = train.labels[idx].to(device)
            factor = lr_factor(cfg, step, total_steps)
            for g, lr0 in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr0 * factor
            logits = model(_to_input(x, device, cfg.channels_last))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            wrong += (logits.argmax(1) != y).sum().item()
            seen += len(idx)
        trained_seconds += time.perf_counter() - start
        epoch += 1
        entry = {
            "epoch": epoch,
            "step": step,
            "lr_factor": lr_factor(cfg, step - 1, total_steps),
            "max_rotation_deg": cfg.max_rotation_deg(step - 1, n) if cfg.experiment == "mnist-rot" else None,
            "train_loss": loss_sum / seen,
            "train_error_pct": 100.0 * wrong / seen,
            "test_error_pct": test_error_pct(model, test_inputs, test_labels, device, cfg),
            "seconds": trained_seconds,
        }
        if track:
            pred = predicted_rotation_angles(model, probe_digits, cfg.figure_angles, device, cfg)
            entry["rotation_r"] = rotation_tracking_r(pred, cfg.figure_angles)
        log.append(entry)
        _log(
            console,
            f"{cfg.experiment} {name} seed {seed} epoch {epoch} (step {step}/{total_steps}): "
            f"loss {entry['train_loss']:.4f}, train error {entry['train_error_pct']:.2f} %, "
            f"test error {entry['test_error_pct']:.2f} %"
            + (f", rotation r {entry['rotation_r']:.3f}" if track else "")
            + f" ({trained_seconds:.0f} s)"
        )
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {
                "fingerprint": cfg.fingerprint(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(), "step": step, "log": log, "seconds": trained_seconds, "result": None,
            })
    err = log[-1]["test_error_pct"] if log else test_error_pct(model, test_inputs, test_labels, device, cfg)
    stopped = step < total_steps
    _log(console, f"[bold]{cfg.experiment} {name} seed {seed}: test error {err:.2f} %[/bold]"
         + (f" (stopped after epoch {epoch}, step {step}/{total_steps}; a later call resumes)" if stopped else ""))
    result = RunResult(name, seed, err, trained_seconds, log[-1]["train_loss"] if log else float("nan"), log,
                       step, total_steps)
    if ckpt_path is not None and not stopped:
        _save_checkpoint(ckpt_path, {"fingerprint": cfg.fingerprint(), "model": model.state_dict(), "result": asdict(result)})
    return result, model


@torch.no_grad()
def predicted_rotation_angles(
    model: STNClassifier, digits: torch.Tensor, angles_deg: tuple[float, ...], device, cfg: ReproduceConfig
) -> np.ndarray:
    """Rotation angle in the STN's ``theta`` for each applied rotation (Figure 3).

    Args:
        model: a trained MNIST STN.
        digits: uint8 ``(N, 1, 28, 28)`` unrotated test digits.
        angles_deg: applied rotations ``(A,)``.

    Returns:
        ``(A, N)`` predicted angles (degrees) - :func:`stn_align.stn.rotation_angle_deg` of theta.
        For STN-C1 theta acts on feature maps, for STN-SL1 on the image.
    """
    model.eval()
    x0 = digits.float() / 255.0
    mean, std = MNIST_NORM["mnist-rot"]
    out = []
    for a in angles_deg:
        x = (rotate_images(x0, torch.full((x0.shape[0],), float(a))) - mean) / std
        _, theta = model.forward_with_theta(_to_input(x, device, cfg.channels_last))
        out.append(rotation_angle_deg(theta.float().cpu()).numpy())
    return np.stack(out)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
