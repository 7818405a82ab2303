"""How ``livetrain run`` ends, with a stand-in for the pipeline: no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import livetrain.pipeline
from livetrain import cli


class FailingPipeline:
    """Starts, then its training fails mid-run, as ``Pipeline.run`` reports it."""

    def __init__(self, cfg: object) -> None:
        self.final: dict = {}
        self.stop_reason = None
        self.looping = False
        self.interrupted = None
        self.url = "http://127.0.0.1:1"
        self.stopped = False

    def start(self) -> None:
        pass

    def run(self, duration_s: float | None) -> dict:
        try:
            raise ValueError("worker group failed (max_failures exhausted)")
        except ValueError as e:
            raise RuntimeError("the training job failed") from e

    def stop(self) -> None:
        self.stopped = True
        self.final = {"rows_ingested": 1200, "served_version": 4}


def test_training_failing_mid_run_still_prints_the_summary_and_exits_non_zero(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(livetrain.pipeline, "Pipeline", FailingPipeline)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    config = Path(__file__).parents[1] / "configs" / "demo.yaml"
    code = cli.main(["run", "--config", str(config), "--state-dir", str(tmp_path), "--wandb", "disabled", "--no-live"])
    out, err = capsys.readouterr()
    assert code == 1
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rows_ingested"] == 1200 and summary["served_version"] == 4
    assert summary["error"] == "the training job failed: ValueError: worker group failed (max_failures exhausted)"
    assert "livetrain: error: the training job failed: ValueError: worker group failed" in err
    assert "Traceback" not in err
