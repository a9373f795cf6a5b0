"""The Ray engine of ``stn-align batch``: the local engine's job (:func:`stn_align.batch.align_directory`) on a Ray cluster.

    stn-align batch shots/ --ref-dir refs/ -o aligned/ --engine ray --ray-address auto

This process (the driver) plans the pairs, takes OUT_DIR's lock, reads the manifest and decides what to
resume exactly as the local engine does (:func:`batch.prepare`, :func:`batch.open_run`). The pairs left to
do, cut into chunks of ``batch_size`` as the local engine cuts them, become a Ray Dataset (one row per
chunk) that ``map_batches`` sends through a pool of :class:`AlignActor`: each actor receives the aligner
once (one GPU per actor when the cluster has GPUs and ``device`` allows it, else CPUs) and runs
:func:`batch.align_chunk` on its rows: decode, network, refine, warp, write. Each pair's manifest record
streams back to the driver, which appends it to the manifest as it comes, so the manifest format and the
resume rules are the local engine's, and on CPU the matrices are the local engine's too (same chunks, so
the same network batches).

The aligner (any model, shipped or not) travels through Ray's object store; INPUT_DIR, the references and
OUT_DIR must be reachable at the same paths on every node (a shared file system), and stn-align must be
installed on every node. Ray is an optional dependency: ``pip install "stn-align[ray]"``.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .batch import (BatchError, BatchRun, BatchSummary, Pair, _one_line, align_chunk, open_run, plan_pairs, prepare,
                    shared_reference)
from .io import DEFAULT_MAX_PIXELS

INSTALL_HINT = "--engine ray needs Ray, which is not installed: pip install \"stn-align[ray]\" (or pip install \"ray[data]>=2.40\")"


def import_ray():
    """``ray`` with Ray Data, or :class:`BatchError` saying how to install it (one line)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BatchError(INSTALL_HINT) from None
    return ray


class AlignActor:
    """One member of the actor pool: holds the aligner (loaded once) and aligns the chunks it is given.

    ``__call__`` takes a batch of rows, each a chunk (``pairs``: JSON list of ``[input, rel, output,
    reference, ref_label]`` with absolute paths) and returns ``{"record": JSON strings}``, one per pair.
    """

    def __init__(self, aligner, out_dir: str, max_pixels: Optional[int], shared_ref, threads: int, use_gpu: bool,
                 options: Optional[dict] = None):
        import cv2
        import ray
        import torch

        if isinstance(aligner, ray.ObjectRef):
            aligner = ray.get(aligner)
        if isinstance(shared_ref, ray.ObjectRef):
            shared_ref = ray.get(shared_ref)
        if use_gpu:
            aligner.device = torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        else:
            aligner.device = torch.device("cpu")
            torch.set_num_threads(threads)
            cv2.setNumThreads(threads)
        aligner.model.to(aligner.device).eval()
        self.aligner, self.out_dir, self.max_pixels = aligner, Path(out_dir), max_pixels
        self.shared_ref, self.shared = shared_ref, shared_reference(aligner, shared_ref)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stn-ray")
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for chunk in batch["pairs"]:
            pairs = [Pair(Path(i), rel, Path(o), Path(r) if r else None, label) for i, rel, o, r, label in json.loads(chunk)]
            records += align_chunk(self.aligner, pairs, self.out_dir, self.pool, self.max_pixels, self.shared_ref,
                                   self.shared, self.options)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def align_directory_ray(
    aligner,
    input_dir: Path | str,
    out_dir: Path | str,
    ref: Path | str | None = None,
    ref_dir: Path | str | None = None,
    recursive: bool = True,
    force: bool = False,
    batch_size: int = 16,
    workers: Optional[int] = None,
    on_progress: Optional[Callable[[dict], None]] = None,
    on_start: Optional[Callable[[int], None]] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    plan: Optional[tuple[list[Pair], bool]] = None,
    ref_image: Optional[np.ndarray] = None,
    address: Optional[str] = None,
    device: str = "auto",
    actors: Optional[int] = None,
    on_info: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
    output_format: str = "keep",
    quality: int = 95,
) -> BatchSummary:
    """:func:`stn_align.batch.align_directory` on a Ray cluster (see the module docstring); same arguments, plus:

    Args:
        address: the cluster (``auto``, ``ray://HOST:10001``, ``HOST:6379``); None: the one Ray is already
            connected to in this process, else ``RAY_ADDRESS``, else a new local Ray instance. A Ray started
            or connected here is shut down (disconnected) at the end.
        device: ``auto`` (one GPU per actor when the cluster has GPUs, else CPU), ``cpu`` or ``cuda``
            (an error when the cluster has no GPU). The aligner is moved to each actor's device.
        workers: threads per actor decoding, refining and encoding (default: 1 per CPU actor, which then
            reserves 1 CPU; min(4, CPUs per GPU) per GPU actor).
        actors: size of the actor pool (default: one per GPU, or one per ``workers`` CPUs of the cluster;
            never more than the number of chunks).
        on_info: called with a line saying where the work runs (actors, devices).

    Raises :class:`BatchError` when Ray is not installed, before any work.
    """
    ray = import_ray()
    if device not in ("auto", "cpu", "cuda"):
        raise BatchError(f"--device must be auto, cpu or cuda, not {device!r}", usage=True)
    if workers is not None and workers < 1:
        raise BatchError("--workers must be at least 1", usage=True)
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if plan is None:
        plan = plan_pairs(input_dir, out_dir, ref, ref_dir, recursive, output_format=output_format)
    pairs, excluded, shared_ref, _ = prepare(aligner, input_dir, out_dir, ref, ref_dir, recursive, batch_size,
                                             workers, max_pixels, plan, ref_image)
    summary = BatchSummary(total=len(pairs), excluded_out_dir=excluded)
    with open_run(aligner, pairs, out_dir, summary, force, on_progress, on_start, overwrite,
                  {"format": output_format, "quality": quality}) as run:
        if run.todo:
            connected_here = not ray.is_initialized()
            if connected_here:
                _connect(ray, address)
            try:
                _run(ray, aligner, run, batch_size, workers, max_pixels, shared_ref, device, actors, on_info)
            finally:
                if connected_here:
                    ray.shutdown()
    return summary


