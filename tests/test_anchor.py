"""``train.anchor_l2`` in the running loop: every DDP rank is pulled towards the
served version's weights once it is served. Real Ray, Ray Train (2 workers,
gloo), Serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from _util import wait_until
from livetrain.config import load_config, shipped_config
from livetrain.training.checkpoint import load_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

STEPS_AFTER = 1000


def newest_checkpoint(state: Path):
    """The newest checkpoint that reads back whole (Ray Train may still be writing one)."""
    for d in sorted((d for d in (state / "ray_train").rglob("checkpoint_*") if d.is_dir()), reverse=True):
        try:
            return load_checkpoint(d)
        except Exception:
            continue
    return None


def test_training_stays_at_the_served_weights_under_a_strong_anchor(ray_session, serve_port, tmp_path: Path):
    """One version is proposed (right after the first round) and served; training
    then goes on for ``STEPS_AFTER`` steps under a very strong pull
    (``anchor_l2`` 1e4): the weights stay within a few optimizer steps of the
    served ones. Without the pull they move far from that barely trained
    version (the stream is learnable)."""
    from livetrain.pipeline import Pipeline

    state = tmp_path / "state"
    cfg = load_config(shipped_config("demo"), [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={serve_port}",
        "train.anchor_l2=1e4", "train.propose_every_s=3600", "train.checkpoint_every_s=2",
    ])
    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        wait_until(lambda: p.snapshot()["served_version"] is not None, 180, "the first version served")
        first = newest_checkpoint(state)
        start = first.meta["progress"]["step"] if first is not None else 0
        wait_until(lambda: (c := newest_checkpoint(state)) is not None and c.meta["progress"]["step"] >= start + STEPS_AFTER,
                   120, f"{STEPS_AFTER} more steps")
        assert p.snapshot()["versions_proposed"] == 1
    finally:
        p.stop()
    served = load_checkpoint(state / "served" / "v000001" / "model.pt")
    final = newest_checkpoint(state)
    assert final.meta["progress"]["step"] >= start + STEPS_AFTER
    params = [k for k in served.weights if "running_" not in k and "num_batches" not in k]  # not the norm's statistics
    moved = max(float((final.weights[k] - served.weights[k]).abs().max()) for k in params)
    assert moved < 1e-3, moved  # Adam moves a weight ~lr (3e-3) a step: the pull holds it far closer
