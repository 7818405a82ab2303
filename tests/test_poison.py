"""A burst of poisoned shards (random labels) must never reach the endpoint.

Random labels make every model score ~50% on them, so a gate comparing on
them would promote whatever comes (a coin toss within the tolerance). The
error-drift alarm puts the gate on hold instead: no promotion while the
burst lasts (longer than ``gate.alarm_hold_rows``: the hold outlasts it), and
every version promoted afterwards is as good on clean data as the one served
when the burst began. Real Ray, Ray Train, Serve; a
directory source fed by this test."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from _util import wait_until
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import SyntheticConfig, load_config
from livetrain.history import read_history
from livetrain.training.checkpoint import load_model

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

ROWS = 500
BURST = 16
"""Shards of random labels: 8,000 rows, longer than ``gate.alarm_hold_rows`` (5,000)."""
CLEAN = SyntheticConfig(generator="sea", variant=2, seed=11, rows_per_shard=ROWS)


def write_shard(landing: Path, seq: int, x: np.ndarray, y: np.ndarray) -> None:
    table = pa.table({**{f"x{i}": x[:, i] for i in range(x.shape[1])}, "label": y})
    tmp = landing / f".s{seq:06d}.tmp"
    pq.write_table(table, tmp)
    tmp.rename(landing / f"s{seq:06d}.parquet")


def clean_accuracy(model_dir: Path, x: np.ndarray, y: np.ndarray) -> float:
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def hold_started(state: Path) -> bool:
    try:
        return json.loads((state / "hold.json").read_text())["active"]
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("kill_registry", [False, True], ids=["", "registry-killed-in-the-burst"])
def test_poisoned_burst_never_reaches_the_endpoint(ray_session, serve_port, tmp_path: Path, kill_registry: bool):
    """With ``kill_registry``, the registry's process is killed once the hold has
    started: Ray restarts it, and it must hold on (``hold.json``), since its fresh
    drift detector sees nothing change in the rest of the burst."""
    import ray

    from livetrain.pipeline import Pipeline

    landing, state = tmp_path / "landing", tmp_path / "state"
    landing.mkdir()
    cfg = load_config(None, [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={serve_port}",
        "source.kind=directory", f"source.path={landing}", "gate.min_eval_rows=500",
    ])
    stream = SyntheticStream(CLEAN, tmp_path / "unused")
    hold_x, hold_y = SyntheticStream(SyntheticConfig(generator="sea", variant=2, seed=99), tmp_path / "u2").next_rows(4000)
    rng = np.random.default_rng(0)
    seq, stop = [0], threading.Event()
    poison = threading.Event()

    def feed() -> None:  # 2 shards/s, as a live source would
        while not stop.wait(0.5):
            x, y = stream.next_rows(ROWS)
            if poison.is_set():
                y = rng.integers(0, 2, ROWS)
            write_shard(landing, seq[0], x, y)
            seq[0] += 1

    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        wait_until(lambda: (s := p.snapshot())["served_version"] and s["versions_promoted"] >= 3, 180, "a settled served version")
        wait_until(lambda: (p.snapshot()["prequential_accuracy_window"] or 0) > 0.9, 180, "a good served model")
        before = p.snapshot()["served_version"]
        baseline = clean_accuracy(state / "served" / f"v{before:06d}", hold_x, hold_y)
        poison.set()
        start = seq[0]
        if kill_registry:
            wait_until(lambda: hold_started(state), 60, "the hold to start")
            pid = ray.get(p.registry.__ray_call__.remote(lambda _: os.getpid()))
            os.kill(pid, signal.SIGKILL)
            assert ray.get(p.registry.__ray_call__.remote(lambda _: os.getpid()), timeout=120) != pid
            back = seq[0]  # the burst goes on for 4 more shards at least, seen by the restarted registry
            wait_until(lambda: seq[0] >= back + 4, 60, "poisoned shards after the restart")
        wait_until(lambda: seq[0] >= start + BURST, 60, f"a {BURST}-shard burst of random labels")
        poison.clear()
        end = seq[0]
        wait_until(lambda: p.ingest.counters.shards_ingested >= end, 60, "the whole burst ingested")
        burst_ingested_at = time.time()
        wait_until(lambda: p.ingest.counters.shards_ingested >= end + 16, 120, "8 s of clean data after the burst")
    finally:
        stop.set()
        feeder.join(5)
        p.stop()
    history = read_history(state)
    alarms = [e["at"] for e in history if e["kind"] == "alarm" and e["seq"] >= start]
    assert alarms, "the burst raised no drift alarm"
    promotions = [e for e in history if e.get("action") == "promote" and e["version"] > before]
    during = [e["version"] for e in promotions if alarms[0] < e["at"] <= burst_ingested_at]
    assert during == [], f"versions promoted on poisoned evidence: {during}"
    assert any(e["at"] > burst_ingested_at for e in promotions), "promotion never resumed after the burst"
    accuracies = {e["version"]: clean_accuracy(state / "served" / f"v{e['version']:06d}", hold_x, hold_y) for e in promotions}
    assert all(a >= baseline - 0.03 for a in accuracies.values()), (baseline, accuracies)
