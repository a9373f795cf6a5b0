"""Self-supervised training: random synthetic warps of the user's own photos, read top to bottom.

Each step draws a batch of (input, reference, M) pairs from :class:`data.PairSampler` (a pure function
of ``(seed, step)``, so ``--resume`` continues exactly), runs the network for ``iterations`` rounds and
penalises the corner error of every round, later rounds weighted more. AdamW, linear warm-up then
cosine decay, gradient clipping, bf16 autocast on CUDA. Validation uses a fixed pair set drawn from
held-out *photos* (split by file-name hash), reported as mean corner error in working-frame pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, load_training_state, save_model, save_training_state, state_path
from .data import PairSampler, Photometric, WarpRanges, key_held_out, load_photo
from .geometry import homography_to_corners, pixel_to_normalized
from .model import AlignerNet, ModelConfig, parameter_count, resolve_device


@dataclass
class TrainConfig:
    data_dir: str
    out: str
    transform: str = "projective"
    size: int = 128
    architecture: str = "iterative"  # "iterative" (0.2) or "global" (0.1); see model.network
    steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    clip: float = 1.0
    iterations: int | None = None  # rounds unrolled in training (None: 2 global rounds, 4 iterative updates)
    gamma: float = 0.8  # loss weight of estimate k is gamma ** (estimates - 1 - k)
    p_crop: float = 0.5  # fraction of DeTone crop pairs (the rest: whole-image warps with fill)
    ranges: WarpRanges = field(default_factory=WarpRanges)
    photometric: bool = True
    val_fraction: float = 0.1
    val_pairs: int = 256
    eval_every: int = 1000
    eval_every_seconds: float | None = None  # also validate when this much wall time passed (learning curves)
    checkpoint_every: int = 500
    log_every: int = 50  # loss history resolution
    stop_after: int | None = None  # stop (with a checkpoint) at this step, to continue later with resume
    device: str = "auto"
    workers: int = 1
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    seed: int = 0
    resume: str | None = None
    init: str | None = None  # start from a model's weights (fine-tuning); head kept if shapes match
    init_lr_scale: float = 1.0  # learning-rate factor of the weights taken from `init` (0 freezes them; new parts train at `lr`)
    max_photos: int | None = None
    overwrite: bool = False  # replace an existing model at `out` (without it, only `resume` from it may)
    val_dir: str | None = None  # validation photos from this folder (then every photo of data_dir trains)
    group_by: str = "auto"  # the split's unit: auto, name, folder or a regex over the relative path (see split_photos)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """ValueError (one line) for settings that cannot train: checked before any photo is read."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "eval_every": self.eval_every,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every, "val_pairs": self.val_pairs}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if self.size < 64 or self.size % 32:
            raise ValueError(f"--size must be a multiple of 32, at least 64, not {self.size}")
        if not self.lr > 0 or self.warmup < 0 or self.workers < 0 or (self.threads is not None and self.threads < 1):
            raise ValueError("--lr must be positive, --warmup and --workers at least 0, --threads at least 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be at least 1, not {self.stop_after}")
        if self.group_by not in ("auto", "name", "folder"):
            import re

            try:
                re.compile(self.group_by)
            except re.error as err:
                raise ValueError(f"--group-by {self.group_by!r}: not auto, name, folder or a valid regex ({err})") from None


def check_destination(config: TrainConfig) -> None:
    """Refuse, before training, a model path that would destroy something or could not be written (ValueError,
    one line): a path inside the training photos, a folder, a file that is not an stn-align model, an existing
    model unless ``resume`` continues it or ``overwrite`` is set, a folder that cannot be written."""
    from .checkpoint import CheckpointError, read_metadata

    out = Path(config.out)
    data = Path(config.data_dir).resolve()
    if out.resolve() == data or data in out.resolve().parents:
        raise ValueError(f"{out}: inside the training photos {config.data_dir}; write the model elsewhere")
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the model file must end in .safetensors")
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; give a file name such as {out / 'model.safetensors'}")
    for path in (out, state_path(out), best_path(out)):
        if not path.exists():
            continue
        try:
            read_metadata(path)
        except CheckpointError:
            raise ValueError(f"{path}: exists and is not an stn-align model; not overwritten (choose another -o)") from None
    resuming = config.resume is not None and Path(config.resume).resolve() in (out.resolve(), state_path(out).resolve())
    if out.exists() and not (resuming or config.overwrite):
        raise ValueError(f"{out}: a model already exists there; continue it with --resume {out}, "
                         "or replace it with --overwrite")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot write there ({parent}: permission denied or not a directory)")


