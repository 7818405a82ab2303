"""cluster.yaml (AWS) and cluster-local.yaml (on-premise) pass the validation
`ray up` runs before any cloud call or SSH connection.

`ray up` (ray.autoscaler._private.commands._bootstrap_config) runs
`prepare_config` (merge with the provider's defaults.yaml, merge setup
commands, fill per-type min/max workers) and then `validate_config` (the
jsonschema in ray/autoscaler/ray-schema.json plus a few cross-field checks).
For provider "local", prepare_config first runs prepare_local (single
internal node type, head_ip/worker_ips checks). Both are pure Python: no AWS
credentials, no boto3, no SSH, no network. They are a private API, which is
why ray is pinned.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import click
import jsonschema  # a core dependency of ray; validate_config needs it
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
LOCAL_YAML = ROOT / "cluster-local.yaml"
BOTH = pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_YAML], ids=lambda p: p.name)


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if validation ever tries to reach a cloud endpoint."""

    def refuse(*args, **kwargs):
        raise AssertionError("cluster-config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def raw() -> dict:
    return _load(CLUSTER_YAML)


@pytest.fixture
def local_raw() -> dict:
    return _load(LOCAL_YAML)


def _validated(config: dict) -> dict:
    """What `ray up` does before it talks to the provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@BOTH
def test_both_files_pass_ray_validation(path, no_network):
    prepared = _validated(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["cluster_name"].startswith("livetrain")


def test_cluster_yaml_passes_ray_validation(raw, no_network):
    prepared = _validated(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@BOTH
def test_misspelled_top_level_key_fails_validation(path, no_network):
    bad = _load(path)
    bad["idle_timeout_minutez"] = bad.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minutez"):
        _validated(bad)


def test_misspelled_max_workers_fails_validation(raw, no_network):
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


@BOTH
def test_setup_installs_livetrain_from_the_synced_repo(path, no_network):
    prepared = _validated(_load(path))
    assert prepared["file_mounts"].get("~/livetrain") == "."
    for cmds in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        joined = "\n".join(cmds)
        assert "-e ~/livetrain" in joined
        assert '"torch>=2.4"' in joined  # quoted, or the shell redirects to a file "=2.4"
        assert '"ray[default]==2.60.0"' in joined
    assert "**/.venv" in prepared["rsync_exclude"]


def test_aws_head_installs_boto3(raw):
    prepared = _validated(raw)
    # The head runs the autoscaler, whose AWS provider imports boto3.
    assert any("boto3" in c for c in prepared["head_setup_commands"])


@BOTH
def test_ports_and_how_to_reach_them(path, no_network):
    prepared = _validated(_load(path))
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--head" in head_start
    assert "--dashboard-port=8265" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP:6379" in worker_start
    text = path.read_text()
    assert f"ray dashboard {path.name}" in text
    assert f"ray attach {path.name} -p 8000" in text
    assert "curl localhost:8000/model" in text
    assert "ray job submit --address http://127.0.0.1:8265" in text


@BOTH
def test_no_api_key_in_the_file(path):
    text = path.read_text()
    # WANDB_API_KEY may only appear as a name or as a reference to the local
    # shell's variable ("$WANDB_API_KEY"), never with a literal value.
    assignment = re.compile(r"""WANDB_API_KEY\\?["']?\s*[=:]\s*\\?["']?([^\s"'\\}]+)""")
    for value in assignment.findall(text):
        assert value.startswith("$"), f"WANDB_API_KEY has a literal value in {path.name}: {value[:4]}..."
    # W&B API keys are 40 hex characters (newer ones carry a prefix).
    assert not re.search(r"\b[0-9a-f]{40}\b", text)
    assert "runtime-env-json" in text  # the documented way the key travels
    # Nor through the commands Ray runs on the nodes (they are logged).
    config = _load(path)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "initialization_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert not any("WANDB" in c for c in config.get(key, [])), key
    assert "WANDB" not in yaml.safe_dump(config.get("file_mounts", {}))


# --- cluster-local.yaml: what a user of an on-premise cluster depends on ---


def test_local_provider_has_head_and_worker_ips(local_raw, no_network):
    provider = local_raw["provider"]
    assert provider["type"] == "local"
    assert "coordinator_address" not in provider  # manual mode: the hosts are listed
    head, workers = provider["head_ip"], provider["worker_ips"]
    assert isinstance(head, str) and head
    assert isinstance(workers, list) and workers
    assert all(isinstance(w, str) and w for w in workers)
    assert len(set(workers)) == len(workers)
    assert head not in workers  # the head would be started twice
    # Ray keeps every listed worker in the cluster.
    prepared = _validated(local_raw)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(workers)
    assert prepared["max_workers"] == len(workers)


def test_local_ssh_user_and_key(local_raw):
    auth = local_raw["auth"]
    assert auth["ssh_user"]
    # Set explicitly: Ray copies it to the head, whose autoscaler uses it to
    # start Ray on the workers.
    assert auth["ssh_private_key"].startswith("~/.ssh/")


def test_local_gpu_workers_declare_their_resources(local_raw, no_network):
    # provider "local" rejects available_node_types; resources go on `ray start`.
    assert "available_node_types" not in local_raw
    prepared = _validated(local_raw)
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start  # train workers go to the GPU machines
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    gpus = re.search(r"--num-gpus=(\d+)", worker_start)
    assert gpus and int(gpus.group(1)) >= 1


def test_local_serve_port_reachable_by_ssh_tunnel():
    text = LOCAL_YAML.read_text()
    assert "ssh -N -L 8000:127.0.0.1:8000" in text
    assert "curl localhost:8000/model" in text


@pytest.mark.parametrize("section, good, typo", [("auth", "ssh_private_key", "ssh_private_kee"),
                                                 ("auth", "ssh_user", "ssh_usr")])
def test_local_misspelled_auth_key_fails_validation(local_raw, no_network, section, good, typo):
    bad = copy.deepcopy(local_raw)
    bad[section][typo] = bad[section].pop(good)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        _validated(bad)


@pytest.mark.parametrize("good, typo", [("worker_ips", "worker_ipz"), ("head_ip", "head_iq")])
def test_local_misspelled_provider_key_fails_validation(local_raw, no_network, good, typo):
    # provider allows unknown keys in the schema; prepare_local catches a
    # missing head_ip/worker_ips and aborts `ray up`.
    bad = copy.deepcopy(local_raw)
    bad["provider"][typo] = bad["provider"].pop(good)
    with pytest.raises(click.ClickException, match="head_ip"):
        _validated(bad)


def test_local_rejects_node_types(local_raw, no_network):
    # Why the file declares GPUs on `ray start` and not in available_node_types.
    bad = copy.deepcopy(local_raw)
    bad["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="available_node_types"):
        _validated(bad)
