"""Training that diverges (a learning rate far too high): non-finite weights
are never proposed nor checkpointed, and training goes on. Real Ray, Ray Train
and Serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _util import wait_until
from livetrain.config import load_config, shipped_config
from livetrain.history import read_history
from livetrain.training.checkpoint import load_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]


def test_diverged_training_proposes_and_checkpoints_nothing_non_finite_and_goes_on(ray_session, serve_port, tmp_path: Path):
    from livetrain.pipeline import Pipeline

    state = tmp_path / "state"
    cfg = load_config(shipped_config("demo"), [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={serve_port}",
        "train.lr=1e30", "train.propose_every_s=0.2", "train.checkpoint_every_s=0.5",
    ])
    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        wait_until(lambda: p.snapshot()["train_divergences"] >= 3, 180, "training to diverge and go on, three times")
        snap = p.snapshot()
        assert snap["versions_proposed"] == 0 and snap["served_version"] is None
    finally:
        p.stop()
    assert not [e for e in read_history(state) if e["kind"] == "decision"]
    checkpoints = sorted(d for d in (state / "ray_train").rglob("checkpoint_*") if d.is_dir())
    assert checkpoints, "the final checkpoint"
    for d in checkpoints:
        assert all(torch.isfinite(w).all() for w in load_checkpoint(d).weights.values()), d.name
