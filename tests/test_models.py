"""Model builders: built-ins, and a user's model as a real entry-point plug-in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from livetrain.config import ConfigError, ModelConfig
from livetrain.training.checkpoint import CheckpointData, load_model, save_checkpoint
from livetrain.training.models import BUILDERS, build_model, model_spec


def test_cnn_classifies_flat_images():
    spec = model_spec(ModelConfig(name="cnn", options={"image_shape": [1, 8, 8]}), num_features=64, num_classes=10)
    out = build_model(spec)(torch.randn(5, 64))
    assert out.shape == (5, 10)


def test_cnn_refuses_a_shape_that_does_not_fit_the_features():
    with pytest.raises(ConfigError, match="image_shape"):
        model_spec(ModelConfig(name="cnn", options={"image_shape": [1, 8, 8]}), num_features=63, num_classes=10)


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="model.options"):
        model_spec(ModelConfig(options={"depth": 3}), 3, 2)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch):
    """An installed-looking package with a ``livetrain.models`` entry point."""
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build(num_features, num_classes, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(num_features, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, num_classes))\n"
    )
    dist = tmp_path / "my_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[livetrain.models]\ntiny = my_models:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny"
    BUILDERS.pop("tiny", None)
    sys.modules.pop("my_models", None)


def test_plugin_model_is_found_by_entry_point_and_round_trips(plugin, tmp_path: Path):
    spec = model_spec(ModelConfig(name=plugin, options={"width": 6}), num_features=3, num_classes=2)
    model = build_model(spec).eval()
    save_checkpoint(tmp_path / "ckpt", CheckpointData(spec, model.state_dict()))
    BUILDERS.pop(plugin)  # a fresh process: found again through the entry point
    rebuilt, _ = load_model(tmp_path / "ckpt")
    x = torch.randn(4, 3)
    assert torch.equal(rebuilt(x), model(x))


def test_unknown_model_lists_what_is_known():
    with pytest.raises(ConfigError, match="known: cnn, mlp"):
        model_spec(ModelConfig(name="nope"), 3, 2)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_options_torch_refuses_are_a_config_error_naming_the_model():
    options = {"image_shape": [1, 4, 4], "channels": [0]}
    with pytest.raises(ConfigError, match=r"model 'cnn' .*'channels': \[0\].* fails on a \[2, 16\] batch"):
        model_spec(ModelConfig(name="cnn", options=options), num_features=16, num_classes=3)
