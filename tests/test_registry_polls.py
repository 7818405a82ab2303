"""The registry actor's long-polls never take the threads its other calls need."""

from __future__ import annotations

import pytest

from livetrain.config import load_config

pytestmark = [pytest.mark.ray]


def test_many_replicas_long_polling_leave_the_registry_free_to_score_and_report(ray_session, tmp_path):
    """Each serving replica keeps a ``wait_for_version`` parked in the registry until
    a version changes (here: for a minute). With more of them than the actor's
    threads (16), ``stats`` (and ``observe``, ``propose``, ``/model``) waited for a
    poll to time out: a cluster with 16 replicas stalled its own gate."""
    import ray

    from livetrain.training.registry_actor import ModelRegistry

    cfg = load_config(None, [f"state_dir={tmp_path}", "schema.features=[x0, x1, x2]"])
    registry = ModelRegistry.remote(cfg.gate, 2, str(tmp_path), cfg.drift)
    try:
        polls = [registry.wait_for_version.remote(-1, 60.0) for _ in range(24)]
        stats = ray.get(registry.stats.remote(), timeout=20)  # GetTimeoutError: every thread held by a poll
        assert stats["served_version"] is None
        assert ray.wait(polls, timeout=0)[1] == polls  # all still parked: none answered to free a thread
    finally:
        ray.kill(registry)
