"""Same-job speed race: stn-align against SIFT + MAGSAC on the same pairs, in one run.

    python benchmarks/throughput.py [--n 100] [--workers 2] [--batch-size 16] [--device cpu] [--repeat 1]
                                    [--json benchmarks/throughput.json] [--profile]

The job, for every pair: read the input and the reference, estimate the transform, warp the full input
onto the reference's canvas, write it (JPEG, quality 95). The pairs are synthetic 448-px product shots
from **held-out** photos (``is_held_out(path, 0.1)``), made with :func:`stn_align.evaluate.synthetic_pairs`
(seed 7; projective, corner jitter 12 %, white fill, photometric jitter: the benchmark's setting c) and
laid out as ``inputs/``, ``refs/``, ``gt.jsonl`` (:func:`stn_align.evaluate.save_pair_set`).

Contenders, each with the same number of worker threads (``--workers``):

* ``cli none`` / ``cli ecc``: ``stn-align batch inputs --ref-dir refs -o OUT --refine none|ecc`` as a whole
  process (interpreter start, imports, model load and the work);
* ``api none`` / ``api ecc``: :func:`stn_align.batch.align_directory` in this process, the model already
  loaded and warmed up;
* ``sift script``: a SIFT + MAGSAC++ job (``cv2.SIFT_create``, ratio test 0.75, ``cv2.findHomography`` with
  ``cv2.USAC_MAGSAC``, 2 px; OpenCV read, warp and write) as a whole process: the classical tool's script;
* ``sift api``: the same job in this process (no interpreter start, OpenCV already imported).

Every contender is timed ``--repeat`` times (interleaved) and the best time is kept. The table gives
pairs/s, the ratio to SIFT at the same level (whole process against the script, in-process against
in-process) and the accuracy of the written matrices against ``gt.jsonl`` (mean corner error, fraction under
1 px, failures; a failure counts with the identity's error, as in :mod:`stn_align.evaluate`).
``--profile`` adds where the time of ``api ecc`` goes (thread-seconds per stage) and the start-up.

This module imports neither torch nor stn_align at its top, so the SIFT script it runs as a subprocess
(``--sift-job``) pays only for OpenCV.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
WHITE = (255, 255, 255)
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


# --- the classical job (OpenCV only) ----------------------------------------------------------------------


def sift_homography(gray_in: np.ndarray, gray_ref: np.ndarray, ratio: float = 0.75) -> np.ndarray | None:
    """SIFT + Lowe's ratio test + MAGSAC++ (2 px) on ``(H, W)`` uint8 images: ``(3, 3)`` input -> reference, or None."""
    detector = cv2.SIFT_create()
    k1, d1 = detector.detectAndCompute(gray_in, None)
    k2, d2 = detector.detectAndCompute(gray_ref, None)
    if d1 is None or d2 is None or len(k1) < 4 or len(k2) < 2:
        return None
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, k=2)
    good = [p[0] for p in knn if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < 4:
        return None
    src = np.float32([k1[m.queryIdx].pt for m in good])
    dst = np.float32([k2[m.trainIdx].pt for m in good])
    matrix, _ = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, 2.0, maxIters=5000, confidence=0.999)
    return None if matrix is None or not np.all(np.isfinite(matrix)) else matrix


def sift_pair(input_path: Path, ref_path: Path, out_path: Path) -> np.ndarray | None:
    """Read, estimate, warp the full input (white border), write atomically; returns the matrix (None: failed)."""
    image = cv2.imread(str(input_path), cv2.IMREAD_COLOR)
    reference = cv2.imread(str(ref_path), cv2.IMREAD_COLOR)
    if image is None or reference is None:
        return None
    matrix = sift_homography(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.cvtColor(reference, cv2.COLOR_BGR2GRAY))
    size = (reference.shape[1], reference.shape[0])
    warped = cv2.warpPerspective(image, np.eye(3) if matrix is None else matrix, size, borderValue=WHITE)
    ok, data = cv2.imencode(out_path.suffix, warped, [cv2.IMWRITE_JPEG_QUALITY, 95])
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, out_path)
    return matrix


