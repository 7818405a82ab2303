"""Checkpoints describe themselves: the model is rebuilt from the file alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from livetrain.config import ModelConfig
from livetrain.training.checkpoint import CheckpointData, CheckpointError, load_model, save_checkpoint, state_dict_numpy, model_from_weights
from livetrain.training.models import build_model, model_spec


def test_model_is_rebuilt_from_checkpoint_alone(tmp_path: Path):
    spec = model_spec(ModelConfig(hidden=[8, 8], dropout=0.1), num_features=5, num_classes=3)
    model = build_model(spec).eval()
    x = torch.randn(4, 5)
    save_checkpoint(tmp_path, CheckpointData(spec, model.state_dict(), meta={"version": 7, "trained_through": 41}))
    rebuilt, data = load_model(tmp_path)
    assert torch.equal(rebuilt(x), model(x))
    assert data.meta == {"version": 7, "trained_through": 41} and data.spec == spec


def test_numpy_weights_round_trip():
    spec = model_spec(ModelConfig(hidden=[4]), 3, 2)
    model = build_model(spec).eval()
    again = model_from_weights(spec, state_dict_numpy(model))
    x = torch.randn(2, 3)
    assert torch.equal(again(x), model(x))


def test_corrupt_checkpoint_is_refused(tmp_path: Path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_model(tmp_path)


def test_weights_of_another_shape_are_refused():
    spec = model_spec(ModelConfig(hidden=[4]), 3, 2)
    other = build_model(model_spec(ModelConfig(hidden=[5]), 3, 2))
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_weights(spec, other.state_dict())


def test_unknown_model_name_is_an_error():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        model_spec(ModelConfig(name="resnet"), 3, 2)


def test_served_weights_travel_as_npz_bytes_without_pickle():
    import pickle

    import numpy as np

    from livetrain.training.checkpoint import weights_from_bytes, weights_to_bytes

    spec = model_spec(ModelConfig(hidden=[4]), 3, 2)
    model = build_model(spec).eval()
    again = model_from_weights(spec, weights_from_bytes(weights_to_bytes(state_dict_numpy(model))))
    x = torch.randn(2, 3)
    assert torch.equal(again(x), model(x))
    hostile = pickle.dumps({"w": np.zeros(2)})  # a pickle stream is refused, never executed
    with pytest.raises(CheckpointError, match="not a weights payload"):
        weights_from_bytes(hostile)
    buf = __import__("io").BytesIO()
    np.savez(buf, w=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError):
        weights_from_bytes(buf.getvalue())
