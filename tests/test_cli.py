"""``livetrain`` as a user runs it: subprocesses, real Ray, real Serve."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from _ingest_util import assert_exactly_once, quarantined_ids, write_id_shard
from _util import free_port, wait_until
from livetrain.actors.blocks import read_snapshot
from livetrain.actors.synthetic import SyntheticStream
from livetrain.config import SyntheticConfig
from livetrain.tracking import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

SUMMARY_KEYS = {
    "rows_ingested", "rows_quarantined", "shards_ingested", "train_steps", "versions_proposed",
    "versions_promoted", "served_version", "prequential_accuracy", "freshness_p50_s", "freshness_p95_s",
}


def ray_sessions() -> set[str]:
    root = Path("/tmp/ray")
    return {p.name for p in root.glob("session_2*")} if root.exists() else set()


def processes_mentioning(words: set[str]) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(w in cmd for w in words):
            found.append(f"{proc.name}: {cmd[:120]}")
    return found


def kill_processes_mentioning(words: set[str]) -> None:
    """SIGKILL every process (but this one) whose command line names one of ``words``."""
    for line in processes_mentioning(words):
        pid = int(line.split(":", 1)[0])
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def livetrain(*args: str, timeout: float = 300, env: dict | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    env = {**(env or os.environ), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "livetrain.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last), proc


def livetrain_until(done: Callable[[dict[str, Any]], bool], what: str, *args: str, state: Path,
                    timeout: float = 240, env: dict | None = None) -> tuple[dict, str]:
    """``livetrain run ...`` stopped with Ctrl-C (SIGINT) once the latest of the
    figures it logs to ``state``'s metrics log (not its events) satisfies
    ``done``: a run as long as the test needs, not a fixed duration.
    Returns the summary and its stdout + stderr."""
    env = {**(env or os.environ), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    before = len(read_metrics(state))  # this run's records only
    cmd = [sys.executable, "-m", "livetrain.cli", *args, "--state-dir", str(state), "--duration", str(2 * timeout),
           "tracking.log_every_s=0.5"]  # the figures it waits on, every tick
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        try:
            def ready() -> bool:
                records = [r for r in read_metrics(state)[before:] if "shards_ingested" in r]
                return proc.poll() is not None or (bool(records) and done(records[-1]))

            wait_until(ready, timeout, what)
            early = proc.poll()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert early is None, f"livetrain exited ({early}) before {what}: {stderr[-3000:]}"
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stdout + stderr


def test_demo_stops_by_itself_prints_summary_and_leaves_no_ray_behind(tmp_path: Path):
    before = ray_sessions()
    summary, proc = livetrain(
        "demo", "--duration", "15", "--wandb", "offline", "--no-live", "--state-dir", str(tmp_path),
        f"serve.port={free_port()}",
    )
    assert SUMMARY_KEYS <= summary.keys()
    # a local Ray has no dashboard, so no State API: Ray Train's placement-group cleaner
    # would warn about it every second of the run (livetrain.worker_setup quiets it)
    assert "Failed to query Ray Train Controller" not in proc.stdout + proc.stderr
    # and no failed Serve task on the way out (serve.shutdown()'s controller kills itself)
    assert "graceful_shutdown failed" not in proc.stdout + proc.stderr
    # the registry gets the buffer by name: a handle among a restartable actor's arguments
    # lives in the object store, which Ray reports as a restart that may fail
    assert "Actor livetrain_registry with class name" not in proc.stdout + proc.stderr
    # nor Ray Train's preemption watcher (off on one machine), for the same reason
    assert "PreemptionWatcher" not in proc.stdout + proc.stderr
    # Train's per-report lines (three a checkpoint, for as long as it runs; one at the stop at least)
    assert "Reporting training result" not in proc.stdout + proc.stderr
    assert "Checkpoint successfully created" not in proc.stdout + proc.stderr
    assert summary["rows_ingested"] > 0 and summary["shards_ingested"] > 0 and summary["train_steps"] > 0
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run recorded"
    new = ray_sessions() - before
    assert new, "the demo did not start its own Ray"
    assert processes_mentioning(new) == []


def write_shards(landing: Path, n: int) -> None:
    stream = SyntheticStream(SyntheticConfig(generator="sea", variant=2, rows_per_shard=500, seed=3), landing)
    for _ in range(n):
        stream.write_shard()


def manifest_rows(state: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state / "manifest.sqlite") as db:
        return db.execute("SELECT name, status FROM shards ORDER BY seq").fetchall()


def ingested(state: Path) -> int:
    try:
        with sqlite3.connect(state / "manifest.sqlite", timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM shards WHERE status = 'ingested'").fetchone()[0]
    except sqlite3.Error:
        return 0


def lock_holder(state: Path) -> str:
    """The run that holds ``state`` as its lock file names it ("" before any run took it)."""
    try:
        return (state / "livetrain.lock").read_text()
    except FileNotFoundError:
        return ""


def kill_tree(proc: subprocess.Popen, sessions_before: set[str]) -> None:
    """SIGKILL the process group, then any Ray process of the session it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    kill_processes_mentioning(ray_sessions() - sessions_before)


def assert_every_row_once(state: Path, landing: Path, all_ids: set[int]) -> None:
    """The final buffer snapshot names every block the buffer held: their row ids plus
    the quarantined ones are every row written, each exactly once."""
    snap = read_snapshot(state)
    bad = set(quarantined_ids(state))
    in_buffer: list[int] = []
    for part in snap.parts:
        ids = pq.read_table(landing / part.shard, columns=["id"])["id"].to_pylist()[part.row_start : part.row_end]
        kept = [i for i in ids if i not in bad]
        assert len(kept) == part.rows
        in_buffer += kept
    assert_exactly_once(all_ids, in_buffer, sorted(bad))


