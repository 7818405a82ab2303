"""The manifest: every shard is ingested exactly once, across callers, crashes and restarts."""

from __future__ import annotations

import hashlib
import os
import multiprocessing
import random
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import xxhash
import pytest

from livetrain.actors.manifest import HASH_KEY, Manifest, ManifestError, file_hash


def _shards(landing: Path, n: int, start: int = 0) -> list[Path]:
    landing.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = landing / f"shard-{i:05d}.parquet"
        p.write_bytes(f"contents of shard {i}".encode())
        paths.append(p)
    return paths


def _claim_until_empty(db: str, owner: str) -> list[str]:
    """Run in a worker: claim in small bites until nothing is left."""
    manifest = Manifest(db)
    got: list[str] = []
    while batch := manifest.claim(owner, 3):
        got.extend(r.name for r in batch)
    manifest.close()
    return got


@pytest.fixture
def manifest(tmp_path):
    with Manifest(tmp_path / "state") as m:
        yield m


# --- discovery -------------------------------------------------------------------


def test_discovery_assigns_increasing_seq_in_the_order_given(manifest, tmp_path):
    paths = _shards(tmp_path / "landing", 4)
    order = [paths[2], paths[0], paths[3], paths[1]]
    records = manifest.discover(order)
    assert [r.name for r in records] == [p.name for p in order]
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert all(r.status == "discovered" for r in records)
    first = records[0]
    assert first.size == order[0].stat().st_size and first.mtime_ns == order[0].stat().st_mtime_ns
    assert first.content_hash == file_hash(order[0]) == xxhash.xxh3_128(order[0].read_bytes()).hexdigest()
    assert manifest.hash_algorithm == "xxh3_128" and manifest.get_meta(HASH_KEY) == "xxh3_128"
    assert manifest.path == tmp_path / "state" / "manifest.sqlite"


def test_discovering_the_same_files_twice_registers_them_once(manifest, tmp_path):
    paths = _shards(tmp_path / "landing", 3)
    assert len(manifest.discover(paths)) == 3
    more = _shards(tmp_path / "landing", 2, start=3)
    new = manifest.discover(paths + more)
    assert [r.name for r in new] == [p.name for p in more]
    assert manifest.counts()["discovered"] == 5
    assert max(r.seq for r in new) > min(r.seq for r in new) > max(r.seq for r in manifest.records()[:3])


def test_concurrent_discovery_of_the_same_files_registers_each_once(tmp_path):
    db = str(tmp_path / "state")
    paths = _shards(tmp_path / "landing", 50)
    Manifest(db).close()

    def discover(_: int) -> list[str]:
        with Manifest(db) as m:
            return [r.name for r in m.discover(paths)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(discover, range(4)))
    registered = [name for names in results for name in names]
    assert sorted(registered) == sorted(p.name for p in paths)
    with Manifest(db) as m:
        assert [r.name for r in m.records()] == [p.name for p in paths]


def test_a_file_with_the_bytes_of_a_known_shard_is_a_duplicate_and_never_claimed(manifest, tmp_path):
    (original,) = _shards(tmp_path / "landing", 1)
    copy = tmp_path / "landing" / "copy.parquet"
    copy.write_bytes(original.read_bytes())
    manifest.discover([original])
    (dup,) = manifest.discover([copy])
    assert dup.status == "duplicate" and dup.duplicate_of == original.name
    assert [r.name for r in manifest.claim("w", 10)] == [original.name]


def test_digests_computed_by_the_caller_are_recorded_as_given(manifest, tmp_path):
    """The loop hashes on its own thread: discover must take that digest, not hash again."""
    a, b = _shards(tmp_path / "landing", 2)
    records = manifest.discover([a, b], {a.name: "given-by-the-caller"})
    assert [r.content_hash for r in records] == ["given-by-the-caller", file_hash(b)]


def _made_before_any_pinned_hash(state: Path, a: Path) -> None:
    """A state dir from before the algorithm was pinned: sha256 digests, no ``meta`` key."""
    with Manifest(state) as m:
        m.discover([a])
        db = sqlite3.connect(m.path)
        with db:
            db.execute("UPDATE shards SET content_hash = ?", (hashlib.sha256(a.read_bytes()).hexdigest(),))
            db.execute("DELETE FROM meta WHERE key = ?", (HASH_KEY,))
        db.close()


def _made_when_blake3_was_pinned(state: Path, a: Path) -> None:
    with Manifest(state) as m:
        m.set_meta(HASH_KEY, "blake3")
    with Manifest(state) as m:
        m.discover([a])


