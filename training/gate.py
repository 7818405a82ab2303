"""The gate's arithmetic: classification metrics, prequential counters and
the promote/reject decision. Pure numpy; no Ray, no torch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from livetrain.config import GateConfig


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over the classes in ``y_true`` or ``y_pred``
    (one absent from both is left out of the averages, as scikit-learn does; a class
    never predicted has precision 0, one never true recall 0)."""
    if len(y_true) == 0:
        raise ValueError("no rows to evaluate")
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes), per_class=False)


def metrics_from_confusion(cm: np.ndarray, per_class: bool = True) -> dict[str, float]:
    tp = np.diag(cm).astype(np.float64)
    pred_pos = cm.sum(axis=0)
    true_pos = cm.sum(axis=1)
    present = (pred_pos + true_pos) > 0
    precision = np.divide(tp, pred_pos, out=np.zeros_like(tp), where=pred_pos > 0)
    recall = np.divide(tp, true_pos, out=np.zeros_like(tp), where=true_pos > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    out = {
        "accuracy": float(tp.sum() / cm.sum()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }
    if per_class:
        out.update({f"f1_class_{i}": float(v) for i, v in enumerate(f1)})
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    idx = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def decide(candidate: dict[str, float], served: dict[str, float] | None, cfg: GateConfig) -> Verdict:
    """Promote unless the candidate is worse than the served model by more than the tolerance."""
    m = cfg.metric
    if served is None:
        return Verdict(True, f"no served model; candidate {m}={candidate[m]:.4f}")
    delta = candidate[m] - served[m]
    if delta >= -cfg.tolerance:
        return Verdict(True, f"{m} {candidate[m]:.4f} vs served {served[m]:.4f} (delta {delta:+.4f} >= -{cfg.tolerance})")
    return Verdict(False, f"{m} {candidate[m]:.4f} vs served {served[m]:.4f} (delta {delta:+.4f} < -{cfg.tolerance})")


_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)


def holdout_mask(x: np.ndarray, fraction: float) -> np.ndarray:
    """Which rows of ``x`` are held out for the gate (``gate.holdout_fraction``).

    A hash of each row's feature bytes, so the trainer and the registry pick
    the same rows from the data alone, and copies of a row are held out
    together (a duplicate cannot leak a held-out row into training)."""
    n = len(x)
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    words = np.ascontiguousarray(x).view(np.uint32).reshape(n, -1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, words.shape[1], len(_MIX)):  # 64 columns at a time: bounded memory for images
            chunk = words[:, lo : lo + len(_MIX)].astype(np.uint64)
            h = (h * np.uint64(0x100000001B3)) ^ (chunk * _MIX[: chunk.shape[1]]).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(33)  # murmur3's finaliser: every input bit moves the top bits
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def holds_out(rows: int, fraction: float, min_rows: int) -> bool:
    """Whether a block of ``rows`` rows holds any out: its held-out share is
    at least ``min_rows``. The trainer and the registry decide by this alone."""
    return rows * fraction >= min_rows


def held_out(x: np.ndarray, fraction: float, min_rows: int) -> np.ndarray:
    """The rows of one block that training leaves out while its shard is the
    newest (``holdout_mask``), or none when the block is too small for its
    held-out rows alone to decide a candidate (``len(x) * fraction <
    min_rows``, i.e. ``gate.min_eval_rows``; ``gate.holdout_min_rows`` for a
    shard tested during a hold): such a shard is judged by the next one, as
    without held-out rows, and trains on every row."""
    if not holds_out(len(x), fraction, min_rows):
        return np.zeros(len(x), dtype=bool)
    return holdout_mask(x, fraction)


def mcnemar_z(y: np.ndarray, cand: np.ndarray, served: np.ndarray) -> float:
    """McNemar's statistic on the rows where exactly one model is right:
    (candidate-only right - served-only right) / sqrt(their sum). On labels
    that carry no signal (a poisoned burst) it is ~N(0, 1) whatever the gap in
    accuracy looks like on a few hundred rows; a model that learnt a new
    concept scores far above 3."""
    c_right, s_right = cand == y, served == y
    b = int((c_right & ~s_right).sum())
    c = int((~c_right & s_right).sum())
    return (b - c) / float(np.sqrt(b + c)) if b + c else 0.0


def hold_z_bar(first_z: float, k: int) -> float:
    """The McNemar z the ``k``-th test of one hold (1, 2, ...) must reach.

    On random labels each test passes ``first_z`` by chance with one-sided
    p = 1 - Phi(first_z) (0.00135 at 3), and a hold that tests a new candidate
    on every shard would add those chances up. The k-th test gets p
    / k**1.5 instead (z 3.0, 3.30, 3.47, 3.58, ... 3.93 at the tenth), so all
    the tests of a hold together pass by chance with probability at most
    zeta(1.5) * p = 2.61 * p, however many there are. (p / k**2 would give
    1.64 * p, but the bar then rose so fast that a real but modest change,
    tested on every shard, waited thousands of rows longer to be served.)
    """
    if k < 1:
        raise ValueError(f"hold_z_bar: k counts from 1, got {k}")
    p = NormalDist().cdf(-first_z)
    return -NormalDist().inv_cdf(p / k**1.5)


class Prequential:
    """Test-then-train figures of one model: confusion counts and log loss,
    cumulative and over a sliding window of the last ``window_rows`` rows
    (block granularity)."""

    def __init__(self, num_classes: int, window_rows: int) -> None:
        self.num_classes = num_classes
        self.window_rows = window_rows
        self.cm = np.zeros((num_classes, num_classes), np.int64)
        self.log_loss_sum = 0.0
        self._window: deque[tuple[np.ndarray, float]] = deque()
        self._w_cm = np.zeros_like(self.cm)
        self._w_loss = 0.0

    def update(self, y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None = None) -> None:
        cm = confusion_matrix(y_true, y_pred, self.num_classes)
        loss = 0.0
        if probs is not None:
            p = probs[np.arange(len(y_true)), y_true.astype(np.int64)]
            # a row the model overflowed on (NaN: finite features far outside its range)
            # counts as a confident miss, not as NaN in the cumulative loss for good
            p = np.clip(np.nan_to_num(p, nan=0.0), 1e-12, 1.0)
            loss = float(-np.log(p).sum())
        self.cm += cm
        self.log_loss_sum += loss
        self._window.append((cm, loss))
        self._w_cm += cm
        self._w_loss += loss
        while len(self._window) > 1 and self._w_cm.sum() - self._window[0][0].sum() >= self.window_rows:
            old_cm, old_loss = self._window.popleft()
            self._w_cm -= old_cm
            self._w_loss -= old_loss

    @property
    def rows(self) -> int:
        return int(self.cm.sum())

    @property
    def window_rows_seen(self) -> int:
        return int(self._w_cm.sum())

    @property
    def accuracy(self) -> float | None:
        return float(np.trace(self.cm) / self.rows) if self.rows else None

    @property
    def window_accuracy(self) -> float | None:
        n = self.window_rows_seen
        return float(np.trace(self._w_cm) / n) if n else None

    def report(self, window: bool) -> dict[str, float] | None:
        """accuracy, macro precision/recall/F1, per-class F1 and log loss."""
        cm, loss = (self._w_cm, self._w_loss) if window else (self.cm, self.log_loss_sum)
        n = int(cm.sum())
        if not n:
            return None
        out = metrics_from_confusion(cm)
        out["log_loss"] = loss / n
        return out

    def confusion(self, window: bool) -> list[list[int]]:
        return (self._w_cm if window else self.cm).tolist()
