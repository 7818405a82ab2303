"""The synthetic drifting stream: river's classic generators written as Parquet shards.

Pure: river, numpy and pyarrow, no Ray. ``livetrain`` runs ``SyntheticStream.run``
in a thread (or an actor forwards to it); the directory watcher then sees the
shards like any other landing data.

What a row is
-------------
Each concept (``variant``) has its own river generator -- ``synth.SEA``,
``synth.Agrawal`` or ``synth.Hyperplane`` -- seeded from ``(seed, variant)``, so
river decides every feature and label. A concept that returns later (0 -> 2 -> 0)
continues its own generator, so rows are never replayed.

Which concept draws row ``r`` follows river's ``ConceptDriftStream`` chained
once per drift point (the last drift is the outermost stream): drift ``i``
takes the row with probability ``1 / (1 + exp(-4 (r - at_row) / width))``, and
the last drift that takes it wins. We apply that rule here instead of nesting
``ConceptDriftStream`` objects because river's version raises ``OverflowError``
(``math.exp``) for any row more than ~177 widths before the drift -- i.e. every
abrupt drift past row 177 -- and because a nested stream only counts the rows it
is asked for, which shifts later drift positions. A ``width`` of 1 is a true
step: the new concept owns every row from ``at_row`` on.

Scaling (fixed constants, so every shard and every model agrees)
---------------------------------------------------------------
* ``sea``: river draws each feature uniformly from [0, 10]; we divide by 10.
  The label rule becomes ``x0 + x1 > threshold / 10`` (thresholds 8, 9, 7, 9.5
  for variants 0-3).
* ``agrawal``: each feature ``v`` is written as ``(v - low) / (high - low)`` with
  ``AGRAWAL_LOW`` / ``AGRAWAL_HIGH`` below (salary 20k-150k, commission 0-85k,
  age 20-80, elevel 0-4, car 1-20, zipcode 0-8, hvalue 0-1.2M, hyears 1-30,
  loan 0-500k): raw salaries of 1e5 make an MLP's first layer saturate.
* ``hyperplane``: river's features are already uniform on [0, 1]; unchanged.

Noise: ``sea`` flips that fraction of labels; ``agrawal`` passes it as river's
``perturbation`` (features are jittered by that fraction of their range, which
blurs the label boundary); ``hyperplane`` passes it as ``noise_percentage``
(river flips a label when ``0.01 + u <= noise``, so slightly less than ``noise``).

Hyperplane concepts: ``variant`` picks the generator's seed, and river draws
the plane's weights from it, so each variant is a different, fixed plane
(``mag_change`` is 0: drift comes only from ``drifts``).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from river.datasets import synth

from livetrain.config import SyntheticConfig

LABEL_COLUMN = "label"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
"""A shard is written as ``.shard-NNNNNNNNN.parquet.tmp`` and renamed when complete."""

SEA_SCALE = 10.0
AGRAWAL_LOW = np.array([20_000, 0, 20, 0, 1, 0, 0, 1, 0], dtype=np.float64)
AGRAWAL_HIGH = np.array([150_000, 85_000, 80, 4, 20, 8, 1_200_000, 30, 500_000], dtype=np.float64)
"""Agrawal's raw ranges (salary, commission, age, elevel, car, zipcode, hvalue, hyears, loan)."""

_CONCEPT_TAG = 1
_MIX_TAG = 2
_SKIP_CHUNK = 65_536
_SHARD_RE = re.compile(rf"{SHARD_PREFIX}(\d{{9}}){re.escape(SHARD_SUFFIX)}")


