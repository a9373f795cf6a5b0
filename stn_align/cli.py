"""Command-line interface: a thin Typer layer over the importable API.

Heavy modules (torch, cv2) are imported inside commands, so ``stn-align --help`` starts fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
import typer.core

from . import __version__

# ---------------------------------------------------------------------------------- default command


class DefaultCommandGroup(typer.core.TyperGroup):
    """A Typer group that runs ``align`` when the first argument is not a command or a group option.

    So ``stn-align INPUT --ref REF`` is ``stn-align align INPUT --ref REF``. A first argument that looks
    like a mistyped command (no such file, close to a command name) still gets "No such command ...".
    """

    default_command = "align"

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors (a bad option value, an unknown command) as one line, ``error: ...``, exit 2."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        import sys

        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as err:  # Typer's (vendored click's) UsageError, BadParameter, ...
            if type(err).__name__ == "NoArgsIsHelpError" or not hasattr(err, "format_message"):
                err.show()  # the help text
                sys.exit(getattr(err, "exit_code", 2))
            ctx = getattr(err, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            if "No such command" in err.format_message():
                hint = f" (commands: {', '.join(sorted(self.commands))}; or an image file: stn-align INPUT --ref REF)"
            typer.echo(f"error: {' '.join(err.format_message().split())}{hint}", err=True)
            sys.exit(getattr(err, "exit_code", 2))
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    _METAVARS = {"<str>": "TEXT", "<path>": "PATH", "<file>": "FILE", "<directory>": "DIR", "<int>": "INTEGER",
                 "<int range>": "INTEGER", "<float>": "NUMBER", "<float range>": "NUMBER"}

    def get_command(self, ctx, name):
        """The command, its options' value names readable in --help (PATH, TEXT, INTEGER, NUMBER, not <str>)."""
        command = super().get_command(ctx, name)
        for param in getattr(command, "params", ()):
            if (getattr(param, "param_type_name", "") == "option" and getattr(param, "metavar", None) is None
                    and not getattr(param, "is_flag", False)):
                try:
                    label = param.display_type(ctx)
                except Exception:  # noqa: BLE001 - help formatting only
                    continue
                if label in self._METAVARS:
                    param.metavar = self._METAVARS[label]
        return command

    def parse_args(self, ctx, args):
        if args and self.default_command in self.commands and self._use_default(ctx, args[0]):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def _use_default(self, ctx, first: str) -> bool:
        if first in self.commands:
            return False
        group_options = {opt for param in self.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)}
        if first in group_options:
            return False
        if not first.startswith("-") and "/" not in first and not os.path.exists(first):
            from .io import IMAGE_EXTENSIONS

            if os.path.splitext(first)[1].lower() not in IMAGE_EXTENSIONS:
                return False  # e.g. "bacth" or "help": "No such command 'bacth'. Did you mean 'batch'?"
        return True


