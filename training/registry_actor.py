"""ModelRegistry: the thin Ray actor around ``Registry``.

Threaded (``max_concurrency``) so that serving replicas can long-poll
``wait_for_version`` while blocks and candidates keep arriving; one lock
guards the plain registry. Promoted weights are re-put into the object store
by this actor, so the served version outlives the training worker that
proposed it, and written to ``<state_dir>/served/v<N>/model.pt`` so a restart
serves the last promoted version at once.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from livetrain.config import GateConfig
from livetrain.messages import BlockMeta, Candidate, Decision, ServedVersion
from livetrain.training.checkpoint import CheckpointData, load_checkpoint, model_from_weights, save_checkpoint
from livetrain.training.registry import Registry, Version

REGISTRY_NAME = "livetrain_registry"


@ray.remote(num_cpus=0.1, max_concurrency=16)
class ModelRegistry:
    def __init__(self, cfg: GateConfig, num_classes: int, state_dir: str) -> None:
        torch.set_num_threads(1)
        self._state = Path(state_dir)
        self._reg = Registry(cfg, num_classes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._served: ServedVersion | None = None
        self._log = (self._state / "decisions.jsonl").open("a")
        self._train_stats: dict[str, Any] = {}
        self._restore_last_served()

    # --- from the ingest loop and the trainer ----------------------------------

    def observe(self, meta: BlockMeta, block: list[ray.ObjectRef]) -> None:
        data = ray.get(block[0])
        with self._lock:
            self._apply(self._reg.observe(meta, data["x"], data["y"]))

    def propose(self, cand: Candidate) -> int:
        weights = ray.get(cand.weights)
        with self._lock:
            version, decisions = self._reg.propose(cand, weights)
            self._apply(decisions)
        return version

    def report_train(self, stats: dict[str, Any]) -> None:
        with self._lock:
            self._train_stats = stats

    # --- from serving replicas -------------------------------------------------

    def wait_for_version(self, have: int, timeout_s: float) -> ServedVersion | None:
        """Long-poll: the served version once it differs from ``have``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._served is None or self._served.version == have:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._served

    def record_answer(self, version: int, at: float) -> None:
        with self._lock:
            self._reg.record_answer(version, at)

    # --- views -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._reg.stats(), **{f"train_{k}": v for k, v in self._train_stats.items()}}

    def served_info(self) -> dict[str, Any] | None:
        with self._lock:
            s = self._served
            return None if s is None else _describe(s)

    def decisions(self, since: int = 0) -> list[Decision]:
        with self._lock:
            return self._reg.decisions[since:]

    # --- internals -------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self._log.write(json.dumps(dataclasses.asdict(d)) + "\n")
            if d.action == "promote":
                self._publish(self._reg.served)
        self._log.flush()

    def _publish(self, v: Version | None) -> None:
        assert v is not None
        save_checkpoint(
            self._state / "served" / f"v{v.version:06d}",
            CheckpointData(
                spec=v.spec,
                weights={k: torch.from_numpy(a) for k, a in v.weights.items()},
                meta={
                    "version": v.version,
                    "trained_through": v.trained_through,
                    "data_written_at": v.data_written_at,
                    "promoted_at": v.promoted_at,
                    "train_step": v.train_step,
                    "metrics": v.metrics,
                },
            ),
        )
        self._served = ServedVersion(
            version=v.version,
            weights=ray.put(v.weights),
            spec=v.spec,
            trained_through=v.trained_through,
            data_written_at=v.data_written_at,
            promoted_at=v.promoted_at or time.time(),
            metrics=dict(v.metrics),
        )
        self._changed.notify_all()

    def _restore_last_served(self) -> None:
        served_dir = self._state / "served"
        latest = sorted(served_dir.glob("v*/model.pt"))
        if not latest:
            return
        data = load_checkpoint(latest[-1])
        m = data.meta
        weights = {k: t.numpy() for k, t in data.weights.items()}
        v = Version(
            version=int(m["version"]),
            spec=data.spec,
            weights=weights,
            model=model_from_weights(data.spec, weights),
            trained_through=int(m["trained_through"]),
            data_written_at=float(m["data_written_at"]),
            proposed_at=float(m.get("promoted_at") or 0.0),
            train_step=int(m.get("train_step", 0)),
            promoted_at=float(m.get("promoted_at") or time.time()),
            metrics=dict(m.get("metrics") or {}),
        )
        with self._lock:
            self._reg.restore_served(v)
            self._publish(v)


def _describe(s: ServedVersion) -> dict[str, Any]:
    return {
        "model_version": s.version,
        "promoted_at": s.promoted_at,
        "trained_through_seq": s.trained_through,
        "data_written_at": s.data_written_at,
        "metrics_on_unseen_data": s.metrics,
        "model": {"name": s.spec.name, **s.spec.kwargs},
    }