def _connect(ray, address: Optional[str]) -> None:
    options = {"logging_level": logging.ERROR, "log_to_driver": True}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        options["include_dashboard"] = False  # a new local instance: keep it light
    try:
        ray.init(address=address, **options)
    except Exception as err:  # noqa: BLE001 - e.g. no cluster at that address
        raise BatchError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS') or 'a new local instance'}: "
                         f"{' '.join(str(err).split())}") from None


def _run(ray, aligner, run: BatchRun, batch_size: int, workers: Optional[int], max_pixels, shared_ref,
         device: str, actors: Optional[int], on_info=None) -> None:
    """Map the chunks of ``run.todo`` over the actor pool; report every record as it comes back."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller reports progress (on_progress)
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "cuda" and not gpus:
        raise BatchError("--device cuda: the Ray cluster has no GPU")
    use_gpu = device != "cpu" and gpus > 0
    threads = workers or (min(4, max(1, cpus // gpus)) if use_gpu else 1)
    chunks = [run.todo[i:i + batch_size] for i in range(0, len(run.todo), batch_size)]
    size = max(1, min(actors or (gpus if use_gpu else cpus // threads), len(chunks)))
    if on_info:
        each = "1 GPU" if use_gpu else f"{threads} CPU"
        on_info(f"ray: {size} actor(s), {each} and {threads} thread(s) each; cluster: {cpus} CPUs, {gpus} GPUs")

    def row(pair: Pair) -> list[str]:  # absolute paths: the actors do not share this process's working directory
        reference = str(pair.reference.absolute()) if pair.reference else ""
        return [str(pair.input.absolute()), pair.rel, str(pair.output.absolute()), reference, pair.ref_label]

    rows = [{"pairs": json.dumps([row(p) for p in chunk])} for chunk in chunks]  # one row per chunk
    kwargs = {"aligner": ray.put(_on_cpu(aligner)), "out_dir": str(run.out_dir.absolute()), "max_pixels": max_pixels,
              "shared_ref": None if shared_ref is None else ray.put(shared_ref), "threads": threads, "use_gpu": use_gpu,
              "options": run.options}
    dataset = ray.data.from_items(rows).map_batches(
        AlignActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else min(threads, cpus))  # never more than the cluster has: it would wait forever

    pending = {p.rel: p for p in run.todo}
    run.begin(run.todo)  # the actors may write any of these outputs from now on
    try:
        for row in dataset.iter_rows():
            record = json.loads(row["record"])
            pair = pending.pop(record["input"], None)
            if pair is not None:
                run.done(pair, record)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - the cluster failed: what came back stays, the rest is failed
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        for pair in list(pending.values()):
            run.done(pair, run.failed(pair, _one_line(RuntimeError(f"Ray engine: {reason}"), pair.input)))


def _on_cpu(aligner):
    """A copy of ``aligner`` whose model is on the CPU (what travels to the actors; each moves it to its device)."""
    import copy

    import torch

    if aligner.device.type == "cpu":
        return aligner
    moved = copy.copy(aligner)
    moved.model = copy.deepcopy(aligner.model).to("cpu")
    moved.device = torch.device("cpu")
    return moved
