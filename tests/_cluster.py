"""A real Ray cluster made of this machine's processes, for the cluster tests.

``ray start --head`` on loopback with token auth, optionally more nodes
(``ray start --address``) and the dashboard (which serves the job API). The
cluster outlives any livetrain run against it; tearing it down is the test's
job: ``local_cluster`` kills exactly the processes it started (never ``ray
stop``, which would take every other Ray on the machine with it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _util import free_port
from test_cli import kill_processes_mentioning


@dataclass
class LocalCluster:
    address: str
    """The head's GCS address (``ray.init(address=...)``, ``livetrain status --address``)."""
    env: dict[str, str]
    """Environment for every client process: token auth, the cluster's temp dir,
    this interpreter's bin/ first on PATH (where ``livetrain`` and ``ray`` live)."""
    dashboard_url: str | None
    """The job API (``ray job submit --address``), when the dashboard runs."""
    token: str
    """The cluster's auth token, for HTTP clients: ``Authorization: Bearer <token>``."""
    kill_words: set[str] = field(default_factory=set)
    """Teardown kills every process whose command line mentions one of these."""


def _ray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, *args], check=True, capture_output=True, text=True, env=env, timeout=120)


@contextmanager
def local_cluster(
    name: str, head_args: Sequence[str] = (), workers: Sequence[Sequence[str]] = (), dashboard: bool = False
) -> Iterator[LocalCluster]:
    """A head with ``head_args`` plus one node per entry of ``workers`` (its ``ray start`` args)."""
    temp = Path("/tmp") / f"lt-{name}-{os.getpid()}"  # short: Ray's socket paths are length-limited
    port = free_port()
    address = f"127.0.0.1:{port}"
    bin_dir = str(Path(sys.executable).parent)
    # the head enables token auth when ~/.ray/auth_token exists; every client must then send it
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "token",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    token = _ray("get-auth-token", "--generate", env=env).stdout.strip().splitlines()[-1]
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    cluster = LocalCluster(address, env, None, token, {str(temp), address})
    if dashboard:  # the job API lives in the dashboard; free ports so clusters side by side never clash
        dash_port = free_port()
        cluster.dashboard_url = f"http://127.0.0.1:{dash_port}"
        head_dash = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                     f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    else:
        head_dash = ["--include-dashboard=false"]
    try:
        _ray("start", "--head", f"--port={port}", *head_dash, f"--temp-dir={temp}", *common, *head_args, env=env)
        for args in workers:
            _ray("start", f"--address={address}", f"--dashboard-agent-listen-port={free_port()}", *common, *args, env=env)
        yield cluster
    finally:
        kill_processes_mentioning(cluster.kill_words)
