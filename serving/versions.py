"""Which model version a replica answers with; plain classes, no Ray.

``VersionFollower`` keeps the replica on the registry's served version: one
long-poll, fetch the weights, build and check the model, then swap a single
``Loaded`` reference. A version whose weights do not fit (CheckpointError)
is refused and the current one keeps serving. ``PinnedVersions`` keeps a few
older versions loaded for ``/predict?version=N``.

The registry side is two callables, so tests drive these classes with
hand-written fakes and the deployment (``app.py``) passes Ray calls.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

from livetrain.messages import ServedVersion
from livetrain.serving.predictor import Loaded, load_version
from livetrain.training.checkpoint import CheckpointError

WaitForVersion = Callable[[int, float], Optional[ServedVersion]]
"""``(have, timeout_s) -> the served version once it differs from have, or None``."""
FetchWeights = Callable[[Any], dict]
"""Weights reference -> ``{name: array}``."""


class VersionFollower:
    def __init__(
        self, wait_for_version: WaitForVersion, fetch_weights: FetchWeights, log: Callable[[str], None] = print, device: str = "cpu"
    ) -> None:
        self._wait = wait_for_version
        self._fetch = fetch_weights
        self._log = log
        self._device = device
        self.current: Loaded | None = None
        """What new requests are answered with; replaced whole, never mutated."""
        self.announced: int | None = None
        """The newest version the registry said it serves."""
        self.refused: dict[int, str] = {}
        """Versions whose weights were refused, with why."""
        self.last_error: str | None = None
        self.swaps = 0

    @property
    def have(self) -> int:
        return self.current.version if self.current is not None else -1

    def step(self, timeout_s: float) -> bool:
        """One long-poll; True if a new version now answers. A version refused
        before is not fetched again until the registry moves on from it."""
        waiting_past = self.announced if self.announced in self.refused else self.have
        served = self._wait(waiting_past, timeout_s)
        if served is None:
            return False
        self.announced = served.version
        if served.version == self.have:  # e.g. a rollback back to what we serve
            return False
        try:
            loaded = load_version(served, self._fetch(served.weights), device=self._device)
        except CheckpointError as e:
            self.refused[served.version] = str(e)
            self.last_error = f"refused v{served.version}: {e}"
            self._log(f"livetrain: {self.last_error}; still serving v{self.have}")
            return False
        self.current = loaded
        self.swaps += 1
        self.last_error = None
        return True

    def run(self, stop: threading.Event, poll_s: float = 5.0, backoff_s: float = 1.0) -> None:
        """``step`` until ``stop``; transient errors (registry restarting,
        weights gone from the object store) wait ``backoff_s`` and retry."""
        while not stop.is_set():
            try:
                self.step(poll_s)
            except Exception as e:
                self.last_error = f"could not follow the registry: {e!r}"
                self._log(f"livetrain: {self.last_error}")
                stop.wait(backoff_s)

    def health_problem(self) -> str | None:
        """Why this replica should be replaced, or None. No model is fine
        until the registry has one (startup before the first promotion)."""
        if self.current is None and self.announced is not None:
            why = self.refused.get(self.announced) or self.last_error or "not loaded yet"
            return f"no model loaded while the registry serves v{self.announced} ({why})"
        return None


class VersionGone(LookupError):
    """A pinned version the registry no longer has (or never had)."""


class PinnedVersions:
    """Up to ``capacity`` versions loaded on demand, least recently used out."""

    def __init__(
        self, lookup: Callable[[int], Optional[ServedVersion]], fetch_weights: FetchWeights, capacity: int, device: str = "cpu"
    ) -> None:
        self._lookup = lookup
        self._device = device
        self._fetch = fetch_weights
        self._capacity = capacity
        self._cache: OrderedDict[int, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, version: int) -> Loaded:
        """The loaded version; VersionGone if the registry does not have it,
        CheckpointError if its weights do not fit."""
        with self._lock:
            if version in self._cache:
                self._cache.move_to_end(version)
                return self._cache[version]
        served = self._lookup(version)
        if served is None or served.version != version:
            raise VersionGone(f"model version {version} is not available: never served, or no longer kept")
        loaded = load_version(served, self._fetch(served.weights), now=time.time(), device=self._device)
        self.loads += 1
        with self._lock:
            self._cache[version] = loaded
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return loaded
