"""Evaluation on pairs with known ground truth: pair sets, synthetic pairs, metrics, method runners.

A **pair set** is a folder::

    inputs/NAME    the input images
    refs/NAME      the reference images (same file names)
    gt.jsonl       one JSON object per line: {"name": NAME, "matrix": [[...], [...], [...]]}
                   (3x3, input pixels -> reference pixels, the package convention)

Metrics (per method): the **corner error** of a pair is the mean distance (reference pixels) between the
input's four corners mapped by the predicted and by the true matrix (:func:`geometry.corner_error`).
A method that returns no matrix (or a non-finite / singular one) **fails** on that pair; a failure
counts as a miss in the ``< 1 px`` / ``< 3 px`` fractions and, for the mean and the median, with the
error of the identity (what the user gets without alignment). Every error is capped at the input
image's diagonal so a single degenerate matrix cannot dominate the mean. Both rules apply equally to
every method. Times are wall-clock seconds of the method's own work per pair (the model's time includes
resizing, the network, refinement and the score, not the final warp; baselines do not warp either).

Used by ``stn-align eval`` and ``benchmarks/benchmark.py``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .geometry import corner_error

# --- pairs -----------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One evaluation pair: images ``(H, W, C)`` and the true ``(3, 3)`` input -> reference matrix."""

    name: str
    input: np.ndarray
    reference: np.ndarray
    matrix: np.ndarray
    group: str = ""  # e.g. the benchmark setting

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.input.shape[1], self.input.shape[0])

    @property
    def ref_size(self) -> tuple[int, int]:
        return (self.reference.shape[1], self.reference.shape[0])


class PairSetError(Exception):
    """A pair set folder that cannot be read; ``str(err)`` is one line."""


def load_pair_set(directory: str | Path) -> list[Pair]:
    """Read ``inputs/``, ``refs/`` and ``gt.jsonl`` from ``directory`` (images via :func:`io.read_image`).

    Also reads the one-reference layout of ``examples/`` (``ground_truth.json`` + ``inputs/``)."""
    from .io import ImageError, read_image

    root = Path(directory)
    gt_path = root / "gt.jsonl"
    if not root.is_dir():
        raise PairSetError(f"{root}: no such directory")
    if not gt_path.is_file() and (root / "ground_truth.json").is_file():
        return _load_one_reference_set(root)
    if not gt_path.is_file():
        raise PairSetError(f"{root}: not a pair set (expected inputs/, refs/ and gt.jsonl; use --synthetic to make pairs from photos)")
    pairs = []
    for number, line in enumerate(gt_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name = str(record["name"])
            matrix = np.asarray(record["matrix"], np.float64)
            if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
                raise ValueError("matrix must be 3x3 and finite")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise PairSetError(f"{gt_path}:{number}: bad record ({err})") from None
        try:
            image_in, image_ref = read_image(root / "inputs" / name), read_image(root / "refs" / name)
        except ImageError as err:
            raise PairSetError(str(err)) from None
        pairs.append(Pair(name, image_in, image_ref, matrix / matrix[2, 2]))
    if not pairs:
        raise PairSetError(f"{gt_path}: no pairs")
    return pairs


def _load_one_reference_set(root: Path) -> list[Pair]:
    """The ``examples/`` layout: ``ground_truth.json`` = ``{"reference": FILE, "matrices": {NAME: 3x3}}``, inputs in ``inputs/``."""
    from .io import ImageError, read_image

    try:
        spec = json.loads((root / "ground_truth.json").read_text())
        reference = read_image(root / spec["reference"])
        pairs = [Pair(name, read_image(root / "inputs" / name), reference, np.asarray(m, np.float64) / m[2][2])
                 for name, m in sorted(spec["matrices"].items())]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as err:
        raise PairSetError(f"{root / 'ground_truth.json'}: bad ground truth ({err})") from None
    except ImageError as err:
        raise PairSetError(str(err)) from None
    if not pairs:
        raise PairSetError(f"{root / 'ground_truth.json'}: no pairs")
    return pairs


def save_pair_set(pairs: Sequence[Pair], directory: str | Path) -> None:
    """Write ``pairs`` as a pair set (images as given, under each pair's ``name``)."""
    from .io import write_image

    root = Path(directory)
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    lines = []
    for pair in pairs:
        write_image(root / "inputs" / pair.name, pair.input)
        write_image(root / "refs" / pair.name, pair.reference)
        lines.append(json.dumps({"name": pair.name, "matrix": [[float(v) for v in row] for row in pair.matrix]}))
    (root / "gt.jsonl").write_text("\n".join(lines) + "\n")


# --- synthetic pairs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Synthetic:
    """How to draw synthetic pairs from photos.

    * ``mode="crop"``: DeTone crops of ``size`` with corners jittered by ``rho`` (fraction of the size);
    * ``mode="whole"``: the whole photo framed at ``size`` and moved in frame by :func:`data.whole_pair`
      (rotation, scale, shear, translation; ``rho`` = perspective corner jitter for ``projective``),
      with ``fill`` (None: the photo's border colour);
    * ``mode="auto"``: ``whole`` for photos on a plain background (product shots), else ``crop``.
    """

    mode: str = "auto"
    size: tuple[int, int] = (256, 256)
    transform: str = "projective"
    rho: float | None = None  # None: 0.25 for crops, 0.12 for whole-image warps
    photometric: bool = True
    fill: tuple[int, int, int] | None = None
    ranges: object | None = None  # data.WarpRanges for whole mode (None: the defaults)
    keep_aspect: bool = False  # whole mode: longer side size[0], the photo's aspect ratio (size[1] ignored)

    def __post_init__(self):
        if self.mode not in ("auto", "crop", "whole"):
            raise ValueError(f"unknown synthetic mode {self.mode!r}; use auto, crop or whole")
        if self.transform not in ("affine", "projective"):
            raise ValueError(f"unknown transform {self.transform!r}; use affine or projective")


def parse_size(text: str) -> tuple[int, int]:
    """``"256"`` -> ``(256, 256)``; ``"512x384"`` -> ``(512, 384)``; ValueError otherwise."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 16:
        raise ValueError(f"invalid size {text!r}: use N or WxH (at least 16 pixels)")
    return (values[0], values[-1])


def plain_background(photo: np.ndarray, tolerance: int = 16) -> bool:
    """True if at least 75 % of the photo's one-pixel border is within ``tolerance`` of its median colour."""
    border = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]]).astype(np.int32)
    distance = np.abs(border - np.median(border, axis=0)).max(axis=1)
    return bool(np.mean(distance <= tolerance) >= 0.75)


