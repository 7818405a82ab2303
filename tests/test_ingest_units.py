"""Ingestion's plain parts, no Ray: the backpressure limiters, block splitting,
the rebuild plan, rewritten-in-place detection."""

from __future__ import annotations

import json
import os

import numpy as np

from _ingest_util import write_id_shard
from livetrain.actors.blocks import (
    SNAPSHOT_FILE,
    HeldPart,
    RebuildShard,
    Snapshot,
    label_index,
    part_rows,
    plan_rebuild,
    read_back,
    read_snapshot,
    write_snapshot,
)
from livetrain.actors.manifest import Manifest, ShardRecord
from livetrain.actors.rate_limiter import CoverageLimiter, FreshnessPolicy
from livetrain.actors.replay_buffer import ReplayBuffer
from livetrain.actors.ingest import CHUNK_BLOCKS, chunks_of
from livetrain.actors.schema import iter_parts, iter_reads
from livetrain.actors.sources import EMPTY_GRACE_S, DirectorySource
from livetrain.config import BufferConfig, SchemaConfig
from livetrain.messages import BlockMeta

SCHEMA = SchemaConfig(features=["x0", "x1", "x2"], id_column="id")


def meta(seq: int, rows: int = 100) -> BlockMeta:
    return BlockMeta(f"s{seq}", seq, rows, rows * 20, 0.0, 0.0)


def test_coverage_limiter_makes_ingestion_wait_until_rows_are_drawn():
    buf: ReplayBuffer[int] = ReplayBuffer(BufferConfig(capacity_rows=10_000, window_rows=10_000))
    limiter = CoverageLimiter(max_unseen_rows=300)
    admitted = 0
    for seq in range(10):
        if not limiter.admits(buf.unseen_rows, 100):
            break
        buf.add(seq, meta(seq))
        admitted += 1
    assert admitted == 3 and limiter.waits == 1 and buf.unseen_rows == 300
    buf.sample(2, fresh_after=-1)  # a trainer draws two blocks: two more may come in
    assert buf.unseen_rows == 100 and limiter.admits(buf.unseen_rows, 200)
    assert not limiter.admits(buf.unseen_rows, 201)


def test_coverage_limiter_always_admits_into_an_all_seen_buffer():
    assert CoverageLimiter(max_unseen_rows=10).admits(0, 10_000)


def test_freshness_evicts_old_blocks_unseen_and_counts_them_within_bounds():
    cfg = BufferConfig(capacity_rows=1000, capacity_bytes=10**6, window_rows=500)
    buf: ReplayBuffer[int] = ReplayBuffer(cfg)
    policy = FreshnessPolicy()
    for seq in range(50):
        assert policy.admits(buf.unseen_rows, 100)
        buf.add(seq, meta(seq))
        s = buf.stats()
        assert s.rows <= cfg.capacity_rows and s.bytes <= cfg.capacity_bytes
    s = buf.stats()
    assert s.rows_evicted_unseen == 4000 and s.unseen_rows == 1000


def test_large_shard_streams_in_blocks_of_at_most_block_rows(tmp_path):
    bad = write_id_shard(tmp_path / "big.parquet", 0, 10_000, bad_every=500)
    parts = list(iter_parts(tmp_path / "big.parquet", SCHEMA, 1500))
    assert len(parts) >= 7 and all(p.row_end - p.row_start <= 1500 for p in parts)
    assert [p.row_start for p in parts[1:]] == [p.row_end for p in parts[:-1]]
    ids = np.concatenate([p.ids for p in parts])
    assert len(ids) == 10_000 - len(bad) and not set(ids.tolist()) & bad
    assert sum(p.bad.num_rows for p in parts if p.bad is not None) == len(bad)


def test_block_rows_are_capped_by_the_buffer_byte_bound():
    assert part_rows(65_536, 200_000, 28 * 1000, SCHEMA) == 1000  # 28-byte rows: 3 float32, int64 label, int64 id


