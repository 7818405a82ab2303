"""``gate.holdout_fraction``: the newest shard is enough to judge a candidate.

Three shards land, then nothing more. Without held-out rows a candidate
trained through the last shard waits for a newer one that never comes; with
them it is judged on the last shard's held-out rows and served. Real Ray,
Ray Train, Serve over HTTP; a directory source fed by this test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _util import http, wait_until
from livetrain.actors.manifest import Manifest
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import SyntheticConfig, load_config
from livetrain.history import read_history
from livetrain.training.gate import holdout_mask

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

ROWS, SHARDS, FRACTION = 2000, 3, 0.25


def test_last_shard_is_served_without_waiting_for_another(ray_session, serve_port, tmp_path: Path):
    from livetrain.pipeline import Pipeline

    landing, state = tmp_path / "landing", tmp_path / "state"
    landing.mkdir()
    stream = SyntheticStream(SyntheticConfig(generator="sea", variant=2, seed=5), tmp_path / "unused")
    shards = [stream.next_rows(ROWS) for _ in range(SHARDS)]
    for seq, (x, y) in enumerate(shards):
        table = pa.table({**{f"x{i}": x[:, i] for i in range(x.shape[1])}, "label": y})
        pq.write_table(table, landing / f".s{seq}.tmp")
        (landing / f".s{seq}.tmp").rename(landing / f"s{seq}.parquet")
    cfg = load_config(None, [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={serve_port}",
        "source.kind=directory", f"source.path={landing}", "train.min_buffer_rows=1000",
        f"gate.holdout_fraction={FRACTION}", "gate.min_eval_rows=300",
    ])
    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        wait_until(lambda: p.snapshot()["shards_ingested"] == SHARDS, 120, "every shard ingested")
        with Manifest(state) as manifest:
            last = manifest.get(f"s{SHARDS - 1}.parquet").seq

        def promoted_through_last():
            done = [e for e in read_history(state) if e["kind"] == "decision" and e["action"] == "promote"]
            return next((e for e in done if e["trained_through"] == last), None)

        decision = wait_until(promoted_through_last, 180, "a version trained through the last shard, served")
        held = int(holdout_mask(shards[-1][0], FRACTION).sum())
        assert 300 <= decision["eval_rows"] <= held  # judged on the last shard's held-out rows alone
        x = shards[-1][0][:2].tolist()
        answer = wait_until(
            lambda: (a := http("POST", p.url + "/predict", {"instances": x})[1])["model_version"] >= decision["version"] and a,
            60, "answers from that version")
        assert len(answer["predictions"]) == 2
    finally:
        p.stop()


def test_each_part_of_a_large_shard_can_be_served_without_waiting_for_another(ray_session, serve_port, tmp_path: Path):
    """One large shard goes in by parts, paced by training (``coverage``): the
    versions trained on its later parts are proposed and served too, though
    they share its seq, not only the one trained on its first part."""
    from livetrain.pipeline import Pipeline

    landing, state = tmp_path / "landing", tmp_path / "state"
    landing.mkdir()
    x, y = SyntheticStream(SyntheticConfig(generator="sea", variant=2, seed=6), tmp_path / "unused").next_rows(8000)
    pq.write_table(pa.table({**{f"x{i}": x[:, i] for i in range(x.shape[1])}, "label": y}), landing / ".big.tmp")
    (landing / ".big.tmp").rename(landing / "big.parquet")
    cfg = load_config(None, [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={serve_port}",
        "source.kind=directory", f"source.path={landing}", "train.min_buffer_rows=500", "train.propose_every_s=0.5",
        "ingest.block_rows=500", "ingest.commit_rows=1000", "buffer.backpressure=coverage", "buffer.max_unseen_rows=1000",
        "gate.holdout_fraction=0.25", "gate.min_eval_rows=100",
    ])
    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        def promotions():
            return [e for e in read_history(state) if e["kind"] == "decision" and e["action"] == "promote"]

        wait_until(lambda: len(promotions()) >= 3, 180, "three versions served from one shard's parts")
        with Manifest(state) as manifest:
            seq = manifest.get("big.parquet").seq
        assert {e["trained_through"] for e in promotions()} == {seq}
    finally:
        p.stop()
