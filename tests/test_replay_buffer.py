"""Replay buffer logic, without Ray: handles are plain ints."""

from __future__ import annotations

import collections

import pytest

from livetrain.actors.replay_buffer import BlockTooLarge, ReplayBuffer
from livetrain.config import BufferConfig
from livetrain.messages import BlockMeta


def meta(seq: int, rows: int = 100, nbytes: int | None = None) -> BlockMeta:
    return BlockMeta(
        shard=f"shard-{seq:06d}.parquet",
        seq=seq,
        rows=rows,
        nbytes=rows * 16 if nbytes is None else nbytes,
        written_at=float(seq),
        ingested_at=float(seq),
    )


def cfg(**kw) -> BufferConfig:
    base = dict(capacity_rows=1000, capacity_bytes=10**9, window_rows=300, recent_fraction=0.5, seed=1)
    base.update(kw)
    return BufferConfig(**base)


def fill(buf: ReplayBuffer, n: int, rows: int = 100) -> None:
    for seq in range(n):
        buf.add(seq, meta(seq, rows))


def test_window_keeps_newest_blocks_in_fifo_order():
    buf = ReplayBuffer(cfg())
    fill(buf, 5)
    s = buf.stats()
    assert s.window_rows == 300
    assert [e.meta.seq for e in buf.entries()[: s.window_blocks]] == [2, 3, 4]


def test_evicted_rows_enter_reservoir():
    buf = ReplayBuffer(cfg())
    fill(buf, 5)
    s = buf.stats()
    assert s.reservoir_blocks == 2
    assert sorted(e.handle for e in buf.entries()[s.window_blocks :]) == [0, 1]
    assert s.rows == 500 and s.rows_evicted == 0


def test_row_capacity_is_never_exceeded():
    buf = ReplayBuffer(cfg())
    for seq in range(200):
        dropped = buf.add(seq, meta(seq))
        assert buf.stats().rows <= 1000
        assert all(d.meta.seq < seq for d in dropped)
    s = buf.stats()
    assert s.rows == 1000 and s.rows_added == 20_000 and s.rows_evicted == 19_000


def test_byte_capacity_is_never_exceeded():
    buf = ReplayBuffer(cfg(capacity_bytes=5000, window_rows=1000))
    for seq in range(50):
        buf.add(seq, meta(seq, rows=10, nbytes=1000))
        assert buf.stats().bytes <= 5000
    assert buf.stats().blocks == 5


def test_window_drops_oldest_when_it_alone_exceeds_capacity():
    buf = ReplayBuffer(cfg(capacity_rows=300, window_rows=300))
    fill(buf, 10)
    assert [e.meta.seq for e in buf.entries()] == [7, 8, 9]
    assert buf.stats().rows_evicted_unseen == 700


def test_block_larger_than_capacity_is_refused_with_reason():
    buf = ReplayBuffer(cfg(capacity_rows=100, window_rows=100))
    with pytest.raises(BlockTooLarge, match="exceeds buffer capacity"):
        buf.add(0, meta(0, rows=101))


def test_late_block_joins_window_in_arrival_order():
    # a retried shard can arrive after newer ones; it is kept, not refused
    buf = ReplayBuffer(cfg())
    buf.add(0, meta(5))
    buf.add(1, meta(3))
    assert [e.meta.seq for e in buf.entries()] == [5, 3]
    assert buf.stats().newest_seq == 5


