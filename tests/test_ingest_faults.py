"""Exactly once, by row id, with real Ray: ingest actor killed mid-shard,
buffer actor killed (restart + rebuild), both killed at random steps while
shards of mixed sizes go in, duplicate deliveries, parallel ingest.

The ingest loop is stepped by the test (no trainer): what the buffer holds is
read back block by block and every id is accounted for.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from _ingest_util import assert_exactly_once, buffer_ids, close, make_loop, quarantined_ids, run_until_done, write_id_shard
from _util import wait_until
from livetrain.actors.quarantine import list_quarantine

pytestmark = [pytest.mark.ray]


def _restart_rebuilt(buffer) -> dict:
    """Kill the buffer actor after its snapshot; the stats of the instance that replaced
    it, once it has rebuilt itself from the state dir (the same handle works again)."""
    import ray

    ray.get(buffer.close.remote())  # writes the snapshot now (it is also written on a cadence)
    ray.kill(buffer, no_restart=False)

    def rebuilt():  # ray.kill is asynchronous: the old instance may still answer first
        try:
            s = ray.get(buffer.stats.remote(), timeout=30)
        except ray.exceptions.RayError:
            return None
        return s if s["rebuilt_rows"] or s["rebuilt_rows_lost"] else None

    return wait_until(rebuilt, 60, "the restarted, rebuilt buffer")


def test_ingest_actor_killed_mid_shard_loses_and_repeats_no_row(ray_session, tmp_path):
    import ray

    cfg, loop, buffer = make_loop(tmp_path, "ingest.block_rows=100", "ingest.max_in_flight=1")
    landing = cfg.landing_dir
    all_ids: set[int] = set()
    write_id_shard(landing / "a-000.parquet", 0, 6000, bad_every=97)
    all_ids |= set(range(0, 6000))
    loop.step(0.2)
    # take a first few blocks of the big shard, then kill its reader while it is still reading
    wait_until(lambda: (loop.step(0.2), loop.in_flight().get("a-000.parquet", 0) >= 2)[1], 30, "first blocks")
    taken = loop.in_flight()["a-000.parquet"]
    assert taken < 60, "the shard was read whole before the kill: not mid-shard"
    ray.kill(loop.actors[0])
    for i in range(1, 4):
        write_id_shard(landing / f"a-{i:03d}.parquet", i * 10_000, 1000, bad_every=50)
        all_ids |= set(range(i * 10_000, i * 10_000 + 1000))
    run_until_done(loop)
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert loop.counters.shards_retried == 1 and loop.counters.shards_ingested == 4
    assert_exactly_once(all_ids, in_buffer, quarantined)
    assert loop.counters.rows_ingested == len(in_buffer) and loop.counters.rows_quarantined == len(quarantined)
    print(f"killed after {taken} blocks; rows: {len(all_ids)} = {len(in_buffer)} buffered + {len(quarantined)} quarantined")
    close(loop, buffer)


def test_a_death_counts_against_the_shard_being_read_not_those_queued_behind_it(ray_session, tmp_path):
    """One ingest actor, two shards sent to it. Its reader dies (killed here) while
    reading the first: that death counts against the first only. The second, queued
    behind it, then loses its reader twice while it is being read: two deaths of its
    own, under ``MAX_ATTEMPTS``, so it is read a third time and goes in. (Before, the
    death it only queued behind counted too, and it was quarantined whole.)"""
    import ray

    from livetrain.actors.ingest import MAX_ATTEMPTS

    assert MAX_ATTEMPTS == 3
    cfg, loop, buffer = make_loop(tmp_path, "ingest.block_rows=100", "ingest.max_in_flight=2", "ingest.num_actors=1")
    landing = cfg.landing_dir
    ids = write_id_shard(landing / "p-000.parquet", 0, 20_000) | write_id_shard(landing / "p-001.parquet", 100_000, 20_000)
    assert not ids  # no bad rows
    wait_until(lambda: (loop.step(0.05), len(loop.in_flight()) == 2)[1], 30, "both shards sent to the one actor")

    def kill_while_reading(name: str) -> None:
        wait_until(lambda: (loop.step(0.05), loop.in_flight().get(name, 0) >= 2)[1], 30, f"{name} being read")
        assert loop.in_flight()[name] < 200, f"{name} was read whole before the kill"
        victim = loop.actors[0]
        ray.kill(victim)
        wait_until(lambda: (loop.step(0.05), loop.actors[0] is not victim)[1], 30, "the death noticed")

    kill_while_reading("p-000.parquet")  # p-001 is queued behind it
    wait_until(lambda: (loop.step(0.05), loop.manifest.get("p-000.parquet").status == "ingested")[1], 60, "p-000 in")
    kill_while_reading("p-001.parquet")
    kill_while_reading("p-001.parquet")
    run_until_done(loop)
    assert [loop.manifest.get(n).status for n in ("p-000.parquet", "p-001.parquet")] == ["ingested", "ingested"]
    in_buffer = buffer_ids(buffer)
    assert sorted(in_buffer) == list(range(20_000)) + list(range(100_000, 120_000))  # each row once
    close(loop, buffer)


def test_buffer_actor_killed_restarts_rebuilt_from_snapshot_and_manifest(ray_session, tmp_path):
    import ray

    cfg, loop, buffer = make_loop(tmp_path, "ingest.block_rows=300", "buffer.window_rows=2000")
    landing = cfg.landing_dir
    all_ids: set[int] = set()
    for i in range(6):
        write_id_shard(landing / f"b-{i:03d}.parquet", i * 10_000, 1000, bad_every=40)
        all_ids |= set(range(i * 10_000, i * 10_000 + 1000))
    run_until_done(loop)
    ray.get(buffer.sample.remote(4, -1, 1, 0))  # some blocks are now seen
    before = ray.get(buffer.stats.remote())
    assert before["reservoir_blocks"] > 0 and before["window_blocks"] > 0
    after = _restart_rebuilt(buffer)
    assert after["rebuilt_rows"] == before["rows"] > 0
    assert (after["rows"], after["reservoir_blocks"], after["window_blocks"]) == (
        before["rows"], before["reservoir_blocks"], before["window_blocks"])
    assert after["unseen_rows"] == before["unseen_rows"]
    for i in range(6, 9):  # ingestion goes on into the restarted buffer
        write_id_shard(landing / f"b-{i:03d}.parquet", i * 10_000, 1000, bad_every=40)
        all_ids |= set(range(i * 10_000, i * 10_000 + 1000))
    run_until_done(loop)
    assert ray.get(buffer.sample.remote(4, -1, 1, 0)).blocks, "sampling works after the restart"
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(all_ids, in_buffer, quarantined)
    print(f"rows: {len(all_ids)} = {len(in_buffer)} buffered + {len(quarantined)} quarantined; rebuilt {after['rebuilt_rows']}")
    close(loop, buffer)


def test_a_shard_unreadable_at_a_rebuild_is_left_out_and_the_buffer_still_comes_up(ray_session, tmp_path):
    """A shard file damaged in place (same size and mtime, so it looks unchanged)
    cannot be read back when the buffer restarts: the buffer rebuilds without
    it, says so, and takes the shards that come next."""
    import ray

    cfg, loop, buffer = make_loop(tmp_path)
    landing = cfg.landing_dir
    for i in range(3):
        write_id_shard(landing / f"r-{i:03d}.parquet", i * 10_000, 500)
    run_until_done(loop)
    ray.get(buffer.close.remote())  # the snapshot names every block
    damaged = landing / "r-001.parquet"
    st = damaged.stat()
    damaged.write_bytes(b"\0" * st.st_size)
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
    ray.kill(buffer, no_restart=False)

    def restarted():
        try:
            s = ray.get(buffer.stats.remote(), timeout=30)
        except ray.exceptions.RayError:  # the old instance may still answer first, or be on its way out
            return None
        return s if s["rebuilt_shards_unreadable"] else None

    after = wait_until(restarted, 60, "the restarted buffer, rebuilt without the damaged shard")
    assert after["rebuilt_shards"] == 2 and after["rebuilt_rows"] == 1000
    write_id_shard(landing / "r-003.parquet", 30_000, 500)
    run_until_done(loop)
    assert sorted({i // 10_000 for i in buffer_ids(buffer)}) == [0, 2, 3]
    close(loop, buffer)


@pytest.mark.slow
def test_random_kills_of_ingest_actors_and_the_buffer_lose_and_repeat_no_row(ray_session, tmp_path):
    """Shards of mixed sizes (some going in by parts) land while ingest actors and
    the buffer are killed at random steps of the loop. At the end every row is in
    the buffer or quarantined, once; a shard whose reader died ``MAX_ATTEMPTS``
    times counts as quarantined whole. Seeded: the kills fall at the same steps
    each run, the timing of the actors around them does not."""
    import random

    import ray

    cfg, loop, buffer = make_loop(tmp_path, "ingest.block_rows=200", "ingest.commit_rows=600", "ingest.num_actors=2",
                                  "ingest.max_in_flight=3", "buffer.snapshot_every_s=0.2")
    rnd = random.Random(1)
    sizes: dict[str, int] = {}
    kills = {"ingest": 0, "buffer": 0}

    def settled() -> bool:
        if len(sizes) < 16 and rnd.random() < 0.3:
            name, rows = f"k-{len(sizes):03d}.parquet", rnd.choice([150, 700, 1500, 3000])
            write_id_shard(cfg.landing_dir / name, len(sizes) * 10_000, rows, bad_every=rnd.choice([0, 37, 101]))
            sizes[name] = rows
        loop.step(0.05)
        r = rnd.random()
        if r < 0.03:
            ray.kill(rnd.choice(loop.actors), no_restart=False)
            kills["ingest"] += 1
        elif r < 0.045:
            ray.kill(buffer, no_restart=False)  # restarts, rebuilt from its snapshot and the manifest
            kills["buffer"] += 1
        return len(sizes) == 16 and loop.manifest.pending_count() == 0 and not loop.in_flight() and not loop.unregistered()

    wait_until(settled, 240, "every shard ingested or quarantined under random kills", interval_s=0)
    assert kills["ingest"] and kills["buffer"]
    run_until_done(loop, 120)  # the buffer may still be restarting: its calls are retried
    whole = {r.name for r in loop.manifest.records("quarantined")}
    all_ids = {int(name[2:5]) * 10_000 + i for name, rows in sizes.items() for i in range(rows)}
    quarantined = [i for i in quarantined_ids(tmp_path) if f"k-{i // 10_000:03d}.parquet" not in whole]
    quarantined += [int(name[2:5]) * 10_000 + i for name in whole for i in range(sizes[name])]
    in_buffer = buffer_ids(buffer)
    assert_exactly_once(all_ids, in_buffer, quarantined)
    print(f"kills {kills}; rows: {len(all_ids)} = {len(in_buffer)} buffered + {len(quarantined)} quarantined "
          f"({len(whole)} shards whole)")
    close(loop, buffer)


def test_same_shard_delivered_twice_is_ingested_once_and_recorded(ray_session, tmp_path):
    cfg, loop, buffer = make_loop(tmp_path, "source.recheck_every_s=0")  # a rewrite in place noticed at once
    landing = cfg.landing_dir
    write_id_shard(landing / "d-000.parquet", 0, 1000, bad_every=100)
    write_id_shard(landing / "d-001.parquet", 10_000, 1000)
    run_until_done(loop)
    shutil.copyfile(landing / "d-000.parquet", landing / "d-000-copy.parquet")  # another name
    data = (landing / "d-001.parquet").read_bytes()
    (landing / "d-001.parquet").write_bytes(data)  # rewritten in place, same bytes
    os.utime(landing / "d-001.parquet", ns=(1, 1))  # make sure the mtime changes
    run_until_done(loop)
    assert loop.counters.shards_duplicate == 2 and loop.counters.shards_ingested == 2
    assert loop.manifest.get("d-000-copy.parquet").status == "duplicate"
    assert [r.same_content for r in loop.manifest.redeliveries()] == [True]
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(set(range(1000)) | set(range(10_000, 11_000)), in_buffer, quarantined)
    close(loop, buffer)


def test_a_shard_first_seen_half_written_goes_in_once_complete(ray_session, tmp_path):
    """A writer that writes in place (no rename into the landing directory): the
    loop first sees the head of the file, unreadable, and quarantines it whole;
    once the file is complete it is read again, and every row goes in once."""
    cfg, loop, buffer = make_loop(tmp_path, "source.recheck_every_s=0")
    landing = cfg.landing_dir
    write_id_shard(tmp_path / "complete.parquet", 0, 1000, bad_every=100)
    data = (tmp_path / "complete.parquet").read_bytes()
    (landing / "h-000.parquet").write_bytes(data[: len(data) // 2])
    run_until_done(loop)
    assert loop.manifest.get("h-000.parquet").status == "quarantined"
    (landing / "h-000.parquet").write_bytes(data)  # the writer finishes
    run_until_done(loop)
    rec = loop.manifest.get("h-000.parquet")
    assert rec.status == "ingested" and rec.good_rows == 990 and rec.bad_rows == 10
    assert loop.counters.shards_reread == 1 and loop.counters.shards_changed_in_place == 0
    assert [e.shard for e in list_quarantine(tmp_path) if e.error is not None] == []  # moved to reingested/
    in_buffer, quarantined = buffer_ids(buffer), quarantined_ids(tmp_path)
    assert_exactly_once(set(range(1000)), in_buffer, quarantined)

    # a shard that went in (even in part) and is then rewritten is still not read again
    (landing / "h-000.parquet").write_bytes(data[: len(data) // 2])
    run_until_done(loop)
    assert loop.counters.shards_changed_in_place == 1 and loop.counters.shards_reread == 1
    assert sorted(buffer_ids(buffer)) == sorted(in_buffer)
    close(loop, buffer)


def test_a_shard_rewritten_after_its_claim_goes_in_as_its_new_bytes_and_survives_a_rebuild(ray_session, tmp_path):
    """The file changes after the loop hashed and claimed it, before its reader
    opens it: the rows read are the new file's, so the manifest must record the
    new file, or the buffer's rebuild after a restart takes the file for changed
    and leaves its rows out. Then a rewrite to bytes another shard has makes it
    that shard's duplicate, read never."""
    import ray

    from livetrain.storage import shard_stat

    cfg, loop, buffer = make_loop(tmp_path, "source.recheck_every_s=0", "ingest.block_rows=300")
    landing = cfg.landing_dir
    path = landing / "r-000.parquet"
    write_id_shard(path, 0, 1000)
    loop.manifest.discover([path], {path.name: loop.manifest.content_hash(path)})
    write_id_shard(tmp_path / "new.parquet", 50_000, 1500)
    os.replace(tmp_path / "new.parquet", path)  # a new file under the name, after it was hashed
    loop.step(0.2, poll=False)  # claimed with the old record, before any listing sees the new file
    assert loop.manifest.get(path.name).status == "claimed"
    run_until_done(loop)
    rec = loop.manifest.get(path.name)
    assert rec.status == "ingested" and rec.good_rows == 1500
    assert (rec.size, rec.mtime_ns) == shard_stat(path) and rec.content_hash == loop.manifest.content_hash(path)
    assert sorted(buffer_ids(buffer)) == list(range(50_000, 51_500))
    assert loop.counters.shards_changed_in_place == 0 and loop.counters.shards_quarantined == 0

    after = _restart_rebuilt(buffer)
    assert (after["rebuilt_rows"], after["rebuilt_rows_lost"]) == (1500, 0)
    assert sorted(buffer_ids(buffer)) == list(range(50_000, 51_500))

    dup = landing / "d-001.parquet"
    write_id_shard(dup, 90_000, 700)
    loop.manifest.discover([dup], {dup.name: loop.manifest.content_hash(dup)})
    shutil.copyfile(path, tmp_path / "same.parquet")
    os.replace(tmp_path / "same.parquet", dup)  # now the bytes of r-000
    run_until_done(loop)
    rec = loop.manifest.get(dup.name)
    assert (rec.status, rec.duplicate_of) == ("duplicate", path.name)
    assert sorted(buffer_ids(buffer)) == list(range(50_000, 51_500))
    close(loop, buffer)


