"""The model registry's logic: served version, pending candidate, prequential
evaluation, gate decisions and freshness. A plain class (torch, no Ray); the
Ray actor in ``registry_actor.py`` forwards to it.

Test-then-train: every new block reaches ``observe`` *before* the buffer
makes it available for training. The served model is scored on it (its
prequential figures), and the block joins the evaluation window. A pending
candidate is decided as soon as the window holds ``gate.min_eval_rows`` rows
that neither it nor the served model has trained on (shard seq greater than
both ``trained_through``), so the comparison is always on unseen data.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from livetrain.config import GateConfig
from livetrain.messages import BlockMeta, Candidate, Decision, ModelSpec
from livetrain.training.checkpoint import model_from_weights
from livetrain.training.gate import Prequential, classification_metrics, decide


KEEP_VERSIONS = 32
"""Served versions kept in memory for rollback, pinning and freshness."""


class RollbackError(ValueError):
    """The requested rollback target does not exist or is already served."""


@dataclass
class Version:
    """A proposed or served model, materialised for evaluation."""

    version: int
    spec: ModelSpec
    weights: dict[str, np.ndarray]
    model: nn.Module
    trained_through: int
    data_written_at: float
    proposed_at: float
    train_step: int
    promoted_at: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(x))).argmax(dim=1).numpy()


@dataclass
class _Block:
    meta: BlockMeta
    x: np.ndarray
    y: np.ndarray


class Registry:
    def __init__(
        self,
        cfg: GateConfig,
        num_classes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.clock = clock
        self.served: Version | None = None
        self.pending: Version | None = None
        self.history: deque[Version] = deque(maxlen=KEEP_VERSIONS)
        """The last served versions, oldest first (older ones live on disk only)."""
        self.decisions: list[Decision] = []
        self.next_version = 1
        self.versions_proposed = 0
        self.prequential = Prequential(num_classes, cfg.window_rows)
        self._recent: deque[_Block] = deque()
        self._recent_rows = 0
        self._unserved_shards: deque[tuple[int, float]] = deque()
        self.freshness_s: list[float] = []
        self.first_answer_at: dict[int, float] = {}

    # --- inputs ----------------------------------------------------------------

    def observe(self, meta: BlockMeta, x: np.ndarray, y: np.ndarray) -> list[Decision]:
        """Score the served model on a new block (test), keep it for the gate."""
        if self.served is not None and len(y):
            self.prequential.update(y, self.served.predict(x))
        self._recent.append(_Block(meta, x, y))
        self._recent_rows += len(y)
        while self._recent_rows - len(self._recent[0].y) >= self.cfg.max_eval_rows:
            self._recent_rows -= len(self._recent.popleft().y)
        self._unserved_shards.append((meta.seq, meta.written_at))
        return self._try_decide()

    def propose(self, cand: Candidate, weights: dict[str, np.ndarray]) -> tuple[int, list[Decision]]:
        """Register a candidate; returns its version and any decisions taken."""
        version = self.next_version
        self.next_version += 1
        self.versions_proposed += 1
        decisions: list[Decision] = []
        if self.pending is not None:
            decisions.append(self._record(self.pending, "supersede", f"superseded by v{version} before enough unseen rows arrived", {}, None, 0, self.served.version if self.served else None))
        self.pending = Version(
            version=version,
            spec=cand.spec,
            weights=weights,
            model=model_from_weights(cand.spec, weights),
            trained_through=cand.trained_through,
            data_written_at=cand.data_written_at,
            proposed_at=cand.proposed_at,
            train_step=cand.train_step,
        )
        return version, decisions + self._try_decide()

    def record_answer(self, version: int, at: float) -> None:
        """A replica answered with ``version`` at ``at``: closes freshness of covered shards."""
        if version in self.first_answer_at:
            return
        self.first_answer_at[version] = at
        v = self.find(version)
        if v is None:
            return
        while self._unserved_shards and self._unserved_shards[0][0] <= v.trained_through:
            _, written = self._unserved_shards.popleft()
            self.freshness_s.append(max(0.0, at - written))

    def restore_served(self, v: Version) -> None:
        """Serve ``v`` again after a restart (no gate: it passed one before)."""
        self.served = v
        self.history.append(v)
        self.next_version = max(self.next_version, v.version + 1)

    def rollback(self, target: Version | None = None, reason: str = "requested") -> Decision:
        """Serve ``target`` (default: the version served before the current one)."""
        if self.served is None:
            raise RollbackError("nothing is served yet")
        if target is None:
            older = [v for v in self.history if v.version != self.served.version]
            if not older:
                raise RollbackError(f"v{self.served.version} is the only version ever served")
            target = older[-1]
        if target.version == self.served.version:
            raise RollbackError(f"v{target.version} is already served")
        previous = self.served
        self.served = target
        if target not in self.history:
            self.history.append(target)
        else:  # keep history ordered by when a version was (re)served
            self.history.remove(target)
            self.history.append(target)
        return self._record(target, "rollback", f"from v{previous.version}: {reason}", dict(target.metrics), None, 0, previous.version)

    def find(self, version: int) -> Version | None:
        return next((v for v in self.history if v.version == version), None)

    # --- the gate --------------------------------------------------------------

    def _try_decide(self) -> list[Decision]:
        cand = self.pending
        if cand is None:
            return []
        floor = max(cand.trained_through, self.served.trained_through if self.served else -1)
        unseen = [b for b in self._recent if b.meta.seq > floor]
        rows = sum(len(b.y) for b in unseen)
        if rows < self.cfg.min_eval_rows:
            return []
        x = np.concatenate([b.x for b in unseen])[-self.cfg.max_eval_rows :]
        y = np.concatenate([b.y for b in unseen])[-self.cfg.max_eval_rows :]
        cm = classification_metrics(y, cand.predict(x), self.num_classes)
        sm = classification_metrics(y, self.served.predict(x), self.num_classes) if self.served else None
        verdict = decide(cm, sm, self.cfg)
        self.pending = None
        served_version = self.served.version if self.served else None
        if verdict.promote:
            cand.promoted_at = self.clock()
            cand.metrics = cm
            self.served = cand
            self.history.append(cand)
        return [self._record(cand, "promote" if verdict.promote else "reject", verdict.reason, cm, sm, len(y), served_version)]

    def _record(
        self,
        v: Version,
        action: str,
        reason: str,
        cm: dict[str, float],
        sm: dict[str, float] | None,
        rows: int,
        served_version: int | None = None,
    ) -> Decision:
        d = Decision(
            version=v.version,
            action=action,
            reason=reason,
            at=self.clock(),
            trained_through=v.trained_through,
            eval_rows=rows,
            candidate=cm,
            served=sm,
            served_version=served_version,
        )
        self.decisions.append(d)
        return d

    # --- views -----------------------------------------------------------------

    def stats(self) -> dict[str, float | int | None]:
        f = np.array(self.freshness_s) if self.freshness_s else None
        promoted = sum(d.action == "promote" for d in self.decisions)
        return {
            "served_version": self.served.version if self.served else None,
            "served_trained_through": self.served.trained_through if self.served else None,
            "versions_proposed": self.versions_proposed,
            "versions_promoted": promoted,
            "versions_rejected": sum(d.action == "reject" for d in self.decisions),
            "prequential_accuracy": self.prequential.accuracy,
            "prequential_accuracy_window": self.prequential.window_accuracy,
            "prequential_rows": self.prequential.rows,
            "freshness_p50_s": float(np.percentile(f, 50)) if f is not None else None,
            "freshness_p95_s": float(np.percentile(f, 95)) if f is not None else None,
            "freshness_count": len(self.freshness_s),
        }