def test_reservoir_is_a_uniform_sample_of_evicted_blocks():
    # 1000 blocks pass through; the reservoir keeps 7 of the 997 evicted ones.
    # Over many seeds each evicted block should be kept about equally often.
    kept = collections.Counter()
    trials = 300
    for seed in range(trials):
        buf = ReplayBuffer(cfg(capacity_rows=1000, window_rows=300, seed=seed))
        fill(buf, 200)
        s = buf.stats()
        kept.update(e.meta.seq // 50 for e in buf.entries()[s.window_blocks :])
    # evicted seqs are 0..196; quarters 0..3 hold 50, 50, 50, 47 of them
    per_block = [kept[q] / n for q, n in zip(range(4), (50, 50, 50, 47))]
    mean = sum(per_block) / 4
    assert all(abs(p - mean) / mean < 0.2 for p in per_block), per_block


def test_fresh_blocks_are_sampled_first_and_oldest_first():
    buf = ReplayBuffer(cfg())
    fill(buf, 5)
    assert [e.meta.seq for e in buf.sample(3, fresh_after=-1)] == [0, 1, 2]
    picked = buf.sample(2, fresh_after=2)
    assert [e.meta.seq for e in picked] == [3, 4]
    picked = buf.sample(1, fresh_after=1)
    assert [e.meta.seq for e in picked] == [2]


def test_undrawn_blocks_of_the_callers_newest_shard_stay_fresh():
    """A shard's blocks share its seq: a draw that took some of them, or parts of a
    large shard that arrived after, must not fall out of the unseen-first order."""
    buf = ReplayBuffer(cfg(window_rows=10_000, capacity_rows=10_000))
    for part in range(4):
        buf.add(f"s7-{part}", BlockMeta("s7", 7, 10, 10, 0.0, 0.0))
    first = buf.sample(2, fresh_after=-1)
    assert [e.handle for e in first] == ["s7-0", "s7-1"]
    buf.add("s7-4", BlockMeta("s7", 7, 10, 10, 0.0, 0.0))  # a later part of the same shard
    rest = buf.sample(3, fresh_after=7)
    assert [e.handle for e in rest] == ["s7-2", "s7-3", "s7-4"]
    assert buf.unseen_rows == 0


def test_a_shard_larger_than_the_window_is_drawn_whole_before_the_mix():
    """Blocks of the caller's newest shard that the window could not hold went to
    the reservoir undrawn: they stay fresh (else, with an all-recent mix, never
    drawn, and a coverage limiter would count them unseen for ever)."""
    buf = ReplayBuffer(cfg(window_rows=20, capacity_rows=1_000, recent_fraction=1.0))
    for part in range(10):
        buf.add(f"s0-{part}", BlockMeta("s0", 0, 10, 10, 0.0, 0.0))
    assert len(buf.window_entries()) == 2
    drawn = [e.handle for e in buf.sample(3, fresh_after=-1)]
    assert drawn == ["s0-0", "s0-1", "s0-2"]
    drawn += [e.handle for e in buf.sample(3, fresh_after=0)]
    drawn += [e.handle for e in buf.sample(4, fresh_after=0)]
    assert drawn == [f"s0-{part}" for part in range(10)]
    assert buf.unseen_rows == 0


def test_sampling_mix_follows_recent_fraction():
    buf = ReplayBuffer(cfg(recent_fraction=0.8))
    fill(buf, 10)  # window: 3 blocks, reservoir: 7
    window = {e.meta.seq for e in buf.entries()[:3]}
    picked = buf.sample(5000, fresh_after=10**9)
    share = sum(e.meta.seq in window for e in picked) / len(picked)
    assert 0.77 < share < 0.83


def test_all_recent_when_reservoir_is_empty():
    buf = ReplayBuffer(cfg(recent_fraction=0.0))
    fill(buf, 2)
    assert len(buf.sample(10, fresh_after=99)) == 10


def test_unseen_eviction_is_counted_only_for_unsampled_blocks():
    buf = ReplayBuffer(cfg(capacity_rows=200, window_rows=200))
    buf.add(0, meta(0))
    buf.sample(1, fresh_after=-1)  # block 0 is now seen
    buf.add(1, meta(1))
    buf.add(2, meta(2))  # evicts 0 (seen)
    buf.add(3, meta(3))  # evicts 1 (unseen)
    s = buf.stats()
    assert s.rows_evicted == 200 and s.rows_evicted_unseen == 100


def test_empty_buffer_samples_nothing():
    assert ReplayBuffer(cfg()).sample(4) == []


def test_drift_reaction_shortens_window_and_raises_recent_share():
    buf = ReplayBuffer(cfg(window_rows=500, recent_fraction=0.2))
    fill(buf, 10)
    assert buf.stats().window_rows == 500
    buf.set_mix(recent_fraction=0.95, window_rows_scale=0.4)
    s = buf.stats()
    assert s.window_rows == 200 and s.rows == 1000  # moved to the reservoir, nothing lost
    window = {e.meta.seq for e in buf.window_entries()}
    picked = buf.sample(4000, fresh_after=10**9)
    assert sum(e.meta.seq in window for e in picked) / len(picked) > 0.9
    with pytest.raises(ValueError):
        buf.set_mix(1.5)


def test_a_backlog_is_trained_oldest_first_so_the_newest_rows_stay_unseen():
    """10 blocks land before the trainer's first round; the window holds only
    the newest 3. Unseen blocks come oldest first from window and reservoir:
    the first candidate leaves the newest rows for the gate to judge it on."""
    buf = ReplayBuffer(cfg())  # capacity 1000 rows: all 10 blocks held, 7 of them in the reservoir
    fill(buf, 10)
    first = buf.sample(4, fresh_after=-1)
    assert [e.meta.seq for e in first] == [0, 1, 2, 3]
    second = buf.sample(4, fresh_after=3)
    assert [e.meta.seq for e in second] == [4, 5, 6, 7]
    assert [e.meta.seq for e in buf.sample(4, fresh_after=7)][:2] == [8, 9]  # then the mix fills the round


def test_ranks_share_out_a_backlog_each_block_once_oldest_first():
    """Two DDP ranks, each with its own ``fresh_after``, draw 4 blocks a round
    from a backlog of 16: each takes every other block, oldest first, and no
    block goes to both (before, both trained on the same 4 blocks a round)."""
    buf = ReplayBuffer(cfg(capacity_rows=10_000))
    fill(buf, 16)
    fresh_after = [-1, -1]
    drawn: list[list[int]] = [[], []]
    for _ in range(2):
        for rank in (0, 1):
            seqs = [e.meta.seq for e in buf.sample(4, fresh_after[rank], rank=rank, world=2)]
            drawn[rank] += seqs
            fresh_after[rank] = max([fresh_after[rank], *seqs])
    assert drawn == [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    assert [e.sampled for e in sorted(buf.entries(), key=lambda e: e.meta.seq)] == [1] * 16
    assert buf.unseen_rows == 0


def test_unseen_blocks_that_fit_one_draw_go_to_every_rank():
    """No backlog: every rank trains on the new blocks (as one worker would)."""
    buf = ReplayBuffer(cfg(capacity_rows=10_000))
    fill(buf, 8)
    buf.sample(4, fresh_after=-1)  # 0-3 drawn
    for rank in (0, 1, 2):
        assert [e.meta.seq for e in buf.sample(4, fresh_after=3, rank=rank, world=3)] == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        buf.sample(4, rank=2, world=2)


@pytest.mark.parametrize("seed", range(20))
def test_ranks_drawing_while_blocks_arrive_leave_no_block_undrawn(seed):
    """Blocks arrive (one-block and several-block shards) while 1-3 ranks draw
    rounds in turn, each moving its ``fresh_after`` as the trainer does; once
    arrivals stop and every rank has drawn its unseen blocks, none was skipped:
    backlog or not, shared out or not."""
    import random

    rng = random.Random(seed)
    world, n_blocks = rng.randint(1, 3), rng.randint(1, 5)
    buf = ReplayBuffer(cfg(capacity_rows=100_000, window_rows=rng.choice([100, 500, 5_000])))
    fresh_after, seq, handle = [-1] * world, 0, 0
    for _ in range(60):
        for _ in range(rng.choice([0, 0, 1, 3, 9])):  # a shard of 1-3 blocks
            for _ in range(rng.randint(1, 3)):
                buf.add(handle, meta(seq))
                handle += 1
            seq += 1
        rank = rng.randrange(world)
        picked = buf.sample(n_blocks, fresh_after[rank], rank=rank, world=world)
        fresh_after[rank] = max([fresh_after[rank], *(e.meta.seq for e in picked)])
    for _ in range(10 * handle):
        if buf.unseen_rows == 0:
            break
        for rank in range(world):
            picked = buf.sample(n_blocks, fresh_after[rank], rank=rank, world=world)
            fresh_after[rank] = max([fresh_after[rank], *(e.meta.seq for e in picked)])
    assert buf.unseen_rows == 0
    assert all(e.sampled for e in buf.entries())


def test_withdraw_takes_a_shards_blocks_out_of_window_and_reservoir():
    buf = ReplayBuffer(cfg())
    fill(buf, 5)  # seqs 0-1 in the reservoir, 2-4 in the window
    for part in range(3):  # a large shard's parts: blocks of one shard, one seq
        buf.add(("big", part), meta(7))
    buf.sample(2, fresh_after=-1)  # two unseen blocks drawn
    before = buf.stats()
    gone = buf.withdraw("shard-000007.parquet")
    after = buf.stats()
    assert sorted(e.handle for e in gone) == [("big", 0), ("big", 1), ("big", 2)]
    assert all(e.meta.shard != "shard-000007.parquet" for e in buf.entries())
    assert after.rows == before.rows - 300 and after.rows_withdrawn == 300 and after.rows_evicted == before.rows_evicted
    assert after.window_rows + after.reservoir_rows == after.rows
    assert after.unseen_rows == sum(e.meta.rows for e in buf.entries() if e.sampled == 0)
    buf.add(8, meta(8))  # and it goes on within its bounds
    assert buf.stats().rows <= 1000 and buf.withdraw("no-such-shard") == []


def test_the_blocks_of_one_chunk_leave_the_reservoir_together():
    """A chunk object lives while any of its blocks is held: its blocks share one
    reservoir key, so at most one chunk is ever held in part (the store holds no
    more than the buffer counts, give or take that one chunk)."""
    buf: ReplayBuffer[int] = ReplayBuffer(cfg(capacity_rows=2000, window_rows=400))
    gone: set[int] = set()
    for k in range(300):
        for half in range(2):
            gone |= {e.handle for e in buf.add(2 * k + half, meta(k, 50), chunk=k)}
        held = {e.handle for e in buf.entries()}
        in_part = {h // 2 for h in held if (h ^ 1) in gone}
        assert len(in_part) <= 1, f"chunks held in part after chunk {k}: {sorted(in_part)}"
    assert len(gone) == 560 and buf.stats().reservoir_blocks > 20


def test_a_block_of_exactly_the_capacity_is_accepted():
    rows = ReplayBuffer(cfg(capacity_rows=100, window_rows=100))
    rows.add(0, meta(0, rows=100))
    assert rows.stats().rows == 100
    nbytes = ReplayBuffer(cfg(capacity_bytes=1600))
    nbytes.add(0, meta(0, rows=100, nbytes=1600))
    assert nbytes.stats().bytes == 1600


def test_a_late_shard_in_a_backlog_is_drawn_in_seq_order_not_arrival_order():
    """A retried shard (seq 3) lands after 4 and 5 while the backlog reaches into
    the reservoir: unseen blocks still come oldest shard first."""
    buf = ReplayBuffer(cfg())  # window 300 rows: the last three to arrive
    for seq in (0, 1, 2, 4, 5, 3):
        buf.add(seq, meta(seq))
    assert [e.meta.seq for e in buf.window_entries()] == [4, 5, 3]
    assert [e.meta.seq for e in buf.sample(6, fresh_after=-1)] == [0, 1, 2, 3, 4, 5]


def test_drawing_blocks_again_never_counts_their_rows_unseen_twice():
    buf = ReplayBuffer(cfg())
    fill(buf, 5)
    buf.sample(2, fresh_after=-1)
    for _ in range(5):  # the mix draws blocks 0 and 1 (and others) again and again
        buf.sample(20, fresh_after=1)
        assert buf.stats().unseen_rows == sum(e.meta.rows for e in buf.entries() if e.sampled == 0)
    assert buf.stats().unseen_rows == 0


def test_mixed_draws_are_weighted_by_rows():
    buf = ReplayBuffer(cfg(capacity_rows=2000, window_rows=2000))
    buf.add("big", meta(0, rows=1000))
    buf.add("small", meta(1, rows=10))
    picked = buf.sample(4000, fresh_after=10**9)
    share = sum(e.handle == "big" for e in picked) / len(picked)
    assert 0.98 < share  # 1000 / 1010 = 0.990; unweighted it would be 0.5


def test_a_block_restored_unsampled_counts_as_unseen_and_a_sampled_one_does_not():
    buf = ReplayBuffer(cfg())
    buf.restore_to_reservoir(0, meta(0), sampled=1)
    assert buf.stats().unseen_rows == 0
    buf.restore_to_reservoir(1, meta(1, rows=40), sampled=0)
    assert buf.stats().unseen_rows == 40


def test_the_window_scale_is_relative_to_the_configured_window_not_the_current_one():
    buf = ReplayBuffer(cfg(window_rows=500))
    buf.set_mix(0.5, window_rows_scale=0.4)
    assert buf.window_limit == 200
    buf.set_mix(0.5, window_rows_scale=1.0)
    assert buf.window_limit == 500
    buf.set_mix(0.5, window_rows_scale=0.5)
    buf.set_mix(0.5, window_rows_scale=0.5)
    assert buf.window_limit == 250


def test_withdrawing_a_shard_already_drawn_leaves_the_unseen_count_alone():
    buf = ReplayBuffer(cfg())
    fill(buf, 5)
    for part in range(2):
        buf.add(("big", part), meta(7))
    buf.sample(7, fresh_after=-1)  # every block drawn, the shard's two among them
    buf.add(8, meta(8))
    assert buf.stats().unseen_rows == 100
    buf.withdraw("shard-000007.parquet")
    assert buf.stats().unseen_rows == 100
