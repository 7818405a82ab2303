"""ModelRegistry: the thin Ray actor around ``Registry``.

Threaded (``max_concurrency``) so that serving replicas can long-poll
``wait_for_version`` (on threads of its own: ``POLL_THREADS``) while blocks
and candidates keep arriving; one lock guards the plain registry. Promoted
weights are re-put into the object store by this actor, so the served version
outlives the training worker that proposed it, and written to
``<state_dir>/served/v<N>/model.pt`` (and pushed to ``storage.uri`` when set)
so a restart serves the last promoted version at once.

The actor restarts when it dies (``max_restarts``) and its calls are retried
(``max_task_retries``): the new instance comes up serving the version the
decision log last served (never a candidate nothing judged; when that one's
``model.pt`` is missing, the one served before it that no rollback took out
of service, a walk-back logged as a rollback), with the versions served
before it (the gate's ``compare_versions``, ``rollback``'s default, the
replaced version's shadow scoring) read back from disk, and the
version numbers going on from the highest the log or ``served/`` holds. A whole-process restart of
``livetrain run`` comes up the same way. What lived only in memory starts
again: the prequential figures and shadow scores, the drift detectors, and
the counts behind ``decisions``/``alarms`` (their callers see a new
``instance`` and start over).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from livetrain.config import DriftConfig, GateConfig
from livetrain.messages import BlockMeta, BlockRef, Candidate, Decision, ServedVersion, fetch_blocks
from livetrain.storage import LogMirror, Store, open_lines
from livetrain.training.drift import DriftAlarm
from livetrain.training.checkpoint import (
    CheckpointData,
    CheckpointError,
    load_checkpoint,
    model_from_weights,
    save_checkpoint,
    state_dict_numpy,
    weights_to_bytes,
)
from livetrain.training.registry import KEEP_VERSIONS, Registry, RollbackError, Version

REGISTRY_NAME = "livetrain_registry"
DECISIONS_FILE = "decisions.jsonl"
ALARMS_FILE = "alarms.jsonl"
SERVED_DIR = "served"
HOLD_FILE = "hold.json"
"""The drift alarm's hold (``Registry.hold_state``), rewritten whenever it changes."""


POLL_THREADS = 64
"""Threads of ``wait_for_version`` (each serving replica keeps one long-poll in
flight, the trainer one for its anchor): a group of their own, so polls parked
for up to their timeout never hold the threads ``observe``, ``propose`` and
``/model`` need (16 replicas once took all of them)."""


REGISTRY_ACTOR_CPUS = 0.1
"""Logical CPUs the registry actor reserves (a local Ray is sized to fit them)."""


@ray.remote(num_cpus=REGISTRY_ACTOR_CPUS, max_concurrency=16, concurrency_groups={"polls": POLL_THREADS}, max_restarts=-1,
            max_task_retries=-1)
