"""Ingest: IngestActor (read -> validate -> quarantine -> blocks) and the
IngestLoop that drives it.

Ownership: the loop calls ``IngestActor.read_shard`` (a streaming generator:
one *chunk* object per read of the file, holding the good rows of up to
``CHUNK_BLOCKS`` blocks, each followed by a small ``Chunk`` item naming
them; then the verdict) and keeps the yielded references, so the loop's
process (the driver) owns every chunk, not the ingest actor: an ingest actor
may die without taking blocks with it. Each block travels as a ``BlockRef``
(the chunk's ref and its rows in it) to the registry (test) and the buffer
(train), unresolved. One object per read, not per block: each object costs
Ray ~1-1.5 ms of CPU across the actor, the driver, the raylet and the
buffer (created, sealed, reported, borrowed), which on 2 cores was ~10% of
the ingest rate.

Discovery: each polled file is hashed on one thread of the loop's process
(the manifest's content hash releases the GIL), a few shards ahead, and
registered in the manifest in landing order once hashed, so a backlog's
hashing never holds up claims and reads.

Exactly once: a shard is claimed in the manifest; the buffer accepts all of
its blocks at once and marks it ingested in the same call
(``ReplayBufferActor.add_shards``, which takes every shard finished since its
last call: one round trip and one manifest transaction for several shards).
An actor that dies mid-shard voids the blocks it yielded after the last
committed part (they are dropped, never added) and the shard is read again
by a fresh actor from its row watermark. A crash of the whole process leaves
the shard ``claimed``; ``Manifest.requeue_claimed`` at start-up puts it back,
watermark kept. Arrival order: shards are finished in claim (``seq``) order,
whatever actor read them. A file rewritten after it was hashed (a writer that
does not rename into the landing directory) is read as it is and its record
takes the new bytes, so a rebuild of the buffer finds it unchanged; once rows
of the old file went in, it is quarantined whole instead (``read_shard``).
An I/O error reading a remote shard is a failed read, retried, not a bad file.

Memory: the actor streams chunks at most ``BACKPRESSURE_PARTS`` items
ahead of the loop. A shard with more than ``ingest.commit_rows`` rows is
committed in parts while it is read: a chunk ends after every k blocks (k
fixed per read) and its ``Chunk`` says a part ends there; when nothing older
waits for the buffer, the head shard's parts read so far go to the buffer,
which moves the shard's row watermark in the manifest in the same call, and
the loop lets go of their refs. So the driver holds about ``commit_rows``
rows of a shard at a time, not the whole shard, and no chunk spans two
parts. A re-read validates the whole file again (its quarantine file covers
the whole shard) but yields only the blocks past the watermark, and the
buffer skips any block below it (a retried call after its restart). A shard
that turns unreadable after parts went in is quarantined whole: the buffer
takes its parts out again (``withdraw_shard``; a part still on its way is
refused by the manifest), so a re-ingest after the fix reads it whole
without repeating a row, and the reason names the rows taken out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from livetrain.actors.blocks import PartSpan, ShardCommit, block_nbytes, block_of, label_index, part_rows
from livetrain.actors.manifest import Fingerprint, Manifest, ShardRecord, file_hash
from livetrain.actors.quarantine import list_quarantine, reingest, write_quarantine
from livetrain.actors.schema import Part, SchemaError, iter_reads, warm_up
from livetrain.actors.sources import DirectorySource
from livetrain.actors.store_memory import SYNC_BYTES, prefault_object_store
from livetrain.config import Config, SchemaConfig, StorageConfig
from livetrain.messages import BlockMeta, BlockRef
from livetrain.storage import configure as configure_storage
from livetrain.storage import shard_name, shard_path, shard_stat

__all__ = ["IngestActor", "IngestLoop", "IngestResult", "IngestCounters", "label_index"]

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
"""Reads of one shard that may fail (actor died, unexpected error) before it is quarantined whole."""
HASH_POLL_S = 0.005
"""How long a step waits on the actors while a landed shard is being hashed."""
KEEP_READERS = 10_000
"""``IngestCounters.readers`` entries kept."""
BACKPRESSURE_PARTS = 4
"""Items (two per chunk) an ingest actor may yield ahead of the loop taking them: bounds its object-store use."""
CHUNK_BLOCKS = 8
"""Blocks one chunk object holds at most: a chunk stays in the object store until its
last block leaves the buffer, so this bounds what the buffer's byte count may miss."""


