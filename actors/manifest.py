"""The manifest: which shard has been seen, claimed, ingested or quarantined.

One SQLite file in the state dir (``manifest.sqlite``), WAL mode, so several
processes on one machine (the watcher, ingest coordinators, the CLI) can open
it at once. Each ``Manifest`` holds its own connection; every write is one
``BEGIN IMMEDIATE`` transaction, which SQLite serialises across processes.

A shard's life::

    discovered ──claim──▶ claimed ──mark_ingested──▶ ingested
      ▲ │  ▲                 │
      │ │  └──release / requeue_claimed (crash mid-shard)
      │ │                    └──mark_quarantined──▶ quarantined
      │ ├──mark_quarantined (before any read)──▶ quarantined
      │ └─(same bytes as a shard already known)──▶ duplicate
      └── duplicate or discovered whose file changed before any read: its new bytes
          (a claimed one too, when its reader finds it changed: ``rewritten_before_read``)

A shard's bytes are identified by their hash (``Fingerprint``): the first
shard with them is their original; a later file with them is its duplicate
and never read. A shard quarantined whole is no original (nothing of it went
in), and when an original takes other bytes its first duplicate stands for
the old ones. A file touched or copied again with the same bytes keeps its
shard; the record takes its new size and mtime.

A shard larger than ``ingest.commit_rows`` is committed in parts while it
is read: each part moves its ``rows_committed`` watermark (file rows before
it are in the buffer), in the same transaction as the buffer takes the
part, and stays ``claimed``; a re-read after a crash resumes at the
watermark; the last part marks it ``ingested``.

Exactly once: a shard is ``ingested`` only after the buffer accepted its rows,
and at start-up every ``claimed`` shard goes back to ``discovered``, so a
crash between claim and acceptance means the shard is read again, never lost
and never counted twice. ``seq`` is assigned at discovery and only grows
(``AUTOINCREMENT``: never reused), so it orders data by arrival.

The ``meta`` table also pins the state dir's schema (``pin_schema``): the one
the first run declared or inferred; ``actors/schema_pin.py`` holds every later
run to it.

Content identity: each shard's bytes are hashed at discovery with the
algorithm pinned in ``meta`` (``content_hash``): XXH3-128 for a new state
dir; a state dir made earlier keeps the one it pinned (BLAKE3, or sha256
before that), so its hashes stay comparable.

Pure: sqlite3, hashlib, xxhash and blake3 only, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import blake3
import xxhash

from livetrain.storage import is_uri, read_shard_chunks, shard_name, shard_path, shard_stat

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.sqlite"
STATUSES = ("discovered", "claimed", "ingested", "quarantined", "duplicate")
SCHEMA_KEY, SCHEMA_SOURCE_KEY = "schema", "schema_source"
"""``meta`` keys of the pinned schema (JSON of its fields) and of where it came from."""
HASH_KEY = "content_hash"
"""``meta`` key of the state dir's content-hash algorithm."""
HASHES = ("xxh3_128", "blake3", "sha256")
"""XXH3-128 for new state dirs: a 128-bit digest (a chance collision among
a billion shards is ~1e-21) at ~2 ms of CPU per 12 MB shard here, read and
all, against ~4.6 ms for BLAKE3 and more for sha256; the hash runs on the
driver beside the ingest actors, so on 2 cores the difference is ingest
throughput. It is not cryptographic: a file crafted to collide with a shard
that has not arrived yet could have that shard dropped as its duplicate,
but crafting it needs that shard's bytes in advance and write access to the
landing directory, which can drop or rewrite the shard anyway. BLAKE3 and
sha256 stay for the state dirs that pinned them (BLAKE3 from 2026-11 to
2026-12-06, sha256 before)."""

