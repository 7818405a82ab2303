"""How often a burst of poisoned shards reaches the endpoint (one JSON line per
burst length).

    python benchmarks/poison.py [--seeds 20] [--bursts 10,16] [--block-rows 500]

Replays a stationary SEA stream (10% label noise) through livetrain's loop
without Ray (``quality.run_livetrain``: served model scored, registry, buffer,
learner, gate; shipped defaults), with the labels of ``--bursts`` consecutive
shards replaced by coin tosses, 12 shards after the start (the served model
has settled by then), and 12 clean shards after. A burst *reaches the
endpoint* when the gate promotes any version while the burst is being
ingested (from its first shard to its last): on random labels every model
scores alike, so whatever is promoted then was promoted on luck, and the
candidates of that time have trained on the poison.

Per burst length: ``value`` is the number of seeds (bursts) in which that
happened; ``promotions_during`` counts them all; ``rows_to_promotion_after``
is the median of rows from the burst's end to the first promotion after it
(the gate serving fresh models again); ``alarms`` the error-drift alarms per
burst (median). ``tests.test_poison`` runs the same through real Ray and
Serve, once; this is the rate.
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


def poisoned_sea(seed: int, block_rows: int, burst: int) -> tuple[Stream, int, int]:
    """A stationary SEA stream with ``burst`` shards of random labels; (stream, first row, end row)."""
    from river.datasets import synth

    n = (LEAD_SHARDS + burst + TAIL_SHARDS) * block_rows
    x, y = _switch([synth.SEA(variant=0, noise=0.1, seed=seed)], [], n, seed)
    lo, hi = LEAD_SHARDS * block_rows, (LEAD_SHARDS + burst) * block_rows
    y[lo:hi] = np.random.default_rng(seed + 1000).integers(0, 2, hi - lo)
    return Stream("sea-poisoned", x, y, 2, [], f"SEA 10% noise, shards {LEAD_SHARDS}..{LEAD_SHARDS + burst - 1} random labels"), lo, hi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20, help="bursts per length (one seed each)")
    ap.add_argument("--bursts", default="10,16", help="burst lengths in shards, comma list")
    ap.add_argument("--block-rows", type=int, default=500)
    ap.add_argument("--samples-per-row", type=float, default=25.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, args.set)
    for burst in (int(b) for b in args.bursts.split(",")):
        reached, during, after, alarms = 0, 0, [], []
        for seed in range(1, args.seeds + 1):
            s, lo, hi = poisoned_sea(seed, args.block_rows, burst)
            decisions: list = []
            run = run_livetrain(s, cfg, args.block_rows, args.samples_per_row, seed, decisions)
            promoted = [row for row, d in decisions if d.action == "promote"]
            n = sum(lo < row <= hi for row in promoted)  # decided while a poisoned shard was the newest
            reached += n > 0
            during += n
            first_after = next((row for row in promoted if row > hi), None)
            if first_after is not None:
                after.append(first_after - hi)
            alarms.append(run.extra["drift_alarms"])
        emit(f"poison/bursts_reaching_endpoint/{burst}_shards", reached, "bursts", bursts=args.seeds,
             promotions_during=during, burst_rows=burst * args.block_rows,
             alarm_hold_rows=cfg.gate.alarm_hold_rows,
             rows_to_promotion_after=statistics.median(after) if after else None,
             resumed_after=len(after), alarms=statistics.median(alarms))


if __name__ == "__main__":
    main()
