"""Request checking and prediction, without Ray: what a replica does per request."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from livetrain.messages import ServedVersion


class BadRequest(ValueError):
    """The request is malformed; the message says what is wrong (-> HTTP 422)."""


def instances_to_array(instances: Any, feature_names: list[str], max_instances: int) -> np.ndarray:
    """``[[f0, f1, ...], ...]`` or ``[{"name": value, ...}, ...]`` -> float32 [n, d]."""
    d = len(feature_names)
    if not isinstance(instances, list):
        raise BadRequest("'instances' must be a list of rows")
    if not instances:
        raise BadRequest("'instances' is empty: send at least one row")
    if len(instances) > max_instances:
        raise BadRequest(f"too many instances: {len(instances)} > {max_instances} per request")
    rows = []
    for i, row in enumerate(instances):
        if isinstance(row, dict):
            missing = [f for f in feature_names if f not in row]
            extra = [k for k in row if k not in feature_names]
            if missing or extra:
                raise BadRequest(f"instance {i}: missing features {missing}, unknown features {extra}")
            row = [row[f] for f in feature_names]
        if not isinstance(row, list):
            raise BadRequest(f"instance {i}: expected a list of {d} numbers or an object keyed by feature name")
        if len(row) != d:
            raise BadRequest(f"instance {i} has {len(row)} features, expected {d}")
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadRequest(f"instance {i}, feature {j}: {v!r} is not a number")
            if not math.isfinite(v):
                raise BadRequest(f"instance {i}, feature {j}: {v!r} is not finite")
        rows.append(row)
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), d)


@dataclass(frozen=True)
class Loaded:
    """One served version, ready to answer. Swapped as a whole: a request that
    read it once answers entirely from it."""

    served: ServedVersion
    model: nn.Module
    loaded_at: float

    @torch.no_grad()
    def predict(self, x: np.ndarray, classes: list[int]) -> dict[str, Any]:
        probs = torch.softmax(self.model(torch.from_numpy(x)), dim=1).numpy()
        idx = probs.argmax(axis=1)
        return {
            "predictions": [classes[i] for i in idx],
            "probabilities": probs.round(6).tolist(),
            "model_version": self.served.version,
        }


def describe(loaded: Loaded | None, now: float | None = None) -> dict[str, Any]:
    """The body of ``GET /model``."""
    if loaded is None:
        return {"model_version": None, "status": "waiting for the first promoted version"}
    s = loaded.served
    now = time.time() if now is None else now
    return {
        "model_version": s.version,
        "promoted_at": s.promoted_at,
        "loaded_at": loaded.loaded_at,
        "trained_through_seq": s.trained_through,
        "data_written_at": s.data_written_at,
        "data_age_s": now - s.data_written_at if s.data_written_at else None,
        "metrics_on_unseen_data": s.metrics,
        "model": {"name": s.spec.name, **s.spec.kwargs},
    }