def test_rebuild_plan_keeps_snapshot_parts_and_adds_shards_committed_after_it(tmp_path):
    with Manifest(tmp_path) as m:
        for i in range(4):
            write_id_shard(tmp_path / f"r{i}.parquet", i * 1000, 100)
        m.discover(sorted(tmp_path.glob("r*.parquet")))
        for rec in m.claim("me", 4):
            m.mark_ingested(rec.name, 100, 0)
        recs = m.ingested()
    held = [HeldPart("r0.parquet", recs[0].seq, 0, 50, 50, 1, 0.0, True, 1),
            HeldPart("gone.parquet", 99, 0, 50, 50, 1, 0.0, False, 0)]
    write_snapshot(tmp_path, Snapshot(held, newest_seq=recs[1].seq))
    plan = plan_rebuild(read_snapshot(tmp_path), recs, capacity_rows=10_000)
    assert [(p.shard, p.starts is None) for p in plan] == [
        ("r0.parquet", False), ("r2.parquet", True), ("r3.parquet", True)]
    assert list(plan[0].starts) == [0]
    assert [p.shard for p in plan_rebuild(None, recs, capacity_rows=150)] == ["r2.parquet", "r3.parquet"]


def test_rebuild_reads_back_the_held_rows_whatever_the_block_size_is_now(tmp_path):
    """The buffer held blocks of 1,500 file rows, one of them cut at a watermark
    (file row 4,700, a re-read after a layout change); the restart reads with
    other block sizes. Every held row comes back, in its own block, once."""
    path = tmp_path / "s.parquet"
    bad = write_id_shard(path, 0, 10_000, bad_every=700)
    held_spans = [(0, 1500), (4700, 6000), (6000, 7500), (9000, 10_000)]  # two not held: evicted
    want = {lo: {i for i in range(lo, hi) if i not in bad} for lo, hi in held_spans}
    starts = {lo: HeldPart("s.parquet", 0, lo, hi, len(want[lo]), 1, 0.0, lo == 0, 0) for lo, hi in held_spans}
    for rows_now in (1500, 1000, 4096, 333, 20_000):
        shard = RebuildShard("s.parquet", str(path), 0, 0.0, 0, 0, starts)
        got = {span.row_start: (span, block) for span, block in read_back(shard, SCHEMA, rows_now)}
        assert sorted(got) == sorted(want), rows_now
        for lo, hi in held_spans:
            span, block = got[lo]
            assert (span.row_end, span.rows) == (hi, len(want[lo])) and set(block["id"].tolist()) == want[lo], (rows_now, lo)
            assert len(block["x"]) == len(block["y"]) == span.rows


def test_a_restart_with_a_smaller_buffer_reads_held_blocks_back_in_blocks_it_takes(tmp_path):
    """Held blocks longer than a block may be now (the buffer or ``ingest.block_rows``
    shrank) come back as several, each where the block was; every held row once."""
    path = tmp_path / "s.parquet"
    bad = write_id_shard(path, 0, 3000, bad_every=700)
    with Manifest(tmp_path / "state") as m:
        m.discover([path])
        (rec,) = m.claim("me", 1)
        m.mark_ingested(rec.name, 3000 - len(bad), len(bad))
        recs = m.ingested()
    held = [HeldPart("s.parquet", rec.seq, 0, 2000, 2000 - 2, 56_000, 0.0, True, 3),
            HeldPart("s.parquet", rec.seq, 2000, 3000, 1000 - 1, 28_000, 0.0, False, 0)]
    (shard,) = plan_rebuild(Snapshot(held, newest_seq=rec.seq), recs, capacity_rows=10_000, part_rows=800)
    assert [(p.row_start, p.row_end, p.in_reservoir, p.sampled) for p in shard.starts.values()] == [
        (0, 800, True, 3), (800, 1600, True, 3), (1600, 2000, True, 3), (2000, 2800, False, 0), (2800, 3000, False, 0)]
    spans = [span for span, _ in read_back(shard, SCHEMA, 800)]
    assert all(span.row_end - span.row_start <= 800 for span in spans)
    ids = [i for _, block in read_back(shard, SCHEMA, 800) for i in block["id"].tolist()]
    assert ids == [i for i in range(3000) if i not in bad]


