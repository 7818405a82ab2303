"""Model builders: built-ins, and a user's model as a real entry-point plug-in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from livetrain.config import ConfigError, ModelConfig, load_config
from livetrain.training.checkpoint import CheckpointData, load_model, save_checkpoint
from livetrain.training.learner import make_optimizer, restore_optimizer
from livetrain.training.models import BUILDERS, build_model, model_spec, register_model
from livetrain.training.softmax import cross_entropy


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


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.options={num_features: 3}"], r"model.options.num_features: livetrain passes it itself"),
        (["model.name=my_net", "model.options={num_classes: 2}"], r"model.options.num_classes: livetrain passes it"),
        (["model.options={hidden: [8]}", "model.hidden=[64, 64]"], r"model.options.hidden: set model.hidden instead"),
        (["model.options={dropout: 0.2}"], r"model.options.dropout: set model.dropout instead"),
        (["model.name=cnn", "model.options={image_shape: [1, 2, 2], dropout: 0.2}"], r"model.options.dropout: set model"),
        (["model.name=cnn", "model.options={image_shape: [1, 2, 2]}", "model.hidden=[8]"], r"model.hidden: the cnn model has"),
    ],
)
def test_options_livetrain_sets_or_a_field_duplicates_are_refused_at_load(overrides: list[str], key: str):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(None, overrides)


@pytest.fixture
def my_net():
    """A plug-in whose builder names ``hidden`` and ``dropout``, one that takes
    ``**options``, and one that takes neither."""
    def named(num_features, num_classes, hidden=(8,), dropout=0.0):
        return torch.nn.Sequential(torch.nn.Linear(num_features, hidden[0]), torch.nn.Dropout(dropout),
                                   torch.nn.Linear(hidden[0], num_classes))

    def any_options(num_features, num_classes, **options):
        return named(num_features, num_classes, **options)

    def neither(num_features, num_classes, width=8):
        return named(num_features, num_classes, hidden=(width,))

    for name, builder in [("named", named), ("any_options", any_options), ("neither", neither)]:
        register_model(name, builder)
    yield
    for name in ("named", "any_options", "neither"):
        BUILDERS.pop(name)


@pytest.mark.parametrize("name", ["named", "any_options"])
def test_plugin_builder_gets_model_hidden_and_dropout_when_it_takes_them(my_net, name: str):
    spec = model_spec(ModelConfig(name=name, hidden=[5], dropout=0.25), 3, 2)
    assert spec.kwargs == {"num_features": 3, "num_classes": 2, "hidden": [5], "dropout": 0.25}
    assert build_model(spec)[1].p == 0.25


def test_plugin_builder_left_at_the_field_defaults_gets_only_its_options(my_net):
    spec = model_spec(ModelConfig(name="named", options={"hidden": [4]}), 3, 2)
    assert spec.kwargs == {"num_features": 3, "num_classes": 2, "hidden": [4]}


@pytest.mark.parametrize(
    "cfg, error",
    [
        (ModelConfig(name="neither", dropout=0.3), r"model.dropout: the 'neither' builder takes no 'dropout' argument"),
        (ModelConfig(name="neither", hidden=[512]), r"model.hidden: the 'neither' builder takes no 'hidden' argument"),
        (ModelConfig(name="named", hidden=[5], options={"hidden": [4]}), r"model.hidden: also set as model.options.hidden"),
    ],
)
def test_plugin_model_fields_its_builder_would_drop_are_a_config_error(my_net, cfg: ModelConfig, error: str):
    with pytest.raises(ConfigError, match=rf"^{error}"):
        model_spec(cfg, 3, 2)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch):
    """An installed-looking package with a ``livetrain.models`` entry point."""
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build(num_features, num_classes, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(num_features, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, num_classes))\n"
        "def crash(num_features, num_classes):\n"
        "    return {}['layers']\n"
    )
    dist = tmp_path / "my_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[livetrain.models]\ntiny = my_models:build\ncrashes = my_models:crash\n"
        "no_module = not_my_models:build\nno_builder = my_models:gone\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny"
    for name in ("tiny", "crashes"):
        BUILDERS.pop(name, None)
    sys.modules.pop("my_models", None)


def test_plugin_model_is_found_by_entry_point_and_round_trips(plugin, tmp_path: Path):
    spec = model_spec(ModelConfig(name=plugin, options={"width": 6}), num_features=3, num_classes=2)
    model = build_model(spec).eval()
    save_checkpoint(tmp_path / "ckpt", CheckpointData(spec, model.state_dict()))
    BUILDERS.pop(plugin)  # a fresh process: found again through the entry point
    rebuilt, _ = load_model(tmp_path / "ckpt")
    x = torch.randn(4, 3)
    assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize(
    "name, cause",
    [
        ("no_module", r"plug-in 'no_module' \(not_my_models:build\) cannot be loaded: ModuleNotFoundError"),
        ("no_builder", r"plug-in 'no_builder' \(my_models:gone\) cannot be loaded: AttributeError"),
        ("crashes", r"the 'crashes' builder failed: KeyError: 'layers'"),
    ],
)
def test_a_broken_plugin_is_a_config_error_naming_it_and_the_cause(plugin, name: str, cause: str):
    with pytest.raises(ConfigError, match=rf"^model.name: {cause}"):
        model_spec(ModelConfig(name=name), num_features=3, num_classes=2)


def test_unknown_model_lists_what_is_known():
    with pytest.raises(ConfigError, match="known: cnn, mlp"):
        model_spec(ModelConfig(name="nope"), 3, 2)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_options_torch_refuses_are_a_config_error_naming_the_model():
    options = {"image_shape": [1, 4, 4], "channels": [0]}
    with pytest.raises(ConfigError, match=r"model 'cnn' .*'channels': \[0\].* fails on a \[2, 16\] batch"):
        model_spec(ModelConfig(name="cnn", options=options), num_features=16, num_classes=3)


def _mlp_with_affine_input_norm(features: int, classes: int, hidden: list[int]) -> torch.nn.Module:
    """An MLP as livetrain built it before 2026-11-28: the input BatchNorm had
    a learnable scale and shift (same parameter names otherwise)."""
    m = build_model(model_spec(ModelConfig(hidden=hidden), features, classes))
    m.net[0] = torch.nn.BatchNorm1d(features)
    with torch.no_grad():
        m.net[0].weight.uniform_(0.3, 3.0)
        m.net[0].bias.normal_()
        m.net[0].running_mean.normal_()
        m.net[0].running_var.uniform_(0.2, 4.0)
    return m.eval()


@pytest.mark.parametrize("hidden", [[8, 8], []])
def test_weights_saved_with_an_affine_input_norm_load_and_answer_the_same(hidden, tmp_path: Path):
    torch.manual_seed(0)
    old = _mlp_with_affine_input_norm(5, 3, hidden)
    spec = model_spec(ModelConfig(hidden=hidden), 5, 3)
    save_checkpoint(tmp_path, CheckpointData(spec=spec, weights=old.state_dict(), meta={}))
    model, _ = load_model(tmp_path)  # strict: a key left over or missing fails here
    x = 3 * torch.randn(64, 5) + 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), old(x), rtol=1e-5, atol=1e-5)
    assert "net.0.weight" not in model.state_dict()


def test_nothing_before_the_mlps_first_layer_learns():
    """The input norm has no parameters, so backward stops at the first layer's
    weights: no gradient through the norm, none for the layer's input."""
    m = build_model(model_spec(ModelConfig(), 9, 7))
    assert isinstance(m.net[0], torch.nn.BatchNorm1d) and list(m.net[0].parameters()) == []
    z = m.net[0](torch.randn(32, 9))
    assert not z.requires_grad