_HASHERS = {"xxh3_128": xxhash.xxh3_128, "blake3": blake3.blake3, "sha256": hashlib.sha256}
_read_buffer = threading.local()
"""Each hashing thread's reusable read buffer (``file_hash``)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    path          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    content_hash  TEXT NOT NULL,
    status        TEXT NOT NULL,
    claimed_by    TEXT,
    claimed_at    REAL,
    good_rows     INTEGER,
    bad_rows      INTEGER,
    reason        TEXT,
    duplicate_of  TEXT,
    discovered_at REAL NOT NULL,
    updated_at    REAL NOT NULL,
    rows_committed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS shards_by_status ON shards (status, seq);
CREATE INDEX IF NOT EXISTS shards_by_hash ON shards (content_hash);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS redeliveries (
    name          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    content_hash  TEXT NOT NULL,
    same_content  INTEGER NOT NULL,
    at            REAL NOT NULL,
    PRIMARY KEY (name, size, mtime_ns)
);
"""
_COLUMNS = (
    "name, path, size, mtime_ns, content_hash, seq, status, claimed_by, claimed_at, "
    "good_rows, bad_rows, reason, duplicate_of, discovered_at, updated_at, rows_committed"
)


@dataclass(frozen=True)
class Redelivery:
    """A known shard's file changed on disk after discovery."""

    name: str
    same_content: bool
    """True: the same bytes again (a duplicate delivery); False: other bytes, not ingested."""
    status: str
    """The shard's status when it was seen again."""
    refreshed: bool = False
    """True: nothing of it had been read yet (``discovered`` or ``duplicate``), so the
    shard now stands for its new bytes (a file written in place, first seen unfinished)."""


class Fingerprint(NamedTuple):
    """What identifies a shard's file: its stat, taken before its bytes were hashed."""

    size: int
    mtime_ns: int
    digest: str


class ManifestError(ValueError):
    """A state change the manifest refuses (unknown shard, wrong status)."""


@dataclass(frozen=True)
class ShardRecord:
    """One shard as the manifest knows it."""

    name: str
    """File name; unique."""
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    """Hex digest of the file's bytes at discovery (``Manifest.hash_algorithm``)."""
    seq: int
    """Discovery order; strictly increasing, never reused."""
    status: str
    """One of ``STATUSES``."""
    claimed_by: str | None
    claimed_at: float | None
    good_rows: int | None
    bad_rows: int | None
    reason: str | None
    """Why the shard was quarantined whole (``quarantined`` only)."""
    duplicate_of: str | None
    """The earlier shard with the same content (``duplicate`` only)."""
    discovered_at: float
    updated_at: float
    rows_committed: int = 0
    """File rows ``[0, rows_committed)`` of a shard committed in parts are in the
    buffer already (a large shard still being read); a re-read resumes there."""

    @property
    def written_at(self) -> float:
        """The file's mtime, epoch seconds (``BlockMeta.written_at``)."""
        return self.mtime_ns / 1e9


