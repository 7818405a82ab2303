"""Smoke test of benchmarks/quality.py: a tiny Parquet replay end to end, and
the drift arithmetic on a hand-made outcome curve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402


def test_dip_and_recovery_are_read_off_the_windowed_accuracy():
    outcome = np.ones(6000, dtype=np.int8)
    outcome[3000:3500] = 0  # every answer wrong for 500 rows after the drift at 3000
    (d,) = quality.drift_figures(outcome, [(3000, 1)], window=1000)
    assert d["before"] == 1.0 and d["lowest"] == 0.5 and d["dip"] == 0.5
    assert d["rows_to_recover"] == 500  # from row 3500 on, the next 1000 rows are all right


def test_a_recovery_is_not_undone_by_a_later_deeper_slump():
    outcome = np.ones(9000, dtype=np.int8)
    outcome[3000:3300] = 0  # a 300-row outage right after the drift at 3000 ...
    outcome[7000:7600] = 0  # ... and a deeper slump long after it had recovered
    (d,) = quality.drift_figures(outcome, [(3000, 1)], window=1000)
    assert d["lowest"] == 0.4 and d["rows_to_recover"] == 300


def test_a_drift_without_a_dip_needs_no_recovery():
    (d,) = quality.drift_figures(np.ones(4000, dtype=np.int8), [(2000, 1)], window=1000)
    assert d["dip"] == 0.0 and d["rows_to_recover"] == 0


def test_livetrains_rows_per_s_is_timed_by_its_median_replay():
    times = iter([3.0, 1.0, 2.0])
    r = quality.repeated(lambda: quality.Run(np.ones(4, dtype=np.int8), next(times), {"k": 1}), 3)
    assert r.seconds == 2.0 and r.extra == {"k": 1, "seconds_per_replay": [1.0, 2.0, 3.0]}


def test_livetrains_replays_are_spread_over_arfs_run_and_not_timed_in_it(monkeypatch):
    """The two sides of the rows/s ratio are timed over the same minutes: the
    replays run before ARF's first row, between its rows and after its last,
    and none of their time counts as ARF's."""
    clock = [0.0]
    monkeypatch.setattr(quality.time, "perf_counter", lambda: clock[0])

    class Model:  # each learnt row takes one second
        learnt = 0

        def predict_one(self, x):
            return 0

        def learn_one(self, x, y):
            self.learnt += 1
            clock[0] += 1.0

    model, seen = Model(), []

    def between():
        seen.append(model.learnt)
        clock[0] += 1000.0

    r = quality.run_river(model, "m", [{0: 0.0}] * 10, [0] * 10, between=between, calls=3)
    assert seen == [0, 5, 10] and r.seconds == 10.0


def test_replays_that_answer_differently_stop_the_benchmark():
    outcomes = iter([np.array([1, 0], dtype=np.int8), np.array([1, 1], dtype=np.int8)])
    with pytest.raises(SystemExit, match="answered differently"):
        quality.repeated(lambda: quality.Run(next(outcomes), 1.0), 2)