def sift_job(inputs: Path, refs: Path, out: Path, workers: int) -> dict[str, list | None]:
    """The SIFT + MAGSAC batch over ``inputs/NAME`` and ``refs/NAME`` into ``out/NAME`` on ``workers`` threads."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in inputs.iterdir() if p.suffix.lower() in SUFFIXES)
    with ThreadPoolExecutor(workers) as pool:
        matrices = pool.map(lambda n: sift_pair(inputs / n, refs / n, out / n), names)
        return {n: None if m is None else m.tolist() for n, m in zip(names, matrices)}


# --- pairs -------------------------------------------------------------------------------------------------


def make_pair_set(root: Path, n: int, seed: int, data: Path) -> Path:
    """``n`` synthetic 448-px product pairs from held-out photos (the benchmark's setting c) as a pair set in ``root``."""
    from dataclasses import replace

    from stn_align.data import WarpRanges, is_held_out, load_photo
    from stn_align.evaluate import Synthetic, save_pair_set, synthetic_pairs
    from stn_align.io import list_images

    stamp = root / "pairs.json"
    spec = {"n": n, "seed": seed, "data": str(data.resolve()), "setting": "c", "format": "jpg"}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return root
    if root.exists() and any(root.iterdir()):
        if not stamp.is_file():  # not a pair set this script made: never delete it
            raise SystemExit(f"error: {root}: not empty and not a pair set of this script (no pairs.json); choose another --pairs-dir")
        shutil.rmtree(root)
    photos = [load_photo(p) for p in list_images(data / "products") if is_held_out(p, 0.1)]
    setting = Synthetic("whole", (448, 448), "projective", 0.12, fill=WHITE, ranges=WarpRanges())
    pairs = [replace(p, name=p.name.replace(".png", ".jpg")) for p in synthetic_pairs(photos, n, setting, seed=seed)]
    save_pair_set(pairs, root)
    stamp.write_text(json.dumps(spec))
    return root


def accuracy(matrices: dict[str, list | None], gt: dict[str, np.ndarray], size: tuple[int, int]) -> dict:
    """Mean corner error (px), fraction under 1 px and failures of ``{name: matrix | None}`` against ``gt``."""
    from stn_align.geometry import corner_error

    cap = float(np.hypot(*size))
    errors, failures = [], 0
    for name, truth in gt.items():
        m = matrices.get(name)
        if m is None or not np.all(np.isfinite(m)):
            failures += 1
            m = np.eye(3)
        errors.append(min(cap, corner_error(np.asarray(m, np.float64), truth, size)))
    errors = np.array(errors)
    return {"mean_px": float(errors.mean()), "under_1px": float((errors < 1).mean()), "failures": failures}


def manifest_matrices(out: Path) -> dict[str, list | None]:
    from stn_align.batch import MANIFEST_NAME, read_manifest

    return {k: r.get("matrix") if r.get("status") == "ok" else None for k, r in read_manifest(out / MANIFEST_NAME).items()}


# --- contenders --------------------------------------------------------------------------------------------


def cli_command() -> list[str]:
    """``stn-align`` of this interpreter's environment (the console script when installed)."""
    script = Path(sys.executable).with_name("stn-align")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from stn_align.cli import app; sys.argv[0] = 'stn-align'; app()"]


def timed_process(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: some pairs failed or suspect; still a finished job
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds


class Race:
    """Runs and times the contenders on one pair set; keeps the best time and the matrices of each."""

    def __init__(self, root: Path, args):
        self.root, self.args = root, args
        self.inputs, self.refs = root / "inputs", root / "refs"
        self.scratch = Path(tempfile.mkdtemp(prefix="stn-throughput-"))
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.matrices: dict[str, dict] = {}
        self.aligners: dict[str, object] = {}

    def out(self, name: str) -> Path:
        path = self.scratch / name.replace(" ", "-")
        if path.exists():
            shutil.rmtree(path)
        return path

    def cli(self, refine: str) -> None:
        name, out = f"cli {refine}", self.out(f"cli-{refine}")
        a = self.args
        self.seconds[name].append(timed_process([
            *cli_command(), "batch", str(self.inputs), "--ref-dir", str(self.refs), "-o", str(out), "--model", a.model,
            "--refine", refine, "--device", a.device, "--batch-size", str(a.batch_size), "--workers", str(a.workers),
            *(["--fallback", a.fallback] if a.fallback else [])]))
        self.matrices[name] = manifest_matrices(out)

    def api(self, refine: str) -> None:
        from stn_align.batch import align_directory

        name, out = f"api {refine}", self.out(f"api-{refine}")
        aligner = self.aligner(refine)
        start = time.perf_counter()
        align_directory(aligner, self.inputs, out, ref_dir=self.refs, batch_size=self.args.batch_size,
                        workers=self.args.workers)
        self.seconds[name].append(time.perf_counter() - start)
        self.matrices[name] = manifest_matrices(out)

    def aligner(self, refine: str):
        """The loaded aligner of ``refine``, warmed up on a few pairs (lazy initialisation is not timed)."""
        if refine not in self.aligners:
            from stn_align.align import Aligner
            from stn_align.batch import align_directory

            options = {"fallback": self.args.fallback} if self.args.fallback else {}
            aligner = Aligner.load(self.args.model, self.args.device, refine=refine, **options)
            warm = self.scratch / "warm-in"
            if not warm.exists():
                for path in sorted(self.inputs.iterdir())[: self.args.batch_size]:
                    (warm / "inputs").mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, warm / "inputs" / path.name)
            align_directory(aligner, warm / "inputs", self.out("warm-out"), ref_dir=self.refs,
                            batch_size=self.args.batch_size, workers=self.args.workers)
            self.aligners[refine] = aligner
        return self.aligners[refine]

    def sift_script(self) -> None:
        out = self.out("sift-script")
        self.seconds["sift script"].append(timed_process([
            sys.executable, str(Path(__file__).resolve()), "--sift-job", str(self.inputs), str(self.refs), str(out),
            "--workers", str(self.args.workers)]))
        self.matrices["sift script"] = json.loads((out / "matrices.json").read_text())

    def sift_api(self) -> None:
        out = self.out("sift-api")
        start = time.perf_counter()
        matrices = sift_job(self.inputs, self.refs, out, self.args.workers)
        self.seconds["sift api"].append(time.perf_counter() - start)
        self.matrices["sift api"] = matrices

    def startup(self) -> float:
        """Seconds of ``stn-align batch`` on an empty folder (interpreter, imports, model load, no pairs)."""
        empty = self.scratch / "empty"
        empty.mkdir(exist_ok=True)
        return timed_process([*cli_command(), "batch", str(empty), "--ref-dir", str(self.refs), "-o",
                              str(self.out("empty-out")), "--model", self.args.model, "--device", self.args.device])


# --- profile -----------------------------------------------------------------------------------------------


class StageClock:
    """Thread-seconds per stage, by wrapping module functions (restored on exit)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()
        self.saved: list[tuple[object, str, object]] = []

    def wrap(self, module, attr: str, stage: str) -> None:
        original = getattr(module, attr, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[stage] += time.perf_counter() - start

        self.saved.append((module, attr, original))
        setattr(module, attr, timed)

    def __enter__(self):
        import stn_align.align as align
        import stn_align.batch as batch

        self.wrap(batch, "read_image", "decode")
        self.wrap(align, "network_view", "resize for the network")
        self.wrap(align, "to_gray", "gray conversion")
        self.wrap(align, "refine_ecc", "ECC")
        self.wrap(align, "alignment_score", "score")
        self.wrap(align, "warp_image", "full-resolution warp")
        self.wrap(batch, "write_image", "encode + write")
        return self

    def __exit__(self, *exc):
        for module, attr, original in reversed(self.saved):
            setattr(module, attr, original)


class TimedModel:
    """Wraps an aligner's network to time its forward passes (attributes pass through)."""

    def __init__(self, model, clock: StageClock):
        self._model, self._clock = model, clock

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._model(*args, **kwargs)
        finally:
            with self._clock.lock:
                self._clock.seconds["network"] += time.perf_counter() - start


def profile(race: Race) -> dict:
    """Where the time of ``api ecc`` goes: thread-seconds per stage over the whole run, and its wall time."""
    from stn_align.batch import align_directory

    aligner = race.aligner("ecc")
    with StageClock() as clock:
        model, aligner.model = aligner.model, TimedModel(aligner.model, clock)
        try:
            start = time.perf_counter()
            align_directory(aligner, race.inputs, race.out("profile"), ref_dir=race.refs,
                            batch_size=race.args.batch_size, workers=race.args.workers)
            wall = time.perf_counter() - start
        finally:
            aligner.model = model
    return {"wall_s": wall, "stages_s": dict(sorted(clock.seconds.items(), key=lambda kv: -kv[1]))}


# --- report ------------------------------------------------------------------------------------------------


PAIRED = {"cli none": "sift script", "cli ecc": "sift script", "api none": "sift api", "api ecc": "sift api"}
WHAT = {
    "cli none": "`stn-align batch --refine none`, whole process",
    "cli ecc": "`stn-align batch --refine ecc`, whole process",
    "sift script": "SIFT + MAGSAC script, whole process",
    "api none": "`align_directory`, model loaded, network only",
    "api ecc": "`align_directory`, model loaded, network + ECC",
    "sift api": "SIFT + MAGSAC job, in process",
}


def table(results: dict, n: int) -> str:
    lines = ["| contender | seconds | pairs/s | vs SIFT (same level) | mean px | under 1 px | failures |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in WHAT:
        if name not in results:
            continue
        r = results[name]
        ratio = f"{r['vs_sift']:.2f}x" if "vs_sift" in r else "1"
        acc = r["accuracy"]
        lines.append(f"| {WHAT[name]} | {r['seconds']:.2f} | {r['pairs_per_s']:.1f} | {ratio} | {acc['mean_px']:.2f} | "
                     f"{acc['under_1px']:.0%} | {acc['failures']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="pairs (default 100)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker threads of every contender")
    parser.add_argument("--batch-size", type=int, default=16, help="stn-align's pairs per network call")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fallback", default=None, help="stn-align's --fallback (default: its own default)")
    parser.add_argument("--repeat", type=int, default=1, help="time every contender this many times, keep the best")
    parser.add_argument("--pairs-dir", type=Path, default=None, help="where the pair set is made (and kept); default: a temporary folder")
    parser.add_argument("--data", type=Path, default=DATA, help="photos/ with products/ (held-out photos are used)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/throughput.json"))
    parser.add_argument("--only", default="", help="comma-separated contenders to run (default: all), e.g. 'api ecc,sift api'")
    parser.add_argument("--profile", action="store_true", help="also report where the time of 'api ecc' goes")
    parser.add_argument("--sift-job", nargs=3, type=Path, metavar=("INPUTS", "REFS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.sift_job:  # the SIFT script, run as its own process by the race
        inputs, refs, out = args.sift_job
        matrices = sift_job(inputs, refs, out, args.workers)
        (out / "matrices.json").write_text(json.dumps(matrices))
        return 0

    root = make_pair_set(args.pairs_dir or Path(tempfile.gettempdir()) / f"stn-throughput-pairs-{args.n}-{args.seed}",
                         args.n, args.seed, args.data)
    gt = {json.loads(line)["name"]: np.asarray(json.loads(line)["matrix"], np.float64)
          for line in (root / "gt.jsonl").read_text().splitlines()}
    first = cv2.imread(str(root / "inputs" / next(iter(gt))))
    size = (first.shape[1], first.shape[0])
    race = Race(root, args)
    runs = {"cli none": lambda: race.cli("none"), "cli ecc": lambda: race.cli("ecc"), "sift script": race.sift_script,
            "api none": lambda: race.api("none"), "api ecc": lambda: race.api("ecc"), "sift api": race.sift_api}
    chosen = [c.strip() for c in args.only.split(",") if c.strip()] or list(runs)
    unknown = [c for c in chosen if c not in runs]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {list(runs)}")
    try:
        for _ in range(args.repeat):
            for name in chosen:
                runs[name]()
                print(f"{name}: {race.seconds[name][-1]:.2f} s", file=sys.stderr)
        results = {}
        for name in chosen:
            best = min(race.seconds[name])
            results[name] = {"seconds": best, "all_seconds": race.seconds[name], "pairs_per_s": args.n / best,
                             "accuracy": accuracy(race.matrices[name], gt, size)}
        for name, baseline in PAIRED.items():
            if name in results and baseline in results:
                results[name]["vs_sift"] = results[name]["pairs_per_s"] / results[baseline]["pairs_per_s"]
        extra = {}
        if args.profile:
            extra["startup_s"] = race.startup()
            extra["profile_api_ecc"] = profile(race)
    finally:
        shutil.rmtree(race.scratch, ignore_errors=True)

    import torch

    info = {"pairs": args.n, "seed": args.seed, "size": size, "workers": args.workers, "batch_size": args.batch_size,
            "model": args.model, "fallback": args.fallback, "device": args.device, "repeat": args.repeat, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "opencv": cv2.__version__, "command": " ".join(["python", *sys.argv])}
    print(f"\n{args.n} pairs of {size[0]}x{size[1]} px, {args.workers} workers, batch {args.batch_size}, "
          f"device {args.device}, best of {args.repeat}\n")
    print(table(results, args.n))
    if args.profile:
        p = extra["profile_api_ecc"]
        total = sum(p["stages_s"].values())
        print(f"\nstart-up of `stn-align batch` (empty folder): {extra['startup_s']:.2f} s")
        print(f"api ecc: {p['wall_s']:.2f} s wall; thread-seconds per stage (sum {total:.2f} s over {args.workers} workers):\n")
        print("| stage | thread-s | ms per pair | share |\n|---|---:|---:|---:|")
        for stage, s in p["stages_s"].items():
            print(f"| {stage} | {s:.2f} | {1000 * s / args.n:.1f} | {s / total:.0%} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "results": results, **extra}, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