class ModelRegistry:
    def __init__(
        self,
        cfg: GateConfig,
        num_classes: int,
        state_dir: str,
        drift: DriftConfig | None = None,
        recent_fraction: float = 0.7,
        window_rows: int = 2000,
        buffer: tuple[str, str] | None = None,
        store: Store | None = None,
    ) -> None:
        """``buffer``: the replay buffer actor's (name, namespace), looked up when a drift
        reaction first moves the sampling mix. A name, not the handle: an actor handle
        among the arguments of an actor that restarts is held in the object store, and
        Ray warns at every start that the restart fails if it is ever lost."""
        torch.set_num_threads(1)
        self._state = Path(state_dir)
        self._store = store
        self._remote: set[str] = set()
        """The model.pt files on ``storage.uri`` (relative names): listed once, then kept up to date."""
        if store is not None:  # a fresh node: served versions and logs come from shared storage
            store.restore(self._state, only=(SERVED_DIR, DECISIONS_FILE, ALARMS_FILE, HOLD_FILE))
            self._remote = set(store.list(SERVED_DIR))
        self._reg = Registry(cfg, num_classes, drift=drift, recent_fraction=recent_fraction, window_rows=window_rows)
        self._last_alarm: DriftAlarm | None = None
        self._buffer_name = buffer
        self._buffer: Any = None
        self._pushed_mix = (round(recent_fraction, 2), 1.0)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._served: ServedVersion | None = None
        self._state.mkdir(parents=True, exist_ok=True)
        self._log = open_lines(self._state / DECISIONS_FILE)
        self._log.flush()  # a torn last line ended, before the mirror reads the log
        self._mirrors: dict[str, LogMirror | None] = {DECISIONS_FILE: None, ALARMS_FILE: None}
        """The logs on ``storage.uri``, pushed a part at a time (None: to be set up again)."""
        for rel in self._mirrors:
            self._push_lines(rel, None)
        self._train_stats: dict[str, Any] = {}
        self._weight_refs: dict[int, ray.ObjectRef] = {}
        self.instance = uuid.uuid4().hex
        """Names this incarnation of the actor (it restarts when it dies)."""
        self._saved_hold: dict[str, Any] | None = None
        self._kept: dict[int, None] = {}
        """Versions served whose model.pt is kept, the longest since served first (``gate.keep_versions``)."""
        self._deleted: set[int] = set()
        """Versions served whose model.pt was deleted to keep the disk bounded."""
        self._restore_last_served()
        self._resume_hold()

    # --- from the ingest loop and the trainer ----------------------------------

    def observe(self, meta: BlockMeta, block: BlockRef) -> None:
        self.observe_many([meta], [block])

    def observe_many(self, metas: list[BlockMeta], blocks: list[BlockRef]) -> None:
        """Score blocks in the order given (arrival order: the live window, the small
        holdouts and freshness assume it), one at a time under the lock, so the
        serving replicas' calls and ``propose`` get in between."""
        for meta, data in zip(metas, fetch_blocks(blocks)):
            with self._lock:
                self._apply(self._reg.observe(meta, data["x"], data["y"]))
                self._log_alarms()
                self._push_mix()
                self._save_hold()

    def propose(self, cand: Candidate) -> int:
        weights = ray.get(cand.weights)
        with self._lock:
            version, decisions = self._reg.propose(cand, weights)
            self._apply(decisions)
            self._save_hold()
        return version

    def small_holdout(self, seq: int) -> bool:
        """``Registry.small_holdout``: asked by the trainer when shard ``seq`` becomes
        its newest. Without the lock (one dict read): observe may be scoring."""
        return self._reg.small_holdout(seq)

    def report_train(self, stats: dict[str, Any]) -> dict[str, float]:
        """Rank 0's training figures in; the drift reactions' knobs out."""
        with self._lock:
            self._train_stats = stats
            r = self._reg.reaction
            return {
                "recent_fraction": r.recent_fraction,
                "lr_scale": r.lr_scale,
                "window_rows_scale": r.window_rows_scale,
            }

    # --- from serving replicas -------------------------------------------------

    @ray.method(concurrency_group="polls")
    def wait_for_version(self, have: int, timeout_s: float) -> ServedVersion | None:
        """Long-poll: the served version once it differs from ``have``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._served is None or self._served.version == have:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._served

    def record_answer(self, version: int, at: float) -> None:
        with self._lock:
            self._reg.record_answer(version, at)

    # --- rollback and pinning ------------------------------------------------

    def rollback(self, version: int | None = None, reason: str = "requested by hand") -> Decision:
        """Serve an earlier version again (default: the one before the current)."""
        with self._lock:
            target = None
            if version is not None:
                try:
                    target = self._reg.find(version) or self._from_disk(version)
                except CheckpointError as e:  # the caller's to hear (409), not a registry failure
                    raise RollbackError(f"v{version} cannot be loaded: {e}") from e
                if target is None and version in self._deleted:
                    raise RollbackError(f"v{version}'s weights were deleted: only the newest "
                                        f"{self._reg.cfg.keep_versions} versions served are kept (gate.keep_versions)")
                if target is None:
                    raise RollbackError(f"v{version} was never served (no {self._dir(version)})")
            d = self._reg.rollback(target, reason)
            self._apply([d])
            return d

    def get_version(self, version: int) -> ServedVersion | None:
        """A version that was served at some point (for pinned requests), or None."""
        with self._lock:
            v = self._reg.find(version) or self._from_disk(version)
            return None if v is None else self._served_message(v)

    # --- views -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._reg.stats(), **{f"train_{k}": v for k, v in self._train_stats.items()}}

    def live_report(self) -> dict[str, Any]:
        with self._lock:
            return self._reg.live_report()

    def alarms(self, since: int = 0) -> tuple[list[DriftAlarm], str]:
        """The alarms from the ``since``-th this instance raised on, and which instance it is."""
        with self._lock:
            return self._reg.drift.alarms_since(since), self.instance

    def served_info(self) -> dict[str, Any] | None:
        with self._lock:
            s = self._served
            return None if s is None else _describe(s)

    def decisions(self, since: int = 0) -> tuple[list[Decision], str]:
        """The decisions from the ``since``-th this instance made on, and which instance it
        is: a restarted registry counts from zero again, so a caller starts over then."""
        with self._lock:
            return self._reg.decisions_since(since), self.instance

    # --- internals -------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        lines = []
        for d in decisions:
            lines.append(json.dumps(dataclasses.asdict(d)) + "\n")
            self._log.write(lines[-1])
            if d.action == "promote":  # a new number: a model.pt already there is a crashed run's (logged never)
                self._save(self._reg.served)  # its weights reach the store before the decision naming it
            if d.action in ("promote", "rollback"):
                self._publish(self._reg.served)
                self._keep(d.version)
        self._log.flush()
        self._push_lines(DECISIONS_FILE, lines)

    def _push_mix(self) -> None:
        """Send the sampling-mix reactions to the buffer when they moved (2 decimals)."""
        r = self._reg.reaction
        mix = (round(r.recent_fraction, 2), round(min(1.0, r.window_rows_scale), 2))
        if self._buffer_name is None or mix == self._pushed_mix:
            return
        if self._buffer is None:
            try:
                self._buffer = ray.get_actor(*self._buffer_name)
            except ValueError:  # not up yet: the next block tries again
                return
        self._buffer.set_mix.remote(*mix)
        self._pushed_mix = mix

    def _log_alarms(self) -> None:
        alarms = self._reg.drift.alarms
        if not alarms or alarms[-1] is self._last_alarm:
            return
        new = list(alarms)
        if self._last_alarm is not None and self._last_alarm in new:
            new = new[new.index(self._last_alarm) + 1 :]
        lines = [json.dumps(dataclasses.asdict(a)) + "\n" for a in new]
        with open_lines(self._state / ALARMS_FILE) as f:
            f.writelines(lines)
        self._last_alarm = alarms[-1]
        self._push_lines(ALARMS_FILE, lines)

    def _save_hold(self) -> None:
        """Write the hold down when it changed (started, tested, a tenth of its
        ``alarm_hold_rows`` further on, ended): a restarted registry holds on
        (``_resume_hold``) instead of taking a poisoned burst it came back in for the
        normal state, for the rows it had left to hold."""
        state = self._reg.hold_state()
        if state == self._saved_hold:
            return
        path = self._state / HOLD_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"active": state is not None, **(state or {})}) + "\n")
        tmp.replace(path)
        self._saved_hold = state
        self._push(HOLD_FILE)

    def _resume_hold(self) -> None:
        try:
            state = json.loads((self._state / HOLD_FILE).read_text())
        except (OSError, ValueError):
            return  # never held, or a file torn by a crash: no hold (the next alarm starts one)
        if not state.get("active") or self._reg.served is None:
            return
        n = state.get("served_at_alarm")
        anchor = None if n is None else (self._reg.find(n) or self._from_disk(n))
        with self._lock:
            self._reg.resume_hold(state, anchor)
            self._saved_hold = self._reg.hold_state()

    def _push(self, rel: str) -> None:
        """Mirror one state file to shared storage; a failed push is reported, never fatal."""
        if self._store is None:
            return
        try:
            self._store.put_file(self._state / rel, rel)
            self._remote.add(rel)
        except OSError as e:
            print(f"livetrain: registry: could not push {rel} to {self._store.cfg.uri}: {e}", file=sys.stderr)

    def _push_lines(self, rel: str, lines: list[str] | None) -> None:
        """Mirror ``lines`` just appended to a log (None: set the mirror up); a failed push
        is reported, never fatal: the next one sets the mirror up again from the local log."""
        mirror = self._mirrors[rel]
        if self._store is None or (lines is not None and not lines):
            return
        try:
            if mirror is None:  # the whole local log, with these lines
                self._mirrors[rel] = LogMirror(self._store, self._state / rel, rel)
            else:
                mirror.push(lines or [])
        except OSError as e:
            self._mirrors[rel] = None
            print(f"livetrain: registry: could not push {rel} to {self._store.cfg.uri}: {e}", file=sys.stderr)

    def _keep(self, version: int) -> None:
        """``version`` was served just now: keep its model.pt, delete the one served longest ago
        beyond ``gate.keep_versions`` (here and on ``storage.uri``)."""
        self._kept.pop(version, None)
        self._kept[version] = None
        self._deleted.discard(version)
        keep = self._reg.cfg.keep_versions
        while keep and len(self._kept) > keep:
            old = next(iter(self._kept))
            del self._kept[old]
            self._deleted.add(old)
            shutil.rmtree(self._dir(old), ignore_errors=True)
            rel = f"{SERVED_DIR}/{self._dir(old).name}/model.pt"
            if self._store is not None and rel in self._remote:  # a restart walks the whole log: no call per version
                try:
                    self._store.delete(rel)
                    self._remote.discard(rel)
                except OSError as e:
                    print(f"livetrain: registry: could not delete {rel} from {self._store.cfg.uri}: {e}", file=sys.stderr)

    def _dir(self, version: int) -> Path:
        return self._state / SERVED_DIR / f"v{version:06d}"

    def _publish(self, v: Version | None) -> None:
        assert v is not None
        if not (self._dir(v.version) / "model.pt").exists():
            self._save(v)
        self._served = self._served_message(v)
        self._changed.notify_all()

    def _served_message(self, v: Version) -> ServedVersion:
        if v.version not in self._weight_refs:  # re-put once: owned by this actor
            self._weight_refs[v.version] = ray.put(weights_to_bytes(v.weights))  # no pickle on the serving side
            while len(self._weight_refs) > KEEP_VERSIONS:
                self._weight_refs.pop(next(iter(self._weight_refs)))
        return ServedVersion(
            version=v.version,
            weights=self._weight_refs[v.version],
            spec=v.spec,
            trained_through=v.trained_through,
            data_written_at=v.data_written_at,
            promoted_at=v.promoted_at or time.time(),
            metrics=dict(v.metrics),
        )

    def _save(self, v: Version) -> None:
        with warnings.catch_warnings():  # the weights come read-only from the object store; torch.save only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            weights = {k: torch.from_numpy(a) for k, a in v.weights.items()}
        path = save_checkpoint(
            self._dir(v.version),
            CheckpointData(
                spec=v.spec,
                weights=weights,
                meta={
                    "version": v.version,
                    "trained_through": v.trained_through,
                    "data_written_at": v.data_written_at,
                    "promoted_at": v.promoted_at,
                    "train_step": v.train_step,
                    "metrics": v.metrics,
                },
            ),
        )
        self._push(str(path.relative_to(self._state)))

    def _from_disk(self, version: int) -> Version | None:
        path = self._dir(version) / "model.pt"
        return _version_from_checkpoint(path) if path.exists() else None

    def _restore_last_served(self) -> None:
        """Serve what the decision log last served, with the versions served before it
        (``gate.compare_versions`` of them: the gate compares candidates with them, and
        ``rollback`` goes back to the newest) and, after a promotion, the one it replaced
        (shadow-scored for the automatic rollback)."""
        on_disk = sorted((self._state / SERVED_DIR).glob("v*/model.pt"))
        log = _read_decisions(self._state / DECISIONS_FILE)
        for n in log.order:  # kept as the log served them; deleted beyond gate.keep_versions below
            self._kept.pop(n, None)
            self._kept[n] = None
        # a crash between saving served/vN and logging its promotion leaves vN on disk only: never reuse N
        self._reg.next_version = max([log.top, *(int(p.parent.name[1:]) for p in on_disk)]) + 1
        path = self._servable(log, on_disk)
        if path is None:
            return
        v = _version_from_checkpoint(path)
        before = list(dict.fromkeys(reversed([n for n in log.order if n != v.version])))  # newest first, once each
        load = before[: max(1, self._reg.cfg.compare_versions)]  # the replaced version is the first
        default = max((n for n in before if n < v.version and n not in log.rolled_back_from), default=None)
        if default is not None and default not in load:  # rollback's default; oldest, beyond compare_versions
            load.append(default)
        earlier = [e for e in map(self._from_disk, load) if e is not None]
        walked_back_from = log.order[-1] if log.order and log.order[-1] != v.version else None
        replaced = log.replaced if walked_back_from is None else None
        previous = next((e for e in earlier if e.version == replaced), None)
        with self._lock:
            decisions = self._reg.restore_served(v, earlier[::-1], previous, log.rolled_back_from, walked_back_from)
            self._publish(v)
            self._apply(decisions)
            self._keep(v.version)

    def _servable(self, log: _DecisionLog, on_disk: list[Path]) -> Path | None:
        """The model.pt to serve again: the newest version of the log's served order that
        a rollback did not take out of service and whose model.pt is there (a save or a
        push that failed leaves none). Never the highest number on disk while the log
        names one: it may be a version rolled back from. Without any, the highest on
        disk that no rollback took out of service (a promotion saved, never logged)."""
        for n in log.servable():
            if (self._dir(n) / "model.pt").exists():
                return self._dir(n) / "model.pt"
        rest = [p for p in on_disk if int(p.parent.name[1:]) not in log.rolled_back_from]
        return rest[-1] if rest else None


def _version_from_checkpoint(path: Path) -> Version:
    data = load_checkpoint(path)
    m = data.meta
    model = model_from_weights(data.spec, {k: t.numpy() for k, t in data.weights.items()})
    return Version(
        version=int(m["version"]),
        spec=data.spec,
        weights=state_dict_numpy(model),  # as this livetrain's model holds them: older layouts come folded
        model=model,
        trained_through=int(m["trained_through"]),
        data_written_at=float(m["data_written_at"]),
        proposed_at=float(m.get("promoted_at") or 0.0),
        train_step=int(m.get("train_step", 0)),
        promoted_at=float(m.get("promoted_at") or time.time()),
        metrics=dict(m.get("metrics") or {}),
    )


@dataclass
class _DecisionLog:
    """What a restart needs from the decision log."""

    top: int = 0
    """The highest version it names."""
    order: list[int] = field(default_factory=list)
    """The versions in the order they were served (promoted or rolled back to)."""
    rolled_back_from: set[int] = field(default_factory=set)
    """Those a rollback took out of service, not served again since (``Registry.rolled_back_from``)."""
    replaced: int | None = None
    """The version the last promotion replaced, unless a rollback came after it (the
    automatic rollback's shadow). Rejections and supersessions serve nothing new: a
    restart after them still shadow-scores it."""

    def add(self, d: dict[str, Any]) -> None:
        version, action = int(d["version"]), d["action"]
        self.top = max(self.top, version)
        if action not in ("promote", "rollback"):
            return
        self.order.append(version)
        self.rolled_back_from.discard(version)
        replaced = d.get("served_version") if action == "promote" else None
        self.replaced = None if replaced is None else int(replaced)
        if action == "rollback" and d.get("served_version") is not None:
            self.rolled_back_from.add(int(d["served_version"]))

    def servable(self) -> list[int]:
        """The served order walked back, newest first, once each, less the versions
        rolled back from: what a restart may serve, best first."""
        return [n for n in dict.fromkeys(reversed(self.order)) if n not in self.rolled_back_from]


def _read_decisions(path: Path) -> _DecisionLog:
    """``decisions.jsonl`` read back; a torn line (a crash mid-write) is skipped."""
    log = _DecisionLog()
    if not path.exists():
        return log
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        log.add(d)
    return log


def _describe(s: ServedVersion) -> dict[str, Any]:
    return {
        "model_version": s.version,
        "promoted_at": s.promoted_at,
        "trained_through_seq": s.trained_through,
        "data_written_at": s.data_written_at,
        "metrics_on_unseen_data": s.metrics,
        "model": {"name": s.spec.name, **s.spec.kwargs},
    }
