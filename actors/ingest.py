"""Ingest: IngestActor (read -> validate -> quarantine -> block) and the
IngestLoop that drives it.

Ownership: the loop calls ``IngestActor.read_shard`` and keeps the returned
block reference, so the loop's process (the driver) owns every block, not
the ingest actor: an ingest actor may die without taking buffered blocks
with it. The ref then travels to the registry (test) and the buffer (train)
inside a list, unresolved.

Exactly once: a shard is claimed in the manifest, and marked ingested only
after the buffer has accepted its block. A crash in between leaves it
``claimed``; ``Manifest.requeue_claimed`` at start-up puts it back.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from livetrain.actors.manifest import Manifest, ShardRecord
from livetrain.actors.quarantine import write_quarantine
from livetrain.actors.schema import read_and_validate
from livetrain.actors.sources import DirectorySource
from livetrain.config import Config, SchemaConfig
from livetrain.messages import BlockMeta, ShardVerdict


def label_index(y: np.ndarray, classes: list[int]) -> np.ndarray:
    """Map declared label values to class indices 0..C-1 (validated labels only)."""
    if list(classes) == list(range(len(classes))):
        return y
    order = np.argsort(classes)
    sorted_classes = np.asarray(classes)[order]
    return order[np.searchsorted(sorted_classes, y)].astype(np.int64)


@ray.remote(num_cpus=0.25, max_restarts=-1)
class IngestActor:
    def __init__(self, schema: SchemaConfig, state_dir: str) -> None:
        self._schema = schema
        self._state = Path(state_dir)

    def read_shard(self, path: str, name: str) -> tuple[ShardVerdict, dict[str, np.ndarray]]:
        """Validate one shard; bad rows go to quarantine. Returns (verdict, block)."""
        v = read_and_validate(path, self._schema)
        if v.error is not None or v.bad is not None:
            write_quarantine(self._state, name, v.bad, v.error, Path(path))
        return v.verdict(name), {"x": v.x, "y": label_index(v.y, self._schema.classes)}


@dataclass
class IngestCounters:
    rows_ingested: int = 0
    rows_quarantined: int = 0
    shards_ingested: int = 0
    shards_quarantined: int = 0
    shards_retried: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _InFlight:
    record: ShardRecord
    verdict: Any  # ObjectRef[ShardVerdict]
    block: Any  # ObjectRef[block]


class IngestLoop:
    """Landing dir -> manifest -> ingest actors -> registry (test) -> buffer (train)."""

    def __init__(self, cfg: Config, manifest: Manifest, buffer: Any, registry: Any) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.buffer = buffer
        self.registry = registry
        self.source = DirectorySource(cfg.landing_dir)
        self.counters = IngestCounters()
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._actors = [
            IngestActor.remote(cfg.schema, str(Path(cfg.state_dir).resolve())) for _ in range(cfg.ingest.num_actors)
        ]
        self._next_actor = 0
        self._in_flight: OrderedDict[str, _InFlight] = OrderedDict()
        self.manifest.requeue_claimed()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step(wait_s=self.cfg.source.poll_interval_s)

    def step(self, wait_s: float = 0.0) -> None:
        """Discover, claim, dispatch, and finish completed shards in claim order."""
        self.manifest.discover(self.source.poll())
        free = self.cfg.ingest.max_in_flight - len(self._in_flight)
        if free > 0:
            for rec in self.manifest.claim(self.owner, free):
                self._dispatch(rec)
        if not self._in_flight:
            time.sleep(wait_s) if wait_s else None
            return
        refs = [f.verdict for f in self._in_flight.values()]
        ray.wait(refs, num_returns=1, timeout=wait_s)
        # finish the head of the queue while it is done: keeps arrival order in the buffer
        while self._in_flight:
            name, head = next(iter(self._in_flight.items()))
            if not ray.wait([head.verdict], timeout=0)[0]:
                break
            del self._in_flight[name]
            self._finish(head)

    def _dispatch(self, rec: ShardRecord) -> None:
        actor = self._actors[self._next_actor % len(self._actors)]
        self._next_actor += 1
        verdict, block = actor.read_shard.options(num_returns=2).remote(str(rec.path), rec.name)
        self._in_flight[rec.name] = _InFlight(rec, verdict, block)

    def _finish(self, f: _InFlight) -> None:
        rec, c = f.record, self.counters
        try:
            v: ShardVerdict = ray.get(f.verdict)
        except ray.exceptions.RayError:  # the ingest actor died mid-shard: retry the shard
            self.manifest.release(rec.name)
            c.shards_retried += 1
            return
        for reason, n in v.reasons.items():
            c.reasons[reason] = c.reasons.get(reason, 0) + n
        c.rows_quarantined += v.bad_rows
        if v.error is not None:
            self.manifest.mark_quarantined(rec.name, v.error)
            c.shards_quarantined += 1
            c.reasons[v.error.split(":")[0]] = c.reasons.get(v.error.split(":")[0], 0) + 1
            return
        if v.good_rows:
            meta = BlockMeta(
                shard=rec.name,
                seq=rec.seq,
                rows=v.good_rows,
                nbytes=v.nbytes,
                written_at=rec.mtime_ns / 1e9,
                ingested_at=time.time(),
            )
            ray.get(self.registry.observe.remote(meta, [f.block]))  # test ...
            ray.get(self.buffer.add.remote(meta, [f.block]))  # ... then train
        self.manifest.mark_ingested(rec.name, v.good_rows, v.bad_rows)
        c.rows_ingested += v.good_rows
        c.shards_ingested += 1

    def shutdown(self) -> None:
        for name, f in self._in_flight.items():
            self.manifest.release(name)
        self._in_flight.clear()
        for a in self._actors:
            ray.kill(a)
