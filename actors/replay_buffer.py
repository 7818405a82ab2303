"""The replay buffer's logic: a plain class, no Ray.

The buffer holds *handles* to blocks (ObjectRefs in production, anything in
tests) with their lineage, never the rows. It keeps

- a recent FIFO window of the newest blocks (``window_rows``), and
- a reservoir: a uniform random sample of every block that ever left the
  window, kept by bottom-k sampling (each evicted block draws a random key;
  the smallest keys that fit the budget stay). Unlike Algorithm R this stays
  uniform when blocks differ in size and the budget is in rows *and* bytes.

Together they never exceed ``capacity_rows`` / ``capacity_bytes``. When the
window alone would exceed them, its oldest blocks are dropped; blocks that
were never sampled by then are counted as ``rows_evicted_unseen``.

``sample`` first returns the *fresh* blocks a caller has not been given yet
(oldest first, so every row is trained on at least once when training keeps
up), then fills up with a mix: ``recent_fraction`` from the window, the rest
from the reservoir, row-weighted within each.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Hashable
from typing import Generic, TypeVar

from livetrain.config import BufferConfig
from livetrain.messages import BlockMeta

H = TypeVar("H")


class BlockTooLarge(ValueError):
    """A single block is larger than the buffer's whole capacity."""


@dataclass
class Entry(Generic[H]):
    handle: H
    meta: BlockMeta
    sampled: int = 0
    chunk: Hashable | None = None
    """Blocks that live in one object together (added one after another) share it."""
    order: int = 0
    """Arrival order in this buffer."""


@dataclass
class BufferStats:
    blocks: int
    rows: int
    bytes: int
    window_blocks: int
    window_rows: int
    reservoir_blocks: int
    reservoir_rows: int
    rows_added: int
    rows_evicted: int
    rows_evicted_unseen: int
    rows_withdrawn: int
    """Rows of shards quarantined after some of their parts went in, taken out again."""
    newest_seq: int
    unseen_rows: int
    """Rows held that no caller has been given yet (what ``coverage`` bounds)."""


@dataclass(order=True)
class _Kept:
    neg_key: float  # heapq is a min-heap; the largest key is dropped first
    tie: int
    entry: Entry = field(compare=False)


