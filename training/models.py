"""Model builders. A model is rebuilt from a ``ModelSpec`` (name + kwargs)
alone, so a checkpoint or a served version carries everything the server
needs besides the weights.

Your own model, without forking livetrain: write a builder

    def build(num_features: int, num_classes: int, **options) -> torch.nn.Module
        # returns a module mapping float32 [n, num_features] to logits [n, num_classes]

in an installed package and declare it as an entry point in that package's
``pyproject.toml``::

    [project.entry-points."livetrain.models"]
    my_tabnet = "my_package.models:build"

then set ``model.name: my_tabnet`` and pass its keyword arguments in
``model.options``; ``model.hidden`` / ``model.dropout`` set away from their
defaults are passed as ``hidden`` / ``dropout`` too (a ConfigError if the
builder takes no such argument). Entry points are looked up in every process that builds
the model (trainers, the registry, serving replicas), which is why a name,
not a function, travels in checkpoints. ``register_model`` does the same for
code running in one process (tests, notebooks).
"""

from __future__ import annotations

import inspect
import math
from importlib.metadata import entry_points
from typing import Any, Callable

import torch
from torch import nn

from livetrain.config import ConfigError, ModelConfig
from livetrain.messages import ModelSpec

ENTRY_POINT_GROUP = "livetrain.models"
Builder = Callable[..., nn.Module]


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


DEFAULT_ACTIVATION = "leaky_relu"
"""What ``model_spec`` gives an MLP unless ``model.options.activation`` says
otherwise. Not ReLU: a small ReLU net trained on a burst of random labels
(at a drift alarm the mix is all recent data) can end with every unit dead
and never learn again; a leaky one keeps a gradient."""


class MLP(nn.Module):
    """Tabular classifier: input standardisation then hidden layers.

    The standardisation is a BatchNorm without the affine part
    (``affine=False``): batch statistics while training, running ones in eval.
    A per-feature scale and shift right before a linear layer is that layer's
    own job, so dropping it loses nothing the net can express, and nothing
    upstream of the first layer then needs a gradient: no backward through the
    norm and none for the first layer's input. On one CPU thread a [9, 32, 32,
    7] net's step at batch 1024 costs ~13% less.

    Weights saved with the affine part (livetrain before 2026-11-28) still
    load: ``_load_from_state_dict`` folds it into the first linear layer,
    which computes exactly the same function.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: list[int],
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.options.activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.BatchNorm1d(num_features, affine=False)]
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # BatchNorm's gamma, beta then Linear(W, b): W (gamma * z + beta) + b = (W * gamma) z + (W beta + b)
        gamma, beta = state_dict.pop(prefix + "net.0.weight", None), state_dict.pop(prefix + "net.0.bias", None)
        w_key, b_key = prefix + "net.1.weight", prefix + "net.1.bias"
        if gamma is not None and beta is not None and w_key in state_dict and b_key in state_dict:
            w, b = state_dict[w_key], state_dict[b_key]
            state_dict[w_key], state_dict[b_key] = w * gamma, b + w @ beta
        super()._load_from_state_dict(state_dict, prefix, *args)


class SmallCNN(nn.Module):
    """Classifier for fixed-size images stored flat (``C*H*W`` features, row-major)."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        image_shape: list[int],
        channels: list[int] = (16, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3 or math.prod(image_shape) != num_features:
            raise ValueError(
                f"model.options.image_shape: {image_shape} (C, H, W) must multiply to the {num_features} features"
            )
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        c_in = image_shape[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, *self.image_shape))


def _mlp(
    num_features: int, num_classes: int, hidden: list[int] = (256, 256), dropout: float = 0.0, activation: str = "relu"
) -> nn.Module:
    return MLP(num_features, num_classes, list(hidden), dropout, activation)


def _cnn(num_features: int, num_classes: int, **options: Any) -> nn.Module:
    return SmallCNN(num_features, num_classes, **options)


BUILDERS: dict[str, Builder] = {"mlp": _mlp, "cnn": _cnn}