@pytest.mark.parametrize("made, algorithm, digest", [
    (_made_before_any_pinned_hash, "sha256", hashlib.sha256),
    (_made_when_blake3_was_pinned, "blake3", blake3.blake3),
])
def test_an_older_state_dir_keeps_its_hash_and_still_finds_duplicates(tmp_path, made, algorithm, digest):
    state = tmp_path / "state"
    a, b = _shards(tmp_path / "landing", 2)
    made(state, a)
    copy = tmp_path / "landing" / "copy-of-a.parquet"
    copy.write_bytes(a.read_bytes())
    with Manifest(state) as m:
        assert m.hash_algorithm == algorithm
        new = {r.name: r for r in m.discover([b, copy])}
        assert new["copy-of-a.parquet"].status == "duplicate" and new["copy-of-a.parquet"].duplicate_of == a.name
        assert new[b.name].content_hash == digest(b.read_bytes()).hexdigest()


def test_file_hash_reads_any_size_the_same_as_hashing_the_bytes_whole(tmp_path):
    p = tmp_path / "f.bin"
    for size in (0, 1, 1 << 20, (1 << 20) + 7, 3 * (1 << 20) - 1):
        data = random.Random(size).randbytes(size)
        p.write_bytes(data)
        assert file_hash(p, "xxh3_128") == xxhash.xxh3_128(data).hexdigest()
        assert file_hash(p, "blake3", chunk_bytes=4096) == blake3.blake3(data).hexdigest()
        assert file_hash(p, "sha256") == hashlib.sha256(data).hexdigest()


def test_an_unknown_hash_algorithm_is_refused_by_name(tmp_path):
    with Manifest(tmp_path / "state") as m:
        m.set_meta(HASH_KEY, "md5")
    with pytest.raises(ManifestError, match="md5"):
        Manifest(tmp_path / "state")


def test_a_claimed_shard_keeps_its_row_watermark_through_requeue_and_ingest(manifest, tmp_path):
    (a,) = _shards(tmp_path / "landing", 1)
    manifest.discover([a])
    with pytest.raises(ManifestError, match="only a claimed shard"):
        manifest.mark_ingested_many([], [(a.name, 100)])
    manifest.claim("w", 1)
    manifest.mark_ingested_many([], [(a.name, 100)])
    manifest.mark_ingested_many([], [(a.name, 60)])  # a retried, older part: the watermark stays
    assert manifest.get(a.name).rows_committed == 100
    assert [r.name for r in manifest.partly_committed()] == [a.name]
    manifest.requeue_claimed()
    (again,) = manifest.claim("w2", 1)
    assert again.rows_committed == 100
    manifest.mark_ingested_many([(a.name, 150, 3)], [(a.name, 200)])
    rec = manifest.get(a.name)
    assert rec.status == "ingested" and rec.good_rows == 150 and manifest.partly_committed() == []


def test_partly_committed_lists_only_shards_with_rows_in_the_buffer(manifest, tmp_path):
    a, b, c = _shards(tmp_path / "landing", 3)
    manifest.discover([a, b, c])
    manifest.claim("w", 2)  # a and b claimed, c discovered
    manifest.mark_ingested_many([], [(b.name, 100)])
    assert [r.name for r in manifest.partly_committed()] == [b.name]


def test_a_manifest_from_before_the_watermark_gets_the_column(tmp_path):
    state = tmp_path / "state"
    (a,) = _shards(tmp_path / "landing", 1)
    with Manifest(state) as m:
        m.discover([a])
    db = sqlite3.connect(state / "manifest.sqlite")
    with db:
        db.execute("ALTER TABLE shards DROP COLUMN rows_committed")
    db.close()
    with Manifest(state) as m:
        assert m.get(a.name).rows_committed == 0 and m.claim("w", 1)[0].name == a.name


def test_seq_is_never_reused(manifest, tmp_path):
    paths = _shards(tmp_path / "landing", 3)
    last = manifest.discover(paths)[-1].seq
    (later,) = manifest.discover(_shards(tmp_path / "landing", 1, start=3))
    assert later.seq > last


# --- claiming --------------------------------------------------------------------


def test_claim_takes_the_oldest_discovered_shards_first(manifest, tmp_path):
    paths = _shards(tmp_path / "landing", 5)
    manifest.discover(paths)
    first = manifest.claim("w1", 2)
    assert [r.name for r in first] == [paths[0].name, paths[1].name]
    assert all(r.status == "claimed" and r.claimed_by == "w1" and r.claimed_at for r in first)
    assert [r.name for r in manifest.claim("w2", 10)] == [p.name for p in paths[2:]]
    assert manifest.claim("w3", 10) == []