def find_photos(data_dir: str | Path) -> list[Path]:
    from .io import list_images

    return list_images(data_dir, recursive=True)


def split_group(path: Path, root: Path | None, group_by: str = "auto", names_unique: bool = True) -> str:
    """The key that decides a photo's side of the split; photos with one key are never on both sides.

    ``name``: the file name (0.2's split; the benchmarks' held-out photos); ``folder``: the folder relative to
    ``root`` (all views of one SKU in ``sku/front.jpg`` layouts); ``auto``: ``name`` when file names are unique
    across folders, else ``folder``; anything else: a regular expression searched in the relative path, its
    first group (or the whole match) being the key (e.g. ``^([^_]+)_`` for ``SKU_view.jpg`` names)."""
    import re

    rel = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.name
    if group_by == "auto":
        group_by = "name" if names_unique else "folder"
    if group_by == "name":
        return path.name
    if group_by == "folder":
        return rel.rpartition("/")[0] or "."
    found = re.search(group_by, rel)
    if not found:
        return rel
    return found.group(1) if found.groups() else found.group(0)


def split_photos(paths: list[Path], val_fraction: float, root: Path | None = None,
                 group_by: str = "auto") -> tuple[list[Path], list[Path]]:
    """Group-level split by a hash of each photo's :func:`split_group` key: validation photos (and every photo
    sharing their key) never appear in training pairs."""
    names_unique = len({p.name for p in paths}) == len(paths)
    key = {p: split_group(p, root, group_by, names_unique) for p in paths}
    val = [p for p in paths if key_held_out(key[p], val_fraction)]
    train = [p for p in paths if not key_held_out(key[p], val_fraction)]
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
    """Dataset whose item ``k`` is the whole batch of step ``k`` (so workers keep the order exactly).

    With ``world`` ranks, rank ``r``'s step ``k`` is the sampler's step ``k * world + r``: every rank draws
    different pairs, and one process (``world = 1``) draws exactly what it always did.
    """

    def __init__(self, sampler: PairSampler, photos: list[np.ndarray], groups, batch_size: int, steps: int,
                 rank: int = 0, world: int = 1):
        self.sampler, self.photos, self.groups, self.batch_size, self.steps = sampler, photos, groups, batch_size, steps
        self.rank, self.world = rank, world

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int):
        return self.sampler.batch(self.photos, step * self.world + self.rank, self.batch_size, self.groups)


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
    """Train (or resume) a model as ``config`` says; writes ``config.out`` and its training state. Returns metadata.

    Under torchrun (``WORLD_SIZE`` > 1) every process trains its share of each batch; see :class:`Distributed`.
    """
    config.check()
    if os.environ.get("RANK", "0") == "0":  # the writer checks; another rank, started late, would see its checkpoint
        check_destination(config)
    ddp = setup_distributed(config.device)
    try:
        return _train(config, log if ddp.main else (lambda *_: None), ddp)
    finally:
        ddp.close()


