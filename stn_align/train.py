"""Self-supervised training: random synthetic warps of the user's own photos, read top to bottom.

Each step draws a batch of (input, reference, M) pairs from :class:`data.PairSampler` (a pure function
of ``(seed, step)``, so ``--resume`` continues exactly), runs the network for ``iterations`` rounds and
penalises the corner error of every round, later rounds weighted more. AdamW, linear warm-up then
cosine decay, gradient clipping, bf16 autocast on CUDA. Validation uses a fixed pair set drawn from
held-out *photos* (split by file-name hash), reported as mean corner error in working-frame pixels.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, load_training_state, save_model, save_training_state, state_path
from .data import PairSampler, Photometric, WarpRanges, is_held_out, load_photo
from .geometry import homography_to_corners, pixel_to_normalized
from .model import AlignerNet, ModelConfig, parameter_count, resolve_device


@dataclass
class TrainConfig:
    data_dir: str
    out: str
    transform: str = "projective"
    size: int = 128
    steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    clip: float = 1.0
    iterations: int = 2  # refinement rounds unrolled in training
    gamma: float = 0.8  # loss weight of round k is gamma ** (iterations - 1 - k)
    p_crop: float = 0.5  # fraction of DeTone crop pairs (the rest: whole-image warps with fill)
    ranges: WarpRanges = field(default_factory=WarpRanges)
    photometric: bool = True
    val_fraction: float = 0.1
    val_pairs: int = 256
    eval_every: int = 1000
    checkpoint_every: int = 500
    log_every: int = 50  # loss history resolution
    stop_after: int | None = None  # stop (with a checkpoint) at this step, to continue later with resume
    device: str = "auto"
    workers: int = 1
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    seed: int = 0
    resume: str | None = None
    init: str | None = None  # start from a model's weights (fine-tuning); head kept if shapes match
    max_photos: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def find_photos(data_dir: str | Path) -> list[Path]:
    from .io import list_images

    return list_images(data_dir, recursive=True)


def split_photos(paths: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Photo-level split: validation photos never appear in training pairs."""
    val = [p for p in paths if is_held_out(p, val_fraction)]
    train = [p for p in paths if not is_held_out(p, val_fraction)]
    if val_fraction > 0 and not val and len(train) > 1:
        val, train = train[-1:], train[:-1]
    return train, val


def load_photos(paths: list[Path], max_side: int) -> tuple[list[np.ndarray], list[list[int]], list[str]]:
    """Decode photos, skipping unreadable ones. Returns ``(photos, indices grouped by folder, 'path: reason' lines)``."""
    from .io import ImageError

    photos, folders, skipped = [], {}, []
    for path in paths:
        try:
            photos.append(load_photo(path, max_side))
        except ImageError as err:
            skipped.append(str(err))
            continue
        folders.setdefault(Path(path).parent, []).append(len(photos) - 1)
    return photos, list(folders.values()), skipped


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float in ``[0, 1]``."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)


def normalized_targets(matrices: np.ndarray, size: int) -> torch.Tensor:
    """Working-pixel matrices ``(B, 3, 3)`` -> normalised corner targets ``(B, 4, 2)``."""
    return homography_to_corners(pixel_to_normalized(torch.from_numpy(matrices).double(), size)).float()


def corner_loss(estimates: list[torch.Tensor], target: torch.Tensor, size: int, gamma: float) -> torch.Tensor:
    """Weighted mean corner distance in working pixels over the refinement rounds."""
    scale = (size - 1) / 2
    total = 0.0
    for k, estimate in enumerate(estimates):
        err = (homography_to_corners(estimate.float()) - target).norm(dim=-1).mean() * scale
        total = total + gamma ** (len(estimates) - 1 - k) * err
    return total


class StepBatches(torch.utils.data.Dataset):
    """Dataset whose item ``k`` is the whole batch of step ``k`` (so workers keep the order exactly)."""

    def __init__(self, sampler: PairSampler, photos: list[np.ndarray], groups, batch_size: int, steps: int):
        self.sampler, self.photos, self.groups, self.batch_size, self.steps = sampler, photos, groups, batch_size, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int):
        return self.sampler.batch(self.photos, step, self.batch_size, self.groups)


def make_validation_set(photos, groups, config: TrainConfig):
    """A fixed set of held-out pairs, half crop and half whole-image, with photometric jitter."""
    sampler = PairSampler(config.transform, config.size, config.ranges, Photometric(), config.p_crop, seed=10_000 + config.seed)
    return sampler.batch(photos, 0, config.val_pairs, groups) if photos else None