class PhotoFolder:
    """The photos under a folder as a lazy sequence of ``(H, W, 3)`` uint8 arrays (loaded on first use,
    longer side at most ``max_side``); for :func:`synthetic_pairs` on a user's folder."""

    def __init__(self, directory: str | Path, max_side: int = 1024, on_skip=None):
        from .io import list_images

        self.directory, self.on_skip = directory, on_skip
        self.paths, self.max_side, self._cache, self.bad = list_images(directory), max_side, {}, set()
        if not self.paths:
            raise PairSetError(f"{directory}: no images found")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        """Photo ``index``; an unreadable one is reported once (``on_skip`` with its one-line error) and the
        next readable photo stands in for it. :class:`PairSetError` when none can be read."""
        from .data import load_photo
        from .io import ImageError

        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            if i in self.bad:
                continue
            if i not in self._cache:
                try:
                    self._cache[i] = load_photo(self.paths[i], self.max_side)
                except ImageError as err:
                    self.bad.add(i)
                    if self.on_skip:
                        self.on_skip(str(err))
                    continue
            return self._cache[i]
        raise PairSetError(f"{self.directory}: none of the {len(self.paths)} images can be read")


def synthetic_pair(photo: np.ndarray, rng: np.random.Generator, spec: Synthetic, name: str = "", group: str = "") -> Pair:
    """One pair from a ``(H, W, 3)`` uint8 photo, drawn with ``rng`` as ``spec`` says."""
    from dataclasses import replace

    from .data import WarpRanges, crop_pair, photometric, whole_pair

    mode = spec.mode
    if mode == "auto":
        mode = "whole" if plain_background(photo) else "crop"
    if mode == "crop":
        rho = 0.25 if spec.rho is None else spec.rho
        image_in, image_ref, matrix = crop_pair(photo, rng, spec.size, rho, spec.transform)
    else:
        ranges = spec.ranges or WarpRanges()
        if spec.rho is not None:
            ranges = replace(ranges, max_perspective=spec.rho)
        size = spec.size
        if spec.keep_aspect:
            h, w = photo.shape[:2]
            side = spec.size[0]
            size = (side, max(16, round(side * h / w))) if w >= h else (max(16, round(side * w / h)), side)
        image_in, image_ref, matrix = whole_pair(photo, rng, size, ranges, spec.transform, spec.fill)
    if spec.photometric:
        image_in, image_ref = photometric(image_in, rng), photometric(image_ref, rng)
    return Pair(name, image_in, image_ref, matrix, group)