def _train(config: TrainConfig, log, ddp: Distributed) -> dict:
    device = ddp.device
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    # Data: photos split by file, decoded once into memory.
    paths = find_photos(config.data_dir)
    if config.max_photos:
        paths = paths[: config.max_photos]
    if config.val_dir:
        train_paths, val_paths = paths, find_photos(config.val_dir)
    else:
        train_paths, val_paths = split_photos(paths, config.val_fraction, Path(config.data_dir), config.group_by)
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
    model = AlignerNet(ModelConfig(transform=config.transform, size=config.size, architecture=config.architecture,
                                   iterations=3 if config.architecture == "global" else 6)).to(device)
    unrolled = config.iterations or (2 if config.architecture == "global" else 4)
    val_iterations = unrolled + 1 if config.architecture == "global" else model.config.iterations
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
    initialised = set(shared) if config.init else set()
    if config.init_lr_scale == 0:  # freeze what came from --init: only the new parts train (cheaper steps)
        for name, param in model.named_parameters():
            param.requires_grad_(name not in initialised)
    groups = []  # (weight decay or not) x (taken from --init or new): the latter train at the full rate
    for decays in (True, False):
        for pretrained in (True, False):
            params = [p for n, p in model.named_parameters()
                      if (p.ndim > 1) == decays and (n in initialised) == pretrained and p.requires_grad]
            if params:
                groups.append({"params": params, "weight_decay": config.weight_decay if decays else 0.0,
                               "lr_scale": config.init_lr_scale if pretrained else 1.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    start, history, curve = 0, [], []  # curve: [step, seconds, val mean px, val under 3 px]
    if config.resume:
        resume = Path(config.resume)
        resume = resume if resume.name.endswith(".state.safetensors") else state_path(resume)
        meta = load_training_state(resume, model, optimizer)
        start, history, curve = meta["step"], meta.get("history", []), meta.get("curve", [])
        log(f"resumed from {resume} at step {start}")
        if meta.get("training", {}).get("processes", 1) != ddp.world:
            log(f"note: resuming with {ddp.world} processes, trained with {meta['training'].get('processes', 1)}: "
                "the data from here on differs from an uninterrupted run")
    model.train()
    net = ddp.wrap(model, config.seed)  # DistributedDataParallel under torchrun, else the model itself

    sampler = PairSampler(config.transform, config.size, config.ranges,
                          Photometric() if config.photometric else Photometric(0, 0, 0, 0, 0, 0, 0), config.p_crop, config.seed)
    batches = StepBatches(sampler, train_photos, train_groups, ddp.share(config.batch_size), config.steps, ddp.rank, ddp.world)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(start, config.steps)), batch_size=None, shuffle=False,
        num_workers=config.workers, prefetch_factor=4 if config.workers else None, persistent_workers=False,
    )
    val = make_validation_set(val_photos, val_groups, config) if ddp.main else None  # rank 0 validates
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    info = lambda step, figures: {  # noqa: E731
        "step": step, "training": {"args": _jsonable(config.to_dict()), "data": data_summary, "device": str(device),
                                   "parameters": parameter_count(model), "seconds": round(elapsed + time.time() - t0, 1),
                                   "processes": ddp.world},
        "validation": figures, "validation_step": tracked["figures_step"], "history": history, "curve": curve,
    }
    best_file = best_path(config.out)
    tracked = {"figures_step": meta.get("validation_step") if config.resume else None,
               "best": _best_so_far(best_file) if config.resume else None}

    def validate(step: int) -> dict:
        """Evaluate, log, extend the curve and keep ``MODEL.best.safetensors`` the best validated weights."""
        nonlocal last_eval
        result = evaluate(model, val, device, val_iterations)
        last_eval = time.time()
        tracked["figures_step"] = step
        curve.append([step, round(elapsed + last_eval - t0, 1), round(result["mean_px"], 4), round(result["under_3px"], 4)])
        log(f"step {step}: val mean {result['mean_px']:.2f}px, <1px {result['under_1px']:.1%}, <3px {result['under_3px']:.1%}")
        if ddp.main and (tracked["best"] is None or result["mean_px"] < tracked["best"]):
            tracked["best"] = result["mean_px"]
            meta = info(step, result)
            save_model(best_file, model, {**{k: v for k, v in meta.items() if k != "step"}, "best_step": step})
        return result

    def save(step: int, figures: dict | None) -> None:
        if not ddp.main:  # rank 0 writes checkpoints
            return
        meta = info(step, figures)
        save_training_state(state_path(config.out), model, optimizer, meta)
        save_model(config.out, model, {k: v for k, v in meta.items() if k != "step"})

    interrupted = False

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    elapsed = 0.0 if not config.resume else meta.get("training", {}).get("seconds", 0.0)
    t0 = last_eval = time.time()
    step, loss_avg = start, None
    figures = meta.get("validation") if config.resume else None  # until the next validation, keep the last
    seen = hashlib.sha256()  # fingerprint of the pairs this process trained on (returned as pairs_sha256)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not ddp.main)
    try:
        with progress:
            task = progress.add_task("train", total=config.steps, completed=start, loss="-")
            for inputs, refs, mats in loader:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, config) * group.get("lr_scale", 1.0)
                image_in, image_ref = to_tensor(inputs.numpy(), device), to_tensor(refs.numpy(), device)
                target = normalized_targets(mats.numpy(), config.size).to(device)
                with autocast:
                    estimates = net(image_in, image_ref, unrolled)
                loss = corner_loss(estimates, target, config.size, config.gamma)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                optimizer.step()
                loss = ddp.average(loss)  # the global batch's loss, for the log and history
                seen.update(mats.numpy().tobytes())
                step += 1
                loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
                progress.update(task, completed=step, loss=f"{loss_avg:.2f}")
                if step % config.log_every == 0:
                    history.append([step, round(loss.item(), 4)])
                if step % 50 == 0 and not progress.console.is_terminal:
                    log(f"step {step}/{config.steps} loss {loss_avg:.2f} (corner px, gamma-weighted sum over the "
                        f"unrolled estimates) lr {learning_rate(step, config):.2e} "
                        f"{(time.time() - t0) / max(1, step - start):.2f}s/step")
                due = config.eval_every_seconds and time.time() - last_eval >= config.eval_every_seconds
                final = step == config.steps or step == config.stop_after
                if val is not None and (step % config.eval_every == 0 or final or due):
                    figures = validate(step)  # the last save's figures are always those of the weights it saves
                if step % config.checkpoint_every == 0 or final:
                    save(step, figures)
                if step == config.stop_after:
                    break
    except KeyboardInterrupt:
        interrupted = True
        with _signals_held():  # a second Ctrl-C, or torchrun forwarding it, must not cut the checkpoint short
            save(step, figures)
        log(f"interrupted: checkpoint saved at step {step}; continue with --resume {config.out}")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if interrupted:
        raise KeyboardInterrupt
    if start >= config.steps:
        save(step, figures)
    return {**info(step, figures), "pairs_sha256": seen.hexdigest()}


