"""The model registry's logic: served version, pending candidate, prequential
evaluation, gate decisions and freshness. A plain class (torch, no Ray); the
Ray actor in ``registry_actor.py`` forwards to it.

Test-then-train: every new block reaches ``observe`` *before* the buffer
makes it available for training. The served model is scored on it (its
prequential figures), and the block joins the evaluation window. A pending
candidate is decided as soon as the window holds ``gate.min_eval_rows`` rows
that neither it nor the served model has trained on, so the comparison is
always on unseen data: rows of shards newer than both ``trained_through``,
and, with ``gate.holdout_fraction``, the held-out rows of the newest of the
two (training leaves them out while that shard is its newest; blocks too
small to decide on alone hold none). A candidate can then be decided as
soon as it is proposed, without waiting for the next shard. During the hold
after an error-drift alarm, shards tested then hold out rows even when too
few to decide on (``gate.holdout_min_rows``): they can promote a candidate
that clears the hold's bar on them, one shard sooner, and only that
(``small_holdout``; the candidate says it left them out).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from livetrain.config import DriftConfig, GateConfig
from livetrain.messages import BlockMeta, Candidate, Decision, ModelSpec
from livetrain.training.checkpoint import CheckpointError, check_finite, model_from_weights
from livetrain.training.drift import DriftAlarm, DriftMonitor, ReactionState, decay, react
from livetrain.training.gate import Prequential, Verdict, classification_metrics, decide, hold_z_bar, holdout_mask, holds_out, mcnemar_z
from livetrain.training.softmax import softmax


KEEP_VERSIONS = 32
"""Served versions kept in memory for rollback, pinning and freshness."""
KEEP_RECENT = 10_000
"""Decisions and freshness samples kept in memory (a run may last months: the
decisions are all in ``decisions.jsonl``; freshness percentiles are over the
newest ones)."""
HOLD_ROWS_STEPS = 10
"""``hold_state`` counts a hold's rows in steps of ``alarm_hold_rows / HOLD_ROWS_STEPS``."""


class RollbackError(ValueError):
    """The requested rollback target does not exist or is already served."""


@dataclass
class Version:
    """A proposed or served model, materialised for evaluation."""

    version: int
    spec: ModelSpec
    weights: dict[str, np.ndarray]
    model: nn.Module
    trained_through: int
    data_written_at: float
    proposed_at: float
    train_step: int
    promoted_at: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    small_holdout: bool = False
    """Never trained on shard ``trained_through``'s held-out rows of a hold (``Candidate``)."""

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.model(torch.from_numpy(np.ascontiguousarray(x)))).numpy()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(x))).argmax(dim=1).numpy()  # no softmax: same argmax


@dataclass
class _Block:
    meta: BlockMeta
    x: np.ndarray
    y: np.ndarray
    pred: np.ndarray | None = None
    """The served model's answers on it, when it was scored (``observe``)."""
    scored_by: int | None = None
    """The version that gave ``pred``: the gate reuses them while that version is served."""
    small_holdout: bool = False
    """Its shard was first tested during a hold: it holds rows out down to
    ``gate.holdout_min_rows`` (``Registry.small_holdout``)."""
    _mask: np.ndarray | None = None

    def held_out(self, fraction: float, min_rows: int) -> np.ndarray:
        """The rows training leaves out while this block's shard is the newest
        (``gate.held_out``, with the mask kept: it does not depend on ``min_rows``)."""
        if not holds_out(len(self.y), fraction, min_rows):
            return np.zeros(len(self.y), dtype=bool)
        if self._mask is None:
            self._mask = holdout_mask(self.x, fraction)
        return self._mask


