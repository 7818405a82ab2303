"""A drift alarm reaches the replay buffer: the registry actor moves the buffer
actor's sampling mix (recent share up, window shorter) on a feature-drift alarm."""

from __future__ import annotations

import time

import numpy as np
import pytest

from _util import wait_until
from livetrain.config import load_config
from livetrain.messages import BlockMeta, BlockRef

pytestmark = [pytest.mark.ray]


def test_a_feature_drift_alarm_moves_the_buffers_sampling_mix(ray_session, tmp_path):
    import ray

    from livetrain.actors.buffer_actor import ReplayBufferActor
    from livetrain.training.registry_actor import ModelRegistry

    cfg = load_config(None, [f"state_dir={tmp_path}", "schema.features=[x0, x1, x2]", "buffer.recent_fraction=0.5",
                             "buffer.window_rows=2000"])
    name, ns = "livetrain_test_mix_buffer", ray.get_runtime_context().namespace
    buffer = ReplayBufferActor.options(name=name, namespace=ns).remote(cfg.buffer, str(tmp_path), cfg.schema,
                                                                       cfg.ingest.block_rows)
    # the buffer by name: the registry looks it up when the mix first moves
    registry = ModelRegistry.remote(cfg.gate, 2, str(tmp_path), cfg.drift, cfg.buffer.recent_fraction,
                                    cfg.buffer.window_rows, (name, ns))
    rng = np.random.default_rng(0)

    def mix() -> tuple[float, int]:
        return ray.get(buffer.__ray_call__.remote(lambda b: (b._buf.recent_fraction, b._buf.window_limit)))

    def feed(seq: int, shift: float) -> None:
        x = rng.normal(shift, 1.0, (1000, 3)).astype(np.float32)
        meta = BlockMeta(f"s{seq}", seq, len(x), x.nbytes, time.time(), time.time())
        ray.get(registry.observe.remote(meta, BlockRef(ray.put({"x": x, "y": (x[:, 0] > shift).astype(np.int64)}))))

    try:
        for seq in range(8):  # the features' reference, and as much again of the same
            feed(seq, 0.0)
        assert mix() == (0.5, 2000) and not ray.get(registry.alarms.remote())[0]
        seq = 8
        while not ray.get(registry.alarms.remote())[0]:  # every feature moves by 3 sd
            assert seq < 14, "no feature-drift alarm"
            feed(seq, 3.0)
            seq += 1
        wait_until(lambda: mix()[0] == cfg.drift.alarm_recent_fraction, 30, "the alarm's sampling mix in the buffer")
        assert mix()[1] < 2000  # and a shorter window
    finally:
        ray.kill(registry)
        ray.kill(buffer)