KILLED_SHARDS, KILLED_ROWS = 40, 2000


def test_run_killed_then_stopped_then_reconfigured_continues_where_it_stopped_each_time(tmp_path: Path):
    """Three restarts of ``livetrain run`` on one state dir, as a user meets them:

    1. the whole process tree SIGKILLed mid-ingest: the next run ingests every
       row exactly once (bad rows quarantined, none lost, none twice);
    2. stopped with Ctrl-C: the next run resumes training from the checkpoint
       and reads only the shards that landed since;
    3. another model in the config: it trains from fresh weights while the old
       version serves."""
    landing, state = tmp_path / "landing", tmp_path / "state"
    landing.mkdir()
    cfg = {
        "state_dir": str(state),
        "live_view": False,
        "source": {"kind": "directory", "path": str(landing)},
        "schema": {"features": ["x0", "x1", "x2"], "label": "label", "classes": [0, 1], "id_column": "id"},
        "ingest": {"block_rows": 250},
        "buffer": {"capacity_rows": 200_000, "window_rows": 200_000, "snapshot_every_s": 0.2},
        "train": {"checkpoint_every_s": 3.0, "min_buffer_rows": 500},
        "serve": {"port": free_port()},
        "tracking": {"wandb": "disabled"},
    }
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    all_ids: set[int] = set()
    for i in range(KILLED_SHARDS):
        write_id_shard(landing / f"k-{i:03d}.parquet", i * 10_000, KILLED_ROWS, bad_every=101)
        all_ids |= set(range(i * 10_000, i * 10_000 + KILLED_ROWS))

    # 1. SIGKILL mid-ingest, then every row exactly once
    sessions = ray_sessions()
    killed = subprocess.Popen([sys.executable, "-m", "livetrain.cli", "run", "--config", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = None
    try:
        # meanwhile a second run on the state dir is refused at once, naming the first (no Ray of its own)
        wait_until(lambda: f'"pid": {killed.pid}' in lock_holder(state), 120, "the first run holding the state dir")
        second = subprocess.Popen([sys.executable, "-m", "livetrain.cli", "run", "--config", str(path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: ingested(state) >= 3, 120, "a first few shards ingested")
    finally:
        kill_tree(killed, sessions)
        if second is not None and second.poll() is None:
            second.kill()
    _, refusal = second.communicate(timeout=120)
    assert second.returncode == 2, refusal[-3000:]
    assert f"state_dir: {str(state)!r} is in use by another livetrain run (pid {killed.pid}" in refusal
    done_at_kill = ingested(state)
    assert done_at_kill < KILLED_SHARDS, "everything was ingested before the kill"
    first, _ = livetrain_until(
        lambda m: ingested(state) == KILLED_SHARDS and m["train_steps"] > 0 and m.get("served_version") is not None,
        "every shard in after the kill, some training and a served version", "run", "--config", str(path),
        state=state)
    assert ingested(state) == KILLED_SHARDS
    assert first["shards_ingested"] == KILLED_SHARDS - done_at_kill  # not one the killed run had finished
    assert_every_row_once(state, landing, all_ids)
    print(f"killed with {done_at_kill}/{KILLED_SHARDS} shards ingested")

    # 2. after Ctrl-C: the checkpoint, and only the new shards
    for i in range(KILLED_SHARDS, KILLED_SHARDS + 5):
        write_id_shard(landing / f"k-{i:03d}.parquet", i * 10_000, 1000)  # no bad rows: exact counts
        all_ids |= set(range(i * 10_000, i * 10_000 + 1000))
    second, output = livetrain_until(
        lambda m: m["shards_ingested"] >= 5 and m["train_steps"] > first["train_steps"],
        "the new shards in and training past the first run", "run", "--config", str(path), state=state)
    assert second["shards_ingested"] == 5 and second["rows_ingested"] == 5_000  # no shard twice
    rows = manifest_rows(state)
    assert len(rows) == KILLED_SHARDS + 5 and {s for _, s in rows} == {"ingested"}
    assert_every_row_once(state, landing, all_ids)
    assert "resumed from checkpoint" in output
    assert all(output.count(f"rank {r} resumed from checkpoint") <= 1 for r in (0, 1))  # not twice (Train's print patch)
    assert "livetrain: stopped (SIGINT)" in output  # Ctrl-C ends the loop at a tick, cleanly
    assert second["train_steps"] > first["train_steps"]  # steps continue from the checkpoint
    assert second["served_version"] >= first["served_version"]

    # 3. another model in the config: it trains from fresh weights; the old version serves meanwhile
    narrower = tmp_path / "narrower.yaml"
    narrower.write_text(yaml.safe_dump({**cfg, "model": {"hidden": [16]}}))
    third, output = livetrain_until(
        lambda m: m["train_steps"] > second["train_steps"] + 20 and m["versions_proposed"] > 0,
        "the new model training and proposing", "run", "--config", str(narrower), state=state)
    assert "training starts from fresh weights" in output and "[32, 32]" in output and "[16]" in output
    assert "resumed from checkpoint" not in output
    assert third["served_version"] >= second["served_version"]


@pytest.mark.parametrize("key", ["state_dir", "source.path"])
def test_a_directory_that_is_a_file_is_named_before_ray_starts(tmp_path: Path, key: str):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "livetrain.cli", "demo", "--wandb", "disabled", "--no-live",
         f"state_dir={tmp_path / 'state'}", f"{key}={taken}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{key}: cannot use {str(taken)!r} as a directory" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr
    assert taken.read_text() == "not a directory"