class _ObserveRecorder:
    """The registry's handle, as far as the loop uses it: records what each
    ``observe_many`` call carries."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        self.observe_many = self

    def remote(self, metas, blocks):
        import ray

        assert len(metas) == len(blocks)
        self.calls.append([(m.seq, m.rows) for m in metas])
        return ray.put(None)


def test_the_registry_scores_each_batch_in_one_call_in_arrival_order(ray_session, tmp_path):
    """Test before train, in arrival order: the registry is a threaded actor, so one
    call per block could be scored in any order (its live window, small holdouts and
    freshness assume arrival order). One call per batch keeps the order, and no
    block is scored twice or skipped."""
    cfg, loop, buffer = make_loop(tmp_path, "ingest.block_rows=300", "ingest.max_in_flight=4")
    loop.registry = recorder = _ObserveRecorder()
    for i in range(8):
        write_id_shard(cfg.landing_dir / f"o-{i:03d}.parquet", i * 10_000, 1000)
    run_until_done(loop)
    scored = [c for call in recorder.calls for c in call]
    assert [seq for seq, _ in scored] == sorted(seq for seq, _ in scored)
    assert sum(rows for _, rows in scored) == 8000 == len(buffer_ids(buffer))
    assert len(recorder.calls) < len(scored)  # batches, not a call per block
    close(loop, buffer)


class _SlowRemoteListing:
    """The landing directory as a remote one whose listing hangs until ``go`` is set
    (an S3 prefix with 100k objects takes ~100 requests to list)."""

    remote = True

    def __init__(self, source) -> None:
        self.source, self.go, self.listings = source, threading.Event(), 0
        self.go.set()

    def poll(self):
        self.go.wait(60)
        self.listings += 1
        return self.source.poll()


def test_a_slow_remote_listing_does_not_stall_the_loop(ray_session, tmp_path):
    cfg, loop, buffer = make_loop(tmp_path)
    loop.source = lister = _SlowRemoteListing(loop.source)

    def step_within(seconds: float = 5.0) -> None:
        t = threading.Thread(target=loop.step, args=(0.05,), daemon=True)
        t.start()
        t.join(seconds)
        assert not t.is_alive(), "a step waited for the landing directory's listing"

    try:
        write_id_shard(cfg.landing_dir / "r-000.parquet", 0, 1000)
        write_id_shard(cfg.landing_dir / "r-001.parquet", 10_000, 1000)
        step_within()
        wait_until(lambda: lister.listings == 1, 10, "the first listing")
        lister.go.clear()  # from here on, every listing hangs
        wait_until(lambda: step_within() or loop.counters.shards_ingested == 2, 30,
                   "the shards listed before to go in while a listing hangs", interval_s=0)
        write_id_shard(cfg.landing_dir / "r-002.parquet", 20_000, 1000)
        lister.go.set()
        wait_until(lambda: step_within() or loop.counters.shards_ingested == 3, 30,
                   "the shard in the listing that hung, once it is in", interval_s=0)
    finally:
        lister.go.set()
    assert_exactly_once(set(range(1000)) | set(range(10_000, 11_000)) | set(range(20_000, 21_000)),
                        buffer_ids(buffer), [])
    close(loop, buffer)


def test_parallel_ingest_actors_never_share_a_shard_and_keep_arrival_order(ray_session, tmp_path):
    import ray

    cfg, loop, buffer = make_loop(tmp_path, "ingest.num_actors=2", "ingest.max_in_flight=4", "ingest.block_rows=400")
    for i in range(10):
        write_id_shard(cfg.landing_dir / f"p-{i:03d}.parquet", i * 10_000, 1000 + 100 * (i % 3))
    run_until_done(loop)
    readers = loop.counters.readers
    assert len(readers) == 10 and len(set(readers.values())) == 2, readers
    assert loop.counters.shards_retried == 0
    metas = [m for m, _ in ray.get(buffer.held_blocks.remote())]
    seqs = [m.seq for m in metas]
    assert seqs == sorted(seqs), "blocks entered the buffer out of arrival order"
    assert [m.shard for m in metas if m.seq == seqs[0]] == ["p-000.parquet"] * 3
    assert_exactly_once({i * 10_000 + j for i in range(10) for j in range(1000 + 100 * (i % 3))}, buffer_ids(buffer), [])
    close(loop, buffer)


@pytest.mark.parametrize("policy", ["coverage", "freshness"])
def test_backpressure_coverage_waits_for_training_freshness_evicts_unseen(ray_session, tmp_path, policy):
    import threading

    import ray

    cfg, loop, buffer = make_loop(
        tmp_path, f"buffer.backpressure={policy}", "buffer.max_unseen_rows=1500", "buffer.capacity_rows=3000",
        "buffer.window_rows=1000", "ingest.block_rows=500",
    )
    for i in range(8):
        write_id_shard(cfg.landing_dir / f"c-{i:03d}.parquet", i * 10_000, 1000)
    stop = threading.Event()
    t = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    t.start()
    try:
        if policy == "coverage":
            s = wait_until(lambda: (s := ray.get(buffer.stats.remote()))["ingest_waits"] > 0 and s, 30, "a wait")
            assert s["unseen_rows"] <= 1500 and loop.manifest.counts()["ingested"] < 8
            fresh_after = -1

            def trainer_draws():  # a trainer taking fresh blocks, oldest first
                nonlocal fresh_after
                sample = ray.get(buffer.sample.remote(2, fresh_after, 1, 0.2))
                fresh_after = max([m.seq for m in sample.metas] + [fresh_after])
                return loop.manifest.counts()["ingested"] == 8

            wait_until(trainer_draws, 60, "every shard ingested while training draws", interval_s=0)
        else:
            wait_until(lambda: loop.manifest.counts()["ingested"] == 8, 30, "every shard ingested")
    finally:
        stop.set()
        t.join(30)
    s = ray.get(buffer.stats.remote())
    assert s["rows"] <= 3000 and s["rows_added"] == 8000
    if policy == "coverage":
        assert s["rows_evicted_unseen"] == 0
    else:
        assert s["ingest_waits"] == 0 and s["rows_evicted_unseen"] == 5000
    close(loop, buffer)
