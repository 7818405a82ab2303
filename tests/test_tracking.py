"""Tracker (W&B run + local metrics log) and the rich live view.

W&B runs here are ``disabled`` or ``offline`` only: nothing reaches the network.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from _util import wait_until
from livetrain.config import TrackingConfig
from livetrain.live_view import LiveView, render
from livetrain.tracking import RUN_ID_FILE, Tracker, read_metrics, resolve_mode


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_auto_mode_defers_to_env_and_explicit_setting_wins():
    assert resolve_mode("auto", {}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("auto", {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode("offline", {"WANDB_MODE": "disabled"}) == "offline"


def test_disabled_wandb_still_writes_local_log(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(TrackingConfig(), tmp_path, {"lr": 0.1})
    assert tracker.mode == "disabled" and not tracker.wandb_active
    tracker.log({"loss": 0.5, "acc": 0.75}, step=3)
    tracker.event("promote", version=2, reason="better")
    tracker.summary({"final_acc": 0.75})  # a no-op without W&B, not an error
    # Each line is flushed as written: readable before close.
    records = read_metrics(tmp_path)
    tracker.close()
    tracker.close()

    assert [r.get("step") for r in records] == [3, None]
    assert records[0]["loss"] == 0.5 and records[0]["acc"] == 0.75
    assert records[1]["event"] == "promote" and records[1]["version"] == 2
    assert all(isinstance(r["t"], float) for r in records)
    assert not (tmp_path / "wandb").exists()


def test_torn_last_line_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with Tracker(TrackingConfig(), tmp_path, {}) as tracker:
        tracker.log({"loss": 1.0}, step=0)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"t": 1.0, "loss"')
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0]
    assert read_metrics(tmp_path / "nowhere") == []


def test_offline_run_lives_in_state_dir_and_resumes_on_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the explicit setting must win
    cfg = TrackingConfig(wandb="offline", project="livetrain-tests", run_name="t")

    first = Tracker(cfg, tmp_path, {"lr": 0.1})
    assert first.mode == "offline" and first.wandb_active
    first.log({"loss": 0.5}, step=1)
    first.event("promote", version=1)
    first.summary({"served_version": 1})
    first.close()
    first.close()

    second = Tracker(cfg, tmp_path, {"lr": 0.1})
    second.log({"loss": 0.4}, step=2)
    second.close()

    assert first.run_id and second.run_id == first.run_id
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first.run_id
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{first.run_id}"))
    assert run_dirs, list((tmp_path / "wandb").iterdir())
    assert [r["loss"] for r in read_metrics(tmp_path) if "loss" in r] == [0.5, 0.4]


def test_online_without_an_api_key_logs_offline_instead_of_prompting(tmp_path, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)  # as on a terminal: a prompt would block
    tracker = Tracker(TrackingConfig(wandb="online"), tmp_path / "state", {})
    tracker.log({"loss": 0.3}, step=0)
    tracker.close()
    assert tracker.mode == "offline"
    assert "W&B has no API key" in capsys.readouterr().err
    assert list((tmp_path / "state" / "wandb").glob(f"offline-run-*-{tracker.run_id}"))


def test_a_torn_last_line_of_the_metrics_log_does_not_swallow_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "metrics.jsonl").write_text('{"loss": 0.1}\n{"loss": 0.')
    with Tracker(TrackingConfig(), tmp_path, {}) as tracker:
        tracker.log({"loss": 0.2}, step=1)
    assert [r["loss"] for r in read_metrics(tmp_path)] == [0.1, 0.2]


def test_wandb_init_failure_degrades_to_local_log(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = Tracker(TrackingConfig(wandb="offline"), tmp_path, {})
    tracker.log({"loss": 0.3}, step=0)
    tracker.event("rollback", version=1)
    tracker.summary({"x": 1})
    tracker.close()

    assert not tracker.wandb_active
    err = capsys.readouterr().err
    assert err.count("no wandb today") == 1
    assert [r.get("loss") for r in read_metrics(tmp_path)] == [0.3, None]


# --- live view ---------------------------------------------------------------


def _text(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_live_view_shows_snapshot_values():
    text = _text(
        render(
            {
                "served_version": 7,
                "prequential_accuracy": 0.9134,
                "buffer_bytes": 3 * 2**20,
                "rows_ingested": 12345,
                "endpoint": "http://127.0.0.1:8000/predict",
                "last_decision": "promoted v7: 0.913 >= 0.901 - 0.01",
                "elapsed_s": 42.4,
            },
            title="demo",
        )
    )
    assert "v7" in text
    assert "91.3%" in text
    assert "3.0 MB" in text
    assert "12,345" in text
    assert "http://127.0.0.1:8000/predict" in text
    assert "promoted v7" in text
    assert "elapsed 42 s" in text


def test_live_view_missing_keys_render_as_dash():
    text = _text(render({}, title="demo"))
    lines = [line for line in text.splitlines() if "served version" in line]
    assert lines and "—" in lines[0]
    assert text.count("—") >= 17  # every field, plus elapsed


def test_live_view_draws_nothing_when_disabled_or_not_a_terminal():
    for console, enabled in [
        (Console(file=io.StringIO(), force_terminal=True), False),
        (Console(file=io.StringIO(), force_terminal=False), True),
    ]:
        with LiveView(enabled, "demo", console=console) as view:
            view.update({"served_version": 3})
        assert console.file.getvalue() == ""


def test_live_view_renders_latest_snapshot_on_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with LiveView(True, "demo", console=console) as view:
        view.update({"served_version": 1})
        view.update({"served_version": 5})
    assert "v5" in console.file.getvalue()


def _wandb_log_bytes(state_dir: Path, run_id: str) -> bytes:
    """The offline run's transaction log (protobuf records; strings appear verbatim)."""
    files = list((state_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, "no offline run log"
    return b"".join(f.read_bytes() for f in files)


def test_served_versions_become_model_artifacts_with_aliases(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    weights = tmp_path / "served" / "v000003" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"the weights of v3")
    tracker = Tracker(TrackingConfig(wandb="offline", project="livetrain-tests"), tmp_path, {})
    tracker.log_model(3, weights, None, {"version": 3, "reason": "beats v2"})
    tracker.log_model(4, None, "s3://bucket/run/served/v000004/model.pt", {"version": 4})
    tracker.log_model(5, tmp_path / "missing.pt", None, {"version": 5})  # nothing to log: skipped, no error
    tracker.close()
    name = f"model-{tracker.run_id}".encode()
    # W&B's writer process may still be flushing the offline log when finish() returns
    # (seen once: only the file header was there yet)
    def flushed() -> bytes | None:
        log = _wandb_log_bytes(tmp_path, tracker.run_id)
        return log if name in log else None

    log = wait_until(flushed, 30, "the artifact in the offline run log")
    for alias in (b"served", b"v3", b"v4"):
        assert alias in log, alias
    assert b"s3://bucket/run/served/v000004/model.pt" in log  # a reference, not an upload