def test_rebuild_of_a_shard_going_in_by_parts_stops_exactly_at_its_watermark(tmp_path):
    path = tmp_path / "s.parquet"
    bad = write_id_shard(path, 0, 10_000, bad_every=700)
    for rows_now in (1500, 1000, 4096):  # the watermark (4,500) was a part end at ingest: 3 x 1,500
        shard = RebuildShard("s.parquet", str(path), 0, 0.0, 0, 0, None, upto=4500)
        ids = [i for _, block in read_back(shard, SCHEMA, rows_now) for i in block["id"].tolist()]
        assert ids == [i for i in range(4500) if i not in bad], rows_now


def test_rebuild_of_a_shard_going_in_by_parts_at_the_snapshot_adds_the_parts_committed_since(tmp_path):
    """The snapshot held two of its parts (one in the reservoir) at watermark 4,500
    and named it open; since then it went on to 7,500 (still by parts), or to its
    end (ingested). Every row it has committed comes back once; a snapshot from
    before ``open`` existed still reads."""
    path = tmp_path / "s.parquet"
    bad = write_id_shard(path, 0, 10_000, bad_every=700)
    with Manifest(tmp_path) as m:
        m.discover([path])
        (rec,) = m.claim("me", 1)
        m.mark_ingested_many([], [(rec.name, 7500)])
        partly = m.partly_committed()
        m.mark_ingested(rec.name, 10_000 - len(bad), len(bad))
        ingested = m.ingested()
    held = [HeldPart(rec.name, rec.seq, 0, 1500, 1, 1, 0.0, False, 0),
            HeldPart(rec.name, rec.seq, 3000, 4500, 1, 1, 0.0, True, 2)]  # 1,500-3,000: evicted
    write_snapshot(tmp_path, Snapshot(held, newest_seq=rec.seq, open={rec.name: (rec.seq, 4500)}))
    snap = read_snapshot(tmp_path)
    for recs, now, end in (([], partly, 7500), (ingested, [], 10_000)):
        (shard,) = plan_rebuild(snap, recs, capacity_rows=100_000, partly=now)
        assert (sorted(shard.starts), shard.tail_from) == ([0, 3000], 4500)
        for rows_now in (1500, 1000, 4096):
            ids = [i for _, block in read_back(shard, SCHEMA, rows_now) for i in block["id"].tolist()]
            assert ids == [i for i in [*range(1500), *range(3000, end)] if i not in bad], (end, rows_now)
    body = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    del body["open"]
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(body))
    assert read_snapshot(tmp_path).open == {} and len(read_snapshot(tmp_path).parts) == 2


def _record(name: str, seq: int, status: str = "ingested", good_rows: int | None = None,
            rows_committed: int = 0) -> ShardRecord:
    return ShardRecord(name, f"/landing/{name}", 1, 1, "", seq, status, None, None, good_rows, None, None, None,
                       0.0, 0.0, rows_committed)


def test_rebuild_ignores_held_parts_of_a_shard_quarantined_and_ingested_again_since():
    """The snapshot held a part of ``a`` at seq 5; ``a`` has since been quarantined and
    ingested again as seq 9. The old part is not read back: ``a`` comes back (or not)
    as any shard committed after the snapshot, here not: ``b`` fills the budget."""
    held = [HeldPart("a", 5, 0, 100, 100, 1, 0.0, True, 1)]
    recs = [_record("a", 9, good_rows=100), _record("b", 10, good_rows=1000)]
    plan = plan_rebuild(Snapshot(held, newest_seq=8), recs, capacity_rows=1000)
    assert [(p.shard, p.starts) for p in plan] == [("b", None)]


def test_rebuild_reads_a_shard_reopened_by_parts_since_the_snapshot_whole_to_its_watermark():
    """The snapshot named ``a`` going in by parts at seq 5 (watermark 300); it was
    quarantined and is going in by parts again as seq 9, at 600 now: every row
    before 600 is read, not only those from the old watermark on."""
    snap = Snapshot([], newest_seq=8, open={"a": (5, 300)})
    (shard,) = plan_rebuild(snap, [], capacity_rows=1000, partly=[_record("a", 9, "claimed", rows_committed=600)])
    assert (shard.seq, shard.starts, shard.tail_from, shard.upto) == (9, None, None, 600)