def synthetic_pairs(
    photos: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]], n: int, spec: Synthetic, seed: int = 0,
    group: str = "", prefix: str = "",
) -> list[Pair]:
    """``n`` pairs, a pure function of ``(photos, spec, seed)``: pair ``i`` uses ``default_rng([seed, i])``.

    ``photos`` is a list of ``(H, W, 3)`` uint8 photos, or a list of such lists (groups drawn equally often,
    e.g. product shots and natural photos). Names are ``{prefix}{i:05d}.png``.
    """
    nested = len(photos) > 0 and isinstance(photos[0], (list, tuple, PhotoFolder))
    groups = [g for g in (photos if nested else [photos]) if len(g)]
    if not groups:
        raise ValueError("no photos to make pairs from")
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pool = groups[int(rng.integers(len(groups)))]
        photo = pool[int(rng.integers(len(pool)))]
        pairs.append(synthetic_pair(photo, rng, spec, f"{prefix}{i:05d}.png", group))
    return pairs


# --- methods ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one method did on one pair."""

    matrix: np.ndarray | None
    seconds: float
    score: float | None = None
    refined: bool = False
    method: str | None = None  # the model's winning path (AlignResult.method); None for baselines
    fired: bool | None = None  # the safety net ran (None: no safety net for this method)


class Method:
    """A named aligner under evaluation: ``method(pair) -> Outcome``."""

    name: str = "method"

    def __call__(self, pair: Pair) -> Outcome:
        raise NotImplementedError

    def warmup(self, pair: Pair) -> None:
        """Run once untimed (lazy initialisation must not count in the first pair's time)."""
        self(pair)


class BaselineMethod(Method):
    """A function of :mod:`baselines` with the motion model ``transform``."""

    def __init__(self, name: str, transform: str = "projective", label: str | None = None):
        from .baselines import get

        self.fn, self.transform, self.name = get(name), transform, label or name

    def __call__(self, pair: Pair) -> Outcome:
        start = time.perf_counter()
        try:
            matrix = self.fn(pair.input, pair.reference, self.transform)
        except Exception:  # noqa: BLE001 - a crashing baseline is a failure, not the end of the run
            matrix = None
        return Outcome(matrix, time.perf_counter() - start)


class ModelMethod(Method):
    """An :class:`align.Aligner` with a given ``refine``, ``fallback`` (the safety net; ``none`` by default,
    so the figures are the network's and ECC's own) and ``mask``. Variants of the same aligner share one
    network estimate per pair through ``cache`` (its time is added to every variant's time)."""

    def __init__(self, aligner, refine: str = "none", mask=None, label: str | None = None, cache: dict | None = None,
                 fallback: str = "none"):
        self.aligner, self.refine, self.mask, self.fallback = aligner, refine, mask, fallback
        self.name = label or method_label(aligner.name, refine, fallback)
        self.cache = {} if cache is None else cache

    def __call__(self, pair: Pair) -> Outcome:
        key = (id(self.aligner), pair.name, id(pair.input))
        if key not in self.cache:
            start = time.perf_counter()
            matrix = self.aligner.estimate([pair.input], [pair.reference])[0]
            self.cache.clear()  # only the current pair is needed
            self.cache[key] = (matrix, time.perf_counter() - start)
        matrix, network_seconds = self.cache[key]
        saved = self.aligner.refine, self.aligner.fallback
        start = time.perf_counter()
        try:
            self.aligner.refine, self.aligner.fallback = self.refine, self.fallback
            result = self.aligner.finish(pair.input, pair.reference, matrix, warp=False, **_mask_arg(self.mask))
        finally:
            self.aligner.refine, self.aligner.fallback = saved
        return Outcome(result.matrix, network_seconds + time.perf_counter() - start, result.score, result.refined,
                       result.method, None if self.fallback == "none" else result.fallback_fired)

    def warmup(self, pair: Pair) -> None:
        self(pair)
        self.cache.clear()  # the timed run must not reuse the (cold) estimate


