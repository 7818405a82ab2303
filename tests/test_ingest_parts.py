"""Large shards committed in parts (``ingest.commit_rows``), by row id, with real
Ray: the buffer takes a shard's first rows while the rest is still read, and
every fault resumes at the manifest's row watermark without losing or
repeating a row (ingest actor killed, buffer actor killed, the loop's process
gone)."""

from __future__ import annotations

import pytest

from _ingest_util import assert_exactly_once, buffer_ids, close, make_loop, quarantined_ids, run_until_done, write_id_shard
from _util import wait_until

pytestmark = [pytest.mark.ray]

ROWS = 6000
PARTS = ("ingest.block_rows=100", "ingest.commit_rows=500", "ingest.max_in_flight=2")
"""Blocks of 100 rows, a part every 5 blocks: a 6,000-row shard goes in as ~12 parts."""


def _big_shard(cfg) -> set[int]:
    write_id_shard(cfg.landing_dir / "big-000.parquet", 0, ROWS, bad_every=97)
    write_id_shard(cfg.landing_dir / "big-001.parquet", 100_000, 700, bad_every=50)  # after it, small
    return set(range(ROWS)) | set(range(100_000, 100_700))


def _reingest_exactly_once(loop, cfg, all_ids: set[int]) -> None:
    """``livetrain quarantine --reingest big-000.parquet``, then every row is in once."""
    from livetrain.actors.quarantine import list_quarantine, reingest

    (entry,) = [e for e in list_quarantine(cfg.state_dir) if e.shard == "big-000.parquet"]
    reingest(cfg.state_dir, cfg.landing_dir, entry, loop.manifest)
    run_until_done(loop)
    assert loop.manifest.get("big-000.parquet").status == "ingested"
    assert_exactly_once(all_ids, buffer_ids(loop.buffer), quarantined_ids(cfg.state_dir))


def _until_parts_committed(loop) -> int:
    """Step the loop until the big shard has parts in the buffer; its watermark."""
    def committed():
        loop.step(0.2)
        rec = loop.manifest.get("big-000.parquet")
        return rec is not None and rec.rows_committed
    upto = wait_until(committed, 30, "a first part of the big shard committed")
    rec = loop.manifest.get("big-000.parquet")
    assert rec.status == "claimed" and 0 < upto < ROWS, "not mid-shard: the shard went in whole"
    return upto


def test_a_large_shard_enters_the_buffer_in_parts_while_it_is_read(ray_session, tmp_path):
    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg)
    upto = _until_parts_committed(loop)
    early = buffer_ids(buffer)
    assert early and max(early) < upto, "the buffer holds rows past the watermark, or none"
    assert loop.manifest.get("big-001.parquet").status != "ingested", "arrival order: the later shard went first"
    most = 0

    def done():
        nonlocal most
        loop.step(0.2)
        most = max(most, loop.held_refs())
        return loop.manifest.pending_count() == 0 and not loop.in_flight() and not loop.unregistered()

    wait_until(done, 60, "every shard ingested or quarantined", interval_s=0)
    # a part read, a part on its way to the buffer, the blocks since: never the 60 blocks of the shard
    assert most <= 3 * 5 + 1, f"the loop held {most} block refs at once"
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(all_ids, in_buffer, quarantined)
    big = loop.manifest.get("big-000.parquet")
    assert big.status == "ingested" and big.good_rows + big.bad_rows == ROWS
    assert loop.counters.rows_ingested == len(in_buffer) and loop.counters.rows_quarantined == len(quarantined)
    assert loop.counters.shards_ingested == 2
    close(loop, buffer)


def test_ingest_actor_killed_after_parts_resumes_at_the_watermark(ray_session, tmp_path):
    import ray

    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg)
    upto = _until_parts_committed(loop)
    ray.kill(loop.actors[0])
    run_until_done(loop)
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert loop.counters.shards_retried >= 1
    assert_exactly_once(all_ids, in_buffer, quarantined)  # a re-read from row 0 would repeat rows
    assert loop.counters.rows_ingested == len(in_buffer) and loop.counters.rows_quarantined == len(quarantined)
    print(f"killed at watermark {upto}; rows: {len(all_ids)} = {len(in_buffer)} buffered + {len(quarantined)} quarantined")
    close(loop, buffer)