def test_rebuild_of_a_shard_by_parts_in_a_snapshot_without_open_reads_it_whole_to_its_watermark():
    """A snapshot written before ``open`` existed holds parts of a shard still going in
    by parts: which parts came after it is unknown, so all are read to the watermark."""
    held = [HeldPart("a", 5, 0, 100, 100, 1, 0.0, True, 1)]
    (shard,) = plan_rebuild(Snapshot(held, newest_seq=5), [], capacity_rows=1000,
                            partly=[_record("a", 5, "claimed", rows_committed=600)])
    assert (shard.starts, shard.tail_from, shard.upto) == (None, None, 600)


def test_labels_map_to_their_place_in_the_declared_classes_even_unsorted():
    np.testing.assert_array_equal(label_index(np.array([9, 1, 5, 9]), [9, 1, 5]), [0, 1, 2, 0])
    np.testing.assert_array_equal(label_index(np.array([5, 1]), [1, 5]), [1, 0])


def test_a_poll_stats_only_new_files_until_the_recheck_is_due(tmp_path):
    """The shard files pile up in the landing directory: known files are stat'ed
    again only every ``recheck_every_s``, so a rewrite in place waits for it."""
    now = [0.0]
    src = DirectorySource(tmp_path, recheck_every_s=10.0, clock=lambda: now[0])
    write_id_shard(tmp_path / "a.parquet", 0, 100)
    assert [p.name for p in src.poll()] == ["a.parquet"]
    write_id_shard(tmp_path / "a.parquet", 0, 200)  # rewritten in place: another size
    write_id_shard(tmp_path / "b.parquet", 1000, 100)
    now[0] = 5.0
    assert [p.name for p in src.poll()] == ["b.parquet"]  # new names at once; a.parquet not stat'ed
    now[0] = 10.0
    assert [p.name for p in src.poll()] == ["a.parquet"]  # the recheck notices the rewrite
    assert src.poll() == []


def test_rewritten_in_place_is_reported_again_and_recorded_by_content(tmp_path):
    src = DirectorySource(tmp_path)
    write_id_shard(tmp_path / "a.parquet", 0, 100)
    with Manifest(tmp_path / "state") as m:
        m.discover(src.poll())
        assert src.poll() == []
        data = (tmp_path / "a.parquet").read_bytes()
        (tmp_path / "a.parquet").write_bytes(data)
        os.utime(tmp_path / "a.parquet", ns=(1, 1))
        events = m.redelivered(src.poll())
        assert [(e.name, e.same_content) for e in events] == [("a.parquet", True)]
        write_id_shard(tmp_path / "a.parquet", 500, 100)  # other bytes before anything read it
        events = m.redelivered(src.poll())
        assert [(e.name, e.same_content, e.refreshed) for e in events] == [("a.parquet", False, True)]
        assert m.get("a.parquet").content_hash == m.content_hash(tmp_path / "a.parquet")
        assert [r.same_content for r in m.redeliveries()] == [True]  # the change is not an event: the shard is its new bytes
        (claimed,) = m.claim("w", 1)
        m.mark_ingested(claimed.name, 100, 0)
        write_id_shard(tmp_path / "a.parquet", 900, 100)  # other bytes once it was read
        events = m.redelivered(src.poll())
        assert [(e.name, e.same_content, e.refreshed) for e in events] == [("a.parquet", False, False)]
        assert m.get("a.parquet").status == "ingested"  # not read twice, not replaced
        assert m.get("a.parquet").content_hash == claimed.content_hash


