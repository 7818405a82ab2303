"""Model builders. A model is rebuilt from a ``ModelSpec`` (name + kwargs)
alone, so a checkpoint or a served version carries everything the server
needs besides the weights."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from livetrain.config import ModelConfig
from livetrain.messages import ModelSpec


class MLP(nn.Module):
    """Tabular classifier: input standardisation (BatchNorm) then ReLU layers."""

    def __init__(self, num_features: int, num_classes: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(num_features)]
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}


def model_spec(cfg: ModelConfig, num_features: int, num_classes: int) -> ModelSpec:
    if cfg.name not in BUILDERS:
        raise ValueError(f"model.name: unknown model {cfg.name!r} (known: {', '.join(sorted(BUILDERS))})")
    kwargs: dict[str, Any] = dict(num_features=num_features, num_classes=num_classes, hidden=list(cfg.hidden))
    if cfg.dropout:
        kwargs["dropout"] = cfg.dropout
    return ModelSpec(name=cfg.name, kwargs=kwargs)


def build_model(spec: ModelSpec) -> nn.Module:
    try:
        builder = BUILDERS[spec.name]
    except KeyError:
        raise ValueError(f"unknown model {spec.name!r} (known: {', '.join(sorted(BUILDERS))})") from None
    return builder(**spec.kwargs)
