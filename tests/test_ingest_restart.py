"""The whole ``livetrain run`` process tree killed with SIGKILL mid-ingest and
started again on the same state dir: every row id is accounted for exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from _ingest_util import assert_exactly_once, quarantined_ids, write_id_shard
from _util import free_port, wait_until
from livetrain.actors.blocks import read_snapshot

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHARDS, ROWS = 40, 2000


def ingested(state: Path) -> int:
    try:
        with sqlite3.connect(state / "manifest.sqlite", timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM shards WHERE status = 'ingested'").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_tree(proc: subprocess.Popen, sessions_before: set[str]) -> None:
    """SIGKILL the process group, then any Ray process of the session it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    for session in {p.name for p in Path("/tmp/ray").glob("session_2*")} - sessions_before:
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and session.encode() in (p / "cmdline").read_bytes():
                    os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                pass


def test_sigkilled_run_restarted_on_same_state_dir_ingests_every_row_exactly_once(tmp_path):
    from test_cli import livetrain_until

    landing, state = tmp_path / "landing", tmp_path / "state"
    landing.mkdir()
    cfg = {
        "state_dir": str(state), "live_view": False,
        "source": {"kind": "directory", "path": str(landing)},
        "schema": {"features": ["x0", "x1", "x2"], "label": "label", "classes": [0, 1], "id_column": "id"},
        "ingest": {"block_rows": 250},
        "buffer": {"capacity_rows": 200_000, "window_rows": 200_000, "snapshot_every_s": 0.2},
        "train": {"checkpoint_every_s": 3.0, "min_buffer_rows": 500},
        "serve": {"port": free_port()}, "tracking": {"wandb": "disabled"},
    }
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    all_ids: set[int] = set()
    for i in range(SHARDS):
        write_id_shard(landing / f"k-{i:03d}.parquet", i * 10_000, ROWS, bad_every=101)
        all_ids |= set(range(i * 10_000, i * 10_000 + ROWS))
    cmd = [sys.executable, "-m", "livetrain.cli", "run", "--config", str(tmp_path / "my.yaml")]
    sessions = {p.name for p in Path("/tmp/ray").glob("session_2*")}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: ingested(state) >= 3, 120, "a first few shards ingested")
    finally:
        kill_tree(first, sessions)
    done_at_kill = ingested(state)
    assert done_at_kill < SHARDS, "everything was ingested before the kill"

    livetrain_until(lambda m: ingested(state) == SHARDS, "every shard ingested after the restart",
                    "run", "--config", str(tmp_path / "my.yaml"), state=state)
    assert ingested(state) == SHARDS
    # the final snapshot names every block the restarted buffer held: read their ids back
    snap = read_snapshot(state)
    bad = set(quarantined_ids(state))
    in_buffer: list[int] = []
    for part in snap.parts:
        ids = pq.read_table(landing / part.shard, columns=["id"])["id"].to_pylist()[part.row_start : part.row_end]
        kept = [i for i in ids if i not in bad]
        assert len(kept) == part.rows
        in_buffer += kept
    assert_exactly_once(all_ids, in_buffer, sorted(bad))
    print(f"killed with {done_at_kill}/{SHARDS} shards ingested; rows: {len(all_ids)} = "
          f"{len(in_buffer)} buffered + {len(bad)} quarantined")