class ReplayBuffer(Generic[H]):
    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self.recent_fraction = cfg.recent_fraction
        """Share of mixed draws from the window (a drift reaction may raise it)."""
        self.window_limit = cfg.window_rows
        """Rows the window may hold (a drift reaction may shorten it)."""
        self._rng = random.Random(cfg.seed)
        self._window: deque[Entry[H]] = deque()
        self._window_rows = 0
        self._window_bytes = 0
        self._reservoir: list[_Kept] = []
        self._reservoir_rows = 0
        self._reservoir_bytes = 0
        self._tie = itertools.count()
        self._arrivals = itertools.count()
        self._last_key: tuple[Hashable | None, float] = (None, 0.0)
        """The chunk the last block into the reservoir came from, and its key."""
        self.rows_added = 0
        self.rows_evicted = 0
        self.rows_evicted_unseen = 0
        self.rows_withdrawn = 0
        self.unseen_rows = 0
        self.newest_seq = -1

    # --- insertion -----------------------------------------------------------

    def add(self, handle: H, meta: BlockMeta, chunk: Hashable | None = None) -> list[Entry[H]]:
        """Insert a block; returns the entries that left the buffer for good.

        ``chunk``: the blocks of one chunk (added one after another) leave the
        window one after another and share one reservoir key, so they also leave
        the reservoir together and the chunk's memory goes with its last block."""
        if meta.rows > self.cfg.capacity_rows or meta.nbytes > self.cfg.capacity_bytes:
            raise BlockTooLarge(
                f"block of shard {meta.shard} ({meta.rows} rows, {meta.nbytes} bytes) exceeds "
                f"buffer capacity ({self.cfg.capacity_rows} rows, {self.cfg.capacity_bytes} bytes)"
            )
        self._window.append(Entry(handle, meta, chunk=chunk, order=next(self._arrivals)))
        self._window_rows += meta.rows
        self._window_bytes += meta.nbytes
        self.rows_added += meta.rows
        self.unseen_rows += meta.rows
        self.newest_seq = max(self.newest_seq, meta.seq)
        self._shrink_window()
        return self._enforce_capacity()

    def set_mix(self, recent_fraction: float, window_rows_scale: float = 1.0) -> None:
        """Drift reactions: the recent share of the sampling mix and a shorter
        window (blocks leaving the window join the reservoir draw)."""
        if not 0.0 <= recent_fraction <= 1.0 or not 0.0 < window_rows_scale <= 1.0:
            raise ValueError(f"set_mix: recent_fraction {recent_fraction} / window_rows_scale {window_rows_scale} out of range")
        self.recent_fraction = recent_fraction
        self.window_limit = max(1, int(self.cfg.window_rows * window_rows_scale))
        self._shrink_window()

    def _shrink_window(self) -> None:
        while self._window_rows > self.window_limit and len(self._window) > 1:
            self._to_reservoir(self._pop_window())

    def restore_to_reservoir(self, handle: H, meta: BlockMeta, sampled: int = 1) -> list[Entry[H]]:
        """Put back a block that was in the reservoir before a restart (rebuild only)."""
        self._to_reservoir(Entry(handle, meta, sampled, order=next(self._arrivals)))
        self.rows_added += meta.rows
        self.unseen_rows += meta.rows if sampled == 0 else 0
        self.newest_seq = max(self.newest_seq, meta.seq)
        return self._enforce_capacity()

    def withdraw(self, shard: str) -> list[Entry[H]]:
        """Take every block of ``shard`` out (a shard quarantined after some of its
        parts went in); returns them. Not counted as evicted."""
        from_window = [e for e in self._window if e.meta.shard == shard]
        if from_window:
            self._window = deque(e for e in self._window if e.meta.shard != shard)
            self._window_rows -= sum(e.meta.rows for e in from_window)
            self._window_bytes -= sum(e.meta.nbytes for e in from_window)
        from_reservoir = [k.entry for k in self._reservoir if k.entry.meta.shard == shard]
        if from_reservoir:
            self._reservoir = [k for k in self._reservoir if k.entry.meta.shard != shard]
            heapq.heapify(self._reservoir)
            self._reservoir_rows -= sum(e.meta.rows for e in from_reservoir)
            self._reservoir_bytes -= sum(e.meta.nbytes for e in from_reservoir)
        gone = from_window + from_reservoir
        for e in gone:
            self.rows_withdrawn += e.meta.rows
            if e.sampled == 0:
                self.unseen_rows -= e.meta.rows
        return gone

    def mark_seen(self, e: Entry[H]) -> None:
        """Count ``e`` as already drawn (a rebuilt block that was trained on before the restart)."""
        if e.sampled == 0:
            self.unseen_rows -= e.meta.rows
            e.sampled = 1

    def _pop_window(self) -> Entry[H]:
        e = self._window.popleft()
        self._window_rows -= e.meta.rows
        self._window_bytes -= e.meta.nbytes
        return e

    def _to_reservoir(self, e: Entry[H]) -> None:
        if e.chunk is None or e.chunk != self._last_key[0]:
            self._last_key = (e.chunk, self._rng.random())
        heapq.heappush(self._reservoir, _Kept(-self._last_key[1], next(self._tie), e))
        self._reservoir_rows += e.meta.rows
        self._reservoir_bytes += e.meta.nbytes

    def _over(self) -> bool:
        return (
            self._window_rows + self._reservoir_rows > self.cfg.capacity_rows
            or self._window_bytes + self._reservoir_bytes > self.cfg.capacity_bytes
        )

    def _enforce_capacity(self) -> list[Entry[H]]:
        dropped: list[Entry[H]] = []
        while self._over() and self._reservoir:
            e = heapq.heappop(self._reservoir).entry
            self._reservoir_rows -= e.meta.rows
            self._reservoir_bytes -= e.meta.nbytes
            dropped.append(e)
        while self._over() and len(self._window) > 1:
            dropped.append(self._pop_window())
        for e in dropped:
            self.rows_evicted += e.meta.rows
            if e.sampled == 0:
                self.rows_evicted_unseen += e.meta.rows
                self.unseen_rows -= e.meta.rows
        return dropped

    # --- sampling ------------------------------------------------------------

    def sample(self, n_blocks: int, fresh_after: int = -1, rank: int = 0, world: int = 1) -> list[Entry[H]]:
        """Up to ``n_blocks`` entries: unseen-by-caller blocks first, then the mix.

        Unseen blocks (newer than ``fresh_after``, or of that shard and never
        drawn by anyone) are taken oldest first from the whole buffer (window and reservoir): a
        backlog is trained in arrival order, so the newest rows stay unseen by
        the first candidate and the gate can judge it on them.

        ``rank`` of ``world`` callers (DDP ranks, each with its own
        ``fresh_after``): when more unseen blocks wait than one draw takes (a
        backlog), each rank takes only its share of them (every ``world``-th
        block by arrival), so the ranks work through a backlog side by side
        instead of all training on the same blocks. When they fit in one draw,
        every rank takes them all (fresh rows count ``world`` times in the
        global batch, as with one worker).
        """
        if not 0 <= rank < world:
            raise ValueError(f"sample: rank {rank} is not one of {world} callers")
        if n_blocks < 1 or self.empty:
            return []
        if self._window and self._window[0].meta.seq < fresh_after:
            pool = self._window  # the steady state: reservoir blocks are older than the window, all seen
        elif self._window and self._window[0].meta.seq == fresh_after:
            # the caller's newest shard straddles the window's edge (a shard of more blocks
            # than the window holds): its blocks in the reservoir may not have been drawn yet
            older = [k.entry for k in self._reservoir if k.entry.meta.seq == fresh_after]
            pool = sorted(older, key=lambda e: e.order) + list(self._window)
        else:
            pool = sorted(self.entries(), key=lambda e: (e.meta.seq, e.order))
        # a shard's blocks share its seq: those of the caller's newest shard that no one has
        # drawn yet are fresh too (a draw took only some of them, or a large shard's
        # later parts arrived since)
        fresh = [e for e in pool if e.meta.seq > fresh_after or (e.meta.seq == fresh_after and e.sampled == 0)]
        if world > 1 and len(fresh) > n_blocks:
            fresh = [e for e in fresh if e.order % world == rank]
        fresh = fresh[:n_blocks]
        n_mix = n_blocks - len(fresh)
        if not self._reservoir:
            n_recent = n_mix
        elif not self._window:
            n_recent = 0
        else:
            n_recent = sum(self._rng.random() < self.recent_fraction for _ in range(n_mix))
        picked = fresh + self._draw(list(self._window), n_recent)
        picked += self._draw([k.entry for k in self._reservoir], n_mix - n_recent)
        for e in picked:
            if e.sampled == 0:
                self.unseen_rows -= e.meta.rows
            e.sampled += 1
        return picked

    def _draw(self, pool: list[Entry[H]], k: int) -> list[Entry[H]]:
        if k <= 0:
            return []
        return self._rng.choices(pool, weights=[e.meta.rows for e in pool], k=k)

    # --- views ---------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return not self._window and not self._reservoir

    def entries(self) -> list[Entry[H]]:
        return list(self._window) + [k.entry for k in self._reservoir]

    def window_entries(self) -> list[Entry[H]]:
        return list(self._window)

    def reservoir_entries(self) -> list[Entry[H]]:
        return [k.entry for k in self._reservoir]

    def stats(self) -> BufferStats:
        return BufferStats(
            blocks=len(self._window) + len(self._reservoir),
            rows=self._window_rows + self._reservoir_rows,
            bytes=self._window_bytes + self._reservoir_bytes,
            window_blocks=len(self._window),
            window_rows=self._window_rows,
            reservoir_blocks=len(self._reservoir),
            reservoir_rows=self._reservoir_rows,
            rows_added=self.rows_added,
            rows_evicted=self.rows_evicted,
            rows_evicted_unseen=self.rows_evicted_unseen,
            rows_withdrawn=self.rows_withdrawn,
            newest_seq=self.newest_seq,
            unseen_rows=self.unseen_rows,
        )
