"""A backlog is shared out among the DDP ranks: with two workers, the first
round trains on twice as many of the waiting shards as one worker draws.
Real Ray, Ray Train (2 workers, gloo), Serve; a directory source fed by this test."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _util import wait_until
from livetrain.actors.manifest import Manifest
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import SyntheticConfig, load_config
from livetrain.history import read_history

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

SHARDS, ROWS = 40, 100


def test_two_ranks_share_out_a_backlog_instead_of_training_on_the_same_blocks(ray_session, serve_port, tmp_path: Path):
    """Forty one-block shards wait before training starts (``min_buffer_rows``
    is all of them). Each rank draws ``blocks_per_round`` (8) unseen blocks a
    round; the one proposal (right after the first round) is trained through
    the 16th shard when the ranks split the backlog, through the 8th when both
    take the same blocks."""
    from livetrain.pipeline import Pipeline

    landing, state = tmp_path / "landing", tmp_path / "state"
    landing.mkdir()
    x, y = SyntheticStream(SyntheticConfig(generator="sea", variant=2, seed=3), tmp_path / "unused").next_rows(SHARDS * ROWS)
    for i in range(SHARDS):
        lo = i * ROWS
        table = pa.table({**{f"x{j}": x[lo : lo + ROWS, j] for j in range(x.shape[1])}, "label": y[lo : lo + ROWS]})
        pq.write_table(table, landing / f".s{i:04d}.tmp")
        (landing / f".s{i:04d}.tmp").rename(landing / f"s{i:04d}.parquet")
    cfg = load_config(None, [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={serve_port}",
        "source.kind=directory", f"source.path={landing}", f"train.min_buffer_rows={SHARDS * ROWS}",
        "train.num_workers=2", "train.blocks_per_round=8", "train.propose_every_s=3600",
    ])
    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        decisions = wait_until(lambda: [e for e in read_history(state) if e["kind"] == "decision"], 180,
                               "the first candidate decided")
    finally:
        p.stop()
    with Manifest(state) as manifest:
        seqs = sorted(r.seq for r in manifest.ingested())
    assert len(seqs) == SHARDS
    # 16 distinct blocks drawn: the newest of them is at least the 16th shard (the ranks'
    # shares follow arrival order, which may differ a little from seq order)
    assert decisions[0]["trained_through"] >= seqs[15], (decisions[0]["trained_through"], seqs[:17])
