"""``gate.holdout_fraction``: the newest shard is enough to judge a candidate.

One shard lands, then nothing more. Without held-out rows a candidate
trained through it waits for a newer shard that never comes; with them it
is judged on the shard's held-out rows and served. Real Ray, Ray Train,
Serve over HTTP; a directory source fed by this test."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _util import http, wait_until
from livetrain.actors.manifest import Manifest
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import SyntheticConfig, load_config
from livetrain.history import read_history
from livetrain.training.gate import held_out

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]


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
        done = promotions()
        assert {e["trained_through"] for e in done} == {seq}
        held = sum(int(held_out(x[lo : lo + 500], 0.25, 100).sum()) for lo in range(0, len(x), 500))
        assert all(100 <= e["eval_rows"] <= held for e in done)  # judged on held-out rows alone
        answer = wait_until(
            lambda: (a := http("POST", p.url + "/predict", {"instances": x[:2].tolist()})[1])["model_version"]
            >= done[-1]["version"] and a, 60, "answers from the newest of them")
        assert len(answer["predictions"]) == 2
    finally:
        p.stop()
