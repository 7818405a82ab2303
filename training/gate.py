"""The gate's arithmetic: classification metrics, prequential counters and
the promote/reject decision. Pure numpy; no Ray, no torch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from livetrain.config import GateConfig


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 (classes absent from both count as 0)."""
    if len(y_true) == 0:
        raise ValueError("no rows to evaluate")
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    pred_pos = cm.sum(axis=0)
    true_pos = cm.sum(axis=1)
    present = (pred_pos + true_pos) > 0
    precision = np.divide(tp, pred_pos, out=np.zeros_like(tp), where=pred_pos > 0)
    recall = np.divide(tp, true_pos, out=np.zeros_like(tp), where=true_pos > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }


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


class Prequential:
    """Test-then-train counters of the served model: cumulative and over a
    sliding window of the last ``window_rows`` rows (block granularity)."""

    def __init__(self, num_classes: int, window_rows: int) -> None:
        self.num_classes = num_classes
        self.window_rows = window_rows
        self.rows = 0
        self.correct = 0
        self._window: deque[tuple[int, int]] = deque()
        self._w_rows = 0
        self._w_correct = 0

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        n, c = len(y_true), int((y_true == y_pred).sum())
        self.rows += n
        self.correct += c
        self._window.append((n, c))
        self._w_rows += n
        self._w_correct += c
        while self._w_rows - self._window[0][0] >= self.window_rows:
            n0, c0 = self._window.popleft()
            self._w_rows -= n0
            self._w_correct -= c0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.rows if self.rows else None

    @property
    def window_accuracy(self) -> float | None:
        return self._w_correct / self._w_rows if self._w_rows else None
