"""What crosses from ingest to the buffer, and how the buffer is rebuilt. Pure: no Ray.

A shard's good rows arrive as one or more *parts* (record batches of at most
``ingest.block_rows`` rows); each part is one buffer block. The buffer accepts
a shard's parts together (``ShardCommit``) and marks the shard ingested in the
manifest in the same call, so a shard is in the buffer whole or not at all;
except a shard larger than ``ingest.commit_rows``, which goes in by parts
(``ShardCommit.final`` False), each moving its row watermark in the manifest.

``buffer_snapshot.json`` in the state dir says which parts the buffer held
(window and reservoir), the newest shard it had committed, and the shard it
was taking by parts then, with its watermark. A restarted buffer re-reads
exactly those parts from the shard files, plus every shard the manifest
marked ingested after the snapshot (newest first, until capacity), and the
parts committed since the snapshot of a shard that was going in by parts
then (up to its watermark now, or to its end if it is ingested now), so it
never holds a part twice and never holds a part the manifest does not name
as committed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from livetrain.config import SchemaConfig
from livetrain.storage import shard_stat

SNAPSHOT_FILE = "buffer_snapshot.json"
SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class PartSpan:
    """Where one block came from: file rows ``[row_start, row_end)`` of its shard."""

    row_start: int
    row_end: int
    rows: int
    """Good rows in the block (bad ones went to quarantine)."""
    nbytes: int


@dataclass(frozen=True)
class ShardCommit:
    """One shard ready for the buffer; its block refs travel beside it, in a list, in span order."""

    shard: str
    seq: int
    written_at: float
    good_rows: int
    bad_rows: int
    spans: list[PartSpan] = field(default_factory=list)
    final: bool = True
    """False: a part of a large shard (``ingest.commit_rows``): its blocks go in and the
    shard's row watermark moves to the last span's end; it stays claimed."""

    @property
    def block_rows(self) -> int:
        """Good rows in this commit's blocks (all of the shard's unless parts went before)."""
        return sum(s.rows for s in self.spans)


@dataclass(frozen=True)
class AddResult:
    """The buffer's answer to ``add_shard``."""

    accepted: bool
    """False: the rate limiter made ingestion wait; call again."""
    rows: int
    """Rows now held."""
    already_held: bool = False
    """The shard was already in the buffer (a retried call after a restart)."""


@dataclass(frozen=True)
class HeldPart:
    """One snapshot line: a block the buffer held."""

    shard: str
    seq: int
    row_start: int
    row_end: int
    rows: int
    nbytes: int
    written_at: float
    in_reservoir: bool
    sampled: int