@torch.no_grad()
def evaluate(model: AlignerNet, val, device, iterations: int, batch_size: int = 64) -> dict:
    """Mean corner error (working px), median, fraction under 1 and 3 px on the validation pairs."""
    model.eval()
    inputs, refs, mats = val
    errors = []
    for i in range(0, len(inputs), batch_size):
        est = model(to_tensor(inputs[i : i + batch_size], device), to_tensor(refs[i : i + batch_size], device), iterations)[-1]
        target = normalized_targets(mats[i : i + batch_size], model.config.size).to(device)
        err = (homography_to_corners(est.float()) - target).norm(dim=-1).mean(-1) * (model.config.size - 1) / 2
        errors.append(err.cpu())
    model.train()
    e = torch.cat(errors).numpy()
    return {"mean_px": float(e.mean()), "median_px": float(np.median(e)), "under_1px": float((e < 1).mean()),
            "under_3px": float((e < 3).mean()), "pairs": int(len(e)), "iterations": iterations}


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(config: TrainConfig, log=print) -> dict:
    """Train (or resume) a model as ``config`` says; writes ``config.out`` and its training state. Returns metadata."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    # Data: photos split by file, decoded once into memory.
    paths = find_photos(config.data_dir)
    if config.max_photos:
        paths = paths[: config.max_photos]
    train_paths, val_paths = split_photos(paths, config.val_fraction)
    max_side = max(4 * config.size, 512)
    train_photos, train_groups, skipped = load_photos(train_paths, max_side)
    val_photos, val_groups, skipped_val = load_photos(val_paths, max_side)
    for line in skipped + skipped_val:
        log(f"skipped {line}")
    if not train_photos:
        raise ValueError(f"{config.data_dir}: no readable training photos found")
    data_summary = {"data_dir": str(config.data_dir), "train_photos": len(train_photos), "val_photos": len(val_photos),
                    "folders": len(train_groups),
                    "skipped": len(skipped) + len(skipped_val)}
    log(f"photos: {len(train_photos)} train, {len(val_photos)} held out for validation")

    # Model and optimizer.
    model = AlignerNet(ModelConfig(transform=config.transform, size=config.size)).to(device)
    if config.init:
        from .align import resolve_model  # a shipped model's name or a path

        source, _ = load_model(resolve_model(config.init))
        own = model.state_dict()
        shared = {}
        for name, value in source.state_dict().items():
            if name not in own:
                continue
            if own[name].shape == value.shape:
                shared[name] = value
            elif own[name].shape[1:] == value.shape[1:] and own[name].shape[0] < value.shape[0]:
                # projective -> affine output layer: (TL, TR, BR) are the first 6 of the 8 corner outputs
                shared[name] = value[: own[name].shape[0]]
        model.load_state_dict(shared, strict=False)
        log(f"initialised {len(shared)}/{len(own)} tensors from {config.init}")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )
    start, history, best = 0, [], None
    if config.resume:
        resume = Path(config.resume)
        resume = resume if resume.name.endswith(".state.safetensors") else state_path(resume)
        meta = load_training_state(resume, model, optimizer)
        start, history = meta["step"], meta.get("history", [])
        log(f"resumed from {resume} at step {start}")
    model.train()

    sampler = PairSampler(config.transform, config.size, config.ranges,
                          Photometric() if config.photometric else Photometric(0, 0, 0, 0, 0, 0, 0), config.p_crop, config.seed)
    batches = StepBatches(sampler, train_photos, train_groups, config.batch_size, config.steps)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(start, config.steps)), batch_size=None, shuffle=False,
        num_workers=config.workers, prefetch_factor=4 if config.workers else None, persistent_workers=False,
    )
    val = make_validation_set(val_photos, val_groups, config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    info = lambda step, figures: {  # noqa: E731
        "step": step, "training": {"args": _jsonable(config.to_dict()), "data": data_summary, "device": str(device),
                                   "parameters": parameter_count(model), "seconds": round(elapsed + time.time() - t0, 1)},
        "validation": figures, "history": history,
    }

    def save(step: int, figures: dict | None) -> None:
        meta = info(step, figures)
        save_training_state(state_path(config.out), model, optimizer, meta)
        save_model(config.out, model, {k: v for k, v in meta.items() if k != "step"})

    interrupted = False

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    elapsed = 0.0 if not config.resume else meta.get("training", {}).get("seconds", 0.0)
    t0 = time.time()
    step, figures, loss_avg = start, None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with progress:
            task = progress.add_task("train", total=config.steps, completed=start, loss="-")
            for inputs, refs, mats in loader:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, config)
                image_in, image_ref = to_tensor(inputs.numpy(), device), to_tensor(refs.numpy(), device)
                target = normalized_targets(mats.numpy(), config.size).to(device)
                with autocast:
                    estimates = model(image_in, image_ref, config.iterations)
                loss = corner_loss(estimates, target, config.size, config.gamma)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                optimizer.step()
                step += 1
                loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
                progress.update(task, completed=step, loss=f"{loss_avg:.2f}px")
                if step % config.log_every == 0:
                    history.append([step, round(loss.item(), 4)])
                if step % 50 == 0 and not progress.console.is_terminal:
                    log(f"step {step}/{config.steps} loss {loss_avg:.2f}px lr {learning_rate(step, config):.2e} "
                        f"{(time.time() - t0) / max(1, step - start):.2f}s/step")
                if val is not None and (step % config.eval_every == 0 or step == config.steps):
                    figures = evaluate(model, val, device, config.iterations + 1)
                    log(f"step {step}: val mean {figures['mean_px']:.2f}px, <1px {figures['under_1px']:.1%}, "
                        f"<3px {figures['under_3px']:.1%}")
                if step % config.checkpoint_every == 0 or step == config.steps or step == config.stop_after:
                    save(step, figures)
                if step == config.stop_after:
                    break
    except KeyboardInterrupt:
        interrupted = True
        save(step, figures)
        log(f"interrupted: checkpoint saved at step {step}; continue with --resume {config.out}")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if interrupted:
        raise KeyboardInterrupt
    if start >= config.steps:
        save(step, figures)
    return info(step, figures)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def config_with(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)
