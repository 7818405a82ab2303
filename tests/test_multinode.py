"""A real two-node Ray cluster on this machine: a head (``ray start --head``
on loopback) and a second node that alone has the ``trainer`` resource.
``livetrain run`` connects to it, the training workers land on the second
node, the buffer and registry beside the driver on the head, blocks cross
nodes through the object store, the endpoint answers. Stopping livetrain
leaves the cluster up; tearing it down is this test's job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from _cluster import local_cluster
from _util import free_port
from livetrain.config import StorageConfig
from livetrain.storage import Store
from test_cli import livetrain_until, write_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

QUERY = """
import json, ray
ray.init(address="{address}", configure_logging=False, log_to_driver=False)
nodes = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
actors = [(v["ActorClassName"], v["Address"]["NodeID"]) for v in ray._private.state.actors().values()]
print(json.dumps({{"nodes": nodes, "actors": actors}}))
"""


@pytest.fixture
def two_nodes(s3):  # after s3: the nodes' workers inherit its credentials from `ray start`
    with local_cluster("mn", head_args=["--num-cpus=3", '--resources={"head": 1}'],
                       workers=[["--num-cpus=2", '--resources={"trainer": 2}']]) as cluster:
        yield cluster.address, cluster.env


def test_loop_runs_across_two_nodes_and_leaves_the_cluster_up(two_nodes, s3: str, tmp_path: Path):
    address, env = two_nodes
    landing = tmp_path / "landing"
    write_shards(landing, 16)
    cfg = {
        "state_dir": str(tmp_path / "state"),
        "live_view": False,
        "source": {"kind": "directory", "path": str(landing)},
        "schema": {"features": ["x0", "x1", "x2"], "label": "label", "classes": [0, 1]},
        "train": {"worker_resources": {"trainer": 1}, "cpus_per_worker": 0.5, "min_buffer_rows": 500},
        "serve": {"port": free_port()},
        "tracking": {"wandb": "disabled"},
        "ray": {"address": address},
        # no node shares a disk with the trainers' checkpoints: they go to S3
        "storage": {"uri": "s3://livetrain-test/multinode", "endpoint": s3},
    }
    path = tmp_path / "mn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary, _ = livetrain_until(
        lambda m: m["shards_ingested"] >= 16 and m["train_steps"] > 0 and m.get("served_version") is not None,
        "every shard in, training on the second node, a served version", "run", "--config", str(path),
        state=tmp_path / "state", env=env)
    assert summary["shards_ingested"] == 16 and summary["train_steps"] > 0
    assert summary["served_version"] is not None  # the endpoint answered probes with it
    out = subprocess.run([sys.executable, "-c", QUERY.format(address=address)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    trainer_node = next(n for n, r in info["nodes"].items() if "trainer" in r)
    head_node = next(n for n, r in info["nodes"].items() if "head" in r)
    placed = {}
    for cls, node in info["actors"]:
        placed.setdefault(cls, set()).add(node)
    assert placed["RayTrainWorker"] == {trainer_node}
    assert placed["ReplayBufferActor"] == {head_node} and placed["ModelRegistry"] == {head_node}
    assert len(info["nodes"]) == 2  # livetrain stopped; the cluster is still up
    store = Store(StorageConfig(uri="s3://livetrain-test/multinode", endpoint=s3))
    ckpts = store.fs.get_file_info(pafs.FileSelector(store.path("ray_train"), recursive=True))
    assert any(i.path.endswith("model.pt") for i in ckpts), "the second node's workers wrote no checkpoint to S3"
    assert f"served/v{summary['served_version']:06d}/model.pt" in store.list()
