"""Backpressure between ingestion and training, as named objects. Pure: no Ray.

The buffer asks its limiter before it accepts a shard's blocks:

* ``FreshnessPolicy`` always admits: when data arrives faster than training
  draws it, the buffer's capacity evicts the oldest blocks, and the rows that
  left unseen are counted (``rows_evicted_unseen``).
* ``CoverageLimiter`` admits while the rows that no trainer has drawn yet stay
  under ``max_unseen_rows``; otherwise ingestion waits. This is Reverb's
  ``SampleToInsertRatio`` with one required draw per inserted row, counted on
  first draws only (re-draws do not pay for new inserts), and
  ``max_unseen_rows`` as its error buffer. One shard is always admitted into
  an all-seen buffer, so a shard larger than the bound cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FreshnessPolicy:
    """Never makes ingestion wait."""

    waits: int = 0

    def admits(self, unseen_rows: int, incoming_rows: int) -> bool:
        return True


@dataclass
class CoverageLimiter:
    """Ingestion waits while ``unseen_rows + incoming_rows > max_unseen_rows``."""

    max_unseen_rows: int
    waits: int = 0
    """How many times an insert was refused (each refusal is one wait)."""

    def admits(self, unseen_rows: int, incoming_rows: int) -> bool:
        ok = unseen_rows == 0 or unseen_rows + incoming_rows <= self.max_unseen_rows
        if not ok:
            self.waits += 1
        return ok


def make_limiter(backpressure: str, max_unseen_rows: int) -> FreshnessPolicy | CoverageLimiter:
    """The limiter ``buffer.backpressure`` names."""
    if backpressure == "coverage":
        return CoverageLimiter(max_unseen_rows)
    return FreshnessPolicy()