class Registry:
    def __init__(
        self,
        cfg: GateConfig,
        num_classes: int,
        clock: Callable[[], float] = time.time,
        drift: DriftConfig | None = None,
        recent_fraction: float = 0.7,
        window_rows: int = 2000,
    ) -> None:
        self.cfg = cfg
        self.drift = DriftMonitor(drift or DriftConfig())
        self.reaction = ReactionState.at_rest(recent_fraction, window_rows)
        """The drift reactions; ``recent_fraction`` and ``window_rows`` are the
        buffer's configured mix and window (``buffer.*``) they return to."""
        self._rows_since_error_alarm: int | None = None
        self._served_at_alarm: Version | None = None
        """The version served when the last error alarm fired (the hold's reference)."""
        self._hold_tests = 0
        """Candidates tested against the hold's bar since the last error alarm (``hold_z_bar``)."""
        self._hold_error_bar: float | None = None
        """Past ``alarm_hold_rows``, the hold lasts while the served model errs on at least
        this share of the newest rows: halfway from its error rate before the alarm to
        the alarm block's (a poisoned burst still going on)."""
        self._served_errors: deque[tuple[int, float]] = deque()
        """(rows, errors) of the served model on the newest blocks, at least ``min_eval_rows``."""
        self.previous: Version | None = None
        """The version served before the current one, shadow-scored for rollback."""
        self.live: Prequential | None = None
        self.shadow: Prequential | None = None
        self.num_classes = num_classes
        self.clock = clock
        self.served: Version | None = None
        self.pending: Version | None = None
        self.history: deque[Version] = deque(maxlen=KEEP_VERSIONS)
        """The last served versions, oldest first (older ones live on disk only)."""
        self.rolled_back_from: set[int] = set()
        """Versions a rollback took out of service (not served again since): ``rollback``'s
        default passes over them."""
        self.decisions: list[Decision] = []
        """The newest decisions (at most ``2 * KEEP_RECENT``; ``decisions_since`` counts from the first)."""
        self._decisions_dropped = 0
        self._actions: Counter[str] = Counter()
        self.next_version = 1
        self.versions_proposed = 0
        self.prequential = Prequential(num_classes, cfg.window_rows)
        self._recent: deque[_Block] = deque()
        self._recent_rows = 0
        self._small_holdout: dict[int, bool] = {}
        """Shard seq -> whether the gate held when its first block was tested (newest ones)."""
        self._unserved_shards: deque[tuple[int, float]] = deque(maxlen=KEEP_RECENT)
        """(seq, written_at) of shards no version trained on them has answered yet; with no
        traffic at all, only the newest are kept."""
        self.freshness_s: list[float] = []
        """Seconds from a shard's arrival to the first answer of a version trained on it (newest ones)."""
        self._freshness_count = 0
        self.first_answer_at: dict[int, float] = {}

    # --- inputs ----------------------------------------------------------------

    def observe(self, meta: BlockMeta, x: np.ndarray, y: np.ndarray) -> list[Decision]:
        """Score the served model on a new block (test), watch for drift, keep
        the block for the gate; may roll back by itself."""
        errors = pred = None
        if self.served is not None and len(y):
            probs = self.served.predict_proba(x)
            pred = probs.argmax(axis=1)
            errors = (pred != y).astype(np.float64)
            self.prequential.update(y, pred, probs)
            self.live.update(y, pred, probs)
            if self.previous is not None:
                self.shadow.update(y, self.previous.predict(x))
        self._react(self.drift.observe(meta.seq, x, errors, self.clock()), len(y))
        self._watch_hold(errors)
        small = self._small_holdout.setdefault(meta.seq, self.holding)  # every block of a shard alike
        if len(self._small_holdout) > 2 * KEEP_RECENT:  # seqs arrive in order: keep the newest
            for old in sorted(self._small_holdout)[:-KEEP_RECENT]:
                del self._small_holdout[old]
        self._recent.append(_Block(meta, x, y, pred, None if pred is None else self.served.version, small))
        self._recent_rows += len(y)
        while self._recent_rows - len(self._recent[0].y) >= self.cfg.max_eval_rows:
            self._recent_rows -= len(self._recent.popleft().y)
        self._unserved_shards.append((meta.seq, meta.written_at))
        return self._maybe_roll_back() + self._try_decide()

    def _react(self, alarms: list[DriftAlarm], rows: int) -> None:
        self.reaction = decay(self.reaction, rows, self.drift.cfg)
        if self._rows_since_error_alarm is not None:
            self._rows_since_error_alarm += rows
        for alarm in alarms:
            self.reaction = react(alarm, self.reaction, self.drift.cfg)
            if alarm.detector.startswith("error") and self.cfg.alarm_hold_rows > 0:
                self._rows_since_error_alarm = 0
                self._served_at_alarm = self.served
                self._hold_tests = 0
                before, block = alarm.detail.get("error_rate_before"), alarm.detail.get("error_rate_block")
                self._hold_error_bar = (before + block) / 2 if before is not None and block is not None and block > before else None

    def _watch_hold(self, errors: np.ndarray | None) -> None:
        """End a hold past ``alarm_hold_rows`` once the served model no longer errs as it
        did at the alarm. A burst of random labels longer than ``alarm_hold_rows`` keeps
        the served model erring, so the hold (and its bar) lasts until the burst ends."""
        if errors is not None:
            self._served_errors.append((len(errors), float(errors.sum())))
            while sum(n for n, _ in self._served_errors) - self._served_errors[0][0] >= self.cfg.min_eval_rows:
                self._served_errors.popleft()
        if self._rows_since_error_alarm is None or self._rows_since_error_alarm < self.cfg.alarm_hold_rows:
            return
        rows = sum(n for n, _ in self._served_errors)
        if rows < self.cfg.min_eval_rows:
            return  # too few rows since a restart to tell
        recent = sum(e for _, e in self._served_errors) / rows
        if self._hold_error_bar is None or recent < self._hold_error_bar:
            self._end_hold()

    def _end_hold(self) -> None:
        self._rows_since_error_alarm = self._served_at_alarm = self._hold_error_bar = None

    def small_holdout(self, seq: int) -> bool:
        """Whether shard ``seq`` holds rows out down to ``gate.holdout_min_rows``: the
        gate held when it was tested. The trainer asks before it trains on a new
        newest shard, and says in its candidate that it did leave them out."""
        return self._small_holdout.get(seq, False)

    @property
    def holding(self) -> bool:
        """True after an error-drift alarm: promotion then needs a significant gain.
        For ``alarm_hold_rows`` rows, then while the served model still errs as at the
        alarm (``_watch_hold``), unless a candidate ends it first (``_release_hold``)."""
        return self._rows_since_error_alarm is not None

    def _maybe_roll_back(self) -> list[Decision]:
        if self.previous is None or self.live.window_rows_seen < self.cfg.rollback_min_rows:
            return []
        live, prev = self.live.window_accuracy, self.shadow.window_accuracy
        if prev - live <= self.cfg.rollback_margin:
            return []
        reason = (
            f"live accuracy {live:.4f} over {self.live.window_rows_seen} rows is below "
            f"v{self.previous.version}'s {prev:.4f} on the same rows by more than {self.cfg.rollback_margin}"
        )
        return [self.rollback(self.previous, reason)]

    def propose(self, cand: Candidate, weights: dict[str, np.ndarray]) -> tuple[int, list[Decision]]:
        """Register a candidate; returns its version and any decisions taken. Weights that
        do not fit the spec raise CheckpointError before anything is counted or recorded;
        non-finite ones are rejected at once (every replica would refuse them), and the
        pending candidate stays."""
        v = Version(
            version=self.next_version,
            spec=cand.spec,
            weights=weights,
            model=model_from_weights(cand.spec, weights),
            trained_through=cand.trained_through,
            data_written_at=cand.data_written_at,
            proposed_at=cand.proposed_at,
            train_step=cand.train_step,
            small_holdout=cand.small_holdout,
        )
        self.next_version += 1
        self.versions_proposed += 1
        served = self.served.version if self.served else None
        try:
            check_finite(weights, f"v{v.version}")
        except CheckpointError as e:
            return v.version, [self._record(v, "reject", f"non-finite weights ({e})", {}, None, 0, served)]
        decisions: list[Decision] = []
        if self.pending is not None:
            decisions.append(self._record(self.pending, "supersede", f"superseded by v{v.version} before enough unseen rows arrived", {}, None, 0, served))
        self.pending = v
        return v.version, decisions + self._try_decide()

    def record_answer(self, version: int, at: float) -> None:
        """A replica answered with ``version`` at ``at``: closes freshness of covered shards."""
        if version in self.first_answer_at:
            return
        self.first_answer_at[version] = at
        if len(self.first_answer_at) > 2 * KEEP_RECENT:  # versions answer in order: keep the newest
            for old in sorted(self.first_answer_at)[:-KEEP_RECENT]:
                del self.first_answer_at[old]
        v = self.find(version)
        if v is None:
            return
        while self._unserved_shards and self._unserved_shards[0][0] <= v.trained_through:
            _, written = self._unserved_shards.popleft()
            self.freshness_s.append(max(0.0, at - written))
            self._freshness_count += 1
        if len(self.freshness_s) > 2 * KEEP_RECENT:  # trimmed now and then: amortised O(1)
            del self.freshness_s[:-KEEP_RECENT]

    def _serve(self, v: Version, previous: Version | None) -> None:
        self.served = v
        self.previous = previous
        self.live = Prequential(self.num_classes, self.cfg.window_rows)
        self.shadow = Prequential(self.num_classes, self.cfg.window_rows)

    def restore_served(self, v: Version, earlier: Sequence[Version] = (), previous: Version | None = None,
                       rolled_back_from: Iterable[int] = (), walked_back_from: int | None = None) -> list[Decision]:
        """Serve ``v`` again after a restart (no gate: it passed one before); ``earlier``:
        versions served before it, oldest first (the gate's ``compare_versions`` and
        ``rollback``'s default); ``previous``: the one ``v`` replaced, shadow-scored for
        the automatic rollback (None after a rollback); ``rolled_back_from``: as the
        decision log tells it; ``walked_back_from``: the version the log last served,
        when its model.pt is missing and ``v`` was served before it. That walk-back is
        a rollback, returned to be logged: a later restart then keeps off that version
        even if its model.pt comes back."""
        self._serve(v, previous=previous)
        self.history.extend([*earlier, v])
        self.rolled_back_from = set(rolled_back_from) - {v.version}
        self.next_version = max(self.next_version, v.version + 1)
        if walked_back_from is None:
            return []
        self.rolled_back_from.add(walked_back_from)
        reason = f"restart: v{walked_back_from}'s model.pt is missing; serving v{v.version}, the newest served before it"
        return [self._record(v, "rollback", reason, dict(v.metrics), None, 0, walked_back_from)]

    def hold_state(self) -> dict[str, Any] | None:
        """The drift alarm's hold, as ``resume_hold`` takes it back after a restart
        (None: no hold). The registry actor writes it down whenever it changes."""
        if self._rows_since_error_alarm is None:
            return None
        step = max(1, self.cfg.alarm_hold_rows // HOLD_ROWS_STEPS)
        return {
            "served_at_alarm": self._served_at_alarm.version if self._served_at_alarm else None,
            "error_bar": self._hold_error_bar,
            "tests": self._hold_tests,
            # rounded down (the hold resumes no later than it was), and not counted past
            # alarm_hold_rows: the state changes ~HOLD_ROWS_STEPS times a hold, not every block
            "rows": min(self._rows_since_error_alarm, self.cfg.alarm_hold_rows) // step * step,
        }

    def resume_hold(self, state: dict[str, Any], anchor: Version | None) -> None:
        """Hold again after a restart, as ``hold_state`` left it: a registry that came
        back in the middle of a poisoned burst must not take it for the normal state
        (its drift detector starts afresh, so no new alarm would come). The hold's
        rows go on from the saved count (a state without one: from 0); ``anchor``: the
        version served at the alarm, if it could be loaded (else the hold ends only by
        ``_watch_hold``)."""
        if self.cfg.alarm_hold_rows <= 0:
            return
        self._rows_since_error_alarm = max(0, min(int(state.get("rows", 0)), self.cfg.alarm_hold_rows))
        self._served_at_alarm = anchor
        self._hold_error_bar = state.get("error_bar")
        self._hold_tests = int(state.get("tests", 0))

    def rollback(self, target: Version | None = None, reason: str = "requested") -> Decision:
        """Serve ``target``. Default: the newest version promoted before the current one
        (numbers go up with promotions) that no rollback took out of service: after an
        automatic v2 -> v1, the default goes on to v0, never back to v2."""
        if self.served is None:
            raise RollbackError("nothing is served yet")
        if target is None:
            if all(v.version == self.served.version for v in self.history):
                raise RollbackError(f"v{self.served.version} is the only version ever served")
            older = [v for v in self.history if v.version < self.served.version and v.version not in self.rolled_back_from]
            if not older:
                raise RollbackError(f"no version promoted before v{self.served.version} is left to roll back to "
                                    f"(rolled back from: {sorted(self.rolled_back_from)}); name the version")
            target = max(older, key=lambda v: v.version)
        if target.version == self.served.version:
            raise RollbackError(f"v{target.version} is already served")
        previous = self.served
        self.rolled_back_from.add(previous.version)
        self.rolled_back_from.discard(target.version)
        self._serve(target, previous=None)
        if target not in self.history:
            self.history.append(target)
        else:  # keep history ordered by when a version was (re)served
            self.history.remove(target)
            self.history.append(target)
        return self._record(target, "rollback", f"from v{previous.version}: {reason}", dict(target.metrics), None, 0, previous.version)

    def find(self, version: int) -> Version | None:
        return next((v for v in self.history if v.version == version), None)

    # --- the gate --------------------------------------------------------------

    def _try_decide(self) -> list[Decision]:
        cand = self.pending
        if cand is None:
            return []
        floor = max(cand.trained_through, self.served.trained_through if self.served else -1)
        xs, ys, answered = [], [], []
        frac = self.cfg.holdout_fraction
        served = self.served.version if self.served else None
        # a hold's smaller held-out shares count only if every version trained through
        # the floor shard says it left them out
        small_ok = all(v.small_holdout for v in (cand, self.served) if v is not None and v.trained_through == floor)
        newer = False
        for b in self._recent:  # oldest first: the newest rows are kept below
            if b.meta.seq > floor:
                rows, newer = slice(None), True
            elif b.meta.seq == floor and frac > 0:
                small = b.small_holdout and small_ok
                rows = b.held_out(frac, self.cfg.holdout_min_rows if small else self.cfg.min_eval_rows)
            else:
                continue
            xs.append(b.x[rows])
            ys.append(b.y[rows])
            answered.append(b.pred[rows] if b.scored_by is not None and b.scored_by == served else None)
        n = sum(len(y) for y in ys)
        # Fewer rows than min_eval_rows, all held out of the floor shard during a hold
        # (whose bar is a significant gain): they may promote the candidate, no more.
        early = n < self.cfg.min_eval_rows and not newer and self.holding and self.served is not None
        if n == 0 or (n < self.cfg.min_eval_rows and not early):
            return []
        keep = slice(-self.cfg.max_eval_rows, None)
        x, y = np.concatenate(xs)[keep], np.concatenate(ys)[keep]
        pc = cand.predict(x)
        ps = None
        if self.served is not None:  # its answers from observe where it scored these rows itself
            ps = np.concatenate(answered)[keep] if all(a is not None for a in answered) else self.served.predict(x)
        cm = classification_metrics(y, pc, self.num_classes)
        sm = classification_metrics(y, ps, self.num_classes) if ps is not None else None
        verdict = decide(cm, sm, self.cfg)
        if verdict.promote and sm is not None and self.holding:
            verdict = self._release_hold(verdict, x, y, pc) or self._hold(verdict, y, pc, ps, cm, sm)
        if verdict.promote and sm is not None and cm[self.cfg.metric] < sm[self.cfg.metric]:
            verdict = self._no_ratchet(verdict, floor, x, y, cm)
        if early and not verdict.promote:
            return []  # not proven on those few rows: the next shard judges it as usual
        self.pending = None
        served_version = self.served.version if self.served else None
        if verdict.promote:
            cand.promoted_at = self.clock()
            cand.metrics = cm
            self._serve(cand, previous=self.served)
            self.history.append(cand)
        return [self._record(cand, "promote" if verdict.promote else "reject", verdict.reason, cm, sm, len(y), served_version)]

    def _no_ratchet(self, verdict: Verdict, floor: int, x: np.ndarray, y: np.ndarray,
                    cm: dict[str, float]) -> Verdict:
        """``gate.compare_versions``: a candidate that spends the tolerance (worse than
        the served model, within it) must also be within it of the versions served
        before, on the same rows. One at least as good as the served model is not
        held back by them: refusing it would keep a worse model serving."""
        m, tol = self.cfg.metric, self.cfg.tolerance
        earlier = [v for v in reversed(self.history) if v is not self.served][: self.cfg.compare_versions]
        for v in (v for v in earlier if v.trained_through <= floor):  # not trained on these rows either
            em = classification_metrics(y, v.predict(x), self.num_classes)
            if cm[m] < em[m] - tol:
                return Verdict(False, f"{verdict.reason}; but v{v.version}, served before, has {m} "
                                      f"{em[m]:.4f} on the same rows: more than {tol} above the candidate")
        return verdict

    def _release_hold(self, verdict: Verdict, x: np.ndarray, y: np.ndarray, pc: np.ndarray) -> Verdict | None:
        """End the hold when the candidate beats the version served at the alarm
        with McNemar z >= ``gate.alarm_release_z``: the newest rows are learnable,
        so the change is real, and the ordinary verdict stands. On random labels z
        against any model is ~N(0, 1), so a poisoned burst never ends the hold."""
        anchor = self._served_at_alarm
        if anchor is None:
            return None
        z = mcnemar_z(y, pc, anchor.predict(x))
        if z < self.cfg.alarm_release_z:
            return None
        self._end_hold()
        return Verdict(True, f"{verdict.reason}; beats v{anchor.version} (served at the drift alarm) with "
                             f"McNemar z {z:.2f} >= {self.cfg.alarm_release_z}: the hold ends")

    def _hold(self, verdict: Verdict, y: np.ndarray, pc: np.ndarray, ps: np.ndarray,
              cm: dict[str, float], sm: dict[str, float]) -> Verdict:
        """While holding, a candidate must beat the served model, and significantly:
        the hold's k-th test needs McNemar z >= ``hold_z_bar(alarm_min_z, k)``, so a
        poisoned burst gets no more chances to slip through by luck than ~2.6 tests,
        however long it holds."""
        self._hold_tests += 1
        gain = cm[self.cfg.metric] - sm[self.cfg.metric]
        z, bar = mcnemar_z(y, pc, ps), hold_z_bar(self.cfg.alarm_min_z, self._hold_tests)
        if gain >= self.cfg.alarm_min_gain and z >= bar:
            return Verdict(True, f"{verdict.reason}; beats it by {gain:+.4f} with McNemar z {z:.2f} >= "
                                 f"{bar:.2f} (test {self._hold_tests} of the drift alarm's hold)")
        return Verdict(
            False,
            f"drift alarm {self._rows_since_error_alarm} rows ago: {self.cfg.metric} gain "
            f"{gain:+.4f} (McNemar z {z:.2f}); holding needs >= {self.cfg.alarm_min_gain} "
            f"and z >= {bar:.2f} (test {self._hold_tests} of the hold)",
        )

    def _record(
        self,
        v: Version,
        action: str,
        reason: str,
        cm: dict[str, float],
        sm: dict[str, float] | None,
        rows: int,
        served_version: int | None = None,
    ) -> Decision:
        d = Decision(
            version=v.version,
            action=action,
            reason=reason,
            at=self.clock(),
            trained_through=v.trained_through,
            eval_rows=rows,
            candidate=cm,
            served=sm,
            served_version=served_version,
        )
        self.decisions.append(d)
        self._actions[action] += 1
        if len(self.decisions) > 2 * KEEP_RECENT:
            self._decisions_dropped += len(self.decisions) - KEEP_RECENT
            del self.decisions[:-KEEP_RECENT]
        return d

    def decisions_since(self, since: int) -> list[Decision]:
        """Decisions from the ``since``-th of the run on (those still held)."""
        return self.decisions[max(0, since - self._decisions_dropped):]

    # --- views -----------------------------------------------------------------

    def stats(self) -> dict[str, float | int | None]:
        f = np.array(self.freshness_s) if self.freshness_s else None
        promoted = self._actions["promote"]
        return {
            "served_version": self.served.version if self.served else None,
            "served_trained_through": self.served.trained_through if self.served else None,
            "versions_proposed": self.versions_proposed,
            "versions_promoted": promoted,
            "versions_rejected": self._actions["reject"],
            "prequential_accuracy": self.prequential.accuracy,
            "prequential_accuracy_window": self.prequential.window_accuracy,
            "prequential_rows": self.prequential.rows,
            "freshness_p50_s": float(np.percentile(f, 50)) if f is not None else None,
            "freshness_p95_s": float(np.percentile(f, 95)) if f is not None else None,
            "freshness_count": self._freshness_count,
            "drift_alarms": self.drift.raised,
            "holding_after_alarm": self.holding,
            "reaction_recent_fraction": self.reaction.recent_fraction,
            "reaction_lr_scale": self.reaction.lr_scale,
            "reaction_window_rows_scale": self.reaction.window_rows_scale,
            "versions_rolled_back": self._actions["rollback"],
        }

    def live_report(self) -> dict[str, object]:
        """The served model's live figures (for /model, W&B and the summary)."""
        last = self.drift.alarms[-1] if self.drift.alarms else None
        return {
            "prequential_window": self.prequential.report(window=True),
            "prequential_cumulative": self.prequential.report(window=False),
            "served_version_window": self.live.report(window=True) if self.live else None,
            "confusion_window": self.prequential.confusion(window=True),
            "drift_alarms": self.drift.raised,
            "last_drift_alarm": None if last is None else {
                "at": last.at, "detector": last.detector, "features": list(last.features), "seq": last.seq,
            },
        }