@dataclass
class Snapshot:
    parts: list[HeldPart]
    newest_seq: int
    """Highest shard seq committed when the snapshot was taken."""
    saved_at: float = 0.0
    open: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Shards going in by parts when the snapshot was taken: name -> (seq, row
    watermark then). Their parts committed later are not in ``parts``."""


def write_snapshot(state_dir: str | Path, snap: Snapshot) -> None:
    """Atomic (temp file + rename); no fsync: a lost snapshot only makes the rebuild use the manifest."""
    target = Path(state_dir) / SNAPSHOT_FILE
    tmp = target.with_name(f".{SNAPSHOT_FILE}.{os.getpid()}.tmp")
    body = {"version": SNAPSHOT_VERSION, "saved_at": time.time(), "newest_seq": snap.newest_seq,
            "parts": [asdict(p) for p in snap.parts], "open": {k: list(v) for k, v in snap.open.items()}}
    tmp.write_text(json.dumps(body))
    os.replace(tmp, target)


def read_snapshot(state_dir: str | Path) -> Snapshot | None:
    """The last snapshot, or None when there is none or it cannot be parsed."""
    try:
        body = json.loads((Path(state_dir) / SNAPSHOT_FILE).read_text())
        if body.get("version") != SNAPSHOT_VERSION:
            return None
        # "open" came later: a snapshot without it names no shard going in by parts
        opened = {str(k): (int(v[0]), int(v[1])) for k, v in body.get("open", {}).items()}
        return Snapshot([HeldPart(**p) for p in body["parts"]], int(body["newest_seq"]), body["saved_at"], opened)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class RebuildShard:
    """Which parts of one ingested shard to read back (all of them when ``starts`` is None)."""

    shard: str
    path: str
    seq: int
    written_at: float
    size: int
    mtime_ns: int
    starts: dict[int, HeldPart] | None
    upto: int | None = None
    """A shard committed in parts, not yet whole: only its file rows before this one."""
    tail_from: int | None = None
    """Besides ``starts``: every file row from this one on (up to ``upto``), the parts
    committed after the snapshot of a shard that was going in by parts then."""

    def file_unchanged(self) -> bool:
        """The file on disk is the one that was ingested (size and mtime as recorded)."""
        try:
            return shard_stat(self.path) == (self.size, self.mtime_ns)
        except OSError:
            return False


def plan_rebuild(snapshot: Snapshot | None, ingested: list, capacity_rows: int,
                 partly: list | None = None, part_rows: int | None = None) -> list[RebuildShard]:
    """Shards to re-read, oldest first. ``ingested``: the manifest's ingested ``ShardRecord``s;
    ``partly``: shards still being committed in parts (each re-read up to its watermark);
    ``part_rows``: the rows a block may span now (a held block longer than that, from a
    run with a larger buffer or ``ingest.block_rows``, comes back as several, each
    where the block was: window or reservoir, drawn or not).

    Snapshot parts are kept only if their shard is still ingested (or still
    going in by parts) with the same file (size and mtime unchanged); a shard
    that was going in by parts at the snapshot also gets the parts committed
    since (``tail_from``); shards committed after the snapshot are added
    newest first until ``capacity_rows`` good rows.
    """
    partly = partly or []
    by_name = {r.name: r for r in [*ingested, *partly]}
    opened = snapshot.open if snapshot is not None else {}
    plan: dict[str, RebuildShard] = {}

    def entry(rec) -> RebuildShard:
        return plan.setdefault(rec.name, RebuildShard(rec.name, rec.path, rec.seq, rec.written_at, rec.size, rec.mtime_ns, {}))

    if snapshot is not None:
        for p in snapshot.parts:
            rec = by_name.get(p.shard)
            if rec is None or rec.seq != p.seq:
                continue
            for piece in _split(p, part_rows):
                entry(rec).starts[piece.row_start] = piece
        for name, (seq, mark) in opened.items():
            rec = by_name.get(name)
            if rec is not None and rec.seq == seq:
                plan[name] = replace(entry(rec), tail_from=mark)
    floor = snapshot.newest_seq if snapshot is not None else -1
    budget = capacity_rows
    for rec in sorted(ingested, key=lambda r: -r.seq):
        if rec.seq <= floor or budget <= 0:
            break
        plan[rec.name] = RebuildShard(rec.name, rec.path, rec.seq, rec.written_at, rec.size, rec.mtime_ns, None)
        budget -= rec.good_rows or 0
    for rec in partly:
        if rec.name in plan and plan[rec.name].tail_from is not None:  # held parts, then the rest to the watermark
            # none past it: a snapshot may be newer than the manifest (both restored from
            # storage.uri, pushed on their own cadences), and the rows past the watermark
            # are read again by ingestion
            held = {lo: p for lo, p in (plan[rec.name].starts or {}).items() if lo < rec.rows_committed}
            plan[rec.name] = replace(plan[rec.name], starts=held, upto=rec.rows_committed)
        else:  # no snapshot names it going in by parts: every part up to the watermark
            plan[rec.name] = RebuildShard(rec.name, rec.path, rec.seq, rec.written_at, rec.size, rec.mtime_ns, None,
                                          rec.rows_committed)
    return sorted(plan.values(), key=lambda s: s.seq)


def _split(p: HeldPart, part_rows: int | None) -> list[HeldPart]:
    span = p.row_end - p.row_start
    if part_rows is None or span <= part_rows:
        return [p]
    cuts = [*range(p.row_start, p.row_end, part_rows), p.row_end]
    return [replace(p, row_start=lo, row_end=hi, rows=-(-p.rows * (hi - lo) // span),
                    nbytes=-(-p.nbytes * (hi - lo) // span)) for lo, hi in zip(cuts, cuts[1:])]


def part_rows(block_rows: int, capacity_rows: int, capacity_bytes: int, schema: SchemaConfig) -> int:
    """Rows per block: ``ingest.block_rows``, capped so one block fits the buffer's row and byte bounds."""
    row_bytes = 4 * int(schema.num_features) + 8 + (8 if schema.id_column else 0)
    return max(1, min(block_rows, capacity_rows, capacity_bytes // row_bytes))


def block_of(part, classes: list[int]) -> dict[str, np.ndarray]:
    """A validated ``schema.Part`` as a buffer block: x, class-index y, and ids if any."""
    block = {"x": part.x, "y": label_index(part.y, classes)}
    if part.ids is not None:
        block["id"] = part.ids
    return block


def block_nbytes(block: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in block.values())


def read_back(shard: RebuildShard, schema: SchemaConfig, part_rows: int) -> Iterator[tuple[PartSpan, dict]]:
    """Re-read the blocks the plan names: the snapshot's spans as they were held (and
    every part from ``shard.tail_from`` on), or every part of the file; up to
    ``shard.upto`` if set (the part across it is cut there).

    Spans are rebuilt from the file rows they name, whatever ``part_rows`` is now: a
    restart may change ``ingest.block_rows`` or the buffer's bounds, and a block cut at
    a watermark (a re-read after such a change) starts inside a part anyway.
    """
    from livetrain.actors.schema import Part, iter_parts

    spans = None if shard.starts is None else sorted((p.row_start, p.row_end) for p in shard.starts.values())
    upto = shard.upto if shard.upto is not None else float("inf")
    tail = 0 if spans is None else shard.tail_from  # every row from here on (to ``upto``)
    pieces: list[Part] = []  # of the span being assembled, when it crosses parts
    i = 0
    for part in iter_parts(shard.path, schema, part_rows):
        done = []
        while spans is not None and i < len(spans) and spans[i][0] < part.row_end:
            lo, hi = spans[i]
            if hi > part.row_start:
                pieces.append(part.between(lo, hi))
            if hi > part.row_end:
                break  # goes on in the next part
            done.append(Part.join(pieces))
            pieces, i = [], i + 1
        if tail is not None and part.row_end > tail and part.row_start < upto:
            done.append(part.between(tail, upto))  # cut at either end, if they fall inside it
        for p in done:
            if p.good_rows:
                block = block_of(p, schema.classes)
                yield PartSpan(p.row_start, p.row_end, p.good_rows, block_nbytes(block)), block
        if (spans is None or i == len(spans)) and (tail is None or part.row_end >= upto):
            return


def label_index(y: np.ndarray, classes: list[int]) -> np.ndarray:
    """Map declared label values to class indices 0..C-1 (validated labels only)."""
    if list(classes) == list(range(len(classes))):
        return y
    order = np.argsort(classes)
    sorted_classes = np.asarray(classes)[order]
    return order[np.searchsorted(sorted_classes, y)].astype(np.int64)
