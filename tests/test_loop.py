"""The whole loop with real parts: Ray actors, the object store, one Ray
Train job (2 workers, gloo DDP), Ray Serve over HTTP, Parquet, SQLite.

One pipeline serves every test in this module (start-up costs ~30 s); the
kill tests (registry, training worker) run last because they disturb the loop.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from _util import http, wait_until
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import load_config, shipped_config
from livetrain.tracking import read_metrics
from livetrain.training.checkpoint import load_checkpoint, load_model

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

DRIFT_ROW = 40_000
RECOVERED = 0.90
"""Accuracy the served model must reach on the new concept (SEA threshold 7 -> 9.5,
noise 0); a model stuck on the old concept scores ~0.8 there."""


@pytest.fixture(scope="module")
def loop(ray_session, serve_port, tmp_path_factory):
    from livetrain.pipeline import Pipeline

    state = tmp_path_factory.mktemp("loop")
    cfg = load_config(
        shipped_config("demo"),
        [
            f"state_dir={state}",
            "live_view=false",
            "tracking.wandb=disabled",
            f"serve.port={serve_port}",
            "synthetic.variant=2",
            "synthetic.rows_per_second=4000",
            "synthetic.rows_per_shard=500",
            f"synthetic.drifts=[{{at_row: {DRIFT_ROW}, variant: 3}}]",
            "gate.window_rows=4000",
            "train.checkpoint_every_s=4",
        ],
    )
    p = Pipeline(cfg, probe_traffic=True)
    p.start()
    yield p
    p.stop()


def model_info(p):
    return http("GET", p.url + "/model")[1]


def test_served_version_advances_at_least_twice(loop):
    seen: set[int] = set()

    def three_versions():
        v = model_info(loop).get("model_version")
        if v is not None:
            seen.add(v)
        return len(seen) >= 3

    wait_until(three_versions, 180, "three distinct served versions")


def test_no_probe_fails_and_those_before_the_first_model_are_counted_apart(loop):
    """The demo's probe traffic: a 503 "no model has been promoted yet" is not a
    dropped request; anything else failing is."""
    wait_until(lambda: loop.snapshot()["probe_requests_ok"] >= 20, 180, "20 answered probes")
    snap = loop.snapshot()
    assert snap["probe_requests_failed"] == 0, snap
    assert snap["probe_requests_no_model"] >= 0 and snap["served_version"] is not None


def test_predict_answers_with_the_model_version(loop):
    wait_until(lambda: model_info(loop).get("model_version"), 120, "a served version")
    status, body = http("POST", loop.url + "/predict", {"instances": [[0.1, 0.2, 0.3], [0.9, 0.8, 0.1]]})
    assert status == 200, body
    assert isinstance(body["model_version"], int) and body["model_version"] >= 1
    assert len(body["predictions"]) == 2 and set(body["predictions"]) <= {0, 1}
    assert np.allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-4)
    # SEA: label 1 iff x0 + x1 > threshold: the far corners are unambiguous
    assert http("POST", loop.url + "/predict", {"instances": [[0.0, 0.0, 0.5], [1.0, 1.0, 0.5]]})[1]["predictions"] == [0, 1]


def test_model_endpoint_describes_the_served_version(loop):
    info = wait_until(lambda: (i := model_info(loop)).get("model_version") and i, 120, "a served version")
    assert info["trained_through_seq"] >= 0 and info["promoted_at"] > 0
    assert set(info["metrics_on_unseen_data"]) >= {"accuracy", "precision", "recall", "f1"}
    live = wait_until(lambda: (m := model_info(loop)["live"]) and m["prequential_window"] and m, 60, "live figures")
    assert set(live["prequential_window"]) >= {"accuracy", "f1", "log_loss", "f1_class_0", "f1_class_1"}
    assert "drift_alarms" in live and len(live["confusion_window"]) == 2


@pytest.mark.parametrize(
    "body, raw, ctype, fragment",
    [
        ({"instances": [[0.1, 0.2]]}, None, "application/json", "has 2 features, expected 3"),
        ({"instances": [[0.1, "a", 0.3]]}, None, "application/json", "number"),
        ({"instances": []}, None, "application/json", "empty"),
        ({}, None, "application/json", "instances"),
        (None, b"{not json", "application/json", "JSON"),
    ],
    ids=["wrong-width", "non-number", "no-instances", "missing-field", "malformed-json"],
)
def test_bad_request_gets_4xx_and_service_keeps_serving(loop, body, raw, ctype, fragment):
    wait_until(lambda: model_info(loop).get("model_version"), 120, "a served version")
    status, answer = http("POST", loop.url + "/predict", body, raw=raw, ctype=ctype)
    assert 400 <= status < 500, answer
    assert fragment.lower() in str(answer).lower()
    assert http("POST", loop.url + "/predict", {"instances": [[0.1, 0.2, 0.3]]})[0] == 200


def accuracy_on_concept(model_dir: Path, variant: int) -> float:
    """Accuracy of a served checkpoint on fresh rows of one SEA concept."""
    from livetrain.config import SyntheticConfig

    stream = SyntheticStream(SyntheticConfig(generator="sea", variant=variant, seed=999), Path(os.devnull).parent)
    x, y = stream.next_rows(4000)
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_accuracy_recovers_after_abrupt_drift(loop):
    state = loop.state_dir
    wait_until(lambda: loop.ingest.counters.rows_ingested >= DRIFT_ROW, 120, "the drift point")
    # versions trained on old-concept shards only: none when the trainer's start-up
    # outlasts the stream's first DRIFT_ROW rows, and the newest served one may
    # already have learnt past the drift when this test starts late
    last_old_shard = DRIFT_ROW // 500 - 1
    old_versions = [d for d in sorted((state / "served").glob("v*"))
                    if load_checkpoint(d).meta["trained_through"] <= last_old_shard]
    # the window (4000 rows) must hold new-concept rows only before it counts
    wait_until(lambda: loop.ingest.counters.rows_ingested >= DRIFT_ROW + 8000, 120, "rows past the drift")
    acc = wait_until(
        lambda: (a := loop.snapshot()["prequential_accuracy_window"]) is not None and a >= RECOVERED and a,
        180,
        f"prequential accuracy on the new concept >= {RECOVERED}",
    )
    after = sorted((state / "served").glob("v*"))[-1]
    new_on_new = accuracy_on_concept(after, variant=3)
    if old_versions:
        assert accuracy_on_concept(old_versions[-1], variant=3) < RECOVERED - 0.03, "the drift did not change the concept"
    assert new_on_new >= RECOVERED and acc >= RECOVERED
    assert accuracy_on_concept(after, variant=2) < RECOVERED - 0.03, "the served model still knows the old concept"


def test_livetrain_rollback_serves_the_previous_version(loop):
    import subprocess
    import sys

    # three: an automatic rollback (v2 -> v1) before this one leaves the default nothing to go to
    wait_until(lambda: loop.snapshot()["versions_promoted"] >= 3, 180, "three promoted versions")
    never = subprocess.run(
        [sys.executable, "-m", "livetrain.cli", "rollback", "999", "--namespace", loop.cfg.ray.namespace],
        capture_output=True, text=True, timeout=120,
    )
    assert never.returncode == 1 and "livetrain: rollback failed: v999 was never served" in never.stderr, never.stderr
    assert "Traceback" not in never.stderr and 'File "' not in never.stderr  # one line, not the actor's stack
    proc = subprocess.run(
        [sys.executable, "-m", "livetrain.cli", "rollback", "--namespace", loop.cfg.ray.namespace, "--reason", "test"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rolled_to = int(proc.stdout.strip().split("serving v")[1].split()[0])
    decisions = [json.loads(l) for l in (loop.state_dir / "decisions.jsonl").read_text().splitlines()]
    (d,) = [d for d in decisions if d["action"] == "rollback" and d["version"] == rolled_to and "test" in d["reason"]]
    # from the registry's served version, which replicas may not have picked up yet
    rolled_from = d["served_version"]
    assert rolled_to != rolled_from
    # the replicas follow the rollback (or a newer promotion that came right after it)
    wait_until(lambda: model_info(loop)["model_version"] != rolled_from, 60, "replicas to leave the rolled-back version")


def train_workers() -> dict[int, str]:
    import ray

    return {
        v["Pid"]: k
        for k, v in ray._private.state.actors().items()
        if v["ActorClassName"] == "RayTrainWorker" and v["State"] == "ALIVE"
    }


def latest_checkpoint_step(state: Path) -> int:
    """Step of the newest checkpoint Ray Train has *registered* (what a restart gets)."""
    snapshot = state / "ray_train" / "livetrain" / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return -1
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except ValueError:  # caught mid-write
        return -1
    if not latest:
        return -1
    return load_checkpoint(snapshot.parent / latest["checkpoint_dir_name"]).meta["progress"]["step"]


@contextmanager
def requests_meanwhile(loop):
    """/predict called in a loop while the block runs: (answers' versions, failures)."""
    failures: list[object] = []
    answers: list[int] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            status, body = http("POST", loop.url + "/predict", {"instances": [[0.5, 0.5, 0.5]]})
            (answers if status == 200 else failures).append(body.get("model_version") if status == 200 else (status, body))

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        t.join(10)


def _served_in_log(state_dir: Path) -> int | None:
    """The version the decision log says is served (the registry's rule on restart)."""
    served = None
    for line in (state_dir / "decisions.jsonl").read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:  # a line torn by the kill
            continue
        served = d["version"] if d["action"] in ("promote", "rollback") else d.get("served_version", served)
    return served


def test_killed_registry_restarts_serving_the_version_its_log_served_while_the_loop_goes_on(loop):
    """The registry's process dies: Ray restarts it, it comes up serving the version
    the decision log last served (not an older one, not an unjudged candidate), no
    request fails meanwhile, and ingestion, training and promotions go on."""
    import ray

    wait_until(lambda: model_info(loop).get("model_version"), 120, "a served version")
    with requests_meanwhile(loop) as (answers, failures):
        pid = ray.get(loop.registry.__ray_call__.remote(lambda _: os.getpid()))
        rows = loop.snapshot()["rows_ingested"]
        loop._log_decisions()
        assert loop._decisions_seen > 0
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "the registry's process gone")
        logged = _served_in_log(loop.state_dir)  # the dead process writes no more
        # the call is retried until the restarted instance answers
        assert ray.get(loop.registry.__ray_call__.remote(lambda _: os.getpid()), timeout=120) != pid
        first = ray.get(loop.registry.served_info.remote())["model_version"]
        promoted_since = {json.loads(line)["version"] for line in (loop.state_dir / "decisions.jsonl").read_text().splitlines()
                          if '"promote"' in line}
        assert first == logged or (first > logged and first in promoted_since), (first, logged)
        newer = wait_until(lambda: (v := model_info(loop)["model_version"]) > first and v, 180,
                           "a promotion by the restarted registry")
        # the pipeline forwards the restarted registry's decisions (to W&B, the live view), counting anew
        loop._log_decisions()  # Pipeline.run's step (this test drives start() only)
        forwarded = {r["version"] for r in read_metrics(loop.state_dir) if r.get("event") == "promote"}
        assert newer in forwarded, f"v{newer} was not forwarded (promotions forwarded: {sorted(forwarded)})"
        wait_until(lambda: loop.snapshot()["rows_ingested"] > rows, 60, "ingestion to go on")
    assert failures == [] and len(answers) > 20


def test_killed_training_worker_resumes_from_checkpoint_while_serving_continues(loop):
    wait_until(lambda: latest_checkpoint_step(loop.state_dir) > 0, 120, "a first train checkpoint")
    workers = wait_until(lambda: len(w := train_workers()) == 2 and w, 60, "two train workers")
    with requests_meanwhile(loop) as (answers, failures):
        ckpt_step = latest_checkpoint_step(loop.state_dir)
        assert loop.snapshot()["train_resumed_from_step"] == 0
        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        new = wait_until(lambda: len(w := train_workers()) == 2 and victim not in w and w, 180, "a restarted worker group")
        assert not set(new) & set(workers)
        resumed = wait_until(lambda: loop.snapshot()["train_resumed_from_step"], 180, "a report from the restarted group")
        assert resumed >= ckpt_step > 0, "training did not resume from the registered checkpoint"
        steps = loop.snapshot()["train_steps"]
        wait_until(lambda: loop.snapshot()["train_steps"] > steps, 60, "training to continue after the restart")
    assert failures == [] and len(answers) > 20