def _mask_arg(mask) -> dict:
    return {} if mask is None else {"mask": mask}


def method_label(base: str, refine: str, fallback: str = "none") -> str:
    """``default+ecc``; with a safety net ``default+ecc+fallback`` (``features``) or ``default+ecc+fallback-rotations``."""
    if fallback == "none":
        return f"{base}+{refine}"
    return f"{base}+{refine}+fallback" + ("" if fallback == "features" else f"-{fallback}")


def model_methods(aligner, refines: Iterable[str], mask=None, label: str | None = None,
                  fallbacks: Iterable[str] = ("none",)) -> list[ModelMethod]:
    """One :class:`ModelMethod` per ``(refine, fallback)`` option, sharing the network estimate
    (names: :func:`method_label`)."""
    cache: dict = {}
    base = label or aligner.name
    return [ModelMethod(aligner, r, mask, method_label(base, r, f), cache, f) for f in fallbacks for r in refines]


# --- running and metrics ---------------------------------------------------------------------------------


@dataclass
class PairResult:
    name: str
    group: str
    error: float  # capped; failures carry the identity's error
    failed: bool
    seconds: float
    score: float | None = None
    refined: bool = False
    matrix: list | None = None
    method: str | None = None  # a model's winning path (network, network+ecc, rotated+ecc, features+ecc, ...)
    fired: bool | None = None  # the safety net ran on this pair (None: the method has none)


def usable(matrix) -> bool:
    """A matrix counts (no failure) if it is a finite, non-singular ``(3, 3)``."""
    if matrix is None:
        return False
    m = np.asarray(matrix, np.float64)
    return m.shape == (3, 3) and bool(np.all(np.isfinite(m))) and abs(np.linalg.det(m)) > 1e-12


def pair_error(matrix, pair: Pair) -> tuple[float, bool]:
    """``(error, failed)`` for one prediction, with the failure and cap rules of this module."""
    cap = math.hypot(*pair.input_size)
    identity = min(cap, corner_error(np.eye(3), pair.matrix, pair.input_size))
    if not usable(matrix):
        return identity, True
    error = corner_error(np.asarray(matrix, np.float64), pair.matrix, pair.input_size)
    return (min(cap, error) if math.isfinite(error) else cap), False


def run(
    pairs: Sequence[Pair], methods: Sequence[Method], progress: Callable[[int, int], None] | None = None,
    warmup: bool = True,
) -> dict[str, list[PairResult]]:
    """Run every method on every pair (pair-major, so variants can share work); ``{method name: results}``.

    With ``warmup`` every method first runs once, untimed, on the first pair."""
    results: dict[str, list[PairResult]] = {m.name: [] for m in methods}
    if warmup and pairs:
        for method in methods:
            method.warmup(pairs[0])
    for index, pair in enumerate(pairs):
        for method in methods:
            outcome = method(pair)
            error, failed = pair_error(outcome.matrix, pair)
            results[method.name].append(PairResult(
                pair.name, pair.group, error, failed, outcome.seconds, outcome.score, outcome.refined,
                None if failed else [[float(v) for v in row] for row in np.asarray(outcome.matrix)],
                outcome.method, outcome.fired))
        if progress:
            progress(index + 1, len(pairs))
    return results


def summarize(results: Sequence[PairResult]) -> dict:
    """Mean / median corner error, fractions under 1 and 3 px, failures, seconds per pair (and AUC of the score)."""
    if not results:
        return {"pairs": 0}
    errors = np.array([r.error for r in results])
    failed = np.array([r.failed for r in results])
    ok = ~failed
    summary = {
        "pairs": len(results),
        "mean_px": float(errors.mean()),
        "median_px": float(np.median(errors)),
        "under_1px": float(((errors < 1) & ok).mean()),
        "under_3px": float(((errors < 3) & ok).mean()),
        "failures": int(failed.sum()),
        "seconds_per_pair": float(np.mean([r.seconds for r in results])),
    }
    scores = [r.score for r in results]
    if all(s is not None for s in scores):
        summary["score_auc"] = roc_auc(np.array(scores, float), errors)
        summary["refined"] = float(np.mean([r.refined for r in results]))
    if all(r.fired is not None for r in results):
        summary["safety_net"] = safety_net_summary(results)
    return summary