def test_two_threads_with_their_own_connections_never_claim_the_same_shard(tmp_path):
    db = str(tmp_path / "state")
    with Manifest(db) as m:
        m.discover(_shards(tmp_path / "landing", 200))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda owner: _claim_until_empty(db, owner), ["a", "b", "c"]))
    claimed = [name for names in results for name in names]
    assert len(claimed) == 200 and len(set(claimed)) == 200


def test_two_processes_never_claim_the_same_shard(tmp_path):
    db = str(tmp_path / "state")
    with Manifest(db) as m:
        m.discover(_shards(tmp_path / "landing", 300))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_claim_until_empty, [(db, f"p{i}") for i in range(4)])
    claimed = [name for names in results for name in names]
    assert len(claimed) == 300 and len(set(claimed)) == 300
    with Manifest(db) as m:
        owners = {r.claimed_by for r in m.records("claimed")}
        assert m.counts()["claimed"] == 300 and owners <= {"p0", "p1", "p2", "p3"}


def test_processes_opening_a_new_manifest_at_once_all_succeed(tmp_path):
    db = str(tmp_path / "state" / "manifest.sqlite")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        assert pool.starmap(_claim_until_empty, [(db, f"p{i}") for i in range(8)]) == [[]] * 8


# --- outcomes and crashes ----------------------------------------------------------


def test_an_ingested_shard_records_its_rows_and_is_not_claimed_again(manifest, tmp_path):
    manifest.discover(_shards(tmp_path / "landing", 2))
    (first,) = manifest.claim("w", 1)
    manifest.mark_ingested(first.name, good_rows=90, bad_rows=10)
    record = manifest.get(first.name)
    assert (record.status, record.good_rows, record.bad_rows) == ("ingested", 90, 10)
    assert [r.name for r in manifest.claim("w", 10)] != [first.name]
    assert [r.name for r in manifest.ingested()] == [first.name]


def test_marking_ingested_twice_is_harmless(manifest, tmp_path):
    manifest.discover(_shards(tmp_path / "landing", 1))
    (shard,) = manifest.claim("w", 1)
    manifest.mark_ingested(shard.name, 5, 0)
    manifest.mark_ingested(shard.name, 5, 0)
    assert manifest.counts()["ingested"] == 1


def test_only_a_claimed_shard_can_be_marked_ingested(manifest, tmp_path):
    (path,) = _shards(tmp_path / "landing", 1)
    manifest.discover([path])
    with pytest.raises(ManifestError, match="discovered"):
        manifest.mark_ingested(path.name, 1, 0)
    with pytest.raises(ManifestError, match="unknown shard"):
        manifest.mark_ingested("nope.parquet", 1, 0)


def test_a_quarantined_shard_keeps_its_reason_and_cannot_be_ingested(manifest, tmp_path):
    manifest.discover(_shards(tmp_path / "landing", 1))
    (shard,) = manifest.claim("w", 1)
    manifest.mark_quarantined(shard.name, "zero rows")
    record = manifest.get(shard.name)
    assert (record.status, record.reason) == ("quarantined", "zero rows")
    with pytest.raises(ManifestError, match="quarantined"):
        manifest.mark_ingested(shard.name, 1, 0)


def test_a_shard_not_claimed_yet_can_be_quarantined(manifest, tmp_path):
    (path,) = _shards(tmp_path / "landing", 1)
    manifest.discover([path])
    manifest.mark_quarantined(path.name, "unreadable")
    record = manifest.get(path.name)
    assert (record.status, record.reason) == ("quarantined", "unreadable")
    assert manifest.claim("w", 1) == []


def test_a_released_shard_is_claimed_again_keeping_its_place(manifest, tmp_path):
    paths = _shards(tmp_path / "landing", 3)
    manifest.discover(paths)
    first, second = manifest.claim("w", 2)
    manifest.release(first.name)
    again = manifest.claim("w", 5)
    assert [r.name for r in again] == [first.name, paths[2].name]
    assert again[0].seq == first.seq


def test_after_a_crash_claimed_shards_are_requeued_and_ingested_ones_stay_done(tmp_path):
    state = tmp_path / "state"
    paths = _shards(tmp_path / "landing", 4)
    crashed = Manifest(state)
    crashed.discover(paths)
    done, in_flight_a, in_flight_b = crashed.claim("dead-worker", 3)
    crashed.mark_ingested(done.name, 10, 0)
    del crashed  # the process dies without closing anything

    with Manifest(state) as restarted:
        assert restarted.requeue_claimed() == [in_flight_a.name, in_flight_b.name]
        counts = restarted.counts()
        assert (counts["discovered"], counts["claimed"], counts["ingested"]) == (3, 0, 1)
        reclaimed = restarted.claim("new-worker", 10)
        assert [r.name for r in reclaimed] == [in_flight_a.name, in_flight_b.name, paths[3].name]
        assert done.name not in {r.name for r in reclaimed}


