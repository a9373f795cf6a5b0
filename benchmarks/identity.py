"""Identity benchmark: an input identical to its reference must come back as the identity.

    python benchmarks/identity.py [--model default] [--out benchmarks/identity.md] [--threads 1]

Every held-out product photo (``is_held_out(path, 0.1)``, the split training never sees) is aligned with
the CLI defaults (ECC polish, safety net, ``--min-score`` 0.75) in two ways:

* ``identical``: the input is the reference, pixel for pixel (the target: 0 pairs over 0.1 px);
* ``re-encoded``: the input is the reference saved once more as JPEG quality 95 (the same shot, another
  file): not a target, reported so that what the network and ECC do on a near-identical pair is visible.

For each: pairs, largest corner error from the identity (px), pairs over 0.1 px, over 1 px, how many of
those over 0.1 px the score flagged (``suspect``), and the methods that won. Writes Markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stn_align.align import Aligner
from stn_align.data import is_held_out
from stn_align.geometry import corner_error
from stn_align.io import read_image

PRODUCTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos" / "products"


def reencoded(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=95)
    return np.asarray(Image.open(buf).convert("RGB"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--photos", type=Path, default=PRODUCTS)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("identity.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out photos (smoke runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [p for p in sorted(args.photos.glob("*.jpg")) if is_held_out(p, 0.1)][: args.limit]
    if not paths:
        print(f"no held-out photos under {args.photos}", file=sys.stderr)
        return 2
    aligner = Aligner.load(args.model, "cpu")
    rows = []
    for variant in ("identical", "re-encoded"):
        errors, flagged, methods, t0 = [], 0, Counter(), time.perf_counter()
        for path in paths:
            ref = read_image(path)
            image = ref.copy() if variant == "identical" else reencoded(ref)
            result = aligner.align(image, ref, warp=False)
            error = corner_error(result.matrix, np.eye(3), (ref.shape[1], ref.shape[0]))
            errors.append(error)
            flagged += bool(error > 0.1 and result.suspect)
            methods[result.method] += 1
        errors = np.array(errors)
        rows.append((variant, len(paths), errors.max(), int((errors > 0.1).sum()), int((errors > 1).sum()), flagged,
                     ", ".join(f"{m} {n}" for m, n in methods.most_common()), (time.perf_counter() - t0) / len(paths)))
    lines = [f"# Identity benchmark ({args.model})", "",
             f"`python benchmarks/identity.py --model {args.model}` on {platform.processor() or platform.machine()}, "
             f"{args.threads} thread(s); {len(paths)} held-out product photos of {args.photos.name}/.", "",
             "| input | pairs | max px | > 0.1 px | > 1 px | > 0.1 px flagged suspect | method | s/pair |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for variant, n, worst, over01, over1, flag, how, seconds in rows:
        lines.append(f"| {variant} | {n} | {worst:.3f} | {over01} | {over1} | {flag} | {how} | {seconds:.3f} |")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0 if rows[0][3] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