def safety_net_summary(results: Sequence[PairResult]) -> dict:
    """How often the safety net fired and what it cost: fractions of pairs where it ran (``fired``) and
    where a fallback path won (``fallback_won``: the method is not ``network``/``identity``, ``+ecc`` or not), mean seconds
    per pair with and without firing (None when there are no such pairs), and the count of each winning method."""
    fired = np.array([bool(r.fired) for r in results])
    won = np.array([not str(r.method).startswith(("network", "identity")) for r in results])  # identity: no fallback
    seconds = np.array([r.seconds for r in results])
    methods: dict[str, int] = {}
    for r in results:
        methods[str(r.method)] = methods.get(str(r.method), 0) + 1
    return {"fired": float(fired.mean()), "fallback_won": float(won.mean()),
            "seconds_fired": float(seconds[fired].mean()) if fired.any() else None,
            "seconds_not_fired": float(seconds[~fired].mean()) if (~fired).any() else None,
            "methods": dict(sorted(methods.items()))}


def roc_auc(scores: np.ndarray, errors: np.ndarray, good: float = 3.0, bad: float = 10.0) -> float | None:
    """ROC AUC of ``scores`` separating pairs with ``error < good`` (positives) from ``error > bad``.

    The probability that a random good pair scores higher than a random bad one (ties count half);
    None when either class is empty (then the figure means nothing).
    """
    scores, errors = np.asarray(scores, float), np.asarray(errors, float)
    pos, neg = scores[errors < good], scores[errors > bad]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def threshold_table(scores: np.ndarray, errors: np.ndarray, thresholds: Iterable[float], good: float = 3.0, bad: float = 10.0) -> list[dict]:
    """For each ``min_score`` threshold: the fraction of bad (``> bad`` px) results flagged and of good ones flagged."""
    scores, errors = np.asarray(scores, float), np.asarray(errors, float)
    pos, neg = errors < good, errors > bad
    rows = []
    for t in thresholds:
        flagged = scores < t
        rows.append({"min_score": float(t),
                     "bad_flagged": float(flagged[neg].mean()) if neg.any() else None,
                     "good_flagged": float(flagged[pos].mean()) if pos.any() else None,
                     "flagged": float(flagged.mean())})
    return rows


def suggest_threshold(scores: np.ndarray, errors: np.ndarray, good: float = 3.0, bad: float = 10.0) -> dict | None:
    """The ``min_score`` (on a 0.01 grid) that best separates results over ``bad`` px from those under ``good``
    (largest flagged-bad minus flagged-good fraction; the lower threshold on ties), with its two fractions.
    None when either kind of result is missing."""
    rows = threshold_table(scores, errors, np.round(np.arange(0.01, 1.0, 0.01), 2), good, bad)
    rows = [r for r in rows if r["bad_flagged"] is not None and r["good_flagged"] is not None]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["bad_flagged"] - r["good_flagged"], -r["min_score"]))


