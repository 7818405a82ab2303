"""ReplayBufferActor: the thin Ray actor around ``ReplayBuffer``.

It stores ``BlockRef``s (a chunk's ObjectRef and the block's rows in it)
that the ingest loop (the chunks' owner) hands over inside a list, so Ray
passes them through unresolved; the rows never enter this process. Trainers
get a ``Sample`` of them and fetch the blocks themselves. The blocks of one
chunk are added together and leave the reservoir together (``ReplayBuffer``'s
``chunk``), so a chunk does not outlive its blocks in the object store.
Threaded, so a trainer waiting for data does not block inserts.

Exactly once: ``add_shards`` marks a batch of shards ingested in the
manifest (one transaction) and inserts their blocks, under one lock, before
it answers; a part of a large shard moves the shard's row watermark instead
(a retried part skips the blocks below the watermark: the rebuild re-read
them); a retried call for a shard already ingested is a no-op for that
shard. (Should this actor die between the two, its restart rebuilds from the
manifest, which already names those shards.) The actor restarts when it dies
(``max_restarts``), and its calls are retried (``max_task_retries``): a new
instance rebuilds itself in ``__init__`` from its last snapshot, the
manifest and the shard files (``actors/blocks.py``), and owns the blocks it
re-reads; a shard it cannot read back (damaged in place since) is left out and
counted (``rebuilt_shards_unreadable``), so the buffer still comes up.
Backpressure is the named limiter of ``actors/rate_limiter.py``.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from livetrain.actors.blocks import (
    AddResult,
    HeldPart,
    ShardCommit,
    Snapshot,
    SNAPSHOT_FILE,
    part_rows,
    plan_rebuild,
    read_back,
    read_snapshot,
    write_snapshot,
)
from livetrain.actors.manifest import Manifest
from livetrain.actors.rate_limiter import make_limiter
from livetrain.actors.replay_buffer import BlockTooLarge, Entry, ReplayBuffer
from livetrain.actors.schema import SchemaError
from livetrain.config import BufferConfig, SchemaConfig, StorageConfig
from livetrain.messages import BlockMeta, BlockRef, Sample
from livetrain.storage import Store
from livetrain.storage import configure as configure_storage

BUFFER_NAME = "livetrain_buffer"


@dataclass(frozen=True)
class BlockHandle:
    """What the buffer keeps per block: where it is in the store and where its rows came from."""

    block: BlockRef
    shard: str
    row_start: int
    row_end: int


BUFFER_ACTOR_CPUS = 0.1
"""Logical CPUs the buffer actor reserves (a local Ray is sized to fit them)."""


@ray.remote(num_cpus=BUFFER_ACTOR_CPUS, max_concurrency=8, max_restarts=-1, max_task_retries=-1)
class ReplayBufferActor:
    def __init__(
        self,
        cfg: BufferConfig,
        state_dir: str | None = None,
        schema: SchemaConfig | None = None,
        block_rows: int = 65_536,
        store: Store | None = None,
        storage: StorageConfig | None = None,
    ) -> None:
        if storage is not None:
            configure_storage(storage)  # a rebuild re-reads shards, maybe from s3://
        self._cfg = cfg
        self._store = store
        self._pushing = threading.Lock()
        self._buf: ReplayBuffer[BlockHandle] = ReplayBuffer(cfg)
        self._limiter = make_limiter(cfg.backpressure, cfg.max_unseen_rows)
        self._lock = threading.Lock()
        self._grown = threading.Condition(self._lock)
        self._closed = False
        self._state_dir = state_dir
        self._manifest = Manifest(state_dir) if state_dir else None
        self._newest_seq = -1
        self._open: dict[str, tuple[int, int]] = {}
        """Shards going in by parts: name -> (seq, row watermark), for the snapshot."""
        self._last_snapshot = 0.0
        self.rebuilt = {"shards": 0, "blocks": 0, "rows": 0, "rows_lost": 0, "shards_unreadable": 0}
        if state_dir and store is not None:
            store.restore(state_dir, only=(SNAPSHOT_FILE,))
        if state_dir and schema is not None:
            self._rebuild(schema, part_rows(block_rows, cfg.capacity_rows, cfg.capacity_bytes, schema))

    # --- from the ingest loop ---------------------------------------------------

    def add_shards(self, commits: list[ShardCommit], refs: list[list[BlockRef]], wait_s: float = 0.5) -> list[AddResult]:
        """Insert several shards' blocks (``refs[i]`` for ``commits[i]``, one per span) in order, and mark
        them ingested in one manifest transaction before the blocks go in.

        The limiter may make the first shard wait (up to ``wait_s``); a later one it
        refuses ends the batch. Every shard from the first refused one on is answered
        ``accepted=False``: call again with those. A shard already ingested (a retried
        call after a restart) is answered ``already_held`` and not added twice.
        """
        deadline = time.monotonic() + wait_s
        with self._grown:
            # a retried call after a restart: shards already ingested are held; a part's
            # blocks below the watermark are in already (the rebuild re-read them)
            known = {c.shard: self._manifest.get(c.shard) for c in commits} if self._manifest is not None else {}
            held = {s for s, r in known.items() if r is not None and r.status == "ingested"}
            marks = {s: r.rows_committed for s, r in known.items() if r is not None and s not in held}
            todo = [c for c in commits if c.shard not in held]
            first_ok = bool(todo)
            while todo and not self._limiter.admits(self._buf.unseen_rows, todo[0].block_rows):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    first_ok = False
                    break
                self._grown.wait(left)
            admitted = todo[:1] if first_ok else []
            unseen = self._buf.unseen_rows + sum(c.block_rows for c in admitted)
            for c in todo[1:] if first_ok else []:  # evictions only lower the unseen count: a safe bound
                if not self._limiter.admits(unseen, c.block_rows):
                    break
                admitted.append(c)
                unseen += c.block_rows
            refused: set[str] = set()  # parts of shards quarantined meanwhile: withdrawn, not added
            if self._manifest is not None and admitted:
                refused = self._manifest.mark_ingested_many(
                    [(c.shard, c.good_rows, c.bad_rows) for c in admitted if c.final],
                    [(c.shard, c.spans[-1].row_end) for c in admitted if not c.final and c.spans],
                )
            by_shard = {c.shard: r for c, r in zip(commits, refs)}
            for c in (c for c in admitted if c.shard not in refused):
                for span, b in zip(c.spans, by_shard[c.shard]):
                    if span.row_end <= marks.get(c.shard, 0):
                        continue
                    meta = BlockMeta(c.shard, c.seq, span.rows, span.nbytes, c.written_at, time.time())
                    self._buf.add(BlockHandle(b, c.shard, span.row_start, span.row_end), meta, chunk=b.ref)
                self._newest_seq = max(self._newest_seq, c.seq)
                if c.final:
                    self._open.pop(c.shard, None)
                elif c.spans:
                    self._open[c.shard] = (c.seq, c.spans[-1].row_end)
            if admitted:
                self._grown.notify_all()
                self._maybe_snapshot()
            rows, accepted = self._buf.stats().rows, {c.shard for c in admitted}
            return [AddResult(c.shard in accepted or c.shard in held, rows, already_held=c.shard in held)
                    for c in commits]

    def withdraw_shard(self, shard: str) -> int:
        """Take out the blocks of a shard quarantined after some of its parts went
        in, so the buffer agrees with the manifest (and with a rebuild, which
        re-reads only ingested and claimed shards); the rows taken out."""
        with self._grown:
            self._open.pop(shard, None)
            gone = self._buf.withdraw(shard)
            if gone:
                self._maybe_snapshot(force=True)
            return sum(e.meta.rows for e in gone)

    def add_shard(self, commit: ShardCommit, refs: list[BlockRef], wait_s: float = 0.5) -> AddResult:
        """``add_shards`` for one shard."""
        return self.add_shards([commit], [refs], wait_s)[0]

    # --- from trainers ----------------------------------------------------------

    def sample(self, n_blocks: int, fresh_after: int, min_rows: int, wait_s: float,
               rank: int = 0, world: int = 1) -> Sample:
        """``n_blocks`` blocks once the buffer holds ``min_rows`` rows
        (waits up to ``wait_s``); an empty sample if it still does not.
        ``rank`` of ``world``: the DDP ranks share out a backlog (``ReplayBuffer.sample``)."""
        deadline = time.monotonic() + wait_s
        with self._grown:
            while not self._closed and self._buf.stats().rows < min_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._grown.wait(left)
            rows = self._buf.stats().rows
            picked = self._buf.sample(n_blocks, fresh_after, rank, world) if rows >= min_rows else []
            if picked:
                self._grown.notify_all()  # unseen rows may have dropped: a waiting insert may go
            return Sample(
                blocks=[e.handle.block for e in picked],
                metas=[e.meta for e in picked],
                buffer_rows=rows,
                closed=self._closed,
            )

    # --- views and lifecycle ----------------------------------------------------

    def held_blocks(self) -> list[tuple[BlockMeta, BlockRef]]:
        """Every block held, window then reservoir, as (meta, block) (tests, benchmarks)."""
        with self._lock:
            return [(e.meta, e.handle.block) for e in self._buf.entries()]

    def set_mix(self, recent_fraction: float, window_rows_scale: float) -> None:
        """Drift reactions from the registry: sampling mix and window length."""
        with self._lock:
            self._buf.set_mix(recent_fraction, window_rows_scale)

    def close(self) -> None:
        """Training stops: every sampler sees ``closed`` from now on; the snapshot is written."""
        with self._grown:
            self._closed = True
            self._grown.notify_all()
            self._maybe_snapshot(force=True)
        if self._store is not None and self._state_dir is not None:
            with self._pushing:  # the last snapshot reaches shared storage before close returns
                self._push_snapshot_locked()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dataclasses.asdict(self._buf.stats())
            out["ingest_waits"] = self._limiter.waits
            out.update({f"rebuilt_{k}": v for k, v in self.rebuilt.items()})
            return out

    # --- snapshot and rebuild -----------------------------------------------------

    def _maybe_snapshot(self, force: bool = False) -> None:
        """Caller holds the lock."""
        if self._state_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._last_snapshot < self._cfg.snapshot_every_s:
            return
        self._last_snapshot = now
        parts = [_held(e, False) for e in self._buf.window_entries()]
        parts += [_held(e, True) for e in self._buf.reservoir_entries()]
        write_snapshot(self._state_dir, Snapshot(parts, self._newest_seq, open=dict(self._open)))
        if self._store is not None and self._pushing.acquire(blocking=False):
            # off the lock: samplers must not wait on the object store's latency
            threading.Thread(target=self._push_snapshot, name="push-snapshot", daemon=True).start()

    def _push_snapshot(self) -> None:
        try:
            self._push_snapshot_locked()
        finally:
            self._pushing.release()

    def _push_snapshot_locked(self) -> None:
        try:
            self._store.put_file(Path(self._state_dir) / SNAPSHOT_FILE, SNAPSHOT_FILE)
        except OSError as e:
            print(f"livetrain: buffer: could not push its snapshot to {self._store.cfg.uri}: {e}", file=sys.stderr)

    def _rebuild(self, schema: SchemaConfig, rows_per_part: int) -> None:
        snap = read_snapshot(self._state_dir)
        ingested, partly = self._manifest.ingested(), self._manifest.partly_committed()
        self._newest_seq = max([r.seq for r in ingested + partly], default=-1)
        self._open = {r.name: (r.seq, r.rows_committed) for r in partly}
        for shard in plan_rebuild(snap, ingested, self._cfg.capacity_rows, partly, rows_per_part):
            if not shard.file_unchanged():
                self.rebuilt["rows_lost"] += sum(p.rows for p in (shard.starts or {}).values())
                continue
            try:
                for span, block in read_back(shard, schema, rows_per_part):
                    meta = BlockMeta(shard.shard, shard.seq, span.rows, span.nbytes, shard.written_at, time.time())
                    handle = BlockHandle(BlockRef(ray.put(block)), shard.shard, span.row_start, span.row_end)
                    held = shard.starts.get(span.row_start) if shard.starts is not None else None
                    if held is not None and held.in_reservoir:
                        self._buf.restore_to_reservoir(handle, meta, held.sampled)
                    else:
                        self._buf.add(handle, meta)
                        if held is not None and held.sampled:
                            self._buf.mark_seen(self._buf.window_entries()[-1])
                    self.rebuilt["blocks"] += 1
                    self.rebuilt["rows"] += span.rows
            except (SchemaError, OSError, BlockTooLarge) as e:  # the buffer comes up without the rest of it
                self.rebuilt["shards_unreadable"] += 1
                print(f"livetrain: buffer: could not read {shard.shard} back ({e}): rebuilt without it", file=sys.stderr)
                continue
            self.rebuilt["shards"] += 1
        self._maybe_snapshot(force=True)


def _held(e: Entry[BlockHandle], in_reservoir: bool) -> HeldPart:
    m, h = e.meta, e.handle
    return HeldPart(m.shard, m.seq, h.row_start, h.row_end, m.rows, m.nbytes, m.written_at, in_reservoir, e.sampled)