def test_files_written_in_place_go_in_with_their_final_bytes(tmp_path):
    """Two writers create their files before writing them: an empty file is not
    reported while it may still be written, and two unfinished files with the same
    first bytes, seen as a shard and its duplicate, each go in once finished."""
    now = [0.0]
    src = DirectorySource(tmp_path, clock=lambda: now[0])
    (tmp_path / "a.parquet").write_bytes(b"")
    assert src.poll() == []
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    with Manifest(tmp_path / "state") as m:
        m.discover(src.poll())
        assert m.get("b.parquet").status == "duplicate"
        write_id_shard(tmp_path / "a.parquet", 0, 100)
        write_id_shard(tmp_path / "b.parquet", 100, 100)
        assert all(e.refreshed for e in m.redelivered(src.poll()))
        assert sorted(r.name for r in m.claim("w", 10)) == ["a.parquet", "b.parquet"]
        for name in ("a.parquet", "b.parquet"):
            assert m.get(name).content_hash == m.content_hash(tmp_path / name)
            assert m.get(name).size == (tmp_path / name).stat().st_size
    (tmp_path / "never.parquet").write_bytes(b"")  # a file left empty is reported in the end
    assert src.poll() == []
    now[0] = EMPTY_GRACE_S
    assert [p.name for p in src.poll()] == ["never.parquet"]


def test_a_file_removed_between_listing_and_registering_is_skipped(tmp_path):
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for i, p in enumerate(paths):
        write_id_shard(p, i * 100, 100)
    with Manifest(tmp_path / "state") as m:
        digests = {p.name: m.content_hash(p) for p in paths}
        paths[0].unlink()
        assert [r.name for r in m.discover(paths, digests)] == ["b.parquet"]
        assert m.redelivered(paths) == []


def test_a_read_goes_out_as_chunks_of_adjacent_blocks_that_end_where_parts_do(tmp_path):
    """``read_shard`` sends each read as chunks: one object of up to CHUNK_BLOCKS blocks,
    a view of the read (no copy), never across a part's end; from a watermark on."""
    bad = write_id_shard(tmp_path / "s.parquet", 0, 10_000, bad_every=97)
    for resume_from, every in ((0, 0), (0, 7), (2_550, 7)):
        ids, blocks, ends = [], 0, []
        for read in iter_reads(tmp_path / "s.parquet", SCHEMA, 100):
            for chunk, part_end in chunks_of(read, 100, resume_from, every, blocks):
                assert 1 <= len(chunk) <= CHUNK_BLOCKS
                assert [p.row_start for p in chunk[1:]] == [p.row_end for p in chunk[:-1]]
                whole = read.between(chunk[0].row_start, chunk[-1].row_end)
                assert np.shares_memory(whole.x, read.x), "a chunk is a copy, not a view of its read"
                assert np.array_equal(whole.ids, np.concatenate([p.ids for p in chunk]))
                blocks += len(chunk)
                assert part_end == (every > 0 and blocks % every == 0)
                if part_end:
                    ends.append(blocks)
                ids += whole.ids.tolist()
        expected = [i for i in range(resume_from, 10_000) if i not in bad]
        assert ids == expected
        assert ends == list(range(every, blocks + 1, every)) if every else not ends
        assert blocks == len(range(resume_from - resume_from % 100, 10_000, 100))


def test_rebuild_from_a_snapshot_newer_than_the_manifest_holds_no_part_past_the_watermark(tmp_path):
    """Both restored from ``storage.uri``, pushed on their own cadences: the snapshot
    held parts to 600 of a shard going in by parts, the manifest's watermark is 300.
    Ingestion reads the shard again from 300, so the rebuild must stop there, or rows
    300-600 are held twice."""
    path = tmp_path / "s.parquet"
    write_id_shard(path, 0, 1000)
    held = [HeldPart("s.parquet", 5, lo, lo + 300, 300, 1, 0.0, False, 0) for lo in (0, 300)]
    snap = Snapshot(held, newest_seq=5, open={"s.parquet": (5, 600)})
    (shard,) = plan_rebuild(snap, [], capacity_rows=10_000,
                            partly=[ShardRecord("s.parquet", str(path), 1, 1, "", 5, "claimed", None, None, None,
                                                None, None, None, 0.0, 0.0, 300)])
    assert (sorted(shard.starts), shard.upto) == ([0], 300)
    ids = [i for _, block in read_back(shard, SCHEMA, 300) for i in block["id"].tolist()]
    assert ids == list(range(300))