def test_requeue_can_be_limited_to_one_owner(manifest, tmp_path):
    manifest.discover(_shards(tmp_path / "landing", 2))
    (a,) = manifest.claim("a", 1)
    (b,) = manifest.claim("b", 1)
    assert manifest.requeue_claimed(owner="a") == [a.name]
    assert manifest.get(b.name).status == "claimed"


def test_state_survives_reopening(tmp_path):
    state = tmp_path / "state"
    paths = _shards(tmp_path / "landing", 3)
    with Manifest(state) as m:
        m.discover(paths)
        (shard,) = m.claim("w", 1)
        m.mark_ingested(shard.name, 7, 1)
        m.set_meta("served_version", "12")
    with Manifest(state) as m:
        assert m.get(shard.name).good_rows == 7
        assert m.counts()["ingested"] == 1 and m.pending_count() == 2
        assert m.get_meta("served_version") == "12"
        assert m.discover(paths) == []


def test_meta_values_are_replaced_and_missing_keys_give_the_default(manifest):
    assert manifest.get_meta("pinned_schema") is None
    assert manifest.get_meta("pinned_schema", "none") == "none"
    manifest.set_meta("pinned_schema", "a")
    manifest.set_meta("pinned_schema", "b")
    assert manifest.get_meta("pinned_schema") == "b"


def test_counts_and_pending_cover_every_status(manifest, tmp_path):
    paths = _shards(tmp_path / "landing", 4)
    manifest.discover(paths)
    a, b, c = manifest.claim("w", 3)
    manifest.mark_ingested(a.name, 1, 0)
    manifest.mark_quarantined(b.name, "not parquet")
    assert manifest.counts() == {
        "discovered": 1, "claimed": 1, "ingested": 1, "quarantined": 1, "duplicate": 0
    }
    assert manifest.pending_count() == 2


def test_the_manifest_runs_in_wal_mode(manifest):
    assert manifest._read("PRAGMA journal_mode")[0][0] == "wal"


def test_a_part_of_a_shard_quarantined_meanwhile_is_refused_not_committed(manifest, tmp_path):
    a, b = _shards(tmp_path / "landing", 2)
    manifest.discover([a, b])
    manifest.claim("w", 2)
    manifest.mark_ingested_many([], [(a.name, 100)])
    manifest.mark_quarantined(a.name, "unreadable after its first part")
    refused = manifest.mark_ingested_many([(b.name, 10, 0)], [(a.name, 200)])  # a part on its way when the verdict came
    assert refused == {a.name}
    assert manifest.get(a.name).status == "quarantined" and manifest.get(b.name).status == "ingested"
    assert manifest.partly_committed() == []  # a rebuild re-reads none of it


def test_a_claimed_shard_rewritten_before_its_read_takes_the_new_bytes_or_becomes_a_duplicate(manifest, tmp_path):
    a, b, c = _shards(tmp_path / "landing", 3)
    manifest.discover([a, b, c])
    assert [r.name for r in manifest.claim("me", 2)] == [a.name, b.name]
    a.write_bytes(b"a's new bytes, longer than before")
    assert [(e.name, e.refreshed) for e in manifest.redelivered([a])] == [(a.name, False)]  # a poll saw it claimed
    st = a.stat()
    rec, taken_back = manifest.rewritten_before_read(a.name, st.st_size, st.st_mtime_ns, manifest.content_hash(a))
    assert taken_back and manifest.redeliveries() == []
    assert (rec.status, rec.claimed_by, rec.size, rec.mtime_ns) == ("claimed", "me", st.st_size, st.st_mtime_ns)
    assert rec.content_hash == manifest.content_hash(a) and rec.seq == 1  # keeps its place
    b.write_bytes(c.read_bytes())  # now the bytes of a shard discovered after it
    st = b.stat()
    rec, taken_back = manifest.rewritten_before_read(b.name, st.st_size, st.st_mtime_ns, manifest.content_hash(b))
    assert not taken_back and (rec.status, rec.duplicate_of, rec.claimed_by) == ("duplicate", c.name, None)
    manifest.mark_ingested(a.name, 10, 0)
    with pytest.raises(ManifestError, match="only a claimed shard"):
        manifest.rewritten_before_read(a.name, 1, 1, "x")


