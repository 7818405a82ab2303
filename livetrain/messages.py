"""Typed messages that cross actor boundaries.

Everything large (row blocks, weights) travels as an ``ObjectRef`` inside
these messages; the messages themselves stay small. A ref nested in a
dataclass is not resolved by Ray when the message is passed to or returned
from an actor method, so the receiver decides when (and whether) to fetch.

Blocks are ``{"x": float32[n, d], "y": int64[n]}`` (and ``"id"`` with
``schema.id_column``). One object in the store holds the blocks an ingest
actor read together (a *chunk*), so a block travels as a ``BlockRef``: the
chunk's ref and the block's rows in it. ``fetch_blocks`` returns numpy views
of the object store's memory (zero-copy).
Weights are ``{name: numpy array}`` state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockRef:
    """One block: rows ``[lo, hi)`` of the chunk object ``ref`` (``hi`` None: to its end)."""

    ref: Any
    lo: int = 0
    hi: int | None = None

    @property
    def key(self) -> str:
        """Names the block while its chunk lives (ObjectRef ids are never reused)."""
        return f"{self.ref.hex()}:{self.lo}"


def slice_block(chunk: dict[str, Any], b: BlockRef) -> dict[str, Any]:
    """Block ``b`` of its fetched ``chunk``: views, no copy."""
    if b.lo == 0 and b.hi is None:
        return chunk
    return {k: v[b.lo : b.hi] for k, v in chunk.items()}


def fetch_blocks(blocks: list[BlockRef]) -> list[dict[str, Any]]:
    """``ray.get`` of the chunks, each block sliced out of its chunk (a chunk named twice is fetched once)."""
    import ray

    refs = list({b.ref: None for b in blocks})
    chunks = dict(zip(refs, ray.get(refs)))
    return [slice_block(chunks[b.ref], b) for b in blocks]


@dataclass(frozen=True)
class BlockMeta:
    """Lineage of one block of good rows: one shard's worth."""

    shard: str
    """Shard file name (unique in the manifest)."""
    seq: int
    """Arrival order of the shard, from the manifest; increases with arrival."""
    rows: int
    nbytes: int
    written_at: float
    """When the shard file was written (its mtime), epoch seconds."""
    ingested_at: float
    """When the block entered the buffer, epoch seconds."""


@dataclass(frozen=True)
class Sample:
    """The buffer's answer to a trainer: references, never the data."""

    blocks: list[BlockRef]
    """The sampled blocks (``fetch_blocks``)."""
    metas: list[BlockMeta]
    """Lineage of those blocks, in the same order."""
    buffer_rows: int
    closed: bool = False
    """The buffer was closed: training should stop."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model besides the weights."""

    name: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Candidate:
    """Rank 0's proposal: new weights in the object store, with lineage."""

    weights: Any
    """ObjectRef of a {name: numpy array} state dict."""
    spec: ModelSpec
    trained_through: int
    """Highest shard seq the weights have trained on."""
    data_written_at: float
    """Write time of the newest shard trained on (for freshness)."""
    train_step: int
    proposed_at: float
    train_loss: float
    small_holdout: bool = False
    """The weights never trained on the held-out rows of shard ``trained_through``
    that only a hold makes shards hold out (``gate.holdout_min_rows``)."""


@dataclass(frozen=True)
class ServedVersion:
    """A promoted version, as the registry hands it to serving replicas."""

    version: int
    weights: Any
    """ObjectRef of the state dict, owned by the registry."""
    spec: ModelSpec
    trained_through: int
    data_written_at: float
    promoted_at: float
    metrics: dict[str, float]
    """Gate metrics on data the version had not seen."""


@dataclass(frozen=True)
class Decision:
    """One gate decision, with its reason and the figures behind it."""

    version: int
    action: str
    """``promote``, ``reject`` or ``supersede``."""
    reason: str
    at: float
    trained_through: int
    eval_rows: int
    candidate: dict[str, float]
    served: dict[str, float] | None
    served_version: int | None
