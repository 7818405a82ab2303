"""The pipeline's bookkeeping that needs no Ray: what ``stop`` reports."""

from __future__ import annotations

import threading

from livetrain.config import load_config
from livetrain.pipeline import Pipeline


def test_a_pipeline_stopped_before_it_started_leaves_an_empty_summary(tmp_path):
    """Ctrl-C during start-up (ray.init, schema.infer waiting for a shard): the CLI
    prints ``final`` after ``stop``."""
    p = Pipeline(load_config(overrides=[f"state_dir={tmp_path}"]))
    p.stop()
    assert p.final == {}


def test_stop_says_when_training_may_not_have_taken_its_last_checkpoint(tmp_path):
    p = Pipeline(load_config(overrides=[f"state_dir={tmp_path}"]))
    assert p._train_problem() is None
    p._stop.set()
    p._stop_error = RuntimeError("could not upload\n the checkpoint")
    assert p._train_problem() == "training failed while stopping (RuntimeError: could not upload the checkpoint)"
    p._stop_error = None
    hung = threading.Event()
    train = threading.Thread(target=hung.wait, name="train", daemon=True)
    train.start()
    p._threads.append(train)
    assert "did not stop within 60 s" in p._train_problem()
    hung.set()
    train.join()
    assert p._train_problem() is None
