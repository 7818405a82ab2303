"""The pipeline's bookkeeping that needs no Ray: what ``stop`` reports."""

from __future__ import annotations

import os
import threading

import pytest

from livetrain.config import ConfigError, load_config
from livetrain.pipeline import Pipeline, reserved_cpus


def test_a_pipeline_stopped_before_it_started_leaves_an_empty_summary(tmp_path):
    """Ctrl-C during start-up (ray.init, schema.infer waiting for a shard): the CLI
    prints ``final`` after ``stop``."""
    p = Pipeline(load_config(overrides=[f"state_dir={tmp_path}"]))
    p.stop()
    assert p.final == {}


def test_stop_says_when_training_may_not_have_taken_its_last_checkpoint(tmp_path):
    p = Pipeline(load_config(overrides=[f"state_dir={tmp_path}"]))
    assert p._train_problem() is None
    p._stop.set()
    p._stop_error = RuntimeError("could not upload\n the checkpoint")
    assert p._train_problem() == "training failed while stopping (RuntimeError: could not upload the checkpoint)"
    p._stop_error = None
    hung = threading.Event()
    train = threading.Thread(target=hung.wait, name="train", daemon=True)
    train.start()
    p._threads.append(train)
    assert "did not stop within 60 s" in p._train_problem()
    hung.set()
    train.join()
    assert p._train_problem() is None


def test_a_local_run_starts_its_own_ray_even_where_ray_start_recorded_a_cluster(tmp_path, monkeypatch):
    """``ray.init(address=None, num_cpus=N)`` would join the cluster ``ray start --head``
    recorded in Ray's temp dir and refuse ``num_cpus``; no Ray starts here."""
    import ray
    from ray._private import services

    recorded = tmp_path / "raytmp" / "ray"
    recorded.mkdir(parents=True)
    (recorded / "ray_current_cluster").write_text("127.0.0.1:6379")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):  # start() sets them
        monkeypatch.setenv(var, os.environ.get(var, ""))
    seen = {}

    class Initialised(Exception):
        pass

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Initialised

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    p = Pipeline(load_config(overrides=[f"state_dir={tmp_path / 'state'}"]))
    with pytest.raises(Initialised):
        p.start()
    p._lock.release()
    assert seen["num_cpus"] == p._local_cpus()
    assert services.canonicalize_bootstrap_address(seen["address"]) is None  # None: Ray starts a new local one


FOUR_POINT_SEVEN = ["serve.num_replicas=2", "serve.num_cpus=1", "ingest.num_actors=2"]


def test_a_local_ray_fits_every_actor_livetrain_starts(monkeypatch):
    """Two replicas of one CPU each and two ingest actors: 2 (train) + 2 (serve) + 0.5
    (ingest) + 0.2 (buffer, registry) on a 2-core machine."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = load_config(overrides=FOUR_POINT_SEVEN)
    assert reserved_cpus(cfg) == pytest.approx(4.7)
    assert Pipeline(cfg)._local_cpus() >= 5
    assert Pipeline(load_config(overrides=[*FOUR_POINT_SEVEN, "ray.num_cpus=5"]))._local_cpus() == 5
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert Pipeline(cfg)._local_cpus() == 16


def test_a_ray_num_cpus_the_actors_do_not_fit_in_is_a_config_error(tmp_path):
    cfg = load_config(overrides=["serve.num_replicas=2", "serve.num_cpus=1", "ray.num_cpus=4"])
    with pytest.raises(ConfigError, match=r"ray.num_cpus: 4 is less than the 4.45 CPUs .*serve.num_replicas x serve.num_cpus 2"):
        Pipeline(cfg)._local_cpus()


def test_probes_send_the_bearer_token_so_they_are_answered_under_auth(monkeypatch):
    """With serve.auth_token_env, a probe without the token is a 401: counted as failed,
    and no answer ever closes a version's freshness. A stub of the app's auth check."""
    import http.server

    answered = threading.Event()
    seen: list[str | None] = []

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("authorization"))
            self.rfile.read(int(self.headers["content-length"]))
            ok = self.headers.get("authorization") == "Bearer s3cret"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b'{"predictions": [0], "model_version": 1}' if ok else b'{"detail": "missing bearer token"}')
            if ok:
                answered.set()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LT_PROBE_TOKEN", " s3cret\n")
    p = Pipeline(load_config(overrides=["serve.auth_token_env=LT_PROBE_TOKEN"]))
    p.url = f"http://127.0.0.1:{server.server_address[1]}"
    probe = threading.Thread(target=p._probe_loop, daemon=True)
    probe.start()
    try:
        assert answered.wait(10), f"no probe was answered; Authorization headers sent: {set(seen)}"
    finally:
        p._stop.set()
        probe.join(10)
        server.shutdown()
    assert p._probe["ok"] >= 1 and p._probe["failed"] == 0
