"""The schema a state dir is bound to, pinned in its manifest.

The first run on a state dir pins the schema it uses: the declared one, or,
with ``schema.infer: true``, the one the first shard that fits defines
(``schema.infer_schema``). Every later run uses the pinned schema: with
``infer`` it is simply taken (label, classes and id column must agree); a
declared schema must equal it, else the run is refused with the difference
(the model's input width, the checkpoints and the buffer's rebuild all depend
on it). Until a shard is ingested a declared schema may still replace the pin.

Inference happens before anything that depends on the schema starts (model,
trainer, Serve, buffer): ``resolve_schema`` waits for the first shard that
fits. Shards that do not fit are left where they are; the ingest loop later
validates them against the pinned schema and quarantines them.

Pure: no Ray.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from livetrain.actors.manifest import Manifest
from livetrain.actors.schema import SchemaError, infer_schema
from livetrain.actors.sources import DirectorySource
from livetrain.config import ConfigError, SchemaConfig
from livetrain.storage import shard_name

log = logging.getLogger(__name__)

PINNED_FIELDS = ("features", "feature_list_column", "num_features", "label", "classes", "id_column")
"""What is pinned; ``infer`` is not (a pinned schema is always concrete)."""
DECLARED_WITH_INFER = ("label", "classes", "id_column")
"""What a config with ``infer: true`` still declares, and must agree with a pin."""
FROM_CONFIG = "config"
"""``source`` of a pin taken from the config rather than a shard."""


class StopSignal(Protocol):
    """What the wait for a shard watches, like ``threading.Event``: ``wait`` returns True once stopped."""

    def wait(self, timeout: float | None = None) -> bool: ...


def schema_fields(schema: SchemaConfig) -> dict:
    return {k: getattr(schema, k) for k in PINNED_FIELDS}


def differences(declared: SchemaConfig, pinned: SchemaConfig) -> list[str]:
    """``schema.<key>: pinned X, config Y`` for each field the config declares otherwise."""
    keys = DECLARED_WITH_INFER if declared.infer else PINNED_FIELDS
    return [
        f"schema.{k}: pinned {getattr(pinned, k)!r}, config {getattr(declared, k)!r}"
        for k in keys
        if getattr(declared, k) != getattr(pinned, k)
    ]


def resolve_schema(
    declared: SchemaConfig,
    manifest: Manifest,
    landing: str | Path,
    stop: StopSignal | None = None,
    poll_s: float = 0.2,
    timeout_s: float | None = None,
) -> SchemaConfig:
    """The concrete schema for this run, pinned in ``manifest``; waits for a shard with ``infer``.

    Raises ``ConfigError`` when the config disagrees with the pin, or when no
    shard fits within ``timeout_s`` (or before ``stop`` is set).
    """
    pinned = manifest.pinned_schema()
    if pinned is None:
        if declared.infer:
            found, source = _first_fitting(declared, landing, stop, poll_s, timeout_s)
        else:
            found, source = declared, FROM_CONFIG
        pinned = manifest.pin_schema(schema_fields(found), source)  # another process may have won
    fields, source = pinned
    schema = SchemaConfig(**fields)
    diff = differences(declared, schema)
    if diff and not declared.infer and manifest.counts()["ingested"] == 0 and not manifest.partly_committed():
        log.warning("livetrain: no rows went in under the pinned schema: pinning the config's (%s)", "; ".join(diff))
        manifest.pin_schema(schema_fields(declared), FROM_CONFIG, replace=True)
        return declared
    if diff:
        origin = "the config of its first run" if source == FROM_CONFIG else f"inferred from shard {source}"
        raise ConfigError(
            f"schema: this state dir's schema is pinned ({origin}) and the config differs: "
            + "; ".join(diff)
            + ". Declare the pinned schema (or schema.infer: true), or use a fresh state_dir."
        )
    return schema


def _first_fitting(
    declared: SchemaConfig,
    landing: str | Path,
    stop: StopSignal | None,
    poll_s: float,
    timeout_s: float | None,
) -> tuple[SchemaConfig, str]:
    source = DirectorySource(landing)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    log.warning("livetrain: schema.infer: waiting for the first shard in %s that fits", landing)
    while True:
        for path in source.poll():  # oldest first; a rewritten file comes back
            try:
                return infer_schema(path, declared), shard_name(path)
            except SchemaError as e:
                log.warning("livetrain: %s does not define the schema: %s", shard_name(path), e)
        if deadline is not None and time.monotonic() >= deadline:
            raise ConfigError(f"schema.infer: no shard in {landing} fit within {timeout_s:g} s")
        if stop is not None and stop.wait(poll_s):
            raise ConfigError("schema.infer: stopped before a shard that fits arrived")
        if stop is None:
            time.sleep(poll_s)  # the landing directory's polling interval

