"""Request checking and prediction, without Ray: what a replica does per request."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from livetrain.messages import ServedVersion
from livetrain.training.checkpoint import check_finite, model_from_weights
from livetrain.training.softmax import softmax

FLOAT32_MAX = float(np.finfo(np.float32).max)
CPU = torch.device("cpu")


class BadRequest(ValueError):
    """The request is malformed; the message says what is wrong.

    ``status`` is the HTTP answer: 422 by default (well-formed but wrong),
    400 for unparseable bodies, 413 for too much, 415 for a content type we
    do not read."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def instances_to_array(instances: Any, feature_names: list[str], max_instances: int) -> np.ndarray:
    """``[[f0, f1, ...], ...]`` or ``[{"name": value, ...}, ...]`` -> float32 [n, d]."""
    d = len(feature_names)
    if not isinstance(instances, list):
        raise BadRequest("'instances' must be a list of rows")
    if not instances:
        raise BadRequest("'instances' is empty: send at least one row")
    if len(instances) > max_instances:
        raise BadRequest(f"too many instances: {len(instances)} > {max_instances} per request (serve.max_instances)", 413)
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
                raise BadRequest(f"instance {i}, feature {j}: {_short(v)} is not a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise BadRequest(f"instance {i}, feature {j}: {_short(v)} is not finite")
            if abs(v) > FLOAT32_MAX:  # would become inf in float32 (and a huge int overflows float())
                raise BadRequest(f"instance {i}, feature {j}: {_short(v)} is out of float32 range")
        rows.append(row)
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), d)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def load_version(served: ServedVersion, weights: dict[str, Any], now: float | None = None, device: str = "cpu") -> "Loaded":
    """Build the model of a served version on ``device``, refusing weights that
    do not fit its spec or are not finite (CheckpointError); nothing is swapped
    on error."""
    check_finite(weights, f"v{served.version}")
    model = model_from_weights(served.spec, weights).to(device)
    return Loaded(served, model, time.time() if now is None else now, torch.device(device))


def replica_device(num_gpus: float, cuda_available: bool) -> str:
    """Where a replica predicts: ``cuda`` when it was given a GPU (``serve.num_gpus``).
    Ray makes only the replica's own GPU visible, so ``cuda`` is that one."""
    if num_gpus <= 0:
        return "cpu"
    if not cuda_available:
        raise RuntimeError(f"serve.num_gpus={num_gpus} but this replica sees no CUDA device (is torch built with CUDA?)")
    return "cuda"


@dataclass(frozen=True)
class Loaded:
    """One served version, ready to answer. Swapped as a whole: a request that
    read it once answers entirely from it."""

    served: ServedVersion
    model: nn.Module
    loaded_at: float
    device: torch.device = CPU

    @property
    def version(self) -> int:
        return self.served.version

    @torch.inference_mode()
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return softmax(self.model(t)).cpu().numpy()

    def scores(self, x: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [n], probabilities [n, classes])`` as arrays (the Arrow answer)."""
        probs = self.probabilities(x)
        problem = self._unscored(probs)
        if problem is not None:
            raise problem
        return np.asarray(classes)[probs.argmax(axis=1)], probs

    def predict(self, x: np.ndarray, classes: list[int]) -> dict[str, Any]:
        answer = self.predict_many([x], classes)[0]
        if isinstance(answer, BadRequest):
            raise answer
        return answer

    def predict_many(self, xs: list[np.ndarray], classes: list[int]) -> list[dict[str, Any] | BadRequest]:
        """One forward pass over several requests' rows; one answer per request,
        all from this version. A request with rows the model could not score gets
        its refusal instead: the other requests of the batch are still answered."""
        probs = self.probabilities(np.concatenate(xs) if len(xs) > 1 else xs[0])
        idx = probs.argmax(axis=1)
        labels = np.asarray(classes)[idx].tolist()
        out: list[dict[str, Any] | BadRequest] = []
        start = 0
        for x in xs:
            end = start + len(x)
            p = probs[start:end]
            problem = self._unscored(p)
            out.append(problem or {"predictions": labels[start:end], "probabilities": p.round(6).tolist(), "model_version": self.version})
            start = end
        return out

    def _unscored(self, probs: np.ndarray) -> BadRequest | None:
        """A 422 naming the rows whose probabilities are not finite, if any. Finite
        features far outside what the model was trained on can overflow it (float32
        tops out at ~3.4e38): NaN is no answer, and not JSON either."""
        bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
        if not len(bad):
            return None
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        return BadRequest(
            f"v{self.version} cannot score rows {bad[:10].tolist()}{more}: the model overflows on them "
            "(features far outside the range it was trained on)"
        )


def answer_bytes(answer: dict[str, Any]) -> bytes:
    # allow_nan=False: a NaN that got this far fails the request (500) rather than
    # going out as a 200 whose body no strict JSON parser reads
    return json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()


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
