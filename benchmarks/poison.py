"""How often a burst of poisoned shards reaches the endpoint (one JSON line per
burst length).

    python benchmarks/poison.py [--seeds 20] [--bursts 10,16] [--every 1] [--block-rows 500]

Replays a stationary SEA stream (10% label noise) through livetrain's loop
without Ray (``quality.run_livetrain``: served model scored, registry, buffer,
learner, gate; shipped defaults). ``--bursts`` consecutive shards, 12 shards
after the start (the served model has settled by then), get coin tosses for
labels (with ``--every K``, only every K-th shard of that stretch: poison
mixed into clean data), and 12 clean shards follow.

A burst *reaches the endpoint* when a version served from its first shard on
is more than 3 points less accurate on clean rows (4,000 fresh rows of the
same concept) than the version served when it began: the model the users get
learnt the poison. ``value`` counts the seeds (bursts) where that happened;
``promotions_during`` counts the versions promoted while a poisoned shard was
the newest one (for whole bursts, luck: every model scores alike on random
labels); ``worst_drop`` is the largest such loss of clean accuracy over all
bursts; ``rows_to_promotion_after`` the median of rows from the burst's end to
the first promotion after it (the gate serving fresh models again).
``tests/test_poison.py`` runs one burst through real Ray and Serve; this is
the rate.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from _common import emit
from livetrain.config import load_config
from quality import Stream, _switch, run_livetrain

LEAD_SHARDS, TAIL_SHARDS = 12, 12
CLEAN_ROWS = 4000
MAX_DROP = 0.03
"""Clean accuracy a version may lose against the one served when the burst began (as tests/test_poison.py)."""


def poisoned_sea(seed: int, block_rows: int, burst: int, every: int = 1) -> tuple[Stream, int, int, Stream]:
    """A stationary SEA stream whose shards ``LEAD_SHARDS + i`` (i < ``burst``, i % ``every`` == 0)
    have random labels; (stream, first poisoned row, end row of the burst, clean rows to judge on)."""
    from river.datasets import synth

    n = (LEAD_SHARDS + burst + TAIL_SHARDS) * block_rows
    x, y = _switch([synth.SEA(variant=0, noise=0.1, seed=seed)], [], n + CLEAN_ROWS, seed)
    lo, hi = LEAD_SHARDS * block_rows, (LEAD_SHARDS + burst) * block_rows
    rng = np.random.default_rng(seed + 1000)
    for start in range(lo, hi, every * block_rows):
        y[start : start + block_rows] = rng.integers(0, 2, block_rows)
    note = f"SEA 10% noise, every {every} of shards {LEAD_SHARDS}..{LEAD_SHARDS + burst - 1} random labels"
    return Stream("sea-poisoned", x[:n], y[:n], 2, [], note), lo, hi, Stream("sea-clean", x[n:], y[n:], 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20, help="bursts per length (one seed each)")
    ap.add_argument("--bursts", default="10,16", help="burst lengths in shards, comma list")
    ap.add_argument("--every", type=int, default=1, help="poison every K-th shard of the burst (1: all)")
    ap.add_argument("--block-rows", type=int, default=500)
    ap.add_argument("--samples-per-row", type=float, default=25.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = ap.parse_args()
    if args.every < 1:
        raise SystemExit("--every: must be >= 1")
    torch.set_num_threads(1)
    cfg = load_config(None, args.set)
    for burst in (int(b) for b in args.bursts.split(",")):
        reached, during, after, alarms, worst = 0, 0, [], [], 0.0
        for seed in range(1, args.seeds + 1):
            s, lo, hi, clean = poisoned_sea(seed, args.block_rows, burst, args.every)
            decisions: list = []
            run = run_livetrain(s, cfg, args.block_rows, args.samples_per_row, seed, decisions)
            before = next((v for row, _, v in reversed(decisions) if row <= lo), None)
            served = {v.version: v for row, _, v in decisions if row > lo and v is not None}
            if before is not None:
                base = float((before.predict(clean.x) == clean.y).mean())
                drop = max((base - float((v.predict(clean.x) == clean.y).mean()) for v in served.values()), default=0.0)
                worst = max(worst, drop)
                reached += drop > MAX_DROP
            promoted = [row for row, d, _ in decisions if d.action == "promote"]
            during += sum(lo < row <= hi for row in promoted)  # decided while a poisoned stretch was the newest
            first_after = next((row for row in promoted if row > hi), None)
            if first_after is not None:
                after.append(first_after - hi)
            alarms.append(run.extra["drift_alarms"])
        emit(f"poison/bursts_reaching_endpoint/{burst}_shards" + (f"_every_{args.every}" if args.every > 1 else ""),
             reached, "bursts", bursts=args.seeds, promotions_during=during, worst_drop=round(worst, 4),
             burst_rows=burst * args.block_rows, poisoned_every=args.every, alarm_hold_rows=cfg.gate.alarm_hold_rows,
             rows_to_promotion_after=statistics.median(after) if after else None,
             resumed_after=len(after), alarms=statistics.median(alarms))


if __name__ == "__main__":
    main()