@dataclass(frozen=True)
class Chunk:
    """The item after each chunk object of ``read_shard``'s stream: the blocks in it, in
    order (block i is the chunk's rows after those of blocks 0..i-1), and whether a part
    ends with it (``progress_blocks``: the loop may commit the blocks so far before the
    shard ends). Small: it travels inline with the stream's report."""

    spans: list[PartSpan]
    part_end: bool = False


@dataclass(frozen=True)
class IngestResult:
    """The last item of ``read_shard``'s stream: the verdict on one shard."""

    shard: str
    good_rows: int
    """The whole file's, also when the read resumed after committed parts."""
    bad_rows: int
    spans: list[PartSpan]
    """Of the blocks that go to the buffer with this verdict, in order: the loop fills it
    in from the ``Chunk`` items (the actor sends it empty)."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Per-row quarantine reason -> rows."""
    error: str | None = None
    """Set when the shard was quarantined whole; the yielded blocks are void."""
    reader: str = ""
    """Which actor read it (``host:pid``)."""
    rewritten: Fingerprint | None = None
    """Set when the file was rewritten with other bytes after it was hashed, before it
    was opened: the rows are the new file's, and its record must say so."""


def chunks_of(read: Part, rows_per_part: int, resume_from: int = 0, progress_blocks: int = 0,
              blocks_before: int = 0) -> list[tuple[list[Part], bool]]:
    """How ``read_shard`` sends one validated read: its parts (blocks) with good rows from
    file row ``resume_from`` on, grouped into chunks of at most ``CHUNK_BLOCKS``, a chunk
    ending where a part does (every ``progress_blocks`` blocks of the stream, counting
    the ``blocks_before`` sent before this read); each with whether a part ends there."""
    # from the watermark on (cut inside a part when the part layout changed since)
    parts = [p.from_row(resume_from) for p in read.split(rows_per_part) if p.row_end > resume_from]
    parts = [p for p in parts if p.good_rows]
    out: list[tuple[list[Part], bool]] = []
    chunk: list[Part] = []
    for i, part in enumerate(parts):
        chunk.append(part)
        part_end = bool(progress_blocks) and (blocks_before + i + 1) % progress_blocks == 0
        if part_end or len(chunk) == CHUNK_BLOCKS or i == len(parts) - 1:
            out.append((chunk, part_end))
            chunk = []
    return out


class Rewriting(Exception):
    """The file changed while its bytes were being compared with its record."""


def rewritten(path: str, size: int, mtime_ns: int, digest: str, algorithm: str) -> Fingerprint | None:
    """None when ``path`` holds the bytes its record names (same size and mtime, or,
    when those moved, as after a ``touch``, the same hash); else the file's new
    ``Fingerprint``. FileNotFoundError when it is gone; ``Rewriting`` when it
    changes while it is hashed."""
    stat = shard_stat(path)
    if stat == (size, mtime_ns):
        return None
    new = file_hash(path, algorithm)
    if shard_stat(path) != stat:
        raise Rewriting(path)
    return None if new == digest else Fingerprint(*stat, new)


INGEST_ACTOR_CPUS = 0.25
"""Logical CPUs each ingest actor reserves (a local Ray is sized to fit them)."""


