"""cluster.yaml passes the validation `ray up` runs before any cloud call.

`ray up` (ray.autoscaler._private.commands._bootstrap_config) runs
`prepare_config` (merge with the provider's defaults.yaml, merge setup
commands, fill per-type min/max workers) and then `validate_config` (the
jsonschema in ray/autoscaler/ray-schema.json plus a few cross-field checks).
Both are pure Python: no AWS credentials, no boto3, no network. They are a
private API, which is why ray is pinned.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema  # a core dependency of ray; validate_config needs it
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if validation ever tries to reach a cloud endpoint."""

    def refuse(*args, **kwargs):
        raise AssertionError("cluster-config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validated(config: dict) -> dict:
    """What `ray up` does before it talks to the provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(raw, no_network):
    prepared = _validated(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_misspelled_top_level_key_fails_validation(raw, no_network):
    bad = copy.deepcopy(raw)
    bad["max_workerz"] = bad.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        _validated(bad)


def test_misspelled_node_type_key_fails_validation(raw, no_network):
    bad = copy.deepcopy(raw)
    gpu = bad["available_node_types"]["gpu_worker"]
    gpu["resourcez"] = gpu.pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)


def test_gpu_workers_autoscale_from_zero(raw):
    prepared = _validated(raw)
    types = prepared["available_node_types"]
    gpu = types["gpu_worker"]
    assert gpu["resources"].get("GPU", 0) >= 1
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] >= 1
    assert prepared["max_workers"] >= gpu["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    # The spot variant, when present, is a GPU type that also starts at zero.
    spot = types.get("gpu_worker_spot")
    if spot is not None:
        assert spot["resources"].get("GPU", 0) >= 1
        assert spot["min_workers"] == 0
        assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def test_head_is_a_cpu_node(raw):
    prepared = _validated(raw)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_setup_installs_livetrain_from_the_synced_repo(raw):
    prepared = _validated(raw)
    assert prepared["file_mounts"].get("~/livetrain") == "."
    for cmds in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        joined = "\n".join(cmds)
        assert "-e ~/livetrain" in joined
        assert '"torch>=2.4"' in joined  # quoted, or the shell redirects to a file "=2.4"
    # The head runs the autoscaler, whose AWS provider imports boto3.
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def test_ports_and_how_to_reach_them(raw):
    prepared = _validated(raw)
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--head" in head_start
    assert "--dashboard-port=8265" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP:6379" in worker_start
    text = CLUSTER_YAML.read_text()
    assert "ray dashboard cluster.yaml" in text
    assert "ray attach cluster.yaml -p 8000" in text
    assert "curl localhost:8000/model" in text
    assert "ray job submit --address http://127.0.0.1:8265" in text


def test_no_api_key_in_the_file():
    text = CLUSTER_YAML.read_text()
    # WANDB_API_KEY may only appear as a name or as a reference to the local
    # shell's variable ("$WANDB_API_KEY"), never with a literal value.
    assignment = re.compile(r"""WANDB_API_KEY\\?["']?\s*[=:]\s*\\?["']?([^\s"'\\}]+)""")
    for value in assignment.findall(text):
        assert value.startswith("$"), f"WANDB_API_KEY has a literal value in cluster.yaml: {value[:4]}..."
    # W&B API keys are 40 hex characters (newer ones carry a prefix).
    assert not re.search(r"\b[0-9a-f]{40}\b", text)
    assert "runtime-env-json" in text  # the documented way the key travels
