"""``livetrain history`` reads the decision log and alarms, in time order."""

from __future__ import annotations

import json
from pathlib import Path

from livetrain.cli import main
from livetrain.history import read_history


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')


def test_history_merges_decisions_and_alarms_in_time_order(tmp_path: Path, capsys):
    write(tmp_path / "decisions.jsonl", [
        {"version": 1, "action": "promote", "reason": "no served model", "at": 10.0},
        {"version": 2, "action": "supersede", "reason": "x", "at": 11.0},
        {"version": 3, "action": "reject", "reason": "accuracy 0.5 vs served 0.9", "at": 13.0},
    ])
    write(tmp_path / "alarms.jsonl", [{"detector": "error:adwin", "seq": 7, "features": [], "at": 12.0}])
    kinds = [(e["kind"], e.get("action")) for e in read_history(tmp_path)]
    assert kinds == [("decision", "promote"), ("alarm", None), ("decision", "reject")]
    assert main(["history", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "promote" in out[0] and "alarm" in out[1] and "accuracy 0.5 vs served 0.9" in out[2]


def test_history_of_an_empty_state_dir_says_so(tmp_path: Path, capsys):
    assert main(["history", "--state-dir", str(tmp_path)]) == 1
    assert "no decisions" in capsys.readouterr().err


def test_a_mistyped_state_dir_is_named_for_history_and_quarantine(tmp_path: Path, capsys):
    missing = tmp_path / "stat"  # "state", mistyped
    assert main(["history", "--state-dir", str(missing)]) == 1
    assert f"no state directory at {missing}" in capsys.readouterr().err
    assert main(["quarantine", "--state-dir", str(missing), "--all"]) == 1
    assert f"no state directory at {missing}" in capsys.readouterr().err
    assert not missing.exists()  # nothing created there: no manifest beside a typo