def file_hash(path: str | Path, algorithm: str = HASHES[0], chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of the file's bytes; every algorithm releases the GIL on large
    chunks, so a thread can hash while another works. A local file is read into
    one reused buffer per thread (a fresh 1 MiB ``bytes`` per read costs its page
    faults: ~1 of the ~3 ms a 12 MB shard took)."""
    if algorithm not in HASHES:
        raise ManifestError(f"unknown content hash {algorithm!r} (known: {', '.join(HASHES)})")
    digest = _HASHERS[algorithm]()
    if is_uri(path):  # s3://... through pyarrow's filesystems
        for chunk in read_shard_chunks(path, chunk_bytes):
            digest.update(chunk)
        return digest.hexdigest()
    buf = getattr(_read_buffer, "buf", None)
    if buf is None or len(buf) != chunk_bytes:
        buf = _read_buffer.buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


class Manifest:
    """A connection to the manifest; one per process or thread that uses it."""

    def __init__(self, path: str | Path, timeout_s: float = 30.0) -> None:
        """``path``: the state dir (then ``<dir>/manifest.sqlite``), or a file ending in ``.sqlite``."""
        path = Path(path)
        if path.suffix != ".sqlite":
            path = path / MANIFEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, maybe several threads of one actor
        self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        self._set_wal(timeout_s)
        # FULL: a commit survives power loss too, so "ingested" is never rolled back under us.
        self._db.execute("PRAGMA synchronous = FULL")
        self._create_tables()
        try:
            self.hash_algorithm = self._pin_hash()
        except ManifestError:
            self._db.close()
            raise
        """The content hash of this state dir (``HASHES``)."""

    def content_hash(self, path: str | Path) -> str:
        """``path``'s digest as this manifest records it; thread-safe (no database access)."""
        return file_hash(path, self.hash_algorithm)

    def fingerprint(self, path: str | Path) -> Fingerprint:
        """``path``'s size and mtime, then its digest; thread-safe. Stat'ed first: a file
        rewritten while it is hashed is recorded with the older stat, so the next look at
        it sees it changed (the other order would pin the new stat to the old bytes)."""
        size, mtime_ns = shard_stat(path)
        return Fingerprint(size, mtime_ns, self.content_hash(path))

    # --- discovery ---------------------------------------------------------------

    def discover(self, paths: Iterable[str | Path],
                 digests: Mapping[str, str | Fingerprint] | None = None) -> list[ShardRecord]:
        """Register files not known by name, in the order given; return the new records.

        The caller orders ``paths`` (by mtime, then name). Hashing happens
        outside the transaction (``digests``: name -> the ``fingerprint`` the
        caller already took, or a bare ``content_hash``, then stat'ed here); a
        file whose bytes match a known shard is recorded as ``duplicate``
        (``duplicate_of`` names the first) and is never claimed.
        """
        digests = digests or {}
        paths = [shard_path(p) for p in paths]
        known = self.known_names([shard_name(p) for p in paths])
        fresh: dict[str, tuple[str | Path, int, int, str]] = {}
        for p in paths:
            name = shard_name(p)
            if name in known or name in fresh:
                continue
            try:
                given = digests.get(name)
                if isinstance(given, Fingerprint):
                    fresh[name] = (p, *given)
                else:  # stat'ed after it was hashed: a rewrite in between goes unseen (``fingerprint``)
                    fresh[name] = (p, *shard_stat(p), given or self.content_hash(p))
            except FileNotFoundError:  # gone since it was listed (or hashed): nothing to read
                log.warning("livetrain: %s disappeared before it was registered", name)
        if not fresh:
            return []
        now = time.time()
        added = []
        with self._write() as db:
            for name, (p, size, mtime_ns, digest) in fresh.items():
                first = _original(db, digest)
                cur = db.execute(
                    "INSERT INTO shards (name, path, size, mtime_ns, content_hash, status, duplicate_of,"
                    " discovered_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (name) DO NOTHING",
                    (name, str(p), size, mtime_ns, digest, "duplicate" if first else "discovered", first, now, now),
                )
                if cur.rowcount:  # another process may have registered it since known_names()
                    added.append(name)
        return [self._get(n) for n in added]

    def known_names(self, names: Iterable[str]) -> set[str]:
        """Which of ``names`` the manifest already has (lets a watcher skip hashing them)."""
        return {r[0] for r in self._named("name", names)}

    def _named(self, columns: str, names: Iterable[str]) -> list[tuple]:
        """``columns`` of the shards called ``names``: one query per 500 names, not one per name
        (a watcher starting beside thousands of shards asks about all of them)."""
        names = list(names)
        rows: list[tuple] = []
        for i in range(0, len(names), 500):  # stay under SQLite's bound-parameter limit
            chunk = names[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows += self._read(f"SELECT {columns} FROM shards WHERE name IN ({marks})", chunk)
        return rows

    def redelivered(self, paths: Iterable[str | Path]) -> list[Redelivery]:
        """Record known shards whose file changed on disk (rewritten in place); return the new events.

        Same bytes: a duplicate delivery, ignored. Other bytes of a shard not
        read yet (``discovered``, or a ``duplicate`` of another): the record takes
        the new bytes (``refreshed``: a file written in place was seen
        unfinished). Other bytes of any other shard: it is *not* re-read (its
        rows may already be trained on); the event is recorded so the user sees
        it. To replace a quarantined shard use ``reingest``.
        """
        paths = [shard_path(p) for p in paths]
        records = {r.name: r for r in (ShardRecord(*row) for row in self._named(_COLUMNS, map(shard_name, paths)))}
        out = []
        for p in paths:
            rec = records.get(shard_name(p))
            if rec is None:
                continue
            try:
                size, mtime_ns = shard_stat(p)
                if (size, mtime_ns) == (rec.size, rec.mtime_ns):
                    continue
                digest = self.content_hash(p)
            except FileNotFoundError:  # gone since it was listed
                continue
            if digest != rec.content_hash and rec.status in ("discovered", "duplicate"):
                if self._refresh(rec.name, size, mtime_ns, digest):
                    out.append(Redelivery(rec.name, False, rec.status, refreshed=True))
                    continue
            with self._write() as db:
                if digest == rec.content_hash:  # touched, copied again: the record follows the file, or a
                    # rebuild of the buffer would take it for changed and leave its rows out
                    db.execute("UPDATE shards SET size = ?, mtime_ns = ?, updated_at = ? WHERE name = ?",
                               (size, mtime_ns, time.time(), rec.name))
                cur = db.execute(
                    "INSERT INTO redeliveries (name, size, mtime_ns, content_hash, same_content, at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (rec.name, size, mtime_ns, digest, int(digest == rec.content_hash), time.time()),
                )
            if cur.rowcount:
                out.append(Redelivery(rec.name, digest == rec.content_hash, rec.status))
        return out

    def _refresh(self, name: str, size: int, mtime_ns: int, digest: str) -> bool:
        """A shard nothing has read yet takes its file's new bytes (and is a duplicate
        only if another shard has them); False if it was claimed meanwhile, or if rows
        of it are in the buffer (requeued after a crash while it went in by parts: its
        read resumes at the watermark, which means nothing in other bytes)."""
        with self._write() as db:
            first = _original(db, digest, name)
            cur = db.execute(
                "UPDATE shards SET size = ?, mtime_ns = ?, content_hash = ?, status = ?, duplicate_of = ?,"
                " updated_at = ? WHERE name = ? AND status IN ('discovered', 'duplicate') AND rows_committed = 0",
                (size, mtime_ns, digest, "duplicate" if first else "discovered", first, time.time(), name),
            )
            if cur.rowcount:
                _rehome_duplicates(db, name)
        return bool(cur.rowcount)

    def rewritten_before_read(self, name: str, size: int, mtime_ns: int, digest: str,
                              may_be_duplicate: bool = True) -> tuple[ShardRecord, bool]:
        """A claimed shard whose file was rewritten after it was hashed, before its
        reader opened it, and read as its new bytes: the record takes them
        (``written_at`` too) and stays claimed, or, if another shard has them and
        ``may_be_duplicate`` (none of its rows went to the buffer yet), becomes its
        ``duplicate``. A redelivery a poll recorded for those bytes meanwhile is
        taken back: they are the shard's now. Returns the record and whether one
        was taken back."""
        with self._write() as db:
            row = db.execute("SELECT status FROM shards WHERE name = ?", (name,)).fetchone()
            if row is None or row[0] != "claimed":
                raise ManifestError(f"shard {name!r} is {row[0] if row else 'unknown'}; only a claimed shard"
                                    " can take the bytes its reader found")
            first = _original(db, digest, name) if may_be_duplicate else None
            status, claimed = ("duplicate", None) if first else ("claimed", name)
            db.execute(
                "UPDATE shards SET size = ?, mtime_ns = ?, content_hash = ?, status = ?, duplicate_of = ?,"
                " claimed_by = CASE WHEN ? IS NULL THEN NULL ELSE claimed_by END,"
                " claimed_at = CASE WHEN ? IS NULL THEN NULL ELSE claimed_at END, updated_at = ? WHERE name = ?",
                (size, mtime_ns, digest, status, first, claimed, claimed, time.time(), name),
            )
            _rehome_duplicates(db, name)
            taken_back = db.execute("DELETE FROM redeliveries WHERE name = ? AND size = ? AND mtime_ns = ?",
                                    (name, size, mtime_ns)).rowcount
        return self._get(name), bool(taken_back)

    def redeliveries(self) -> list[Redelivery]:
        rows = self._read(
            "SELECT r.name, r.same_content, s.status FROM redeliveries r JOIN shards s USING (name) ORDER BY r.at"
        )
        return [Redelivery(n, bool(same), status) for n, same, status in rows]

    def reingest(self, name: str, path: str | Path) -> ShardRecord:
        """A quarantined shard goes back to ``discovered`` with the current bytes of ``path``.

        It gets a new ``seq`` (it arrives now) and a fresh content hash; if those
        bytes equal another shard's, it becomes a ``duplicate`` of it instead.
        """
        p = Path(path)
        st = p.stat()
        digest = self.content_hash(p)
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT status, discovered_at FROM shards WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ManifestError(f"unknown shard {name!r}")
            if row[0] != "quarantined":
                raise ManifestError(f"shard {name!r} is {row[0]}; only a quarantined shard can be re-ingested")
            db.execute("DELETE FROM shards WHERE name = ?", (name,))
            first = _original(db, digest)
            db.execute(
                "INSERT INTO shards (name, path, size, mtime_ns, content_hash, status, duplicate_of,"
                " discovered_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, str(p), st.st_size, st.st_mtime_ns, digest, "duplicate" if first else "discovered",
                 first, now, now),
            )
        return self._get(name)

    # --- claiming ----------------------------------------------------------------

    def claim(self, owner: str, limit: int) -> list[ShardRecord]:
        """Atomically take up to ``limit`` discovered shards, lowest ``seq`` first."""
        if limit < 1:
            return []
        now = time.time()
        with self._write() as db:
            rows = db.execute(
                f"UPDATE shards SET status = 'claimed', claimed_by = ?, claimed_at = ?, updated_at = ?"
                f" WHERE seq IN (SELECT seq FROM shards WHERE status = 'discovered' ORDER BY seq LIMIT ?)"
                f" RETURNING {_COLUMNS}",
                (owner, now, now, limit),
            ).fetchall()
        return sorted((ShardRecord(*r) for r in rows), key=lambda r: r.seq)

    def release(self, name: str) -> None:
        """Give a claimed shard back (it will be claimed again, keeping its seq)."""
        self._transition(name, ("claimed",), "discovered", claimed_by=None, claimed_at=None)

    def requeue_claimed(self, owner: str | None = None) -> list[str]:
        """Put every claimed shard (or every one ``owner`` claimed) back to discovered.

        Called at start-up: a shard still claimed then was being read when the
        process died, and the buffer never accepted it.
        """
        now = time.time()
        where, args = "status = 'claimed'", ()
        if owner is not None:
            where, args = "status = 'claimed' AND claimed_by = ?", (owner,)
        with self._write() as db:
            rows = db.execute(
                f"UPDATE shards SET status = 'discovered', claimed_by = NULL, claimed_at = NULL,"
                f" updated_at = ?"
                f" WHERE {where} RETURNING name, seq",
                (now, *args),
            ).fetchall()
        return [name for name, _ in sorted(rows, key=lambda r: r[1])]

    # --- outcomes ----------------------------------------------------------------

    def mark_ingested(self, name: str, good_rows: int, bad_rows: int) -> None:
        """The buffer accepted the shard's good rows. Idempotent; only from ``claimed``."""
        self._transition(name, ("claimed",), "ingested", good_rows=good_rows, bad_rows=bad_rows)

    def mark_ingested_many(self, shards: Iterable[tuple[str, int, int]],
                           parts: Iterable[tuple[str, int]] = ()) -> set[str]:
        """``mark_ingested`` for each ``(name, good_rows, bad_rows)``, and the watermark of each
        ``(name, rows_committed)`` part of a claimed shard, all in one transaction (or none).
        Returns the names of parts left out because their shard was quarantined
        meanwhile (its blocks must not go in)."""
        refused: set[str] = set()
        with self._write() as db:
            for name, upto in parts:
                row = db.execute("SELECT status, rows_committed FROM shards WHERE name = ?", (name,)).fetchone()
                if row is not None and row[0] == "quarantined":
                    refused.add(name)
                    continue
                if row is None or row[0] != "claimed":
                    raise ManifestError(f"shard {name!r} is {row[0] if row else 'unknown'}; only a claimed shard commits parts")
                if upto > row[1]:  # a retried part leaves the watermark where it is
                    db.execute("UPDATE shards SET rows_committed = ?, updated_at = ? WHERE name = ?",
                               (upto, time.time(), name))
            for name, good_rows, bad_rows in shards:
                _transition_in(db, name, ("claimed",), "ingested", good_rows=good_rows, bad_rows=bad_rows)
        return refused

    def mark_quarantined(self, name: str, reason: str) -> None:
        """The shard was rejected whole. Idempotent; from ``claimed`` or ``discovered``."""
        self._transition(name, ("claimed", "discovered"), "quarantined", reason=reason, good_rows=0)

    # --- queries -----------------------------------------------------------------

    def get(self, name: str) -> ShardRecord | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM shards WHERE name = ?", (name,))
        return ShardRecord(*rows[0]) if rows else None

    def ingested(self, order_by_seq: bool = True) -> list[ShardRecord]:
        """Ingested shards (to rebuild the buffer after a restart), oldest first."""
        order = " ORDER BY seq" if order_by_seq else ""
        rows = self._read(f"SELECT {_COLUMNS} FROM shards WHERE status = 'ingested'{order}")
        return [ShardRecord(*r) for r in rows]

    def partly_committed(self) -> list[ShardRecord]:
        """Shards not ingested yet whose first rows are in the buffer (committed in parts), oldest first."""
        rows = self._read(f"SELECT {_COLUMNS} FROM shards WHERE status IN ('discovered', 'claimed')"
                          " AND rows_committed > 0 ORDER BY seq")
        return [ShardRecord(*r) for r in rows]

    def records(self, status: str | None = None) -> list[ShardRecord]:
        """All shards (or those in ``status``), in seq order."""
        if status is None:
            rows = self._read(f"SELECT {_COLUMNS} FROM shards ORDER BY seq")
        else:
            rows = self._read(f"SELECT {_COLUMNS} FROM shards WHERE status = ? ORDER BY seq", (status,))
        return [ShardRecord(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Shards per status; every status present, zeros included."""
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(dict(self._read("SELECT status, COUNT(*) FROM shards GROUP BY status")))
        return counts

    def pending_count(self) -> int:
        """Shards not yet done: discovered or claimed."""
        return self._read("SELECT COUNT(*) FROM shards WHERE status IN ('discovered', 'claimed')")[0][0]

    # --- meta --------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # --- the pinned schema --------------------------------------------------------

    def pinned_schema(self) -> tuple[dict, str] | None:
        """The schema this state dir is bound to (its fields as a dict) and where it came from."""
        body, source = self.get_meta(SCHEMA_KEY), self.get_meta(SCHEMA_SOURCE_KEY)
        return None if body is None else (json.loads(body), source or "")

    def pin_schema(self, fields: dict, source: str, replace: bool = False) -> tuple[dict, str]:
        """Pin ``fields`` unless a schema is pinned already (or ``replace``); return the pinned one
        (first writer wins)."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (SCHEMA_KEY,)).fetchone()
            if row is None or replace:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?), (?, ?)",
                           (SCHEMA_KEY, json.dumps(fields, sort_keys=True), SCHEMA_SOURCE_KEY, source))
        pinned = self.pinned_schema()
        assert pinned is not None
        return pinned

    # --- lifecycle ---------------------------------------------------------------

    def backup(self, target: sqlite3.Connection) -> None:
        """A consistent copy of the whole manifest into ``target`` (SQLite's online backup)."""
        with self._lock:
            self._db.backup(target)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------

    def _set_wal(self, timeout_s: float) -> None:
        """Switch to WAL. The switch ignores the busy timeout when connections race
        to create the file ("database is locked"), so retry it until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode == "wal":
                    return
                if time.monotonic() > deadline:
                    raise ManifestError(f"{self.path}: could not switch to WAL (mode stays {mode})")
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.05)

    def _create_tables(self) -> None:
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            columns = {r[1] for r in db.execute("PRAGMA table_info(shards)")}
            if "rows_committed" not in columns:  # a manifest from before parts were committed
                db.execute("ALTER TABLE shards ADD COLUMN rows_committed INTEGER NOT NULL DEFAULT 0")

    def _pin_hash(self) -> str:
        """The state dir's hash algorithm; first use pins XXH3-128, or sha256 when
        shards were recorded before any algorithm was (their digests are sha256)."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (HASH_KEY,)).fetchone()
            if row is None:
                older = db.execute("SELECT 1 FROM shards LIMIT 1").fetchone() is not None
                row = ("sha256" if older else HASHES[0],)
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (HASH_KEY, row[0]))
        if row[0] not in HASHES:
            raise ManifestError(f"{self.path}: content hash {row[0]!r} is not one this livetrain knows ({', '.join(HASHES)})")
        return row[0]

    def _transition(self, name: str, allowed_from: tuple[str, ...], to: str, **values: object) -> None:
        with self._write() as db:
            _transition_in(db, name, allowed_from, to, **values)

    def _get(self, name: str) -> ShardRecord:
        record = self.get(name)
        if record is None:
            raise ManifestError(f"unknown shard {name!r}")
        return record

    def _read(self, sql: str, args: Iterable[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _write(self) -> _WriteTx:
        return _WriteTx(self._db, self._lock)


def _original(db: sqlite3.Connection, digest: str, besides: str | None = None) -> str | None:
    """The shard whose rows ``digest``'s bytes are (another file with them is its duplicate).
    A shard quarantined whole is none: nothing of it went in, and the same bytes under
    a new name (the way back from a remote landing directory) must be read."""
    row = db.execute(
        "SELECT name FROM shards WHERE content_hash = ? AND status NOT IN ('duplicate', 'quarantined')"
        " AND name != ? ORDER BY seq LIMIT 1",
        (digest, besides or ""),
    ).fetchone()
    return row[0] if row else None


def _rehome_duplicates(db: sqlite3.Connection, name: str) -> None:
    """``name`` took other bytes: the first of its duplicates (same old bytes, another
    file) stands for them now and is read; the rest become its duplicates."""
    rows = db.execute("SELECT name FROM shards WHERE status = 'duplicate' AND duplicate_of = ? ORDER BY seq",
                      (name,)).fetchall()
    if not rows:
        return
    heir, now = rows[0][0], time.time()
    db.execute("UPDATE shards SET status = 'discovered', duplicate_of = NULL, updated_at = ? WHERE name = ?", (now, heir))
    db.execute("UPDATE shards SET duplicate_of = ?, updated_at = ? WHERE status = 'duplicate' AND duplicate_of = ?",
               (heir, now, name))


def _transition_in(db: sqlite3.Connection, name: str, allowed_from: tuple[str, ...], to: str, **values: object) -> None:
    """One shard's status change inside the caller's write transaction."""
    row = db.execute("SELECT status FROM shards WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ManifestError(f"unknown shard {name!r}")
    if row[0] == to:
        return
    if row[0] not in allowed_from:
        raise ManifestError(f"shard {name!r} is {row[0]}; cannot become {to} (only from {'/'.join(allowed_from)})")
    sets = "".join(f"{k} = ?, " for k in values)
    db.execute(
        f"UPDATE shards SET status = ?, {sets}updated_at = ? WHERE name = ?",
        (to, *values.values(), time.time(), name),
    )


class _WriteTx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error), holding the thread lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