def test_an_optimizer_state_for_the_old_layout_leaves_the_optimizer_fresh(capsys):
    torch.manual_seed(0)
    old = _mlp_with_affine_input_norm(4, 2, [8]).train()
    old_opt = make_optimizer(old, 1e-3)
    cross_entropy(old(torch.randn(16, 4)), torch.randint(2, (16,))).backward()
    old_opt.step()

    new = build_model(model_spec(ModelConfig(hidden=[8]), 4, 2))
    new.load_state_dict(old.state_dict())
    opt = make_optimizer(new, 1e-3)
    assert not restore_optimizer(opt, old_opt.state_dict(), lr=5e-3, who="rank 0")
    assert "optimizer starts afresh" in capsys.readouterr().out
    assert opt.state_dict()["state"] == {}  # nothing half-loaded
    cross_entropy(new(torch.randn(16, 4)), torch.randint(2, (16,))).backward()
    opt.step()  # and it trains

    again = make_optimizer(new, 1e-3)
    assert restore_optimizer(again, opt.state_dict(), lr=5e-3, who="rank 0", weight_decay=0.05)
    assert [(g["lr"], g["weight_decay"]) for g in again.param_groups] == [(5e-3, 0.05)]  # the config's, not the saved
    assert len(again.state_dict()["state"]) == len(list(new.parameters()))
