"""One run per state dir: the lock ``Pipeline.start`` takes before Ray or any write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from livetrain.config import ConfigError, load_config
from livetrain.pipeline import Pipeline
from livetrain.state_lock import LOCK_FILE, StateDirLock


def test_a_second_holder_is_refused_naming_the_state_dir_and_the_first_run(tmp_path):
    first, second = StateDirLock(tmp_path), StateDirLock(tmp_path)
    first.acquire({"pid": 4242, "job_id": "raysubmit_abc", "namespace": "ns1"})
    with pytest.raises(ConfigError, match=r"state_dir: .* in use by another livetrain run \(pid 4242, .*raysubmit_abc"):
        second.acquire({"pid": 1})
    assert str(tmp_path) in str(pytest.raises(ConfigError, second.acquire, {"pid": 1}).value)
    first.release()
    second.acquire({"pid": 1})
    assert second.held
    second.release()


def test_the_lock_file_is_not_inherited_by_child_processes(tmp_path):
    """Ray's processes started from the driver must not keep the lock after it exits."""
    lock = StateDirLock(tmp_path)
    lock.acquire({"pid": os.getpid()})
    assert not os.get_inheritable(lock._fd)
    lock.release()


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, pathlib; from livetrain.state_lock import StateDirLock; "
         f"StateDirLock(pathlib.Path({str(tmp_path)!r})).acquire({{'pid': os.getpid()}}); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            StateDirLock(tmp_path).acquire({"pid": os.getpid()})
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock = StateDirLock(tmp_path)
    lock.acquire({"pid": os.getpid()})
    lock.release()


def test_a_second_pipeline_on_the_state_dir_is_refused_until_the_first_stops(tmp_path):
    """Wired into start() before Ray starts: both starts here fail before ray.init (the
    landing path is a file), the first holding the lock until its stop()."""
    state, blocker = tmp_path / "state", tmp_path / "not-a-dir"
    blocker.write_text("")
    overrides = [f"state_dir={state}", "source.kind=directory", f"source.path={blocker}",
                 "schema={features: [x0], label: label, classes: [0, 1]}"]
    first, second = Pipeline(load_config(overrides=overrides)), Pipeline(load_config(overrides=overrides))
    with pytest.raises(ConfigError, match="source.path"):
        first.start()
    with pytest.raises(ConfigError, match=rf"state_dir: .*in use by another livetrain run \(pid {os.getpid()}"):
        second.start()
    assert sorted(p.name for p in state.iterdir()) == [LOCK_FILE]  # nothing else written
    first.stop()
    with pytest.raises(ConfigError, match="source.path"):  # past the lock now
        second.start()
    second.stop()
