"""How fast the DDP ranks work through a backlog: rows of unseen data drawn
per second by 2 Ray Train workers against 1 worker, in one run.

    python benchmarks/catchup.py [--shards 1000] [--rows-per-shard 1000]

A backlog of shards lands before training starts (``train.min_buffer_rows``
is all of it, so the first round sees the whole backlog). The clock runs
from the trainers' first draw to the last unseen row drawn
(``ReplayBuffer.unseen_rows`` reaching 0). Each rank draws
``train.blocks_per_round`` blocks a round; the ranks share a backlog out, so
two workers should get through it up to twice as fast as one (on 2 CPU
cores the two workers also share the machine with ingest and Serve).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def catch_up(landing: Path, state: Path, workers: int, total_rows: int) -> tuple[float, int]:
    """Seconds from the first draw until no row is unseen, and the rows drawn meanwhile."""
    import ray

    from _util import free_port, wait_until
    from livetrain.config import load_config
    from livetrain.pipeline import Pipeline

    cfg = load_config(None, [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={free_port()}",
        "source.kind=directory", f"source.path={landing}", f"train.num_workers={workers}",
        f"train.min_buffer_rows={total_rows}", f"buffer.capacity_rows={total_rows}",
        "buffer.capacity_bytes=2147483648",
    ])
    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        def unseen() -> int:
            return ray.get(p.buffer.stats.remote())["unseen_rows"]

        wait_until(lambda: ray.get(p.buffer.stats.remote())["rows"] >= total_rows, 600, "the backlog in the buffer", 0.05)
        at_start = wait_until(lambda: (u := unseen()) < total_rows and u, 600, "the first draw", 0.01)
        t0 = time.monotonic()
        wait_until(lambda: unseen() == 0, 600, "the backlog drawn", 0.01)
        return time.monotonic() - t0, at_start
    finally:
        p.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    args = ap.parse_args()

    from livetrain.actors.synthetic import SyntheticStream
    from livetrain.config import SyntheticConfig, load_config

    tmp = Path(tempfile.mkdtemp(prefix="livetrain-bench-catchup-"))
    stream = SyntheticStream(SyntheticConfig(generator="sea", variant=2, rows_per_shard=args.rows_per_shard, seed=1),
                             tmp / "landing")
    for _ in range(args.shards):
        stream.write_shard()
    total = args.shards * args.rows_per_shard
    tc = load_config(None, []).train
    try:
        rates = {}
        for workers in (1, 2):
            seconds, drawn = catch_up(tmp / "landing", tmp / f"state-{workers}", workers, total)
            rates[workers] = drawn / seconds
        emit("catchup_2_workers_rows_per_s", round(rates[2]), "rows/s", baseline=round(rates[1]),
             baseline_is="the same backlog, 1 worker", backlog_rows=total,
             round=f"{tc.blocks_per_round} blocks of {args.rows_per_shard} rows per rank, "
                   f"{tc.steps_per_round} steps of batch {tc.batch_size}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