def test_a_shard_requeued_with_rows_in_the_buffer_does_not_take_a_rewritten_files_bytes(manifest, tmp_path):
    """Its read resumes at the watermark: rows past it of another file would go in
    under it, and rows before it never. The rewrite is recorded instead (its reader
    then finds the file changed and it is quarantined whole)."""
    (a,) = _shards(tmp_path / "landing", 1)
    manifest.discover([a])
    manifest.claim("me", 1)
    manifest.mark_ingested_many([], [(a.name, 300)])
    manifest.requeue_claimed()
    before = manifest.get(a.name)
    a.write_bytes(b"another file altogether")
    assert [(e.refreshed, e.same_content) for e in manifest.redelivered([a])] == [(False, False)]
    after = manifest.get(a.name)
    assert (after.size, after.mtime_ns, after.content_hash) == (before.size, before.mtime_ns, before.content_hash)


def test_a_file_touched_or_copied_again_with_the_same_bytes_keeps_its_shard_and_its_new_stat(manifest, tmp_path):
    """Else a rebuild of the buffer would find the ingested file "changed" and leave its rows out."""
    (a,) = _shards(tmp_path / "landing", 1)
    manifest.discover([a])
    manifest.claim("me", 1)
    manifest.mark_ingested(a.name, 10, 0)
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 5_000_000_000))
    assert [(e.same_content, e.status) for e in manifest.redelivered([a])] == [(True, "ingested")]
    rec = manifest.get(a.name)
    assert (rec.status, rec.size, rec.mtime_ns) == ("ingested", a.stat().st_size, a.stat().st_mtime_ns)


def test_the_bytes_of_a_shard_quarantined_whole_under_a_new_name_are_read_not_a_duplicate(manifest, tmp_path):
    """The way back on a remote landing directory (no ``--reingest`` there): nothing of
    the quarantined shard went in, so the same bytes under a new name must be read."""
    a, b = _shards(tmp_path / "landing", 2)
    manifest.discover([a])
    manifest.claim("me", 1)
    manifest.mark_quarantined(a.name, "the store was unreachable")
    b.write_bytes(a.read_bytes())
    (rec,) = manifest.discover([b])
    assert (rec.status, rec.duplicate_of) == ("discovered", None)


def test_when_an_original_takes_new_bytes_its_first_duplicate_stands_for_the_old_ones(manifest, tmp_path):
    a, b, c = _shards(tmp_path / "landing", 3)
    b.write_bytes(a.read_bytes())
    c.write_bytes(a.read_bytes())
    manifest.discover([a, b, c])
    assert [manifest.get(p.name).status for p in (a, b, c)] == ["discovered", "duplicate", "duplicate"]
    a.write_bytes(b"a's new bytes")
    assert [e.refreshed for e in manifest.redelivered([a])] == [True]
    got = {p.name: (manifest.get(p.name).status, manifest.get(p.name).duplicate_of) for p in (a, b, c)}
    assert got == {a.name: ("discovered", None), b.name: ("discovered", None), c.name: ("duplicate", b.name)}


def test_a_fingerprint_is_stated_before_it_is_hashed(manifest, tmp_path, monkeypatch):
    """A file rewritten while it is hashed must keep the stat of before: the next look
    at it then sees it changed. (Stat'ed after, the new stat would vouch for the old
    bytes' hash for good.)"""
    import livetrain.actors.manifest as manifest_module

    (a,) = _shards(tmp_path / "landing", 1)
    old = (a.stat().st_size, a.stat().st_mtime_ns)
    real = manifest_module.file_hash

    def hash_then_rewrite(path, algorithm):
        digest = real(path, algorithm)
        a.write_bytes(b"rewritten while it was hashed")
        os.utime(a, ns=(old[1] + 10**9, old[1] + 10**9))
        return digest

    monkeypatch.setattr(manifest_module, "file_hash", hash_then_rewrite)
    fp = manifest.fingerprint(a)
    assert (fp.size, fp.mtime_ns) == old and fp != (a.stat().st_size, a.stat().st_mtime_ns, fp.digest)
    monkeypatch.setattr(manifest_module, "file_hash", real)
    (rec,) = manifest.discover([a], {a.name: fp})
    assert (rec.size, rec.mtime_ns) == old
    assert [e.refreshed for e in manifest.redelivered([a])] == [True]  # seen changed: takes its bytes
    assert manifest.get(a.name).content_hash == manifest.content_hash(a)
