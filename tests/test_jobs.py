"""``livetrain run`` as a Ray job on a running two-node cluster, watched with
``livetrain status`` and ended with ``livetrain stop``; and the clear errors
of status and stop when there is nothing to talk to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from _cluster import LocalCluster, local_cluster
from _util import free_port, http, wait_until
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import StorageConfig, SyntheticConfig
from livetrain.storage import Store

QUERY = """
import json, ray
ray.init(address="{address}", configure_logging=False, log_to_driver=False)
nodes = {{n["NodeID"]: (n["Alive"], n["Resources"]) for n in ray.nodes()}}
actors = [(v["ActorClassName"], v["Address"]["NodeID"]) for v in ray._private.state.actors().values()
          if v["State"] == "ALIVE"]
print(json.dumps({{"nodes": nodes, "actors": actors}}))
"""


def cluster_info(cluster: LocalCluster) -> dict:
    """The cluster's nodes (alive, resources) and where its live actors are, asked as another client."""
    p = subprocess.run([sys.executable, "-c", QUERY.format(address=cluster.address)], env=cluster.env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


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
def test_run_as_ray_job_on_two_nodes_trains_on_the_second_and_stops_cleanly_on_request(s3: str, tmp_path: Path):
    """A real two-node cluster on this machine: a head (``ray start --head`` on
    loopback, with the dashboard's job API) and a second node that alone has
    the ``trainer`` resource. ``livetrain run`` goes in as a Ray job; the
    training workers land on the second node, the buffer and registry beside
    the driver on the head, blocks cross nodes through the object store, no
    node shares a disk with the trainers (checkpoints and served versions go to
    S3). ``livetrain status`` watches it, ``livetrain stop`` ends it: the job
    succeeds and the cluster stays up (tearing it down is this test's job)."""
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
        "train": {"worker_resources": {"trainer": 1}, "cpus_per_worker": 0.5, "min_buffer_rows": 500},
        "serve": {"port": free_port()},
        "tracking": {"wandb": "disabled"},
        "ray": {"namespace": "jobs-test"},
        "storage": {"uri": "s3://livetrain-test/multinode", "endpoint": s3},
    }))
    where = ["--namespace", "jobs-test"]
    # after s3: the nodes' processes, the job's driver among them, inherit its credentials from `ray start`
    with local_cluster("jobs", head_args=["--num-cpus=3", '--resources={"head": 1}'],
                       workers=[["--num-cpus=2", '--resources={"trainer": 2}']], dashboard=True) as cluster:
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
        assert later["rows_ingested"] > first["rows_ingested"] and later["train_steps"] > 0
        wait_until(lambda: (http("GET", later["endpoint"] + "/model")[1].get("model_version") or -1)
                   >= later["served_version"], 30, "the endpoint to serve it")
        human = cli("status", "--address", cluster.address, *where, env=cluster.env)
        assert human.returncode == 0 and "livetrain running" in human.stdout and "served version" in human.stdout

        info = cluster_info(cluster)
        trainer_node = next(n for n, (alive, r) in info["nodes"].items() if "trainer" in r)
        head_node = next(n for n, (alive, r) in info["nodes"].items() if "head" in r)
        placed: dict[str, set[str]] = {}
        for cls, node in info["actors"]:
            placed.setdefault(cls, set()).add(node)
        assert placed["RayTrainWorker"] == {trainer_node}
        assert placed["ReplayBufferActor"] == {head_node} and placed["ModelRegistry"] == {head_node}

        stop = cli("stop", "--address", cluster.address, *where, env=cluster.env)
        assert stop.returncode == 0, stop.stderr[-2000:]
        wait_until(lambda: job(JobStatus.SUCCEEDED), 60, "the job to succeed")
        summary = json.loads(jobs.get_job_logs("livetrain-test").strip().splitlines()[-1])
        assert summary["rows_ingested"] >= later["rows_ingested"] and summary["served_version"] is not None
        nodes = cluster_info(cluster)["nodes"]
        assert len(nodes) == 2 and all(alive for alive, _ in nodes.values())  # livetrain stopped; the cluster is up

        store = Store(StorageConfig(uri="s3://livetrain-test/multinode", endpoint=s3))
        ckpts = store.fs.get_file_info(pafs.FileSelector(store.path("ray_train"), recursive=True))
        assert any(i.path.endswith("model.pt") for i in ckpts), "the second node's workers wrote no checkpoint to S3"
        assert f"served/v{summary['served_version']:06d}/model.pt" in store.list()


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