@ray.remote(num_cpus=INGEST_ACTOR_CPUS, max_restarts=-1)
class IngestActor:
    def __init__(self, schema: SchemaConfig, state_dir: str, rows_per_part: int,
                 storage: StorageConfig | None = None, prefault_bytes: int = 0,
                 prefault_sync_bytes: int = SYNC_BYTES) -> None:
        if storage is not None:
            configure_storage(storage)  # shards on s3://: this process opens them with the cluster's endpoint
        self._schema = schema
        self._state = Path(state_dir)
        self._rows_per_part = rows_per_part
        self._me = f"{socket.gethostname()}:{os.getpid()}"
        warm_up()
        first = min(prefault_bytes, prefault_sync_bytes)
        self.prefaulted = prefault_object_store(first)
        """Bytes of the object store mapped in so far (``ingest.prefault_store``): the
        first ``prefault_sync_bytes`` before it takes work, the rest on a thread."""
        self.prefaulting: threading.Thread | None = None
        if prefault_bytes > first and self.prefaulted == first:
            self.prefaulting = threading.Thread(target=self._prefault_rest, args=(first, prefault_bytes),
                                                name="prefault", daemon=True)
            self.prefaulting.start()

    def _prefault_rest(self, begin: int, end: int) -> None:
        self.prefaulted += prefault_object_store(end, begin)

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE_PARTS)
    def read_shard(self, path: str, name: str, resume_from: int = 0, progress_blocks: int = 0,
                   claimed: tuple[int, int, str, str] | None = None):
        """Yield the good rows from file row ``resume_from`` on (the rows before it were
        committed in parts) as chunks: one object per read (``schema.iter_reads``) holding
        its blocks (at most ``CHUNK_BLOCKS``; a chunk ends where a part of
        ``progress_blocks`` blocks does, 0: no parts), each followed by its ``Chunk``;
        then an ``IngestResult``.

        Validation covers the whole file whatever ``resume_from``: bad rows are
        written to quarantine at the end (one file per shard, replaced on a
        retry); a shard that cannot be used at all is quarantined whole.

        ``claimed``: the record's size, mtime, content hash and hash algorithm. A
        file rewritten since (a writer that does not rename into the landing
        directory) is read as it is now and the verdict carries its
        ``rewritten`` fingerprint, unless rows of the old file went in already
        (``resume_from``): then it is quarantined whole, as is a file that
        changes while it is compared.
        """
        bad: list[pa.Table] = []
        reasons: dict[str, int] = {}
        good = blocks = 0
        new: Fingerprint | None = None
        try:
            if claimed is not None:
                new = self._rewritten(path, claimed, resume_from)
            for read in iter_reads(path, self._schema, self._rows_per_part):
                if read.bad is not None:
                    bad.append(read.bad)
                    for r, n in read.reasons.items():
                        reasons[r] = reasons.get(r, 0) + n
                good += read.good_rows
                for chunk, part_end in chunks_of(read, self._rows_per_part, resume_from, progress_blocks, blocks):
                    blocks += len(chunk)
                    yield from self._chunk(read, chunk, part_end)
        except SchemaError as e:
            write_quarantine(self._state, name, None, str(e), shard_path(path))
            yield IngestResult(name, 0, 0, [], {}, str(e), self._me)
            return
        table = pa.concat_tables(bad) if bad else None
        if table is not None:
            write_quarantine(self._state, name, table, None, shard_path(path))
        yield IngestResult(name, good, 0 if table is None else table.num_rows, [], reasons, None, self._me, new)

    @staticmethod
    def _rewritten(path: str, claimed: tuple[int, int, str, str], resume_from: int) -> Fingerprint | None:
        """``rewritten`` for ``read_shard``; raises ``SchemaError`` for a shard it must quarantine."""
        try:
            new = rewritten(path, *claimed)
        except FileNotFoundError:
            return None  # gone: the read says so
        except Rewriting:
            raise SchemaError("its file changed while it was compared with its record; "
                              "write shards elsewhere and rename them into the landing directory") from None
        if new is not None and resume_from:
            raise SchemaError("its file was rewritten with other bytes while it went in by parts")
        return new

    def _chunk(self, read: Part, parts: list[Part], part_end: bool):
        """One object for ``parts`` (adjacent views of ``read``: no copy), then its ``Chunk``."""
        block = block_of(read.between(parts[0].row_start, parts[-1].row_end), self._schema.classes)
        per_row = block_nbytes(block) // len(block["y"])
        yield block
        yield Chunk([PartSpan(p.row_start, p.row_end, p.good_rows, p.good_rows * per_row) for p in parts], part_end)


@dataclass
class IngestCounters:
    rows_ingested: int = 0
    rows_quarantined: int = 0
    shards_ingested: int = 0
    shards_quarantined: int = 0
    shards_retried: int = 0
    """Reads sent again because a reader died: the shard it was reading, and those queued behind it."""
    shards_duplicate: int = 0
    """Deliveries of bytes already known: same content under another name, or rewritten in place."""
    shards_changed_in_place: int = 0
    """Known shards rewritten with other bytes: recorded, not read again."""
    shards_reread: int = 0
    """Shards quarantined whole (nothing of them in the buffer) and then rewritten:
    read again, as a half-written file is once its writer finishes."""
    reasons: dict[str, int] = field(default_factory=dict)
    readers: dict[str, str] = field(default_factory=dict)
    """Shard -> the actor that read it (last read), for the newest ``KEEP_READERS``
    shards; for tests and debugging."""