def test_a_crashed_loop_is_resumed_from_the_watermark_by_the_next_one(ray_session, tmp_path):
    import ray

    from livetrain.actors.ingest import IngestLoop
    from livetrain.actors.manifest import Manifest

    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg)
    upto = _until_parts_committed(loop)
    for actor in loop.actors:  # the process is gone: its actors with it, nothing given back
        ray.kill(actor)
    loop.manifest.close()
    manifest = Manifest(tmp_path)
    again = IngestLoop(cfg, manifest, buffer, None)  # requeues what the dead loop had claimed
    rec = manifest.get("big-000.parquet")
    assert rec.status == "discovered" and rec.rows_committed >= upto
    run_until_done(again)
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(all_ids, in_buffer, quarantined)
    assert manifest.get("big-000.parquet").status == "ingested"
    close(again, buffer)


def test_buffer_killed_after_parts_rebuilds_them_and_the_shard_goes_on(ray_session, tmp_path):
    import ray

    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg)
    upto = _until_parts_committed(loop)
    ray.kill(buffer, no_restart=False)  # restarts and rebuilds: the parts below the watermark too
    wait_until(lambda: ray.get(buffer.stats.remote())["rebuilt_rows"] > 0, 60, "the buffer rebuilt")
    run_until_done(loop)
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(all_ids, in_buffer, quarantined)
    print(f"buffer killed at watermark {upto}; rows: {len(in_buffer)} buffered + {len(quarantined)} quarantined")
    close(loop, buffer)


def test_a_part_the_buffer_makes_wait_stops_the_read_of_the_rest(ray_session, tmp_path):
    """Coverage backpressure refuses the second part until trainers draw: meanwhile the
    loop holds about two parts of blocks, not the rest of the shard, then it goes on."""
    import ray

    cfg, loop, buffer = make_loop(tmp_path, *PARTS, "buffer.backpressure=coverage", "buffer.max_unseen_rows=600")
    all_ids = _big_shard(cfg)
    _until_parts_committed(loop)
    wait_until(lambda: (loop.step(0.05), ray.get(buffer.stats.remote())["ingest_waits"] > 0)[1], 30, "a part refused")
    most = max((loop.step(0.05), loop.held_refs())[1] for _ in range(20))  # a second of refusals
    assert most <= 3 * 5 + 1, f"the loop held {most} block refs while the buffer made it wait"

    fresh_after = -1

    def drawn_and_done():
        nonlocal fresh_after
        sample = ray.get(buffer.sample.remote(4, fresh_after, 1, 0.0))  # a trainer draws: unseen rows fall
        fresh_after = max([m.seq for m in sample.metas], default=fresh_after)
        loop.step(0.05)
        return loop.manifest.pending_count() == 0 and not loop.in_flight() and not loop.unregistered()

    wait_until(drawn_and_done, 60, "the rest ingested once trainers draw", interval_s=0)
    assert_exactly_once(all_ids, buffer_ids(buffer), quarantined_ids(tmp_path))
    close(loop, buffer)