def best_path(model_path: Path | str) -> Path:
    """Where the best validated weights of a run go: ``MODEL.best.safetensors`` beside ``MODEL.safetensors``."""
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".best.safetensors")


def _best_so_far(path: Path) -> float | None:
    from .checkpoint import CheckpointError, read_metadata

    try:
        return (read_metadata(path).get("validation") or {}).get("mean_px")
    except CheckpointError:
        return None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_held():
    """Ignore SIGINT and SIGTERM inside the block (main thread only)."""
    if not _main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def config_with(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)


# --- distributed data parallel (torchrun / --nproc) -----------------------------------------------------
#
# One process per device. The global batch is ``batch_size``, split evenly across the ranks: rank ``r`` of
# ``N`` trains step ``k`` on the pairs of sampler step ``k * N + r`` (``batch_size / N`` of them), so the
# data is a pure function of (seed, step, rank, N) and ``--resume`` with the same N is exact. Gradients
# are averaged by DistributedDataParallel; rank 0 logs, validates and writes checkpoints. Plain
# BatchNorm: each rank normalises its own share and the running statistics are rank 0's (DDP broadcasts
# them at every forward pass); SyncBatchNorm would need CUDA and an all-reduce per layer and per round.


@dataclass
class Distributed:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> int:
        """This rank's pairs per step (the global batch divided by the number of ranks)."""
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} is not divisible by the {self.world} processes")
        return batch_size // self.world

    def wrap(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` (itself when alone); per-rank torch seed for anything random."""
        if self.world == 1:
            return model
        torch.manual_seed(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def average(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over the ranks (for logging the global loss)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / self.world

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any.

    gloo on CPU, nccl on CUDA with one GPU per local rank. Without torchrun: a single process on ``device``.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Distributed(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); use fewer processes")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), device=dev, owns_group=owns)


def launch(config: TrainConfig, nproc: int) -> dict:
    """Run :func:`train` in ``nproc`` local processes (what ``torchrun --standalone --nproc_per_node N`` does).

    CPU runs give each process ``cpu_count // nproc`` threads unless ``config.threads`` says otherwise.
    Returns rank 0's result (with ``"ranks"``: every rank's result, in rank order).
    """
    import logging
    import os
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError("--nproc must be at least 1")
    Distributed(world=nproc).share(config.batch_size)  # an uneven split fails here, before any process starts
    if "WORLD_SIZE" in os.environ:
        raise RuntimeError("--nproc inside torchrun: torchrun already started the processes")
    if config.threads is None and resolve_device(config.device).type == "cpu":
        config = replace(config, threads=max(1, (os.cpu_count() or 1) // nproc))
    launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                                 rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    # The agent's own logs (tracebacks of failed processes, signals) give way to one line here.
    agent_logs = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                  if name.startswith("torch.distributed.elastic")]
    levels = [log.level for log in agent_logs]
    for log in agent_logs:
        log.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(launch_config, train)(config)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise RuntimeError(f"training process {rank} failed: {_last_line(failure.message)}") from None
    except SignalException:  # Ctrl-C or SIGTERM: rank 0 has saved a checkpoint
        raise KeyboardInterrupt from None
    finally:
        for log, level in zip(agent_logs, levels):
            log.setLevel(level)
    ranks = [results[r] for r in sorted(results)]
    return {**ranks[0], "ranks": ranks}


def _last_line(message) -> str:
    if isinstance(message, dict):  # an error file: {"message": ..., "extraInfo": {"py_callstack": ...}}
        message = message.get("message", message)
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