def feature_names(cfg: SyntheticConfig) -> list[str]:
    """``x0 .. x{d-1}``: d is 3 for sea, 9 for agrawal, ``num_features`` for hyperplane."""
    return [f"x{i}" for i in range(_width(cfg))]


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard; lexical order is write order."""
    return f"{SHARD_PREFIX}{index:09d}{SHARD_SUFFIX}"


def _width(cfg: SyntheticConfig) -> int:
    return {"sea": 3, "agrawal": 9}.get(cfg.generator, cfg.num_features)


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def _river_generator(cfg: SyntheticConfig, variant: int) -> Any:
    seed = _derive_seed(cfg.seed, _CONCEPT_TAG, variant)
    if cfg.generator == "sea":
        return synth.SEA(variant=variant, noise=cfg.noise, seed=seed)
    if cfg.generator == "agrawal":
        return synth.Agrawal(classification_function=variant, perturbation=cfg.noise, seed=seed)
    return synth.Hyperplane(
        seed=seed,
        n_features=cfg.num_features,
        n_drift_features=0,
        mag_change=0.0,
        noise_percentage=cfg.noise,
    )


class SyntheticStream:
    """A seeded drifting classification stream that writes shards into ``landing``.

    The same config writes the same rows, however they are chunked. A stream
    opened on a landing dir that already holds its shards continues after them
    (it regenerates and skips those rows), so a restart neither overwrites nor
    repeats a shard.
    """

    def __init__(self, cfg: SyntheticConfig, landing: Path) -> None:
        self.cfg = cfg
        self.landing = Path(landing)
        self.names = feature_names(cfg)
        variants = {cfg.variant, *(d.variant for d in cfg.drifts)}
        self._concepts: dict[int, Iterator[tuple[dict, Any]]] = {
            v: iter(_river_generator(cfg, v)) for v in sorted(variants)
        }
        self._segment_variants = np.array([cfg.variant, *(d.variant for d in cfg.drifts)], dtype=np.int64)
        self._mix_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _MIX_TAG]))
        self._position = 0
        self._rows_written = 0
        self._next_index = 0
        self.landing.mkdir(parents=True, exist_ok=True)
        self._resume()

    @property
    def rows_written(self) -> int:
        """Rows in the shards of this landing dir (including ones found at start)."""
        return self._rows_written

    @property
    def exhausted(self) -> bool:
        """True once ``max_rows`` rows are written."""
        return self.cfg.max_rows is not None and self._rows_written >= self.cfg.max_rows

    def concept_at(self, row: int) -> int:
        """The variant that owns ``row`` (exact for abrupt drifts; the majority for gradual)."""
        variant = self.cfg.variant
        for d in self.cfg.drifts:
            if row >= d.at_row:
                variant = d.variant
        return variant

    def next_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` rows of the stream: float32 ``[n, d]`` features, int64 ``[n]`` labels.

        Advances the stream; the rows are not written anywhere.
        """
        rows = np.arange(self._position, self._position + n)
        segment = self._segments(rows)
        x = np.empty((n, len(self.names)), dtype=np.float64)
        y = np.empty(n, dtype=np.int64)
        for variant in np.unique(self._segment_variants[segment]):
            where = np.flatnonzero(self._segment_variants[segment] == variant)
            x[where], y[where] = self._pull(int(variant), len(where))
        self._position += n
        return self._scale(x).astype(np.float32), y

    def write_shard(self) -> Path | None:
        """Write the next shard atomically; None when ``max_rows`` is reached."""
        n = self.cfg.rows_per_shard
        if self.cfg.max_rows is not None:
            n = min(n, self.cfg.max_rows - self._rows_written)
        if n <= 0:
            return None
        x, y = self.next_rows(n)
        columns = {name: pa.array(x[:, i]) for i, name in enumerate(self.names)}
        columns[LABEL_COLUMN] = pa.array(y)
        path = self.landing / shard_name(self._next_index)
        tmp = self.landing / f".{path.name}{TEMP_SUFFIX}"
        with open(tmp, "wb") as f:
            pq.write_table(pa.table(columns), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._next_index += 1
        self._rows_written += n
        return path

    def run(self, stop: threading.Event) -> None:
        """Write shards at ``rows_per_second`` until ``stop`` is set or ``max_rows`` is reached.

        A shard is due when its last row would have arrived on a schedule that
        starts now; the schedule is absolute (monotonic clock), so a slow write
        is caught up by the next ones instead of delaying every later shard.
        """
        start = time.monotonic()
        first = self._rows_written
        while not stop.is_set() and not self.exhausted:
            n = self.cfg.rows_per_shard
            if self.cfg.max_rows is not None:
                n = min(n, self.cfg.max_rows - self._rows_written)
            due = start + (self._rows_written - first + n) / self.cfg.rows_per_second
            if stop.wait(max(0.0, due - time.monotonic())):
                return
            self.write_shard()

    # --- internals -----------------------------------------------------------

    def _segments(self, rows: np.ndarray) -> np.ndarray:
        """Index into ``[variant, *drifts]`` of the concept that draws each row."""
        drifts = self.cfg.drifts
        # Drawn for every row and drift, gradual or not, so the draws depend
        # only on the row number, never on how the stream is chunked.
        u = self._mix_rng.random((len(rows), len(drifts)))
        segment = np.zeros(len(rows), dtype=np.int64)
        for i, d in enumerate(drifts):
            if d.width <= 1:
                takes = rows >= d.at_row
            else:
                z = np.clip(-4.0 * (rows - d.at_row) / d.width, -700.0, 700.0)
                takes = u[:, i] < 1.0 / (1.0 + np.exp(z))
            segment[takes] = i + 1
        return segment

    def _pull(self, variant: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((n, len(self.names)), dtype=np.float64)
        y = np.empty(n, dtype=np.int64)
        for i, (features, label) in enumerate(itertools.islice(self._concepts[variant], n)):
            x[i] = tuple(features.values())
            y[i] = label
        return x, y

    def _scale(self, x: np.ndarray) -> np.ndarray:
        if self.cfg.generator == "sea":
            return x / SEA_SCALE
        if self.cfg.generator == "agrawal":
            return (x - AGRAWAL_LOW) / (AGRAWAL_HIGH - AGRAWAL_LOW)
        return x

    def _resume(self) -> None:
        """Drop half-written temp files; continue after the shards already here."""
        for stale in self.landing.glob(f".{SHARD_PREFIX}*{SHARD_SUFFIX}{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        existing = {p: m for p in self.landing.iterdir() if (m := _SHARD_RE.fullmatch(p.name))}
        if not existing:
            return
        rows = sum(pq.read_metadata(p).num_rows for p in existing)
        while self._position < rows:
            self.next_rows(min(_SKIP_CHUNK, rows - self._position))
        self._rows_written = rows
        self._next_index = max(int(m.group(1)) for m in existing.values()) + 1