@dataclass
class _InFlight:
    record: ShardRecord
    gen: Any  # ObjectRefGenerator
    actor: int
    committed_upto: int = 0
    """The shard's row watermark: file rows before it are in the buffer (parts committed)."""
    handle: Any = None
    """The ingest actor reading it (``actor`` is its slot, which a replacement takes over)."""
    items: list[Any] = field(default_factory=list)
    """Refs of the stream not taken apart yet: a chunk waiting for its ``Chunk``, or the verdict."""
    blocks: list[BlockRef] = field(default_factory=list)
    spans: list[PartSpan] = field(default_factory=list)
    """The blocks read since the last part ended, and where they came from."""
    parts: list[tuple[list[BlockRef], list[PartSpan]]] = field(default_factory=list)
    """Parts read whole (blocks, spans), not committed yet."""
    parts_taken: bool = False
    """Some parts went to the buffer (answered or not)."""
    finished: bool = False


@dataclass
class _Ready:
    """A shard read whole, waiting for the buffer: its verdict and its blocks (refs)."""

    record: ShardRecord
    result: IngestResult
    blocks: list[Any]
    observed: bool = False
    """The registry has scored its blocks (not again when the limiter refuses it once)."""
    part: bool = False
    """A part of a shard still being read (``ingest.commit_rows``), not the whole of it."""


@dataclass
class _Commit:
    """The one batch of ready shards on its way to the buffer: observed, then committed."""

    shards: list[_Ready]
    observing: list[Any]
    """Registry ``observe`` calls that must finish first (test before train)."""
    call: Any = None
    """The ``add_shards`` call, once sent."""