def write_plots(results: dict[str, list[PairResult]], directory: str | Path, min_score: float | None = None) -> list[Path]:
    """``errors_cdf.png`` (fraction of pairs under each error, every method) and ``score_vs_error.png`` (each
    scored method's score against its error, ``min_score`` drawn) in ``directory``; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('eval --plots needs matplotlib: pip install "stn-align[plots]"') from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results.items():
        errors = np.sort([r.error for r in rows])
        ax.step(np.maximum(errors, 0.01), np.arange(1, len(errors) + 1) / len(errors), where="post", label=name)
    ax.set(xscale="log", xlabel="corner error (px)", ylabel="fraction of pairs under it", ylim=(0, 1.01),
           title="Error CDF")
    for x in (1, 3, 10):
        ax.axvline(x, color="0.85", lw=0.8, zorder=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(directory / "errors_cdf.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    scored = {name: rows for name, rows in results.items() if any(r.score is not None for r in rows)}
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in scored.items():
            pts = [(max(r.error, 0.01), r.score) for r in rows if r.score is not None]
            ax.scatter(*zip(*pts), s=10, alpha=0.6, label=name)
        if min_score is not None:
            ax.axhline(min_score, color="red", lw=1, label=f"--min-score {min_score:g}")
        ax.set(xscale="log", xlabel="corner error (px)", ylabel="score", ylim=(-0.02, 1.02), title="Score against error")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(directory / "score_vs_error.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def summarize_all(results: dict[str, list[PairResult]], by_group: bool = False) -> dict:
    """``{method: summary}``, or ``{group: {method: summary}}`` (plus ``"all"``) with ``by_group``."""
    if not by_group:
        return {name: summarize(rs) for name, rs in results.items()}
    groups = sorted({r.group for rs in results.values() for r in rs})
    out = {g: {name: summarize([r for r in rs if r.group == g]) for name, rs in results.items()} for g in groups}
    out["all"] = {name: summarize(rs) for name, rs in results.items()}
    return out


# --- presentation ----------------------------------------------------------------------------------------

COLUMNS = (("mean px", "mean_px", "{:.2f}"), ("median px", "median_px", "{:.2f}"), ("<1px", "under_1px", "{:.1%}"),
           ("<3px", "under_3px", "{:.1%}"), ("fail", "failures", "{:d}"), ("s/pair", "seconds_per_pair", "{:.3f}"))


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def rich_table(summary: dict[str, dict], title: str = ""):
    """A :class:`rich.table.Table` of ``{method: summary}``."""
    from rich.table import Table

    table = Table(title=title or None, caption="corner error in reference pixels; a failure (no matrix) counts as a miss "
                  "and with the identity's error; errors capped at the input diagonal; AUC: score, <3 px vs >10 px")
    table.add_column("method", style="bold", overflow="fold")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True, min_width=max(5, len(header)))
    table.add_column("AUC", justify="right", no_wrap=True, min_width=5)
    for name, s in summary.items():
        table.add_row(name, *[_cell(s.get(key), fmt) for _, key, fmt in COLUMNS], _cell(s.get("score_auc"), "{:.3f}"))
    return table


def markdown_table(summary: dict[str, dict]) -> str:
    """The same table as Markdown."""
    head = ["method", *[h for h, _, _ in COLUMNS], "score AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, s in summary.items():
        cells = [name, *[_cell(s.get(key), fmt) for _, key, fmt in COLUMNS], _cell(s.get("score_auc"), "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: dict[str, list[PairResult]], summary: dict, extra: dict | None = None) -> dict:
    """JSON-ready: the summary and every pair's result."""
    from dataclasses import asdict

    return {**(extra or {}), "summary": summary,
            "pairs": {name: [asdict(r) for r in rs] for name, rs in results.items()}}


# --- previews --------------------------------------------------------------------------------------------


def write_previews(
    pairs: Sequence[Pair], results: Sequence[PairResult], directory: str | Path, n: int = 8, seed: int = 0,
    method: str = "", fill="white",
) -> list[Path]:
    """Preview sheets (:func:`preview.make_sheet`) of the worst ``n`` pairs and a random ``n`` of one method's results.

    Files: ``worst_01_NAME.jpg`` ... (worst first) and ``random_01_NAME.jpg`` ...; returns their paths.
    A failed pair is shown warped by the identity, titled FAILED.
    """
    from .align import warp_image
    from .io import write_image
    from .preview import make_sheet

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in pairs}
    order = sorted(range(len(results)), key=lambda i: -results[i].error)
    rng = np.random.default_rng(seed)
    chosen = [("worst", i) for i in order[:n]]
    chosen += [("random", int(i)) for i in rng.choice(len(results), size=min(n, len(results)), replace=False)]
    written, counters = [], {"worst": 0, "random": 0}
    for kind, i in chosen:
        r = results[i]
        pair = by_name[r.name]
        matrix = np.eye(3) if r.failed else np.asarray(r.matrix)
        aligned = warp_image(pair.input, matrix, pair.ref_size, fill)
        score = "" if r.score is None else f"  score {r.score:.2f}"
        status = "FAILED (identity shown)" if r.failed else f"error {r.error:.2f} px"
        title = f"{method}  {r.name}  {status}{score}"
        counters[kind] += 1
        stem = Path(r.name).stem.replace("/", "_")
        path = root / f"{kind}_{counters[kind]:02d}_{stem}.jpg"
        write_image(path, make_sheet(pair.input, pair.reference, aligned, title=title), quality=90)
        written.append(path)
    return written
