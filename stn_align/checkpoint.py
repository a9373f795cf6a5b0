"""Checkpoints: safetensors only (never pickle), with the model's description as JSON metadata.

* Model file (``MODEL.safetensors``): network weights + ``metadata["stn_align"]``, a JSON object with
  ``model`` (the :class:`ModelConfig`), ``training`` (arguments, data summary, validation figures).
* Training state (``MODEL.state.safetensors``): weights, optimizer moments and the step, for ``--resume``.

Both carry ``tensors_sha256`` in their metadata (:func:`tensors_sha256`), checked at every load: a file
whose tensors were damaged (a flipped bit, a bad copy) is refused instead of giving NaN matrices.
Files are written atomically and get the permissions of an ordinary new file (``0o666`` less the umask).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import AlignerNet, ModelConfig

META_KEY = "stn_align"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A file that is not a usable stn-align checkpoint. ``str(err)`` is one line naming the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (hex)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """Write ``tensors`` with ``meta`` (plus their ``tensors_sha256``) as JSON metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps({**meta, "tensors_sha256": tensors_sha256(tensors)})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)  # writes a new file: set the mode after it
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a model file is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _verified(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """The tensors' SHA-256; :class:`CheckpointError` if the metadata records another (a damaged file)."""
    digest = tensors_sha256(tensors)
    recorded = meta.get("tensors_sha256")
    if recorded is not None and recorded != digest:
        raise CheckpointError(path, "corrupt checkpoint: its tensors do not match the SHA-256 recorded when it was "
                                    "written (a damaged or altered file; copy or download it again)")
    return digest


def state_path(model_path: Path | str) -> Path:
    """Where the resumable training state of ``MODEL.safetensors`` lives: ``MODEL.state.safetensors``."""
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".state.safetensors")


def save_model(path: Path | str, model: AlignerNet, info: dict) -> None:
    """Write weights and ``{"format", "model", **info}`` metadata atomically."""
    meta = {"format": FORMAT_VERSION, "model": model.config.to_dict(), **info}
    meta.pop("tensors_sha256", None)
    _atomic_save(model.state_dict(), meta, path)


def read_metadata(path: Path | str) -> dict:
    """The checkpoint's JSON metadata, without loading any tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a safetensors checkpoint ({str(err).splitlines()[0]})") from None
    if raw is None:
        raise CheckpointError(path, "safetensors file has no stn-align metadata (not an stn-align model)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(path, "corrupt stn-align metadata") from None


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[AlignerNet, dict]:
    """Rebuild the network a checkpoint describes and load its weights. Returns ``(model in eval mode, metadata)``."""
    meta = read_metadata(path)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"bad model description in metadata ({err})") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(path, f"corrupt tensor data ({str(err).splitlines()[0]})") from None
    meta = {**meta, "tensors_sha256": _verified(path, tensors, meta)}
    model = AlignerNet(config)
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(path, f"weights do not match the described architecture ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), meta


def save_training_state(path: Path | str, model: AlignerNet, optimizer: torch.optim.Optimizer, info: dict) -> None:
    """Weights, AdamW moments and ``info`` (step, config...) in one safetensors file."""
    tensors = dict(model.state_dict())
    optim_state = optimizer.state_dict()
    scalars = {}
    for index, state in optim_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"format": FORMAT_VERSION, "model": model.config.to_dict(), "param_groups": optim_state["param_groups"],
            "optim_scalars": scalars, **info}
    meta.pop("tensors_sha256", None)
    _atomic_save(tensors, meta, path)


def load_training_state(path: Path | str, model: AlignerNet, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer from :func:`save_training_state`; returns its metadata (with ``step``)."""
    meta = read_metadata(path)
    if "step" not in meta:
        raise CheckpointError(path, "not a training state (no step); pass MODEL.state.safetensors or the model it sits beside")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(path, f"corrupt tensor data ({str(err).splitlines()[0]})") from None
    _verified(path, tensors, meta)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optim_scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