def test_a_shard_unreadable_after_parts_is_taken_out_and_reingested_once(ray_session, tmp_path):
    """The file is cut short after its first parts went in: the shard is
    quarantined whole and its parts leave the buffer; once the user puts the
    whole file back and re-ingests it, every row is there exactly once."""
    import ray

    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg)
    path = cfg.landing_dir / "big-000.parquet"
    whole = path.read_bytes()
    upto = _until_parts_committed(loop)
    assert any(i < ROWS for i in buffer_ids(buffer))
    path.write_bytes(whole[: len(whole) // 2])  # truncated: no Parquet footer any more
    ray.kill(loop.actors[0])  # the re-read finds it unreadable
    run_until_done(loop)
    big = loop.manifest.get("big-000.parquet")
    assert big.status == "quarantined" and "taken out again" in big.reason, big.reason
    wait_until(lambda: not any(i < ROWS for i in buffer_ids(buffer)), 30, "the big shard's parts taken out")
    assert ray.get(buffer.stats.remote())["rows_withdrawn"] >= upto - upto // 97 - 1

    path.write_bytes(whole)  # the user's fix
    _reingest_exactly_once(loop, cfg, all_ids)
    close(loop, buffer)


def test_a_shard_rewritten_after_its_first_parts_went_in_is_taken_out_not_resumed_in_the_new_file(ray_session, tmp_path):
    """The loop's process dies while the big shard goes in by parts, and its file is
    then replaced by another file of the same name. Resuming at the watermark would
    put rows of the new file after rows of the old under one record (and the new
    file's first rows never): the shard is quarantined whole, its parts taken out,
    and a re-ingest reads the new file whole, each row once."""
    import ray

    from livetrain.actors.ingest import IngestLoop
    from livetrain.actors.manifest import Manifest

    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg) - set(range(ROWS))
    _until_parts_committed(loop)
    for actor in loop.actors:
        ray.kill(actor)
    loop.manifest.close()
    all_ids |= set(range(200_000, 200_000 + ROWS))
    write_id_shard(tmp_path / "new.parquet", 200_000, ROWS, bad_every=97)
    (tmp_path / "new.parquet").replace(cfg.landing_dir / "big-000.parquet")
    again = IngestLoop(cfg, Manifest(tmp_path), buffer, None)
    run_until_done(again)
    big = again.manifest.get("big-000.parquet")
    assert big.status == "quarantined" and "rewritten" in big.reason and "taken out again" in big.reason, big.reason
    wait_until(lambda: not any(i < ROWS for i in buffer_ids(buffer)), 30, "the old file's parts taken out")
    assert not any(200_000 <= i for i in buffer_ids(buffer))

    _reingest_exactly_once(again, cfg, all_ids)
    close(again, buffer)


def test_buffer_killed_after_a_shard_finished_its_parts_rebuilds_the_parts_after_its_snapshot(ray_session, tmp_path):
    """The buffer's last snapshot was taken while the big shard went in by parts;
    the rest of its parts went in after it (snapshots come on a cadence,
    ``buffer.snapshot_every_s``), then the buffer died. The rebuild re-reads the
    parts the snapshot names and every part committed since."""
    import ray

    from livetrain.actors.blocks import SNAPSHOT_FILE, read_snapshot

    cfg, loop, buffer = make_loop(tmp_path, *PARTS, "buffer.snapshot_every_s=0.001")  # a snapshot at every commit
    all_ids = _big_shard(cfg)
    _until_parts_committed(loop)
    snap = wait_until(lambda: (s := read_snapshot(tmp_path)) and "big-000.parquet" in s.open and s, 30,
                      "a snapshot naming the big shard going in by parts")
    _, mark = snap.open["big-000.parquet"]
    assert 0 < mark < ROWS
    mid = (tmp_path / SNAPSHOT_FILE).read_bytes()
    run_until_done(loop)
    assert loop.manifest.get("big-000.parquet").status == "ingested"
    (tmp_path / SNAPSHOT_FILE).write_bytes(mid)  # no snapshot since: the buffer died before its next one
    ray.kill(buffer, no_restart=False)

    def rebuilt():
        try:
            return ray.get(buffer.stats.remote(), timeout=30)["rebuilt_rows"] > 0
        except ray.exceptions.RayError:  # ray.kill is asynchronous: the old instance may still answer first
            return False

    wait_until(rebuilt, 60, "the buffer rebuilt")
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(all_ids, in_buffer, quarantined)  # the parts after the mark were lost before
    print(f"snapshot at watermark {mark}; rows: {len(in_buffer)} buffered + {len(quarantined)} quarantined")
    close(loop, buffer)


def test_a_shard_whose_reads_keep_failing_after_parts_is_quarantined_and_taken_out(ray_session, tmp_path):
    """Its reader dies on every attempt (``MAX_ATTEMPTS``) after its first parts went
    in: the shard is quarantined whole, its parts leave the buffer, and a re-ingest
    once the cause is fixed puts every row in once."""
    import ray

    from livetrain.actors.quarantine import list_quarantine, reingest

    cfg, loop, buffer = make_loop(tmp_path, *PARTS)
    all_ids = _big_shard(cfg)
    _until_parts_committed(loop)

    def given_up():  # the reader of the head shard dies before the loop takes any more of it
        ray.kill(loop.actors[0])
        loop.step(0.2)
        return loop.manifest.get("big-000.parquet").status == "quarantined"

    wait_until(given_up, 60, "the big shard quarantined after its reads failed", interval_s=0)
    big = loop.manifest.get("big-000.parquet")
    assert big.reason.startswith("ingest failed") and "taken out again" in big.reason, big.reason
    run_until_done(loop)
    wait_until(lambda: not any(i < ROWS for i in buffer_ids(buffer)), 30, "the big shard's parts taken out")
    assert [e.shard for e in list_quarantine(tmp_path) if e.shard == "big-000.parquet"]

    for e in list_quarantine(tmp_path):  # the cause is gone (no more kills): every shard set aside goes back
        if e.error is not None:
            reingest(tmp_path, cfg.landing_dir, e, loop.manifest)
    run_until_done(loop)
    assert loop.manifest.get("big-000.parquet").status == "ingested"
    assert_exactly_once(all_ids, buffer_ids(buffer), quarantined_ids(tmp_path))
    close(loop, buffer)