class IngestLoop:
    """Landing dir -> manifest -> ingest actors -> registry (test) -> buffer (train).

    ``step`` never blocks on the buffer: ready shards (finished in claim
    order) go to the buffer together in one ``add_shards`` call while the
    actors read on; one such batch is outstanding at a time, which keeps the
    buffer's arrival order. Shards claimed, being read, ready or committing
    together stay within ``ingest.max_in_flight``, so a buffer that makes
    ingestion wait (``coverage``) stops new claims.
    """

    def __init__(self, cfg: Config, manifest: Manifest, buffer: Any, registry: Any | None) -> None:
        if cfg.schema.infer:
            raise ValueError("IngestLoop needs a concrete schema: resolve schema.infer first (actors/schema_pin.py)")
        self.cfg = cfg
        self.manifest = manifest
        self.buffer = buffer
        self.registry = registry
        self.source = DirectorySource(cfg.landing_dir, cfg.source.recheck_every_s)
        self.counters = IngestCounters()
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        b = cfg.buffer
        self._rows_per_part = part_rows(cfg.ingest.block_rows, b.capacity_rows, b.capacity_bytes, cfg.schema)
        self._actors = [self._new_actor() for _ in range(cfg.ingest.num_actors)]
        self._next_actor = 0
        self._attempts: dict[str, int] = {}
        self._in_flight: OrderedDict[str, _InFlight] = OrderedDict()
        self._ready: list[_Ready] = []
        self._commit: _Commit | None = None
        self._landed: deque[Path | str] = deque()
        """Polled, not yet hashed."""
        self._hashing: OrderedDict[Path | str, Future] = OrderedDict()
        """Being hashed on a thread, in landing order; registered in the manifest as a finished prefix."""
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livetrain-hash")
        self._lister = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livetrain-list")
        self._listing: Future | None = None
        """A remote landing directory's listing on its way (one request per 1,000 objects: seconds
        once the shards pile up), so it never stalls the loop."""
        self._stop = threading.Event()
        self.manifest.requeue_claimed()

    def _new_actor(self) -> Any:
        state = str(Path(self.cfg.state_dir).resolve())
        # beside the driver: the landing dir and the quarantine are on its disk
        # unless they live on shared storage
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return IngestActor.options(scheduling_strategy=here).remote(
            self.cfg.schema, state, self._rows_per_part, self.cfg.storage,
            int(self.cfg.ingest.prefault_store * self.cfg.buffer.capacity_bytes),
        )

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop``; the landing directory is listed every ``source.poll_interval_s``
        at most, however often blocks come back (a listing costs time in proportion to the
        files there, and the shard files pile up: they are the log)."""
        self._stop = stop
        interval = self.cfg.source.poll_interval_s
        poll_at = 0.0
        while not stop.is_set():
            now = time.monotonic()
            poll = now >= poll_at
            if poll:
                poll_at = now + interval
            self.step(wait_s=interval, poll=poll)

    def step(self, wait_s: float = 0.0, poll: bool = True) -> None:
        """Discover (list the landing directory if ``poll``), claim, dispatch, take ready
        blocks, finish shards in claim order, commit."""
        self._discover(poll)
        busy = len(self._in_flight) + len(self._ready) + (len(self._commit.shards) if self._commit else 0)
        free = self.cfg.ingest.max_in_flight - busy
        if free > 0:
            for rec in self.manifest.claim(self.owner, free):
                self._dispatch(rec)
        waits = [f.gen for f in self._in_flight.values() if not f.finished and not f.parts]
        if self._commit is not None:
            waits += [self._commit.call] if self._commit.call is not None else self._commit.observing
        if not waits and not self._in_flight and not self._ready:
            if self._hashing:  # a shard is being hashed: register it as soon as it is done
                futures_wait([next(iter(self._hashing.values()))], timeout=wait_s)
            elif self._listing is not None:  # taken as soon as it is in
                futures_wait([self._listing], timeout=wait_s)
            elif wait_s:
                time.sleep(wait_s)  # the landing directory's polling interval
            return
        if waits:  # not the whole interval while a shard is hashed: it is claimed next step
            ray.wait(waits, num_returns=1, timeout=min(wait_s, HASH_POLL_S) if self._hashing else wait_s)
        for f in self._in_flight.values():
            self._drain(f)
        while self._in_flight:  # the head first: keeps arrival order in the buffer
            name, head = next(iter(self._in_flight.items()))
            if not head.finished or self._part_pending(name):
                break
            del self._in_flight[name]
            self._finish(head)
        self._take_parts()
        self._advance_commit()

    def unregistered(self) -> int:
        """Shards polled but not in the manifest yet (waiting to be hashed, or being hashed);
        a remote listing on its way counts as one."""
        return len(self._landed) + len(self._hashing) + (self._listing is not None)

    def held_refs(self) -> int:
        """Blocks the loop holds now, read or waiting for the buffer (tests: memory bound)."""
        return (sum(len(f.blocks) + sum(len(bs) for bs, _ in f.parts) for f in self._in_flight.values())
                + sum(len(r.blocks) for r in self._waiting()))

    def committing(self) -> int:
        """Shards read whose batch the loop has not had answered by the buffer yet: the
        buffer may have marked them ingested, the counters count them once answered (tests)."""
        return len(self._ready) + (len(self._commit.shards) if self._commit is not None else 0)

    def in_flight(self) -> dict[str, int]:
        """Shard -> blocks taken so far, for shards being read (tests)."""
        return {n: len(f.blocks) + sum(len(bs) for bs, _ in f.parts) for n, f in self._in_flight.items()}

    # --- internals ---------------------------------------------------------------

    def _listed(self, poll: bool) -> list[Path] | list[str]:
        """What the source reports: a local directory is listed here (~10 ms for 20,000
        files); a remote one on a thread, its result taken at a later step."""
        if not self.source.remote:
            return self.source.poll() if poll else []
        if poll and self._listing is None:
            self._listing = self._lister.submit(self.source.poll)
        if self._listing is None or not self._listing.done():
            return []
        listing, self._listing = self._listing, None
        return listing.result()  # a failed listing raises here, as a local one would

    def _discover(self, poll: bool = True) -> None:
        paths = self._listed(poll)
        if paths:
            self._landing(paths)
        # hash ahead on a thread (the hash releases the GIL), a few shards at a time in
        # landing order, so the loop keeps dispatching while a backlog is hashed
        while self._landed and len(self._hashing) < 2 * self.cfg.ingest.max_in_flight:
            p = self._landed.popleft()
            self._hashing[p] = self._hasher.submit(self.manifest.fingerprint, p)  # stat, then hash
        hashed: dict[Path | str, Fingerprint] = {}
        while self._hashing and next(iter(self._hashing.values())).done():
            p, future = self._hashing.popitem(last=False)
            try:
                hashed[p] = future.result()
            except FileNotFoundError:  # gone before it was hashed: never registered, nothing to read
                log.warning("livetrain: %s disappeared before it was registered", shard_name(p))
        if not hashed:
            return
        for rec in self.manifest.discover(list(hashed), {shard_name(p): d for p, d in hashed.items()}):
            if rec.status == "duplicate":
                self.counters.shards_duplicate += 1
                log.warning("livetrain: %s has the same bytes as %s: recorded as a duplicate", rec.name, rec.duplicate_of)

    def _landing(self, paths: list[Path] | list[str]) -> None:
        """Files the source reports: redeliveries are recorded, new ones queued for hashing."""
        for event in self.manifest.redelivered(paths):
            if event.refreshed:
                log.info("livetrain: %s changed before it was read: registered with its new bytes", event.name)
            elif event.same_content:
                self.counters.shards_duplicate += 1
                log.warning("livetrain: %s was delivered again with the same bytes: ignored", event.name)
            elif event.status == "quarantined" and self._reread_whole(event.name):
                self.counters.shards_reread += 1
                log.warning("livetrain: %s, quarantined whole, was rewritten: read again", event.name)
            elif event.status == "claimed":  # its reader compares the file with its record (read_shard)
                self.counters.shards_changed_in_place += 1
                log.warning("livetrain: %s was rewritten while it was claimed: if its reader had not opened it yet, "
                            "the new bytes are read; else they are not", event.name)
            else:
                self.counters.shards_changed_in_place += 1
                log.warning("livetrain: %s was rewritten with other bytes after discovery: not read again", event.name)
        known = self.manifest.known_names(shard_name(p) for p in paths)
        self._landed.extend(p for p in paths if shard_name(p) not in known)

    def _reread_whole(self, name: str) -> bool:
        """Send a shard quarantined whole, and since rewritten, through ingestion again.

        Nothing of it is in the buffer, so no row can be trained on twice. A file
        written in place rather than renamed into the landing directory is first
        seen half-written (a Parquet file without its footer: unreadable); this is
        how it still goes in once complete. A remote landing directory's objects
        appear whole, and ``livetrain quarantine --reingest`` stays the way there.
        """
        rec = self.manifest.get(name)
        if self.source.remote or rec is None or rec.rows_committed or rec.good_rows:
            return False
        entry = next((e for e in list_quarantine(self.cfg.state_dir) if e.shard == name and e.error is not None), None)
        if entry is None:
            return False
        reingest(self.cfg.state_dir, self.cfg.landing_dir, entry, self.manifest)
        return True

    def _dispatch(self, rec: ShardRecord, actor: int | None = None, resume_from: int | None = None) -> None:
        i = self._next_actor % len(self._actors) if actor is None else actor
        self._next_actor += actor is None
        upto = rec.rows_committed if resume_from is None else resume_from
        every = -(-self.cfg.ingest.commit_rows // self._rows_per_part) if self.cfg.ingest.commit_rows else 0
        claimed = (rec.size, rec.mtime_ns, rec.content_hash, self.manifest.hash_algorithm)
        gen = self._actors[i].read_shard.remote(str(rec.path), rec.name, upto, every, claimed)
        self._in_flight[rec.name] = _InFlight(rec, gen, i, upto, handle=self._actors[i])

    def _drain(self, f: _InFlight) -> None:
        # a part waiting for the buffer stops the draining: the actor then stops
        # BACKPRESSURE_PARTS items ahead, and the shard's blocks in the store stay ~2 parts
        while not f.finished and not f.parts and f.gen.next_ready():
            try:
                item = next(f.gen)
            except StopIteration:  # next_ready() can be True at the end of the stream
                f.finished = True
                break
            f.items.append(item)
            if len(f.items) < 2:
                continue  # a chunk (its Chunk follows) or the verdict (the stream ends)
            try:
                chunk = ray.get(item)  # ready, small: it came inline with the stream's report
            except ray.exceptions.RayError:  # the actor died or raised: _finish retries
                f.finished = True
                break
            ref, lo = f.items[0], 0
            for span in chunk.spans:
                f.blocks.append(BlockRef(ref, lo, lo + span.rows))
                lo += span.rows
            f.spans += chunk.spans
            f.items = []
            if chunk.part_end:
                f.parts.append((f.blocks, f.spans))
                f.blocks, f.spans = [], []
        f.finished = f.finished or f.gen.is_finished()

    def _waiting(self) -> list[_Ready]:
        """Shards and parts read whole, waiting for the buffer or on their way to it."""
        return self._ready + (self._commit.shards if self._commit is not None else [])

    def _part_pending(self, name: str) -> bool:
        """A part of ``name`` waits for the buffer (its shard is not finished before it is answered)."""
        return any(r.part and r.record.name == name for r in self._waiting())

    def _take_parts(self) -> None:
        """The head shard's parts read so far become one commit, once nothing older waits:
        a large shard enters the buffer while it is read, and its refs are let go."""
        if not self._in_flight or self._ready or self._commit is not None:
            return
        f = next(iter(self._in_flight.values()))
        if not f.parts:
            return
        spans = [s for _, ss in f.parts for s in ss]
        blocks = [b for bs, _ in f.parts for b in bs]
        f.parts, f.parts_taken = [], True
        result = IngestResult(f.record.name, sum(s.rows for s in spans), 0, spans)
        self._ready.append(_Ready(f.record, result, blocks, part=True))

    def _finish(self, f: _InFlight) -> None:
        rec, c = f.record, self.counters
        try:
            if len(f.items) != 1:
                raise RuntimeError("the stream ended without a verdict")
            result = ray.get(f.items[0])
            if not isinstance(result, IngestResult):
                raise RuntimeError("the stream ended without a verdict")
        except (ray.exceptions.RayError, RuntimeError) as e:  # the ingest actor died mid-shard
            self._retry(f, e)
            return
        if result.rewritten is not None and result.error is None:
            rec = self._take_new_bytes(f, result.rewritten)
            if rec.status == "duplicate":
                return
        # with the parts read but not committed yet (they go in with the rest)
        blocks = [b for bs, _ in f.parts for b in bs] + f.blocks
        result = dataclasses.replace(result, spans=[s for _, ss in f.parts for s in ss] + f.spans)
        c.readers[rec.name] = result.reader
        if len(c.readers) > 2 * KEEP_READERS:  # a run may last months: keep the newest (dicts keep order)
            c.readers = dict(list(c.readers.items())[-KEEP_READERS:])
        self._attempts.pop(rec.name, None)
        for reason, n in result.reasons.items():
            c.reasons[reason] = c.reasons.get(reason, 0) + n
        if result.error is not None:
            self._quarantine_whole(f, result.error)  # the actor wrote its quarantine record
            key = result.error.split(":")[0]
            c.reasons[key] = c.reasons.get(key, 0) + 1
        elif result.good_rows:
            self._ready.append(_Ready(rec, result, blocks))
        else:
            self.manifest.mark_ingested(rec.name, 0, result.bad_rows)
            self._count_ingested(result)

    def _take_new_bytes(self, f: _InFlight, new: Fingerprint) -> ShardRecord:
        """``f``'s file was rewritten after it was hashed and its reader read the new
        bytes: its record takes them, so a rebuild of the buffer finds the file
        unchanged. If another shard has them and none of ``f``'s rows went in yet,
        it is that shard's duplicate: its blocks are dropped."""
        name = f.record.name
        rec, taken_back = self.manifest.rewritten_before_read(
            name, *new, may_be_duplicate=not (f.parts_taken or f.committed_upto))
        if taken_back:  # a poll counted the new bytes as not read: they are, after all
            self.counters.shards_changed_in_place = max(0, self.counters.shards_changed_in_place - 1)
        if rec.status == "duplicate":
            self.counters.shards_duplicate += 1
            self._attempts.pop(name, None)
            log.warning("livetrain: %s was rewritten before it was read, with the bytes of %s: "
                        "recorded as a duplicate", name, rec.duplicate_of)
        else:
            log.info("livetrain: %s was rewritten after it was claimed: read and registered with its new bytes", name)
        return rec

    def _quarantine_whole(self, f: _InFlight, reason: str, record: bool = False) -> None:
        """Mark ``f``'s shard quarantined whole (``record``: write its quarantine record
        too); parts of it already in the buffer are taken out again."""
        rec = f.record
        parts_in = max(f.committed_upto, rec.rows_committed)
        if parts_in or f.parts_taken:
            reason += (f" (its rows before file row {parts_in} had gone into the buffer in parts"
                       " and were taken out again)")
        if record:
            write_quarantine(self.cfg.state_dir, rec.name, None, reason, rec.path)
        self.manifest.mark_quarantined(rec.name, reason)
        if parts_in or f.parts_taken:
            # after the verdict is in the manifest, so a part still on its way is refused;
            # not waited on: a buffer that restarts meanwhile rebuilds without them anyway
            self.buffer.withdraw_shard.remote(rec.name)
        self.counters.shards_quarantined += 1

    def _advance_commit(self) -> None:
        """Answer the outstanding batch if the buffer has; start the next one when none is out."""
        if self._commit is not None:
            if self._commit.call is None:
                if self._commit.observing and ray.wait(self._commit.observing, num_returns=len(self._commit.observing), timeout=0)[1]:
                    return
                ray.get(self._commit.observing)  # surfaces a failed observe
                self._send(self._commit)
                return
            if ray.wait([self._commit.call], timeout=0)[1]:
                return
            answers = ray.get(self._commit.call)
            left = [r for r, a in zip(self._commit.shards, answers) if not a.accepted]
            for r, a in zip(self._commit.shards, answers):
                if a.accepted and r.part:
                    if (f := self._in_flight.get(r.record.name)) is not None:
                        f.committed_upto = max(f.committed_upto, r.result.spans[-1].row_end)
                elif a.accepted:
                    self._count_ingested(r.result)
            self._commit = None
            self._ready = left + self._ready  # refused by the limiter: first in the next batch
        if self._commit is None and self._ready and not self._stop.is_set():
            self._commit = _Commit(self._ready, self._observe(self._ready))
            self._ready = []
            if not self._commit.observing:
                self._send(self._commit)

    def _observe(self, shards: list[_Ready]) -> list[Any]:
        """The registry scores the batch's blocks before the buffer takes them (test
        before train): one call, so it sees them in arrival order (the registry is a
        threaded actor, whose calls may run in any order)."""
        if self.registry is None:
            return []
        now = time.time()
        metas, blocks = [], []
        for r in (r for r in shards if not r.observed):
            r.observed = True
            metas += [BlockMeta(r.record.name, r.record.seq, s.rows, s.nbytes, r.record.written_at, now)
                      for s in r.result.spans]
            blocks += r.blocks
        return [self.registry.observe_many.remote(metas, blocks)] if metas else []

    def _send(self, commit: _Commit) -> None:
        commit.observing = []
        commits = [
            ShardCommit(r.record.name, r.record.seq, r.record.written_at, r.result.good_rows, r.result.bad_rows,
                        r.result.spans, final=not r.part)
            for r in commit.shards
        ]
        commit.call = self.buffer.add_shards.remote(commits, [r.blocks for r in commit.shards])

    def _count_ingested(self, result: IngestResult) -> None:
        c = self.counters
        c.rows_quarantined += result.bad_rows
        c.rows_ingested += result.good_rows
        c.shards_ingested += 1

    def _retry(self, f: _InFlight, error: BaseException) -> None:
        """``f``'s stream broke (its actor died, or raised). An actor reads its shards in
        the order they were sent, which is the loop's order, and the loop finishes them
        head first: ``f`` is the first of its actor's shards to fail, the one it was
        reading. Only ``f``'s attempt counts. The shards sent to the same actor after it
        failed with it (or would, once it is killed): they are read again on its
        replacement, behind ``f`` and in the same order, with no attempt counted, so a
        shard that kills its reader is quarantined after ``MAX_ATTEMPTS`` and costs the
        others nothing. A replacement already made for an earlier death is not killed."""
        name = f.record.name
        self._attempts[name] = self._attempts.get(name, 0) + 1
        self.counters.shards_retried += 1
        behind: list[_InFlight] = []
        if self._actors[f.actor] is f.handle:
            try:
                ray.kill(f.handle)
            except Exception:
                pass
            self._actors[f.actor] = self._new_actor()
            behind = [g for g in self._in_flight.values() if g.handle is f.handle]
        if self._attempts[name] >= MAX_ATTEMPTS:
            self._quarantine_whole(f, f"ingest failed {MAX_ATTEMPTS} times: {str(error).strip().splitlines()[0][:200]}",
                                   record=True)
        else:
            # read it again at once, still claimed, from its watermark (parts committed stay), and
            # keep it at the head: arrival order holds
            self._dispatch(f.record, actor=f.actor, resume_from=f.committed_upto)
            self._in_flight.move_to_end(name, last=False)
        for g in behind:  # keeps its place in the loop's order
            self.counters.shards_retried += 1
            self._dispatch(g.record, actor=f.actor, resume_from=g.committed_upto)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Give back every shard the buffer did not take; a batch on its way is waited for first."""
        pending = [r.record.name for r in self._ready] + list(self._in_flight)  # release is idempotent
        if self._commit is not None:
            if self._commit.call is None:
                pending += [r.record.name for r in self._commit.shards]
            else:
                try:
                    answers = ray.get(self._commit.call, timeout=timeout_s)
                    pending += [r.record.name for r, a in zip(self._commit.shards, answers) if not a.accepted]
                except ray.exceptions.RayError:  # unknown outcome: leave them claimed (requeued at start-up)
                    log.warning("livetrain: the buffer did not answer the last commit; its shards stay claimed")
        self._hasher.shutdown(wait=True, cancel_futures=True)  # nothing registered from here on
        self._lister.shutdown(wait=False, cancel_futures=True)  # a listing on its way is dropped
        for name in pending:
            self.manifest.release(name)
        self._in_flight.clear()
        self._ready, self._commit = [], None
        for a in self._actors:
            ray.kill(a)