def register_model(name: str, builder: Builder) -> None:
    """Make ``builder`` available as ``model.name: <name>`` in this process."""
    BUILDERS[name] = builder


def find_builder(name: str) -> Builder:
    if name in BUILDERS:
        return BUILDERS[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                BUILDERS[name] = ep.load()
            except Exception as e:  # a broken plug-in: its module or attribute is not there, or fails to import
                raise ConfigError(f"model.name: plug-in {name!r} ({ep.value}) cannot be loaded: "
                                  f"{type(e).__name__}: {e}") from e
            return BUILDERS[name]
    known = sorted(set(BUILDERS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    raise ValueError(f"unknown model {name!r} (known: {', '.join(known)}; plug-ins register under the "
                     f"'{ENTRY_POINT_GROUP}' entry-point group)")


def _plugin_fields(cfg: ModelConfig) -> dict[str, Any]:
    """``model.hidden`` / ``model.dropout`` for a plug-in: those set away from their
    defaults go to the builder as keyword arguments; a builder that takes no such
    argument (by name or ``**options``) is a ConfigError, not a silently dropped field."""
    defaults = ModelConfig()
    fields = {k: getattr(cfg, k) for k in ("hidden", "dropout") if getattr(cfg, k) != getattr(defaults, k)}
    if not fields:
        return {}
    try:
        builder = find_builder(cfg.name)
    except ConfigError:  # a broken plug-in
        raise
    except ValueError:  # an unknown name: model_spec says so, naming model.name
        return {}
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # no signature to read: let the call decide
        params = None
    takes_any = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in fields.items():
        if key in cfg.options:
            raise ConfigError(f"model.{key}: also set as model.options.{key}; keep one")
        if not takes_any and key not in params:
            raise ConfigError(f"model.{key}: the {cfg.name!r} builder takes no {key!r} argument, so {value} would be "
                              f"ignored; leave model.{key} at its default ({getattr(defaults, key)}) or give the builder "
                              f"a {key!r} parameter")
    return {k: list(v) if k == "hidden" else v for k, v in fields.items()}


def model_spec(cfg: ModelConfig, num_features: int, num_classes: int) -> ModelSpec:
    """The spec the trainer builds, checked by building it once."""
    kwargs: dict[str, Any] = dict(num_features=num_features, num_classes=num_classes, **cfg.options)
    if cfg.name == "mlp":
        kwargs.setdefault("hidden", list(cfg.hidden))
        # written into the spec, so checkpoints from before the option (ReLU) rebuild as they were
        kwargs.setdefault("activation", DEFAULT_ACTIVATION)
        if cfg.dropout:
            kwargs.setdefault("dropout", cfg.dropout)
    elif cfg.name == "cnn" and cfg.dropout:
        kwargs.setdefault("dropout", cfg.dropout)
    elif cfg.name not in ("mlp", "cnn"):
        kwargs.update(_plugin_fields(cfg))
    spec = ModelSpec(name=cfg.name, kwargs=kwargs)
    try:
        model = build_model(spec)
    except TypeError as e:
        raise ConfigError(f"model.options: the {cfg.name!r} builder does not accept them: {e}") from e
    except ValueError as e:
        raise ConfigError(f"model.name: {e}" if str(e).startswith("unknown model") else str(e)) from e
    except RuntimeError as e:  # torch refusing a layer (a width of 0, ...): name the config, not a stack
        raise ConfigError(f"model {cfg.name!r} cannot be built from {kwargs}: {e}") from e
    except Exception as e:  # a plug-in's own bug: still one line, naming it
        raise ConfigError(f"model.name: the {cfg.name!r} builder failed: {type(e).__name__}: {e}") from e
    try:
        out = model.eval()(torch.zeros(2, num_features))
    except RuntimeError as e:
        raise ConfigError(f"model {cfg.name!r} ({kwargs}) fails on a [2, {num_features}] batch: {e}") from e
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"model {cfg.name!r} maps [2, {num_features}] to {tuple(out.shape)}, expected (2, {num_classes}) logits")
    return spec


def build_model(spec: ModelSpec) -> nn.Module:
    return find_builder(spec.name)(**spec.kwargs)
