"""``schema.infer`` with real Ray: the schema comes from the first shard that fits
(as ``Pipeline.start`` resolves it), ingest runs on it, and a later shard that
does not fit is quarantined whole; the verdicts reach metrics.jsonl by reason."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _ingest_util import assert_exactly_once, buffer_ids, close, quarantined_ids, run_until_done, write_id_shard
from livetrain.actors.manifest import Manifest
from livetrain.actors.schema_pin import resolve_schema
from livetrain.config import load_config
from livetrain.pipeline import _numbers
from livetrain.tracking import Tracker, read_metrics

pytestmark = [pytest.mark.ray]


def test_inferred_schema_ingests_good_shards_and_quarantines_one_that_does_not_fit(ray_session, tmp_path):
    from livetrain.actors.buffer_actor import ReplayBufferActor
    from livetrain.actors.ingest import IngestLoop

    cfg = load_config(None, [
        f"state_dir={tmp_path}", "schema.infer=true", "schema.id_column=id",
        "buffer.capacity_rows=100000", "buffer.window_rows=100000",
    ])
    landing = cfg.landing_dir
    landing.mkdir(parents=True)
    (landing / "a-000.parquet").write_bytes(b"PAR1 but not really")  # oldest: cannot define the schema
    all_ids = set(range(1000))
    write_id_shard(landing / "a-001.parquet", 0, 1000, bad_every=50)

    manifest = Manifest(tmp_path)
    schema = resolve_schema(cfg.schema, manifest, landing)  # what Pipeline.start does first
    assert (schema.features, schema.id_column, manifest.pinned_schema()[1]) == (["x0", "x1", "x2"], "id", "a-001.parquet")
    cfg = dataclasses.replace(cfg, schema=schema)

    # later shards: one more that fits, one with an extra column, one with the features as a list
    write_id_shard(landing / "a-002.parquet", 10_000, 1000, bad_every=50)
    all_ids |= set(range(10_000, 11_000))
    x = np.random.default_rng(0).random((100, 4))
    extra = {**{f"x{j}": x[:, j] for j in range(4)}, "label": np.zeros(100, np.int64), "id": np.arange(20_000, 20_100)}
    pq.write_table(pa.table(extra), landing / "a-003.parquet")
    listed = {"f": pa.array(x[:, :3].tolist(), pa.list_(pa.float64(), 3)), "label": np.zeros(100, np.int64),
              "id": np.arange(30_000, 30_100)}
    pq.write_table(pa.table(listed), landing / "a-004.parquet")

    buffer = ReplayBufferActor.remote(cfg.buffer, str(tmp_path), cfg.schema, cfg.ingest.block_rows)
    loop = IngestLoop(cfg, manifest, buffer, None)
    run_until_done(loop)
    status = {r.name: (r.status, r.reason) for r in manifest.records()}
    assert status["a-001.parquet"][0] == status["a-002.parquet"][0] == "ingested"
    assert status["a-000.parquet"] == ("quarantined", status["a-000.parquet"][1])
    assert "not a readable parquet file" in status["a-000.parquet"][1]
    assert status["a-003.parquet"] == ("quarantined", "extra columns: ['x3']")
    assert "missing columns" in status["a-004.parquet"][1]
    assert_exactly_once(all_ids, buffer_ids(buffer), quarantined_ids(tmp_path))

    with Tracker(cfg.tracking.__class__(wandb="disabled"), tmp_path, {}) as tracker:
        c = loop.counters
        tracker.log(_numbers({"rows_quarantined": c.rows_quarantined, "shards_quarantined": c.shards_quarantined,
                              "quarantine_reasons": dict(c.reasons)}))
    logged = read_metrics(tmp_path)[-1]
    assert logged["shards_quarantined"] == 3 and logged["rows_quarantined"] == c.rows_quarantined > 0
    assert logged["quarantine/extra_columns"] == 1 and logged["quarantine/missing_columns"] == 1
    assert logged["quarantine/nan_feature"] + logged["quarantine/label_not_in_classes"] == c.rows_quarantined
    close(loop, buffer)


def test_livetrain_stop_ends_the_wait_for_a_first_shard(ray_session, tmp_path):
    """The stop request sits in the control actor, which ``run`` reads; ``start`` waiting
    for a shard under ``schema.infer`` must hear it too (else it waits ``duration_s``)."""
    import threading

    from livetrain.config import ConfigError
    from livetrain.control import request_stop
    from livetrain.pipeline import Pipeline

    ns = "livetrain-stop-while-inferring"
    cfg = load_config(None, [f"state_dir={tmp_path}/state", "source.kind=directory", f"source.path={tmp_path}/landing",
                             "schema={infer: true, label: label, classes: [0, 1]}", f"ray.namespace={ns}",
                             "duration_s=30", "source.poll_interval_s=0.1"])
    p = Pipeline(cfg, probe_traffic=False)
    waiting, done = threading.Event(), {}

    def stop_it() -> None:
        while not hasattr(p, "manifest"):  # set just before start() waits for the schema
            if waiting.wait(0.05):
                return
        done["stopped"] = request_stop(ns, "livetrain stop", 30)

    client = threading.Thread(target=stop_it, daemon=True)
    client.start()
    try:
        with pytest.raises(ConfigError, match="stopped before a shard that fits arrived"):
            p.start()
    finally:
        waiting.set()
        p.stop()
    client.join(60)
    assert done == {"stopped": True} and p.stop_reason == "livetrain stop"
