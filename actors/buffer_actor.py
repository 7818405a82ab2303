"""ReplayBufferActor: the thin Ray actor around ``ReplayBuffer``.

It stores ObjectRefs that the ingest loop (their owner) hands over inside a
list, so Ray passes them through unresolved; the rows never enter this
process. Trainers get a ``Sample`` of refs and fetch the blocks themselves.
Threaded, so a trainer waiting for data does not block inserts.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import ray

from livetrain.actors.replay_buffer import ReplayBuffer
from livetrain.config import BufferConfig
from livetrain.messages import BlockMeta, Sample

BUFFER_NAME = "livetrain_buffer"


@ray.remote(num_cpus=0.1, max_concurrency=8)
class ReplayBufferActor:
    def __init__(self, cfg: BufferConfig) -> None:
        self._buf: ReplayBuffer[ray.ObjectRef] = ReplayBuffer(cfg)
        self._lock = threading.Lock()
        self._grown = threading.Condition(self._lock)
        self._closed = False

    def add(self, meta: BlockMeta, block: list[ray.ObjectRef]) -> int:
        """Insert one block (by reference); returns the rows now held."""
        with self._grown:
            self._buf.add(block[0], meta)
            self._grown.notify_all()
            return self._buf.stats().rows

    def sample(self, n_blocks: int, fresh_after: int, min_rows: int, wait_s: float) -> Sample:
        """Refs of ``n_blocks`` blocks once the buffer holds ``min_rows`` rows
        (waits up to ``wait_s``); an empty sample if it still does not."""
        deadline = time.monotonic() + wait_s
        with self._grown:
            while not self._closed and self._buf.stats().rows < min_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._grown.wait(left)
            rows = self._buf.stats().rows
            picked = self._buf.sample(n_blocks, fresh_after) if rows >= min_rows else []
            return Sample(
                refs=[e.handle for e in picked],
                metas=[e.meta for e in picked],
                buffer_rows=rows,
                closed=self._closed,
            )

    def close(self) -> None:
        """Training stops: every sampler sees ``closed`` from now on."""
        with self._grown:
            self._closed = True
            self._grown.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dataclasses.asdict(self._buf.stats())
