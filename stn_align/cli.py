"""Command-line interface: a thin Typer layer over the importable API.

Heavy modules (torch, cv2) are imported inside commands, so ``stn-align --help`` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import __version__

app = typer.Typer(
    help="Align an input image to a reference with a siamese spatial transformer network.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        typer.echo(f"stn-align {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
):
    """Align an input image to a reference with a siamese spatial transformer network."""


# ---------------------------------------------------------------------------------------------- train


@app.command()
def train(
    data_dir: Path = typer.Argument(..., help="Folder of photos (searched recursively, any common image format)."),
    out: Path = typer.Option(..., "-o", "--out", help="Model file to write (MODEL.safetensors; training state goes beside it)."),
    transform: str = typer.Option("projective", help="affine (6 parameters) or projective (8)."),
    size: int = typer.Option(128, help="Working resolution in pixels (multiple of 32)."),
    steps: int = typer.Option(20000, help="Optimizer steps."),
    batch_size: int = typer.Option(32, help="Pairs per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: int = typer.Option(1, help="Data-generating worker processes."),
    val_fraction: float = typer.Option(0.1, help="Fraction of photos held out for validation."),
    resume: Optional[Path] = typer.Option(None, help="Continue from MODEL.safetensors (or its .state.safetensors)."),
    init: Optional[Path] = typer.Option(None, help="Start from another model's weights (fine-tuning)."),
    seed: int = typer.Option(0, help="Seed of the pair sampler (training data is a function of seed and step)."),
    iterations: int = typer.Option(2, help="Refinement rounds unrolled in training."),
    p_crop: float = typer.Option(0.5, help="Fraction of crop pairs (DeTone); the rest are whole-image warps with fill."),
    max_rotation: float = typer.Option(30.0, help="Whole-image warps: rotation range, degrees."),
    max_scale: float = typer.Option(1.28, help="Whole-image warps: scale factor range [1/F, F]."),
    max_shear: float = typer.Option(0.15, help="Whole-image warps: shear factor."),
    max_translation: float = typer.Option(0.15, help="Whole-image warps: translation, fraction of the size."),
    max_perspective: float = typer.Option(0.12, help="Whole-image warps: corner jitter, fraction of the size (projective)."),
    crop_rho: float = typer.Option(0.25, help="Crop pairs: corner jitter, fraction of the crop size."),
    eval_every: int = typer.Option(1000, help="Validate every N steps."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint every N steps."),
):
    """Train an aligner on your own photos, self-supervised by random synthetic warps."""
    from .checkpoint import CheckpointError
    from .data import WarpRanges
    from .io import ImageError
    from .train import TrainConfig
    from .train import train as run_training

    if transform not in ("affine", "projective"):
        fail(f"--transform must be affine or projective, not {transform!r}")
    ranges = WarpRanges(max_rotation=max_rotation, max_scale=max_scale, max_shear=max_shear,
                        max_translation=max_translation, max_perspective=max_perspective, crop_rho=crop_rho)
    config = TrainConfig(data_dir=str(data_dir), out=str(out), transform=transform, size=size, steps=steps,
                         batch_size=batch_size, lr=lr, device=device, workers=workers, val_fraction=val_fraction,
                         resume=str(resume) if resume else None, init=str(init) if init else None, seed=seed,
                         iterations=iterations, p_crop=p_crop, ranges=ranges, eval_every=eval_every,
                         checkpoint_every=checkpoint_every)
    try:
        result = run_training(config)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except (ImageError, CheckpointError, ValueError, RuntimeError) as err:
        fail(str(err))
    figures = result.get("validation")
    typer.echo(f"wrote {out}" + (f" (validation: mean {figures['mean_px']:.2f}px, <3px {figures['under_3px']:.1%})" if figures else ""))
