"""Self-describing checkpoints: weights, model spec, config, version, lineage.

One ``model.pt`` file written with ``torch.save`` and read back with
``torch.load(weights_only=True)``: only tensors and plain Python values, no
pickled code. ``load_model`` rebuilds the model from the file alone.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from livetrain.messages import ModelSpec
from livetrain.training.models import build_model

FORMAT = "livetrain.checkpoint/1"
FILENAME = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, of another format, or does not fit its model."""


@dataclass
class CheckpointData:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    """version, trained_through, train_step, config, ... (plain values)."""
    optimizer: dict[str, Any] | None = None


def save_checkpoint(directory: str | os.PathLike, data: CheckpointData) -> Path:
    """Write ``<directory>/model.pt`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = directory / (FILENAME + ".tmp")
    payload = {
        "format": FORMAT,
        "spec": {"name": data.spec.name, "kwargs": data.spec.kwargs},
        "weights": {k: v.detach().cpu() for k, v in data.weights.items()},
        "meta": data.meta,
        "optimizer": data.optimizer,
    }
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory_or_file: str | os.PathLike) -> CheckpointData:
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / FILENAME
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, not a torch file, or pickled code
        raise CheckpointError(f"{path}: not a loadable livetrain checkpoint ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    spec = ModelSpec(name=payload["spec"]["name"], kwargs=dict(payload["spec"]["kwargs"]))
    return CheckpointData(spec, payload["weights"], payload.get("meta") or {}, payload.get("optimizer"))


def load_model(directory_or_file: str | os.PathLike) -> tuple[nn.Module, CheckpointData]:
    """The model rebuilt from the checkpoint alone, in eval mode."""
    data = load_checkpoint(directory_or_file)
    return model_from_weights(data.spec, data.weights), data


def model_from_weights(spec: ModelSpec, weights: dict[str, Any]) -> nn.Module:
    """Build ``spec``'s model and load ``weights`` (tensors or numpy arrays)."""
    model = build_model(spec)
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in weights.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit model {spec.name} {spec.kwargs}: {e}") from e
    return model.eval()


def check_finite(weights: dict[str, Any], what: str) -> None:
    """Refuse weights with a NaN or infinite value (CheckpointError naming ``what`` and the
    weight): a diverged training run's model answers the same class everywhere."""
    for name, w in weights.items():
        a = np.asarray(w)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(f"{what}: weight {name!r} is not finite")


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Weights as numpy arrays: what goes into the object store."""
    return {k: v.detach().cpu().numpy().copy() for k, v in unwrap(model).state_dict().items()}


def weights_to_bytes(weights: dict[str, np.ndarray]) -> bytes:
    """A state dict as ``.npz`` bytes: what a promoted version carries in the object store."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in weights.items()})
    return buf.getvalue()


def weights_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Parse ``weights_to_bytes`` output; arrays only (``allow_pickle=False``), so a
    corrupt or hostile payload can fail but never run code."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"not a weights payload: {e}") from e


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return getattr(model, "module", model)