app = typer.Typer(
    cls=DefaultCommandGroup,
    help="Align an input image to a reference with a siamese spatial transformer network.\n\n"
    "Shorthand: stn-align INPUT... --ref REF runs stn-align align INPUT... --ref REF.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: readable type names (PATH, TEXT, INTEGER), no markup
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


# ================================================================================================
# BEGIN align / batch / models commands (owner: CLI inference). Other commands live in their own
# sections; helpers here are prefixed ``_infer_`` / ``_model_`` to avoid clashes.
# ================================================================================================

_TRANSFORMS = ("affine", "projective")
_REFINES = ("ecc", "none")
_FALLBACKS = ("features", "rotations", "none")
_ALPHA_SUFFIXES = (".png", ".tif", ".tiff", ".webp")
_WRITE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

_MODEL_HELP = "Shipped model name (see 'stn-align models') or a .safetensors path. Default: picked by --transform."
_TRANSFORM_HELP = "affine or projective: picks the shipped model of that kind ('affine' / 'default') when --model is not given."
_ITERATIONS_HELP = "Network refinement: updates (iterative models) or warp-and-re-predict rounds (global models); default: the model's own."
_WORKING_SIZE_HELP = "Iterative models: run the update stage at this size (multiple of 32; default: the model's own)."
_DEVICE_HELP = "auto (CUDA when available), cpu or cuda."
_FILL_HELP = "Border of the aligned image: white, black, edge, transparent (adds alpha) or R,G,B."
_REFINE_HELP = "ecc: polish the network's estimate with OpenCV's ECC (kept only if it helps); none: network only."
_MIN_SCORE_HELP = "Alignments scoring below this (0-1) are flagged suspect (after the --fallback safety net)."
_FALLBACK_HELP = ("Safety net when the result scores below --min-score: features (also try the network started from the "
                  "input turned 90/180/270 degrees, and SIFT + MAGSAC, each polished like the network's; the best score "
                  "wins), rotations (the turned starts only) or none.")
_MASK_HELP = ("none, auto (refinement and score look only at the reference's foreground: the product on a plain "
              "background, or its alpha) or FILE (a mask image in the reference's frame, non-zero = use).")


_FORMAT_HELP = "Output format: keep (each output in its input's format), jpg, png, tiff or webp."
_QUALITY_HELP = "JPEG and WebP quality, 1-100 (WebP 100: lossless)."
_INTERPOLATION_HELP = ("The final warp's sampling: linear, cubic, area or lanczos. Any warp that shrinks the input "
                       "more than 1.5x is antialiased first (an area-filtered copy).")
_CANVAS_HELP = ("The output image: reference (the reference's size and framing), input (the reference's framing at the "
                "input's resolution) or union (the reference frame and the whole warped input, nothing cut off).")
_CROP_HELP = "none, or common: crop the output to the largest rectangle the warped input covers entirely."


def _infer_check_output(output_format: str, interpolation: str, canvas: str, crop: str) -> None:
    from .align import INTERPOLATIONS
    from .batch import OUTPUT_FORMATS
    from .canvas import CANVASES, CROPS

    for name, value, allowed in (("--format", output_format, ("keep", *OUTPUT_FORMATS)),
                                 ("--interpolation", interpolation, tuple(INTERPOLATIONS)),
                                 ("--canvas", canvas, CANVASES), ("--crop", crop, CROPS)):
        if value not in allowed:
            fail(f"{name} must be one of {', '.join(allowed)}, not {value!r}", 2)


def _infer_check_mask(mask: str) -> Optional[str]:
    if mask not in ("none", "auto") and not Path(mask).is_file():
        fail(f"{mask}: --mask must be none, auto or an existing mask image file", 2)
    return None if mask == "none" else mask


def _infer_consoles(json_to_stdout: bool = False):
    """(results console, diagnostics console). Results go to stderr when stdout carries JSON."""
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    return (err if json_to_stdout else Console(soft_wrap=True, highlight=False)), err


def _infer_check_options(transform: Optional[str], refine: str, fill: str, iterations: Optional[int], min_score: float,
                         fallback: str = "features") -> None:
    if transform is not None and transform not in _TRANSFORMS:
        fail(f"--transform must be affine or projective, not {transform!r}", 2)
    if fallback not in _FALLBACKS:
        fail(f"--fallback must be features, rotations or none, not {fallback!r}", 2)
    if refine not in _REFINES:
        fail(f"--refine must be ecc or none, not {refine!r}", 2)
    if iterations is not None and iterations < 1:
        fail(f"--iterations must be at least 1, not {iterations}", 2)
    if not 0.0 <= min_score <= 1.0:
        fail(f"--min-score must be between 0 and 1, not {min_score}", 2)
    from .align import parse_fill  # imported here: it pulls in torch, so only after the cheap checks

    try:
        parse_fill(fill)
    except ValueError as err:
        fail(str(err), 2)


def _infer_load(model: Optional[str], transform: Optional[str], device: str, diag, **options):
    """Resolve the device (saying which) and the model (checking --transform); returns an Aligner."""
    import torch

    from .align import Aligner, parse_fill, resolve_model
    from .checkpoint import CheckpointError, read_metadata
    from .model import resolve_device

    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as err:
        fail(str(err), 2)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        diag.print(f"using cuda:{index} ({torch.cuda.get_device_name(index)})")
    else:
        diag.print("using cpu")
    name = model or ("affine" if transform == "affine" else "default")
    # NB: typer.Exit is a RuntimeError: never call fail() inside these try blocks.
    try:
        path = resolve_model(name)
        actual = read_metadata(path).get("model", {}).get("transform") if transform is not None else None
    except (CheckpointError, ValueError, OSError) as err:
        fail(str(err))
    if transform is not None and actual != transform:
        fail(f"--model {name} is a {actual} model but --transform {transform} was given "
             "(drop one of the two options)", 2)
    try:
        return Aligner.load(path, str(dev), **{**options, "fill": parse_fill(options["fill"])})
    except (CheckpointError, ValueError, RuntimeError, OSError) as err:
        fail(str(err))


def _infer_same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _infer_check_writable(path: Path, what: str) -> None:
    """Fail (usage, before any work) unless ``path`` can be written: not a folder, in an existing writable folder."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        fail(f"{path}: {what} is a directory; give a file name", 2)
    if not parent.is_dir():
        fail(f"{path}: {what}: no such directory {parent}", 2)
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"{path}: {what}: permission denied (not writable)", 2)


def _infer_default_output(input: Path) -> Path:
    suffix = input.suffix if input.suffix.lower() in _WRITE_SUFFIXES else ".png"
    return input.with_name(f"{input.stem}.aligned{suffix}")


def _infer_matrix_lines(matrix) -> list[str]:
    return ["  " + "  ".join(f"{v: .8g}".rjust(15) for v in row) for row in matrix]


# ---------------------------------------------------------------------------------------------- align


@app.command("align")
def align_command(
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...", help="The image(s) to align (each is warped onto the reference; the reference itself is skipped if listed)."),
    ref: Path = typer.Option(..., "--ref", "-r", help="The reference image: the output has its size and framing."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output file, or folder (required to be a folder with several inputs). Default: INPUT_NAME.aligned.EXT next to each input."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    transform: Optional[str] = typer.Option(None, "--transform", help=_TRANSFORM_HELP),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help=_ITERATIONS_HELP),
    working_size: Optional[int] = typer.Option(None, "--working-size", min=64, help=_WORKING_SIZE_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    fill: str = typer.Option("white", "--fill", help=_FILL_HELP),
    refine: str = typer.Option("ecc", "--refine", help=_REFINE_HELP),
    min_score: float = typer.Option(0.75, "--min-score", min=0.0, max=1.0, help=_MIN_SCORE_HELP),
    fallback: str = typer.Option("features", "--fallback", help=_FALLBACK_HELP),
    fail_on_suspect: bool = typer.Option(False, "--fail-on-suspect", help="Exit 1 when an alignment is suspect (score below --min-score); the output is still written."),
    output_format: str = typer.Option("keep", "--format", help=_FORMAT_HELP + " Names the default output; -o's suffix otherwise."),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help=_QUALITY_HELP),
    interpolation: str = typer.Option("linear", "--interpolation", help=_INTERPOLATION_HELP),
    canvas: str = typer.Option("reference", "--canvas", help=_CANVAS_HELP),
    crop: str = typer.Option("none", "--crop", help=_CROP_HELP),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the result record as JSON to FILE, or '-' for stdout (several inputs: a JSON list).", metavar="FILE|-"),
    mask: str = typer.Option("none", "--mask", help=_MASK_HELP),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also write a sheet (input | reference | aligned | overlay | checkerboard) to FILE (one input)."),
    max_pixels: int = typer.Option(178_956_970, "--max-pixels", min=1, help="Refuse images larger than this many pixels (decompression-bomb guard)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and warnings (and --json -)."),
):
    """Align INPUT(s) onto REF and write the aligned image(s) (also: stn-align INPUT... --ref REF).

    Examples:

      stn-align shot.jpg --ref reference.jpg                 # writes shot.aligned.jpg, prints matrix and score

      stn-align shots/*.jpg --ref reference.jpg -o aligned/  # several shots, one reference

      stn-align shot.jpg --ref reference.jpg --json -        # the record as JSON on stdout
    """
    import json

    from rich.markup import escape

    from .batch import OUTPUT_FORMATS, writable
    from .io import _WRITE_FORMATS, ImageError, read_image, read_info, write_image

    _infer_check_options(transform, refine, fill, iterations, min_score, fallback)
    _infer_check_output(output_format, interpolation, canvas, crop)
    show, diag = _infer_consoles(json_to_stdout=json_out == "-")
    if quiet:
        show.quiet = True
    if len(inputs) > 1 and any(_infer_same(p, ref) for p in inputs):  # a shell glob may list the reference too
        inputs = [p for p in inputs if not _infer_same(p, ref)]
        diag.print(f"note: {escape(str(ref))} is the reference; not aligned onto itself")
    several = len(inputs) > 1
    if several and preview is not None:
        fail("--preview takes one input", 2)
    if several and out is not None and out.exists() and not out.is_dir():
        fail(f"{out}: with several inputs, -o must be a folder", 2)
    outputs = []
    for input in inputs:
        folder = out if out is not None and (several or out.is_dir()) else None
        if folder is not None:  # -o DIR: DIR/INPUT_NAME
            output = folder / (input.name if input.suffix.lower() in _WRITE_SUFFIXES else f"{input.stem}.png")
        else:
            output = out if out is not None else _infer_default_output(input)
        if output_format != "keep":
            if out is None or folder is not None:
                output = output.with_suffix(OUTPUT_FORMATS[output_format])
            elif _WRITE_FORMATS.get(output.suffix.lower()) != _WRITE_FORMATS[OUTPUT_FORMATS[output_format]]:
                fail(f"{output}: its suffix is not --format {output_format} (drop one of the two)", 2)
        for other, what in [(p, "input") for p in inputs] + [(ref, "reference")]:  # never over an input
            if _infer_same(output, other):
                fail(f"{output}: the output would overwrite the {what} (choose another -o)", 2)
            if json_out not in (None, "-") and _infer_same(Path(json_out), other):
                fail(f"{json_out}: the --json file would overwrite the {what}", 2)
        if output.suffix.lower() not in _WRITE_SUFFIXES:
            fail(f"{output}: unsupported output format {output.suffix or '(no suffix)'!r} "
                 f"(use one of: {' '.join(_WRITE_SUFFIXES)})", 2)
        if fill == "transparent" and output.suffix.lower() not in _ALPHA_SUFFIXES:
            fail(f"{output}: --fill transparent needs an output format with alpha (.png, .tif, .webp), "
                 f"not {output.suffix}", 2)
        outputs.append(output)
    if json_out not in (None, "-"):
        _infer_check_writable(Path(json_out), "--json")
    if preview is not None and preview.suffix.lower() not in _WRITE_SUFFIXES:
        fail(f"{preview}: unsupported preview format {preview.suffix or '(no suffix)'!r}", 2)
    mask_option = _infer_check_mask(mask)
    try:
        image_in = read_image(inputs[0], max_pixels=max_pixels) if not several else None  # a bad single input: before loading
        image_ref = read_image(ref, max_pixels=max_pixels)
    except ImageError as err:
        fail(str(err))
    if several and out is not None:
        out.mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    info = Console(stderr=True, soft_wrap=True, highlight=False, quiet=quiet)  # 'using cpu': not with -q
    aligner = _infer_load(model, transform, device, info, iterations=iterations, working_size=working_size, refine=refine, fill=fill,
                          min_score=min_score, mask=mask_option, fallback=fallback, interpolation=interpolation,
                          canvas=canvas, crop=crop)
    records, failures, suspects = [], [], 0
    for input, output in zip(inputs, outputs):
        try:
            image = image_in if image_in is not None else read_image(input, max_pixels=max_pixels)
            result = aligner.align(image, image_ref)
            write_image(output, writable(result.image), quality, read_info(input))
            if preview is not None:
                from .preview import make_sheet

                write_image(preview, make_sheet(image, image_ref, result.image, title=input.name))
        except (ImageError, ValueError, RuntimeError) as err:
            message = str(err) if isinstance(err, ImageError) else f"{input}: {err}"
            if not several:
                fail(message)
            failures.append(message)
            continue
        record = {"input": str(input), "reference": str(ref), "output": str(output), **result.to_record(),
                  "model": aligner.name}
        records.append(record)
        how = {"network": "network", "rotated": "network from a turned start", "features": "SIFT features",
               "identity": "identity, nothing moved"}[result.method.removesuffix("+ecc")] + (" + ECC" if result.refined else "")
        show.print(f"aligned {escape(str(input))} -> [bold]{escape(str(output))}[/bold]  "
                   f"({result.transform}, model {escape(aligner.name)}, {how})")
        show.print(f"score {result.score:.3f}" + ("  [yellow]suspect[/yellow]" if result.suspect else ""))
        if not several:
            show.print("matrix (input pixels -> reference pixels):")
            for line in _infer_matrix_lines(result.matrix):
                show.print(line)
        if result.suspect:
            suspects += 1
            diag.print(f"[yellow]warning:[/yellow] {escape(str(input))}: score {result.score:.3f} is below --min-score "
                       f"{min_score:g}: the alignment is suspect, check the output")
    payload = records[0] if not several and records else records
    if json_out == "-":
        typer.echo(json.dumps(payload, indent=2))
    elif json_out is not None:
        try:
            from .io import write_text_atomic

            write_text_atomic(Path(json_out), json.dumps(payload, indent=2) + "\n")
        except OSError as err:
            fail(f"{json_out}: cannot write ({err.strerror or err})")
    if failures:
        diag.print(f"[red]{len(failures)} failed:[/red]")
        for message in failures:
            typer.echo(message, err=True)
        raise typer.Exit(1)
    if fail_on_suspect and suspects:
        raise typer.Exit(1)


@app.command("apply")
def apply_command(
    transform: Path = typer.Argument(..., metavar="MANIFEST_OR_MATRIX", help="A batch manifest (alignments.jsonl) or a JSON transform (the --json record of a single alignment, or a 3x3 list)."),
    files: list[Path] = typer.Argument(..., metavar="FILES...", help="Images or folders of images to warp the same way (a mask, a RAW development, another resolution of the shot)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output file (one input) or folder (a folder argument's tree is mirrored). Default: NAME.aligned.EXT beside each file."),
    fill: str = typer.Option("white", "--fill", help=_FILL_HELP + " For masks: black."),
    interpolation: str = typer.Option("linear", "--interpolation", help=_INTERPOLATION_HELP + " nearest keeps a mask's values."),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help=_QUALITY_HELP),
):
    """Re-apply a recorded transform to other files, e.g. the mask layer or a high-resolution version of a shot.

    With a manifest, each file gets the record of the input with the same relative path (or the same name),
    any extension. A file of another size than the aligned input is taken as the same shot at another
    resolution: the output is scaled alike. Examples:

      stn-align apply aligned/alignments.jsonl masks/ -o aligned_masks/ --fill black --interpolation nearest
      stn-align apply shot.json shot_8k.tif -o shot_8k.aligned.tif
    """
    from .align import INTERPOLATIONS, parse_fill
    from .apply import ApplyError, apply_file, load_transforms, match
    from .io import ImageError, is_image_file, list_images

    if interpolation not in INTERPOLATIONS:
        fail(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}", 2)
    try:
        fill_option = parse_fill(fill)
    except ValueError as err:
        fail(str(err), 2)
    try:
        transforms = load_transforms(transform)
    except ApplyError as err:
        fail(str(err))
    jobs: list[tuple[Path, str, Path]] = []  # (file, name to match, output)
    for item in files:
        if item.is_dir():
            try:
                found = list_images(item)
            except ImageError as err:
                fail(str(err))
            for path in found:
                rel = path.relative_to(item).as_posix()
                jobs.append((path, rel, (out / rel) if out is not None else _infer_default_output(path)))
        else:
            target = out if out is not None else _infer_default_output(item)
            if out is not None and (len(files) > 1 or out.is_dir()):
                target = out / (item.name if is_image_file(item.name) else f"{item.stem}.png")
            jobs.append((item, item.name, target))
    protected = [transform, *[f for f, _, _ in jobs]]
    failures = []
    for source, name, target in jobs:
        if any(_infer_same(target, p) for p in protected):
            failures.append(f"{target}: would overwrite an input (choose another -o)")
            continue
        try:
            chosen = match(transforms, name)
            _, size = apply_file(chosen, source, target, fill_option, interpolation, quality)
        except (ApplyError, ImageError, ValueError) as err:
            failures.append(str(err) if not isinstance(err, ValueError) else f"{source}: {err}")
            continue
        typer.echo(f"{source} -> {target} ({size[0]}x{size[1]})")
    if failures:
        typer.echo(f"{len(failures)} failed:", err=True)
        for line in failures:
            typer.echo(line, err=True)
        raise typer.Exit(1)


@app.command("batch")
def batch_command(
    input_dir: Path = typer.Argument(..., metavar="INPUT_DIR", help="Folder of images to align."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: mirrors INPUT_DIR (same relative paths and names) plus alignments.jsonl. A folder inside INPUT_DIR is left out of the input listing."),
    ref: Optional[Path] = typer.Option(None, "--ref", "-r", help="One reference for every input."),
    ref_dir: Optional[Path] = typer.Option(None, "--ref-dir", help="Folder of references: each input is paired with the reference at the same relative path, or else the same relative name with any image extension."),
    ref_in_folder: Optional[str] = typer.Option(None, "--ref-in-folder", metavar="NAME|GLOB", help="One reference per product folder: the image of each folder whose name matches (e.g. 'ref.jpg' or '*_front.*') is the reference of the others there."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", metavar="CSV", help="A CSV of input,reference rows (inputs relative to INPUT_DIR, references to the CSV's folder); only those inputs are aligned."),
    ignore_case: bool = typer.Option(False, "--ignore-case", help="Match --ref-dir names and --ref-in-folder patterns regardless of case."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    transform: Optional[str] = typer.Option(None, "--transform", help=_TRANSFORM_HELP),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help=_ITERATIONS_HELP),
    working_size: Optional[int] = typer.Option(None, "--working-size", min=64, help=_WORKING_SIZE_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    fill: str = typer.Option("white", "--fill", help=_FILL_HELP),
    refine: str = typer.Option("ecc", "--refine", help=_REFINE_HELP),
    min_score: float = typer.Option(0.75, "--min-score", min=0.0, max=1.0, help=_MIN_SCORE_HELP),
    fallback: str = typer.Option("features", "--fallback", help=_FALLBACK_HELP),
    mask: str = typer.Option("none", "--mask", help=_MASK_HELP),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Include sub-folders."),
    force: bool = typer.Option(False, "--force", help="Redo every input, also those whose output is up to date (default: resume, redoing only what changed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Let outputs replace files in OUT_DIR that stn-align did not write (default: such an input fails and the file is left as it is)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Pairs per network call."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Threads decoding, refining and encoding images. Default: min(4, CPUs)."),
    fail_on_suspect: bool = typer.Option(False, "--fail-on-suspect", help="Exit 1 when any alignment of the job is suspect (score below --min-score), skipped ones included."),
    max_pixels: int = typer.Option(178_956_970, "--max-pixels", min=1, help="Refuse images larger than this many pixels (decompression-bomb guard)."),
    max_memory: int = typer.Option(1024, "--max-memory", min=64, metavar="MB", help="About how much memory the images in flight may take (local engine); fewer pairs run at once when they are large. One pair always runs."),
    output_format: str = typer.Option("keep", "--format", help=_FORMAT_HELP),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help=_QUALITY_HELP),
    interpolation: str = typer.Option("linear", "--interpolation", help=_INTERPOLATION_HELP),
    canvas: str = typer.Option("reference", "--canvas", help=_CANVAS_HELP),
    crop: str = typer.Option("none", "--crop", help=_CROP_HELP),
    suspect_dir: Optional[Path] = typer.Option(None, "--suspect-dir", help="Also copy every suspect output of the job to this folder (same relative paths), for review. OUT_DIR/suspects.txt lists them either way."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list the folder entries that were not inputs (other files, unsupported formats, links)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary: only warnings, failures and errors."),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray (a Ray cluster with Ray Data: an actor pool, one GPU per actor when the cluster has GPUs; needs pip install \"stn-align[ray]\" and paths shared by every node)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --engine ray: the cluster, e.g. auto or ray://HOST:10001. Default: RAY_ADDRESS, else a new local Ray."),
):
    """Align every image of INPUT_DIR to --ref (or to its counterpart in --ref-dir) into OUT_DIR.

    Examples:

      stn-align batch shots/ --ref reference.jpg -o aligned/

      stn-align batch catalogue/ --ref-in-folder 'ref.*' -o aligned/ --suspect-dir review/

      stn-align batch shots/ --ref-dir refs/ -o aligned/ --format png --fail-on-suspect

    Resumable: re-running the same command skips inputs whose output is up to date (same input, reference,
    model and options, output intact; see alignments.jsonl) and redoes the rest, saying why. Files in OUT_DIR
    that stn-align did not write are never replaced without --overwrite. Ctrl-C or SIGTERM stops after the
    pairs in progress (a second one at once). Exit status: 0 all aligned, 1 some failed (each listed at the
    end) or, with --fail-on-suspect, some suspect, 2 usage error, 130/143 stopped by SIGINT/SIGTERM.
    """
    import contextlib
    import time

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .batch import BatchError, StopSignals, align_directory, check_alpha_outputs, plan_pairs
    from .io import ImageError, read_image

    if sum(x is not None for x in (ref, ref_dir, ref_in_folder, pairs)) != 1:
        fail("give exactly one of --ref FILE, --ref-dir DIR, --ref-in-folder NAME or --pairs CSV", 2)
    _infer_check_options(transform, refine, fill, iterations, min_score, fallback)
    _infer_check_output(output_format, interpolation, canvas, crop)
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, not {engine!r}", 2)
    if ray_address is not None and engine != "ray":
        fail("--ray-address needs --engine ray", 2)
    if engine == "ray":
        from .ray_engine import import_ray

        try:
            import_ray()
        except BatchError as err:
            fail(str(err))
    if quiet and verbose:
        fail("--quiet and --verbose contradict each other", 2)
    mask_option = _infer_check_mask(mask)
    if suspect_dir is not None and any(_infer_same(suspect_dir, d) for d in (out, input_dir, *([ref_dir] if ref_dir else []))):
        fail(f"{suspect_dir}: --suspect-dir must be a folder of its own, not OUT_DIR, INPUT_DIR or --ref-dir", 2)
    show, diag = _infer_consoles()
    from rich.console import Console

    info = Console(stderr=True, soft_wrap=True, highlight=False, quiet=quiet)  # progress and notes; -q silences
    show.quiet = quiet
    not_inputs: list[tuple[Path, str]] = []
    try:
        plan = plan_pairs(input_dir, out, ref=ref, ref_dir=ref_dir, recursive=recursive, skipped=not_inputs,
                          output_format=output_format, ref_in_folder=ref_in_folder, pairs_csv=pairs,
                          ignore_case=ignore_case)
        if fill == "transparent":
            check_alpha_outputs(plan[0])
        ref_image = read_image(ref, max_pixels=max_pixels) if ref is not None else None
    except BatchError as err:
        fail(str(err), 2 if err.usage else 1)
    except ImageError as err:
        fail(str(err))
    if plan[1]:
        diag.print(f"note: {escape(str(out))} is inside {escape(str(input_dir))}; it is left out of the inputs")
    if not plan[0]:
        diag.print(f"[yellow]warning:[/yellow] no images found in {escape(str(input_dir))}"
                   + ("" if recursive else " (without sub-folders: --no-recursive)"))
    if engine == "ray":  # loaded here on the CPU; each actor moves it to its own device (--device)
        from rich.console import Console

        aligner = _infer_load(model, transform, "cpu", Console(quiet=True), iterations=iterations, working_size=working_size, refine=refine,
                              fill=fill, min_score=min_score, mask=mask_option, fallback=fallback, interpolation=interpolation,
                              canvas=canvas, crop=crop)
    else:
        aligner = _infer_load(model, transform, device, info, iterations=iterations, working_size=working_size, refine=refine, fill=fill,
                              min_score=min_score, mask=mask_option, fallback=fallback, interpolation=interpolation,
                              canvas=canvas, crop=crop)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=info, transient=False)
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    task = None
    # Not a terminal (piped, logged): a plain progress line every STN_ALIGN_PROGRESS_SECONDS (10) s instead of the bar.
    plain = {"total": 0, "last": 0.0, "every": float(os.environ.get("STN_ALIGN_PROGRESS_SECONDS", 10))}

    def on_start(total: int) -> None:
        nonlocal task
        task = progress.add_task("aligning", total=total, counts="")
        plain["total"], plain["last"] = total, time.monotonic()

    def on_progress(record: dict) -> None:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        text = f"ok {counts['ok']}" + (f", skipped {counts['skipped']}" if counts["skipped"] else "") + \
            (f", [red]failed {counts['failed']}[/red]" if counts["failed"] else "")
        progress.update(task, advance=1, counts=text)
        now = time.monotonic()
        if not diag.is_terminal and not quiet and now - plain["last"] >= plain["every"]:
            plain["last"] = now
            done = sum(counts.values())
            typer.echo(f"progress: {done}/{plain['total']} ({text.replace('[red]', '').replace('[/red]', '')})", err=True)

    def on_signal(signum: int) -> None:
        name = "SIGTERM" if signum == 15 else "SIGINT"
        typer.echo(f"{name}: stopping after the pairs in progress (send it again to stop at once)", err=True)

    stopper = StopSignals(on_first=on_signal) if engine == "local" else None
    try:
        with progress, (stopper or contextlib.nullcontext()):
            common = dict(ref=ref, ref_dir=ref_dir, recursive=recursive, force=force, overwrite=overwrite,
                          batch_size=batch_size, workers=workers, on_progress=on_progress, on_start=on_start, plan=plan,
                          ref_image=ref_image, max_pixels=max_pixels, output_format=output_format, quality=quality)
            if engine == "ray":
                from .ray_engine import align_directory_ray

                summary = align_directory_ray(aligner, input_dir, out, address=ray_address, device=device,
                                              on_info=lambda text: diag.print(escape(text)), **common)
            else:
                summary = align_directory(aligner, input_dir, out, stop=stopper.event, memory_budget=max_memory * 2**20,
                                          **common)
    except KeyboardInterrupt:
        diag.print(f"interrupted; finished pairs are recorded in {escape(str(Path(out) / 'alignments.jsonl'))}: "
                   "re-run the same command to resume")
        raise typer.Exit(130)
    except BatchError as err:
        fail(str(err), 2 if err.usage else 1)
    except (ImageError, ValueError, RuntimeError, OSError) as err:
        fail(str(err))

    for line in summary.warnings:
        diag.print(f"[yellow]warning:[/yellow] {escape(line)}")
    show.print(f"aligned {summary.aligned}, skipped {summary.skipped}, failed {summary.failed}, "
               f"suspect {summary.suspect} in {summary.seconds:.1f} s ({summary.pairs_per_second:.2f} pairs/s)")
    if summary.redone:
        total = sum(summary.redone.values())
        why = ", ".join(f"{reason} {n}" if len(summary.redone) > 1 else reason for reason, n in sorted(summary.redone.items()))
        show.print(f"{total} redone: {escape(why)}")
    show.print(f"manifest: {escape(str(summary.manifest))}")
    if not_inputs and not quiet:
        diag.print(f"not inputs: {len(not_inputs)} entr{'y' if len(not_inputs) == 1 else 'ies'} of "
                   f"{escape(str(input_dir))} skipped" + ("" if verbose else " (--verbose lists them)"))
        if verbose:
            for path, reason in not_inputs:
                typer.echo(f"  {path}: {reason}", err=True)
    if summary.gone:
        shown = ", ".join(summary.gone[:10]) + (f" and {len(summary.gone) - 10} more" if len(summary.gone) > 10 else "")
        diag.print(f"[yellow]gone:[/yellow] {len(summary.gone)} input(s) recorded in the manifest no longer exist "
                   f"(their outputs are kept): {escape(shown)}")
    if suspect_dir is not None:
        from .batch import gather_suspects
        from .manifest import read_manifest

        try:
            copied = gather_suspects(Path(out), read_manifest(summary.manifest), suspect_dir)
        except OSError as err:
            fail(f"{suspect_dir}: cannot write ({err.strerror or err})")
        diag.print(f"{len(copied)} suspect output(s) in {escape(str(suspect_dir))}")
    if summary.suspects:
        from .batch import SUSPECTS_NAME

        shown = ", ".join(summary.suspects[:5]) + (f" and {len(summary.suspects) - 5} more" if len(summary.suspects) > 5 else "")
        diag.print(f"[yellow]suspect[/yellow] (score < {min_score:g}; check these outputs): {escape(shown)}; "
                   f"all listed in {escape(str(Path(out) / SUSPECTS_NAME))}")
        judged = summary.aligned + summary.skipped
        if judged >= 4 and summary.suspect > 0.5 * judged:
            what = "--ref the right image" if ref is not None else "the pairing giving the right references"
            diag.print(f"[yellow]warning:[/yellow] {summary.suspect} of {judged} alignments are suspect: is {what}?")
    if summary.interrupted and stopper is not None and stopper.signum is not None:
        name = "SIGTERM" if stopper.signum == 15 else "SIGINT"
        typer.echo(f"stopped by {name}: every finished pair is recorded; re-run the same command to resume", err=True)
        raise typer.Exit(stopper.exit_code)
    if summary.failures:
        diag.print(f"[red]{summary.failed} failed:[/red]")
        for message in summary.failures:
            typer.echo(message, err=True)
        raise typer.Exit(1)
    if fail_on_suspect and summary.suspect:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- train


def _train_restore_settings(ctx, resume: Path, values: dict, range_values: dict) -> None:
    """Fill ``values``/``range_values`` with the resumed run's saved settings where the option was not given."""
    from .checkpoint import CheckpointError, read_metadata, state_path

    path = resume if resume.name.endswith(".state.safetensors") else state_path(resume)
    try:
        saved = read_metadata(path).get("training", {}).get("args", {})
    except CheckpointError as err:
        fail(str(err))
    saved_ranges = saved.get("ranges") or {}
    for target, source in ((values, saved), (range_values, saved_ranges)):
        for name in target:
            if name not in source:
                continue
            given = ctx.get_parameter_source(name) is not None and ctx.get_parameter_source(name).name != "DEFAULT"
            if not given:
                target[name] = source[name]
            elif target[name] != source[name]:
                typer.echo(f"warning: --{name.replace('_', '-')} {target[name]} overrides the resumed run's "
                           f"{source[name]}", err=True)


@app.command()
def train(
    ctx: typer.Context,
    data_dir: Path = typer.Argument(..., metavar="PHOTOS_DIR", help="Folder of photos (searched recursively, any common image format)."),
    out: Path = typer.Option(..., "-o", "--out", help="Model file to write (MODEL.safetensors; training state goes beside it)."),
    transform: str = typer.Option("projective", help="affine (6 parameters) or projective (8)."),
    size: int = typer.Option(128, min=64, help="Working resolution in pixels (multiple of 32)."),
    architecture: str = typer.Option("iterative", help="iterative (coarse global stage + local-correlation updates) or global (0.1's)."),
    steps: int = typer.Option(20000, min=1, help="Optimizer steps. On a 2-core CPU a step of 16 pairs at 128 px takes about 2 s: the default 20000 steps at batch 32 are about a day; a GPU takes minutes to hours."),
    batch_size: int = typer.Option(32, min=1, help="Pairs per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    warmup: int = typer.Option(300, min=0, help="Linear warm-up steps."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: int = typer.Option(1, min=0, help="Data-generating worker processes."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for the network (default: torch's choice)."),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.99, help="Fraction of photos held out for validation."),
    resume: Optional[Path] = typer.Option(None, help="Continue from MODEL.safetensors (or its .state.safetensors)."),
    init: Optional[str] = typer.Option(None, help="Start from a model's weights (fine-tuning): a shipped name, e.g. default, or a path."),
    init_lr_scale: float = typer.Option(1.0, help="Learning-rate factor for the weights taken from --init (0 freezes them; new parts train at --lr)."),
    seed: int = typer.Option(0, help="Seed of the pair sampler (training data is a function of seed and step)."),
    iterations: Optional[int] = typer.Option(None, min=1, help="Rounds unrolled in training (default: 4 updates iterative, 2 rounds global)."),
    p_crop: float = typer.Option(0.5, help="Fraction of crop pairs (DeTone); the rest are whole-image warps with fill."),
    max_rotation: float = typer.Option(45.0, help="Whole-image warps: rotation range, degrees."),
    max_scale: float = typer.Option(1.43, help="Whole-image warps: scale factor range [1/F, F]."),
    max_shear: float = typer.Option(0.15, help="Whole-image warps: shear factor."),
    max_translation: float = typer.Option(0.15, help="Whole-image warps: translation, fraction of the size."),
    max_perspective: float = typer.Option(0.12, help="Whole-image warps: corner jitter, fraction of the size (projective)."),
    crop_rho: float = typer.Option(0.25, help="Crop pairs: corner jitter, fraction of the crop size."),
    eval_every: int = typer.Option(1000, min=1, help="Validate every N steps."),
    eval_every_seconds: Optional[float] = typer.Option(None, min=1.0, help="Also validate every N seconds of wall time (learning curves)."),
    checkpoint_every: int = typer.Option(500, min=1, help="Checkpoint every N steps."),
    stop_after: Optional[int] = typer.Option(None, min=1, help="Stop (with a checkpoint) at this step; continue later with --resume."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model at -o (default: refused; --resume continues it)."),
    val_dir: Optional[Path] = typer.Option(None, "--val-dir", help="Validation photos from this folder (every photo of DATA_DIR then trains)."),
    group_by: str = typer.Option("auto", "--group-by", help="What the validation split keeps together: name, folder (all views of one product), auto (folder when file names repeat across folders, else name) or a regex over the relative path whose first group is the key."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes (one per GPU, or CPU processes; "
                              "the batch is split across them). Same as torchrun --nproc_per_node N -m stn_align train."),
):
    """Train an aligner on your own photos, self-supervised by random synthetic warps.

    Examples:

      stn-align train my_photos/ -o my_model.safetensors --init default --steps 2000 --lr 5e-4 --warmup 100

      stn-align train my_photos/ -o my_model.safetensors --resume my_model.safetensors   # continue a run
    """
    from .checkpoint import CheckpointError
    from .data import WarpRanges
    from .io import ImageError
    from .train import TrainConfig
    from .train import launch
    from .train import train as run_training

    if transform not in ("affine", "projective"):
        fail(f"--transform must be affine or projective, not {transform!r}")
    if architecture not in ("iterative", "global"):
        fail(f"--architecture must be iterative or global, not {architecture!r}", 2)
    values = dict(transform=transform, size=size, architecture=architecture, steps=steps, warmup=warmup,
                  batch_size=batch_size, lr=lr, val_fraction=val_fraction, init=str(init) if init else None, seed=seed,
                  init_lr_scale=init_lr_scale, iterations=iterations, p_crop=p_crop, eval_every=eval_every,
                  eval_every_seconds=eval_every_seconds, checkpoint_every=checkpoint_every,
                  val_dir=str(val_dir) if val_dir else None, group_by=group_by)
    range_values = dict(max_rotation=max_rotation, max_scale=max_scale, max_shear=max_shear,
                        max_translation=max_translation, max_perspective=max_perspective, crop_rho=crop_rho)
    if resume is not None:  # the run's own settings, unless given here (then a warning says so)
        _train_restore_settings(ctx, resume, values, range_values)
    ranges = WarpRanges(**range_values)
    config = TrainConfig(data_dir=str(data_dir), out=str(out), device=device, workers=workers, threads=threads,
                         resume=str(resume) if resume else None, ranges=ranges, stop_after=stop_after,
                         overwrite=overwrite, **values)
    from .train import check_destination

    try:
        config.check()
        check_destination(config)
    except ValueError as err:
        fail(str(err), 2)
    try:
        result = run_training(config) if nproc == 1 else launch(config, nproc)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except (ImageError, CheckpointError, ValueError, RuntimeError) as err:
        fail(str(err))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    figures, at = result.get("validation"), result.get("validation_step")
    typer.echo(f"wrote {out}" + (f" (validation at step {at}: mean {figures['mean_px']:.2f}px, "
                                 f"<3px {figures['under_3px']:.1%})" if figures else ""))
    from .train import _best_so_far, best_path

    best = best_path(out)
    if best.is_file():
        typer.echo(f"best validated weights: {best} (mean {_best_so_far(best):.2f}px)")


# --------------------------------------------------------------------------------------------- models


def _model_parameters(path: Path) -> Optional[int]:
    """Learnable parameter count from the safetensors header (no weights loaded)."""
    try:
        from safetensors import safe_open

        total = 0
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith("optim.") or key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    continue
                count = 1
                for dim in f.get_slice(key).get_shape():
                    count *= dim
                total += count
        return total
    except Exception:  # noqa: BLE001 - a listing must not fail on one odd file
        return None


def _model_card_line(path: Path) -> str:
    """First prose line of the model card ``NAME.md`` beside the model ('' if none)."""
    card = path.with_name(path.name.removesuffix(".safetensors") + ".md")
    try:
        lines = card.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    in_front_matter = bool(lines) and lines[0].strip() == "---"
    for i, line in enumerate(lines):
        text = line.strip()
        if in_front_matter:
            if i > 0 and text == "---":
                in_front_matter = False
            continue
        if text and not text.startswith(("#", "<!--", "|", "![", "```", "---", "===")):
            return text
    return ""


def _model_accuracy(validation: dict, size) -> str:
    if not validation:
        return "no validation figures"
    parts = []
    if "mean_px" in validation:
        parts.append(f"mean corner error {validation['mean_px']:.2f} px")
    if "under_3px" in validation:
        parts.append(f"{validation['under_3px']:.0%} < 3 px")
    if not parts:
        return "no validation figures"
    pairs = f", {validation['pairs']} pairs" if "pairs" in validation else ""
    return ", ".join(parts) + f" (at {size} px{pairs})"


def _model_card(model: str, console) -> None:
    """Print one checkpoint's card: what it is, how it was trained, its figures, and its Markdown card if any."""
    from rich.markup import escape

    from .align import resolve_model
    from .checkpoint import CheckpointError, load_model

    try:
        path = resolve_model(model)
        _, meta = load_model(path)  # also verifies the tensors' checksum
    except (CheckpointError, OSError, ValueError) as err:
        fail(str(err))
    config, training = meta.get("model", {}), meta.get("training", {})
    args = training.get("args", {})
    data = training.get("data", {})
    params = _model_parameters(path)
    rows = [("file", str(path)), ("transform", config.get("transform")), ("architecture", config.get("architecture")),
            ("working size", f"{config.get('size')} px"), ("parameters", f"{params:,}" if params is not None else "?"),
            ("validation", _model_accuracy(meta.get("validation") or {}, config.get("size"))),
            ("trained", f"{args.get('steps', '?')} steps, batch {args.get('batch_size', '?')}, "
                        f"{training.get('seconds', '?')} s on {training.get('device', '?')}" if args else "no record"),
            ("photos", f"{data.get('train_photos', '?')} train, {data.get('val_photos', '?')} validation "
                       f"from {data.get('data_dir', '?')}" if data else "no record"),
            ("tensors sha256", f"{meta.get('tensors_sha256')} (verified)")]
    for key, value in rows:
        console.print(f"[bold]{key:>15}[/bold]  {escape(str(value))}")
    card = path.with_name(path.name.removesuffix(".safetensors") + ".md")
    if card.is_file():
        console.print(f"\n[dim]{escape(str(card))}:[/dim]")
        console.print(escape(card.read_text(encoding="utf-8", errors="replace").rstrip()))


@app.command("models")
def models_command(
    model: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="A shipped model's name or a .safetensors file: print its card."),
):
    """List the shipped models (transform, working size, parameters, validation accuracy), or print one model's card.

    Examples: stn-align models;  stn-align models default;  stn-align models my_model.safetensors
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .align import model_summary, models_dir, shipped_models
    from .checkpoint import CheckpointError

    console = Console(soft_wrap=True, highlight=False)
    if model is not None:
        _model_card(model, console)
        return
    models = shipped_models()
    if not models:
        console.print(f"no models installed (looked in {escape(str(models_dir()))}); "
                      "use --model PATH.safetensors with your own, or train one with 'stn-align train'")
        return
    table = Table(title=f"models in {escape(str(models_dir()))}")
    for column in ("name", "transform", "size", "parameters", "accuracy (validation)", "description"):
        table.add_column(column, overflow="fold")
    for name, path in models.items():
        try:
            info = model_summary(path)
        except (CheckpointError, KeyError, TypeError, ValueError, OSError) as err:
            table.add_row(escape(name), "?", "?", "?", f"[red]unreadable: {escape(str(err))}[/red]", "")
            continue
        params = _model_parameters(path)
        table.add_row(escape(name), info["transform"], f"{info['size']} px",
                      f"{params:,}" if params is not None else "?", _model_accuracy(info["validation"], info["size"]),
                      escape(_model_card_line(path)))
    console.print(table)


# ================================================================================================
# END align / batch / models commands
# ================================================================================================


# ================================================================================================
# eval command (owner: evaluation; see stn_align/evaluate.py)
# ================================================================================================


@app.command("eval")
def eval_command(
    pairs_dir: Path = typer.Argument(..., metavar="PAIRS_DIR", help="A pair set (inputs/NAME, refs/NAME, gt.jsonl) or, with --synthetic, a folder of photos."),
    model: str = typer.Option("default", "--model", "-m", help="Shipped model name (see 'stn-align models') or a .safetensors path."),
    refine: str = typer.Option("ecc", "--refine", help="Refinement(s) to evaluate, comma-separated: ecc, none (e.g. none,ecc shows both)."),
    fallback: str = typer.Option("features", "--fallback", help="The safety net, as in 'stn-align batch': features, rotations or none. "
                                 "Other than none, the model also runs without it (MODEL+REFINE rows) beside with it (MODEL+REFINE+fallback rows)."),
    min_score: float = typer.Option(0.75, "--min-score", min=0.0, max=1.0, help="As in 'stn-align batch': the safety net fires below this score (0-1)."),
    baselines: str = typer.Option("identity", "--baselines", help="Comma-separated OpenCV baselines run side by side: identity, orb, sift, ecc ('' for none)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary and every pair's result as JSON to FILE."),
    synthetic: bool = typer.Option(False, "--synthetic", help="PAIRS_DIR is a folder of photos: make random pairs with known ground truth from them."),
    n: int = typer.Option(100, "--n", min=1, help="--synthetic: number of pairs."),
    transform: Optional[str] = typer.Option(None, "--transform", help="--synthetic: affine or projective pairs; also the baselines' motion model. Default: the model's."),
    size: str = typer.Option("256", "--size", help="--synthetic: pair size, WxH, or N (crops: N x N; whole-image warps: longer side N, the photo's aspect)."),
    rho: Optional[float] = typer.Option(None, "--rho", help="--synthetic: corner jitter, fraction of the size (default 0.25 for crops, 0.12 perspective for whole-image warps)."),
    mode: str = typer.Option("auto", "--mode", help="--synthetic: crop (a crop and its corner-jittered copy), whole (the whole photo moved in frame) or auto (whole for photos on a plain background)."),
    photometric: bool = typer.Option(True, "--photometric/--no-photometric", help="--synthetic: random lighting/blur/noise/JPEG changes on both sides."),
    seed: int = typer.Option(0, "--seed", help="--synthetic: random seed (same seed, same pairs)."),
    save_pairs: Optional[Path] = typer.Option(None, "--save-pairs", help="--synthetic: also write the pairs as a pair set to DIR."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write preview sheets of the worst and of random pairs (model's results) to DIR."),
    preview_n: int = typer.Option(8, "--preview-n", min=0, help="Pairs per preview group (worst, random)."),
    mask: str = typer.Option("none", "--mask", help="none, auto (refinement and score look at each reference's foreground only) or FILE (one mask for every reference)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="Network refinement rounds (default: the model's own)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch and OpenCV (default: their own choice); timings depend on it."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write errors_cdf.png (every method) and score_vs_error.png (with --min-score drawn) to DIR, and print a --min-score suggestion; needs the plots extra (matplotlib)."),
):
    """Measure accuracy and speed on pairs with known ground truth, side by side with OpenCV baselines.

    Examples:

      stn-align eval my_photos/ --synthetic --n 200 --baselines orb,sift,ecc

      stn-align eval ../shared/data/real/hpatches6 --baselines sift --refine none,ecc

    Prints mean/median corner error, fraction under 1 and 3 px, failures and seconds per pair. The defaults
    (--refine ecc --fallback features --min-score 0.75) measure what 'stn-align batch' runs by default; with a
    safety net it also prints how often it fired and which path won.
    """
    from rich.console import Console
    from rich.markup import escape

    refines = [r.strip() for r in refine.split(",") if r.strip()]
    names = [b.strip() for b in baselines.split(",") if b.strip()]
    if not refines or any(r not in ("none", "ecc") for r in refines):
        fail(f"--refine must be ecc, none or a comma-separated list of them, not {refine!r}", 2)
    if transform is not None and transform not in ("affine", "projective"):
        fail(f"--transform must be affine or projective, not {transform!r}", 2)
    if fallback not in _FALLBACKS:
        fail(f"--fallback must be features, rotations or none, not {fallback!r}", 2)
    if mask not in ("none", "auto") and not Path(mask).is_file():
        fail(f"--mask must be none, auto or a mask image file, not {mask!r}", 2)
    if mode not in ("auto", "crop", "whole"):
        fail(f"--mode must be auto, crop or whole, not {mode!r}", 2)

    import json

    import cv2
    import torch

    from .align import Aligner, resolve_model
    from .baselines import BASELINES
    from .checkpoint import CheckpointError
    from .evaluate import (BaselineMethod, PairSetError, PhotoFolder, Synthetic, load_pair_set, method_label, model_methods,
                           parse_size, rich_table, run, save_pair_set, summarize_all, synthetic_pairs, to_json, write_previews)
    from .io import ImageError

    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        fail(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}", 2)
    console, diag = Console(soft_wrap=True, highlight=False), Console(stderr=True, soft_wrap=True, highlight=False)
    if threads is not None:  # at least 1 (Typer checks)
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    try:
        aligner = Aligner.load(resolve_model(model), device, iterations=iterations, min_score=min_score, fallback=fallback)
        motion = transform or aligner.transform
        if synthetic:
            spec = Synthetic(mode, parse_size(size), motion, rho, photometric, keep_aspect="x" not in size.lower())
            folder = PhotoFolder(pairs_dir, on_skip=lambda message: diag.print(f"skipped {escape(message)}"))
            pairs = synthetic_pairs(folder, n, spec, seed=seed)
            if save_pairs is not None:
                save_pair_set(pairs, save_pairs)
                diag.print(f"wrote {len(pairs)} pairs to {escape(str(save_pairs))}")
        else:
            pairs = load_pair_set(pairs_dir)
    except (CheckpointError, PairSetError, ImageError, ValueError, OSError) as err:
        fail(str(err))
    # Without the net (the network's and ECC's own figures) and, unless --fallback none, with it (what batch runs).
    methods = model_methods(aligner, refines, None if mask == "none" else mask,
                            fallbacks=("none",) if fallback == "none" else ("none", fallback))
    primary = method_label(aligner.name, refines[0], fallback)  # previews show what batch would write
    methods += [BaselineMethod(b, motion) for b in names]

    from rich.progress import Progress

    with Progress(console=diag, transient=True) as bar:
        task = bar.add_task(f"{len(pairs)} pairs x {len(methods)} methods", total=len(pairs))
        results = run(pairs, methods, progress=lambda done, total: bar.update(task, completed=done))
    summary = summarize_all(results)
    net = "--fallback none" if fallback == "none" else f"+fallback rows: --fallback {fallback} --min-score {min_score:g}"
    console.print(rich_table(summary, f"{len(pairs)} pairs, {escape(str(pairs_dir))}; {net}"))
    _eval_print_safety_net(console, summary, min_score)
    if json_out is not None:
        extra = {"pairs_dir": str(pairs_dir), "model": str(model), "transform": motion, "synthetic": synthetic,
                 "fallback": fallback, "min_score": min_score}
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(to_json(results, summary, extra), indent=1))
        except OSError as err:
            fail(f"{json_out}: cannot write ({err.strerror or err})")
    if plots is not None:
        import numpy as np

        from .evaluate import suggest_threshold, write_plots

        try:
            files = write_plots(results, plots, min_score)
        except (ImportError, OSError) as err:
            fail(f"{plots}: {err}" if isinstance(err, OSError) else str(err))
        diag.print(f"wrote {', '.join(escape(str(f)) for f in files)}")
        rows = [r for r in results[primary] if r.score is not None]
        best = suggest_threshold(np.array([r.score for r in rows]), np.array([r.error for r in rows])) if rows else None
        if best is None:
            console.print("threshold: no suggestion (the pairs need results both under 3 px and over 10 px)")
        else:
            console.print(f"suggested --min-score {best['min_score']:.2f} for {escape(primary)}: flags "
                          f"{best['bad_flagged']:.0%} of results over 10 px and {best['good_flagged']:.0%} of those "
                          f"under 3 px (now {min_score:g})")
    if preview is not None and preview_n > 0:
        try:
            files = write_previews(pairs, results[primary], preview, preview_n, seed, primary)
        except (ImageError, OSError) as err:
            fail(str(err))
        diag.print(f"wrote {len(files)} preview sheets to {escape(str(preview))}")


def _eval_print_safety_net(console, summary: dict, min_score: float) -> None:
    """One line per method with a safety net: :func:`evaluate.safety_net_summary` from its summary."""
    from rich.markup import escape

    for name, s in summary.items():
        net = s.get("safety_net")
        if net is None:
            continue
        n = s["pairs"]
        winners = ", ".join(f"{m} {k}" for m, k in net["methods"].items())
        cost = ["-" if net[k] is None else f"{net[k]:.3f}" for k in ("seconds_not_fired", "seconds_fired")]
        console.print(f"safety net of {escape(name)} (fires below score {min_score:g}): fired on {round(net['fired'] * n)}/{n} "
                      f"({net['fired']:.0%}), a fallback path won on {round(net['fallback_won'] * n)}/{n} "
                      f"({net['fallback_won']:.0%}); s/pair not fired {cost[0]}, fired {cost[1]}; winners: {escape(winners)}")


# ================================================================================================
# END eval command
# ================================================================================================


# ------------------------------------------------------------------------------------------ reproduce


@app.command("reproduce")
def reproduce_command(
    experiment: str = typer.Argument(..., help="mnist-rot, mnist-trans or svhn."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="MNIST dir (the four IDX .gz files, unpacked files or a torchvision root) or SVHN dir "
        "(train_32x32.mat, test_32x32.mat; needs scipy). Default: ../shared/data/<mnist|svhn>."),
    protocol: str = typer.Option("short", "--protocol", help="paper: the authors' SGD lr 0.01, batch 256, 150 000 "
                                 "iterations, lr /10 at 1/3 and 2/3; short: the first CPU budget (Adam, cosine); "
                                 "curriculum: 20 CPU epochs in which the transformers learn to rotate (SGD momentum "
                                 "0.9, lr 1e-3, localisation lr x10, rotations ramped over 3 epochs; on mnist-trans: x1, "
                                 "no ramp)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the training set (overrides "
                                         "--iterations; default 3, or the protocol's iterations)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="Optimiser steps per network."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd or adam (default: the protocol's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Base learning rate (default: the protocol's)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default: the protocol's)."),
    loc_lr_scale: Optional[float] = typer.Option(None, "--loc-lr-scale", help="Localisation lr / base lr."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Batch size (default: the protocol's)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="step (lr / 10 at --lr-drops) or cosine."),
    lr_drops: Optional[str] = typer.Option(None, "--lr-drops", help="Comma-separated fractions of the run, e.g. 0.333,0.667."),
    rotation_ramp: Optional[float] = typer.Option(None, "--rotation-ramp", min=0.0, help="mnist-rot curriculum (not in "
                                                  "the paper): grow the largest training rotation 0 -> 90 deg over this "
                                                  "many epochs (default: the protocol's; 0 = off)."),
    networks: Optional[str] = typer.Option(None, "--networks", help="Comma-separated subset, e.g. STN-SL1,STN-C0 (trained in that order)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1, help="End each network at this epoch of its "
                                             "schedule and report it as it stands; a later call with a larger value "
                                             "(or none) resumes the same run."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: write results and figures from "
                                     "the checkpoints in OUT as they stand (e.g. a long run part-way)."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per network (0..N-1)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("icpr2020-results"), "--out", help="Output folder (results, figures, checkpoints/)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on this many images (smoke runs)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1, help="Score on the first N test images."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads for torch."),
    resume: bool = typer.Option(True, "--resume/--restart", help="Continue from OUT/checkpoints (default) or start over."),
):
    """Reproduce Finnveden et al. (ICPR 2020): CNN vs STN-C0 / STN-CX / STN-SLX (SVHN must be supplied by you)."""
    from .icpr2020 import run_reproduce

    try:
        drops = None if lr_drops is None else tuple(float(f) for f in lr_drops.split(",") if f.strip())
        nets = None if networks is None else tuple(n.strip() for n in networks.split(",") if n.strip())
        run_reproduce(experiment, data, epochs=epochs, seeds=seeds, device=device, out_dir=out, limit=limit,
                      test_limit=test_limit, threads=threads, protocol=protocol, optimizer=optimizer, lr=lr,
                      momentum=momentum, loc_lr_scale=loc_lr_scale, batch_size=batch_size, schedule=schedule,
                      lr_drops=drops, iterations=iterations, rotation_ramp_epochs=rotation_ramp,
                      networks=nets, stop_after_epochs=stop_after,
                      report_only=report_only, resume=resume)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))


# -------------------------------------------------------------------------------------------- export
# (owner: ONNX export; see stn_align/export.py)


@app.command("export")
def export_command(
    model: str = typer.Argument(..., help="Shipped model name (see 'stn-align models') or a .safetensors path."),
    out: Path = typer.Option(..., "-o", "--out", help="ONNX file to write (one file, weights included)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="Refinement rounds baked into the graph (default: the aligner's)."),
    opset: int = typer.Option(18, "--opset", min=18, help="ONNX opset (18 or newer)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the file with onnxruntime (when installed) and compare with PyTorch."),
):
    """Export the network's estimate as an ONNX graph: two (B, 3, S, S) images in, the working-frame matrix out."""
    from .align import resolve_model
    from .checkpoint import CheckpointError, load_model
    from .export import ExportError, compare_with_torch, export_onnx

    try:
        path = resolve_model(model)
        net, _ = load_model(path)
        typer.echo(f"exporting {path.name} (working size {net.config.size}) ...", err=True)
        written = export_onnx(net, out, iterations, opset, metadata={"source": path.name})
    except (CheckpointError, ExportError) as err:
        fail(str(err))
    typer.echo(f"wrote {written}: inputs image_in, image_ref (B, 3, {net.config.size}, {net.config.size}) in [0, 1]; "
               "outputs matrix (B, 3, 3), corner_offsets (B, 4, 2), working pixels")
    if check:
        try:
            difference = compare_with_torch(net, written, iterations)
        except ImportError:
            typer.echo("onnxruntime is not installed: not checked", err=True)
        else:
            typer.echo(f"onnxruntime vs PyTorch: largest corner difference {difference:.2e} px")
            if not difference < 1e-3:
                fail(f"{written}: onnxruntime differs from PyTorch by {difference:.3g} px")


if __name__ == "__main__":  # python -m stn_align.cli; keep this at the very end of the file
    app()
