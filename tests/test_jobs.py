"""``livetrain run`` as a Ray job on a running cluster, watched with
``livetrain status`` and ended with ``livetrain stop``; and the clear errors
of status and stop when there is nothing to talk to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _cluster import LocalCluster, local_cluster
from _util import free_port, http, wait_until
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import SyntheticConfig

NODES = """
import json, ray
ray.init(address="{address}", configure_logging=False, log_to_driver=False)
print(json.dumps([n["Alive"] for n in ray.nodes()]))
"""


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livetrain.cli", *args], capture_output=True, text=True,
                          env=env, timeout=180, check=False)


def status(cluster: LocalCluster, namespace: str) -> dict | None:
    """``livetrain status --json``; None while its driver has not started livetrain yet."""
    p = cli("status", "--json", "--address", cluster.address, "--namespace", namespace, env=cluster.env)
    if p.returncode == 1 and "no livetrain is running" in p.stderr:
        return None
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_without_a_cluster_say_so_and_fail(command: str):
    p = cli(command, "--address", f"127.0.0.1:{free_port()}")  # nobody listens there
    assert p.returncode == 1 and "no Ray cluster at 127.0.0.1:" in p.stderr
    p = cli(command, "--address", "http://127.0.0.1:8265")  # the job API URL, a common mix-up
    assert p.returncode == 1 and "dashboard (job API) URL" in p.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_run_as_ray_job_reports_status_and_stops_cleanly_on_request(tmp_path: Path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    landing, state, job_dir = tmp_path / "landing", tmp_path / "state", tmp_path / "job"
    stream = SyntheticStream(SyntheticConfig(generator="sea", variant=2, rows_per_shard=500, seed=3), landing)
    for _ in range(4):
        stream.write_shard()
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(yaml.safe_dump({
        "live_view": False,
        "source": {"kind": "directory", "path": str(landing)},
        "schema": {"features": ["x0", "x1", "x2"], "label": "label", "classes": [0, 1]},
        "train": {"num_workers": 1, "cpus_per_worker": 0.5, "min_buffer_rows": 500},
        "serve": {"port": free_port()},
        "tracking": {"wandb": "disabled"},
        "ray": {"namespace": "jobs-test"},
    }))
    where = ["--namespace", "jobs-test"]
    with local_cluster("jobs", head_args=["--num-cpus=4"], dashboard=True) as cluster:
        cluster.kill_words.add(str(state))  # the job's driver, should the test fail while it runs
        p = cli("status", "--address", cluster.address, *where, env=cluster.env)
        assert p.returncode == 1 and "no livetrain is running in Ray namespace 'jobs-test'" in p.stderr

        # exactly what a user types: the config travels in the job's working dir
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
             "--submission-id", "livetrain-test", "--no-wait", "--",
             "livetrain", "run", "--config", "job.yaml", f"state_dir={state}"],
            cwd=job_dir, env=cluster.env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert submit.returncode == 0, submit.stderr[-2000:]
        jobs = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})

        def job(want: JobStatus) -> bool:
            s = jobs.get_job_status("livetrain-test")
            assert s == want or not s.is_terminal(), f"job ended {s}:\n{jobs.get_job_logs('livetrain-test')[-4000:]}"
            return s == want

        wait_until(lambda: job(JobStatus.RUNNING), 60, "the job to run")

        def ingesting() -> dict | None:
            job(JobStatus.RUNNING)  # fails with the job's logs should it end
            s = status(cluster, "jobs-test")
            return s if s and s.get("rows_ingested") else None

        first = wait_until(ingesting, 90, "rows ingested")
        assert first["job_id"] == "livetrain-test" and first["state"] == "running"

        def served() -> dict | None:
            job(JobStatus.RUNNING)
            stream.write_shard()  # keep data arriving: the gate decides on rows newer than a candidate's
            s = status(cluster, "jobs-test")
            # prequential accuracy: the served model scored rows that arrived after its promotion
            return s if s and s.get("served_version") is not None and s["prequential_accuracy"] is not None else None

        later = wait_until(served, 120, "a served version scored on new rows", interval_s=0)
        assert later["rows_ingested"] > first["rows_ingested"]
        wait_until(lambda: (http("GET", later["endpoint"] + "/model")[1].get("model_version") or -1)
                   >= later["served_version"], 30, "the endpoint to serve it")
        human = cli("status", "--address", cluster.address, *where, env=cluster.env)
        assert human.returncode == 0 and "livetrain running" in human.stdout and "served version" in human.stdout

        stop = cli("stop", "--address", cluster.address, *where, env=cluster.env)
        assert stop.returncode == 0, stop.stderr[-2000:]
        wait_until(lambda: job(JobStatus.SUCCEEDED), 60, "the job to succeed")
        summary = json.loads(jobs.get_job_logs("livetrain-test").strip().splitlines()[-1])
        assert summary["rows_ingested"] >= later["rows_ingested"] and summary["served_version"] is not None

        nodes = subprocess.run([sys.executable, "-c", NODES.format(address=cluster.address)], env=cluster.env,
                               capture_output=True, text=True, timeout=120, check=False)
        assert nodes.returncode == 0 and json.loads(nodes.stdout.strip().splitlines()[-1]) == [True]


@pytest.mark.ray
def test_control_hands_stop_request_to_publisher_and_refuses_a_second_livetrain(ray_session):
    import ray

    from livetrain.control import AlreadyRunning, NotRunning, find_control, read_status, request_stop, start_control

    control = start_control("control-test", {"namespace": "control-test"})
    try:
        assert read_status("control-test")["state"] == "starting"
        with pytest.raises(AlreadyRunning, match="already running in Ray namespace 'control-test'"):
            start_control("control-test", {})
        assert ray.get(control.publish.remote({"rows_ingested": 5})) is None
        assert read_status("control-test") | {"updated_at": None} == {
            "state": "running", "stop_requested": None, "updated_at": None, "namespace": "control-test",
            "rows_ingested": 5}
        assert request_stop("control-test", "by test", timeout_s=0.1) is False  # nobody has stopped yet
        assert ray.get(control.publish.remote({"rows_ingested": 6})) == "by test"  # the pipeline's next tick
        assert read_status("control-test")["state"] == "stopping"
        ray.get(control.stopped.remote({"rows_ingested": 7}))
        assert request_stop("control-test", "again", timeout_s=10) is True
        assert read_status("control-test")["rows_ingested"] == 7
    finally:
        ray.kill(control)
    with pytest.raises(NotRunning, match="no livetrain is running in Ray namespace 'nobody-here'"):
        find_control("nobody-here")
