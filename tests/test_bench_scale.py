"""benchmarks/scale.py's pure parts: the two-node cluster's ``ray start``
lines, the livetrain config of each placement, and the figures it prints.
(A run needs a two-node cluster and four TorchTrainer start-ups: minutes, so
it is not run here; tests/test_jobs.py covers the cluster path.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from livetrain.config import load_config

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import scale  # benchmarks/ is not a package


def test_only_the_second_node_has_the_far_resource_and_both_stay_on_loopback(tmp_path):
    head, far = scale.ray_start_commands("ray", 6379, tmp_path, 4, 3, 2**30)
    assert "--head" in head and "--head" not in far
    assert "--address=127.0.0.1:6379" in far and f"--temp-dir={tmp_path}" in head
    for cmd in (head, far):
        assert "--node-ip-address=127.0.0.1" in cmd and f"--object-store-memory={2**30}" in cmd
    resources = [json.loads(next(a for a in cmd if a.startswith("--resources=")).split("=", 1)[1]) for cmd in (head, far)]
    assert scale.HEAD in resources[0] and scale.FAR not in resources[0]
    assert scale.FAR in resources[1] and scale.HEAD not in resources[1]


@pytest.mark.parametrize("place", [scale.ONE_NODE, scale.CROSS_NODE])
def test_each_placement_is_a_valid_livetrain_config_with_workers_on_its_node(tmp_path, place):
    args = scale.parse_args(["--features", "5", "--set", "train.batch_size=64"])
    cfg = load_config(None, scale.pipeline_overrides(tmp_path, "127.0.0.1:6379", 8123, 2, place, args))
    assert cfg.train.num_workers == 2 and cfg.train.worker_resources == {place.resource: 1}
    assert cfg.schema.features == [f"x{i}" for i in range(5)] and cfg.synthetic.num_features == 5
    assert cfg.ray.address == "127.0.0.1:6379" and cfg.train.batch_size == 64  # --set wins


def test_bad_worker_counts_are_refused():
    with pytest.raises(SystemExit):
        scale.parse_args(["--workers", "0,2"])


def test_train_figures_compare_cross_node_with_one_node_per_worker_count():
    rates = {("one_node", 1): 1000.0, ("cross_node", 1): 900.0, ("one_node", 2): 1600.0, ("cross_node", 2): 1200.0}
    figs = {f["name"]: f for f in scale.train_figures(rates)}
    assert figs["scale_train_1w_cross_node_samples_per_s"]["value"] == 900
    assert figs["scale_train_1w_cross_node_samples_per_s"]["baseline"] == 1000
    assert figs["scale_train_2w_cross_node_samples_per_s"]["baseline"] == 1600
    assert figs["scale_train_cross_node_2w_vs_1w"]["value"] == pytest.approx(1200 / 900, abs=1e-3)
    assert figs["scale_train_one_node_2w_vs_1w"]["value"] == pytest.approx(1.6)


def test_one_worker_count_prints_no_scaling_figure():
    figs = scale.train_figures({("one_node", 2): 1600.0, ("cross_node", 2): 1200.0})
    assert [f["name"] for f in figs] == ["scale_train_2w_cross_node_samples_per_s"]


def test_transfer_figures_are_mib_per_s_with_the_local_rate_as_baseline(capsys):
    seconds = {("cross_node", "64MiB"): 0.2, ("one_node", "64MiB"): 0.05}
    (fig,) = scale.transfer_figures({"64MiB": 64 * scale.MiB}, seconds)
    assert fig["value"] == 320.0 and fig["baseline"] == 1280.0 and fig["ms"] == 200.0
    assert "loopback" in fig["note"]
    scale.emit(**fig)
    line = json.loads(capsys.readouterr().out)
    assert line["ratio"] == pytest.approx(0.25) and line["unit"] == "MiB/s"


def test_a_block_is_float32_features_and_an_int64_label_per_row():
    assert scale.block_bytes(20, 65_536) == 65_536 * (20 * 4 + 8)
