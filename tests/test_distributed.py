"""Data-parallel training: 2 CPU processes (gloo) learn, write a loadable checkpoint, see different pairs, resume exactly.

One straight 2-process run is shared by the tests; the resume test redoes it in two halves, the first through
``torchrun -m stn_align train`` and the second through ``stn-align train --nproc 2``.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import shared_photos
from stn_align.checkpoint import load_model, read_metadata, state_path
from stn_align.cli import app
from stn_align.data import PairSampler, WarpRanges
from stn_align.train import StepBatches, TrainConfig, launch

pytestmark = pytest.mark.slow  # CI runs these too: python -m pytest -q -m slow

STEPS = 30
# Whole-image translations (every CLI option spelled out below), so that 30 steps show real learning.
OPTIONS = dict(size=64, steps=STEPS, batch_size=8, lr=3e-3, warmup=3, workers=0, threads=1, val_fraction=0.2, seed=0,
               architecture="global", iterations=1, p_crop=0.0, eval_every=1000, checkpoint_every=1000)
RANGES = dict(max_rotation=0.0, max_scale=1.0, max_shear=0.0, max_translation=0.15, max_perspective=0.0)


def cli_options(**changes) -> list[str]:
    options = {**OPTIONS, **RANGES, **changes}
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "photos"
    root.mkdir()
    for path in shared_photos("products", 16):
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def straight(photos):
    """A 2-process run from scratch: ``(model path, launch result)``."""
    out = photos.parent / "straight.safetensors"
    config = TrainConfig(data_dir=str(photos), out=str(out), ranges=WarpRanges(**RANGES), log_every=1, val_pairs=8, **OPTIONS)
    return out, launch(config, nproc=2)


def test_two_processes_learn_and_write_a_loadable_checkpoint(straight):
    out, result = straight
    losses = [loss for _, loss in result["history"]]  # the global batch's loss, averaged over the ranks
    assert len(losses) == STEPS
    assert np.mean(losses[-6:]) < 0.75 * np.mean(losses[:6])
    model, meta = load_model(out)
    assert not model.training and meta["model"]["size"] == 64
    assert meta["training"]["processes"] == 2 and meta["validation"]["pairs"] == 8
    assert read_metadata(state_path(out))["step"] == STEPS
    ranks = result["ranks"]
    assert len(ranks) == 2 and ranks[1]["validation"] is None  # rank 0 validates
    assert ranks[0]["pairs_sha256"] != ranks[1]["pairs_sha256"]  # each rank trained on its own pairs


def test_ranks_share_each_batch_without_overlap():
    """Rank r of N draws sampler step k*N + r; one process draws what it always did."""
    photos = [(np.random.default_rng(i).random((160, 160, 3)) * 255).astype(np.uint8) for i in range(3)]
    sampler = PairSampler("projective", 64, seed=5)
    ranks = [StepBatches(sampler, photos, None, 4, 10, rank=r, world=2)[3][2] for r in range(2)]
    assert not np.allclose(ranks[0], ranks[1])
    assert np.array_equal(ranks[1], sampler.batch(photos, 7, 4)[2])
    assert np.array_equal(StepBatches(sampler, photos, None, 4, 10)[3][2], sampler.batch(photos, 3, 4)[2])


def test_resume_under_torchrun_is_exact(straight, photos):
    reference, _ = straight
    out = photos.parent / "halves.safetensors"
    common = [str(photos), "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "stn_align", "train", *common, *cli_options(), "--stop-after", str(STEPS // 2)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert read_metadata(state_path(out))["step"] == STEPS // 2
    second = CliRunner().invoke(app, ["train", *common, *cli_options(), "--nproc", "2", "--resume", str(out)])
    assert second.exit_code == 0, second.output
    a, _ = load_model(reference)
    b, _ = load_model(out)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_batch_must_split_evenly(photos, tmp_path):
    result = CliRunner().invoke(app, ["train", str(photos), "-o", str(tmp_path / "m.safetensors"),
                                      *cli_options(batch_size=5, steps=1), "--nproc", "2"])
    assert result.exit_code != 0
    assert "not divisible" in result.output and "\n" not in result.output.strip()