def test_parquet_replay_prints_a_line_per_learner_and_a_summary(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):  # four shards; the concept flips at row 1200
        x = rng.random((400, 2)).astype(np.float32)
        y = np.where(x[:, 0] + x[:, 1] > 1.0, 1, 0)
        if i >= 3:
            y = 1 - y
        pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "y": y}), tmp_path / f"shard-{i:03d}.parquet")
    cmd = [sys.executable, str(BENCH / "quality.py"), "--parquet", str(tmp_path), "--features", "a,b",
           "--label", "y", "--classes", "0,1", "--drift-at", "1200", "--block-rows", "200",
           "--samples-per-row", "2", "--static-rows", "400", "--window", "200", "--set", "train.min_buffer_rows=200",
           "--set", "gate.min_eval_rows=200"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    lines = {d["name"]: d for d in map(json.loads, out.stdout.splitlines())}
    name = tmp_path.name
    assert set(lines) == {f"quality/{name}/{k}" for k in (*quality.DEFAULT_LEARNERS, "summary")}
    for k in quality.DEFAULT_LEARNERS:
        line = lines[f"quality/{name}/{k}"]
        assert 0.0 <= line["value"] <= 1.0 and line["rows_per_s"] > 0 and line["torch_threads"] == 1
        assert [d["at"] for d in line["drifts"]] == [1200]
    assert lines[f"quality/{name}/livetrain"]["versions_promoted"] >= 1
    assert len(lines[f"quality/{name}/livetrain"]["seconds_per_replay"]) == 3  # three replays answered alike
    assert lines[f"quality/{name}/livetrain"]["interleaved_with"] == "arf"
    assert list(lines)[0] == f"quality/{name}/livetrain"  # reported first, as before
    assert lines[f"quality/{name}/summary"]["rows_per_s_vs_arf"] > 0


def test_poison_replay_counts_the_bursts_that_reached_the_endpoint():
    """benchmarks/poison.py: every gate decision of the replay is seen (as many
    promotions as the registry counted, each with the version then served), none
    promoted on the burst, and the gate serves fresh models again after it."""
    import poison
    from livetrain.config import load_config

    s, lo, hi, clean = poison.poisoned_sea(seed=1, block_rows=500, burst=6)
    unpoisoned, _, _, _ = poison.poisoned_sea(seed=1, block_rows=500, burst=0)  # the same rows, none poisoned
    assert (s.y[:lo] == unpoisoned.y[:lo]).all() and 0.4 < (s.y[lo:hi] == unpoisoned.y[lo:hi]).mean() < 0.6
    mixed, _, _, _ = poison.poisoned_sea(seed=1, block_rows=500, burst=6, every=3)  # shards 12 and 15 only
    same = [(mixed.y[r : r + 500] == unpoisoned.y[r : r + 500]).all() for r in range(lo, hi, 500)]
    assert same == [False, True, True, False, True, True] and len(clean.y) == poison.CLEAN_ROWS
    decisions: list = []
    run = quality.run_livetrain(s, load_config(None, []), 500, 5.0, 1, decisions)
    promoted = [(row, v) for row, d, v in decisions if d.action == "promote"]
    assert len(promoted) == run.extra["versions_promoted"] >= 2
    assert all(v.version == d.version for (row, d, v) in decisions if d.action == "promote")
    assert not [row for row, _ in promoted if lo < row <= hi] and max(row for row, _ in promoted) > hi
    out = subprocess.run([sys.executable, str(BENCH / "poison.py"), "--seeds", "1", "--bursts", "4",
                          "--samples-per-row", "5"], capture_output=True, text=True, check=True, timeout=300)
    (line,) = map(json.loads, out.stdout.splitlines())
    assert line["name"] == "poison/bursts_reaching_endpoint/4_shards" and line["bursts"] == 1
    assert line["value"] == line["promotions_during"] == 0 and line["burst_rows"] == 2000
    assert line["worst_drop"] <= poison.MAX_DROP


@pytest.mark.parametrize("every_s, proposals", [(0.25, 16), (1.0, 4)])
def test_the_replay_proposes_on_the_trainers_cadence_of_its_simulated_clock(every_s, proposals):
    """Rows arrive at ``synthetic.rows_per_second`` (2,000/s): a 500-row block every
    0.25 s. The replay proposes as the trainer does, every ``train.propose_every_s``,
    not after every block whatever the config: 16 blocks trained on (from the second,
    ``train.min_buffer_rows``), one proposal each at 0.25 s, one per 4 at 1 s."""
    from livetrain.config import load_config

    rng = np.random.default_rng(0)
    x = rng.random((8500, 3)).astype(np.float32)
    s = quality.Stream("t", x, (x[:, 0] > 0.5).astype(np.int64), 2, [], "toy")
    cfg = load_config(None, [f"train.propose_every_s={every_s}"])
    run = quality.run_livetrain(s, cfg, 500, 2.0, 1)
    assert run.extra["proposals"] == proposals and run.extra["propose_every_s"] == every_s
    assert run.extra["versions_promoted"] <= proposals


def test_a_parquet_streams_drift_rows_count_the_files_rows_even_when_some_are_dropped(tmp_path):
    """``--drift-at 300`` names row 300 of the files; with 100 rows before it dropped (a
    label not declared), the drift is at row 200 of what the learners see."""
    y = np.zeros(600, dtype=np.int64)
    y[:100] = 7  # not a declared class: dropped
    y[300:] = 1  # the drift
    pq.write_table(pa.table({"a": np.arange(600, dtype=np.float32), "y": y}), tmp_path / "s.parquet")
    s = quality.parquet(str(tmp_path), ["a"], "y", [0, 1], [300])
    assert len(s.y) == 500 and s.drifts == [(200, 1)] and s.y[199] == 0 and s.y[200] == 1
