"""The terminal live view of a running livetrain.

Rendered on **stderr**: stdout stays clean for the one JSON summary line that
``livetrain run`` prints last. The view shows nothing at all when it is
disabled or stderr is not a terminal (CI logs, pipes).

``update`` only stores the snapshot; rich's refresh thread renders the latest
one at most ``REFRESH_PER_S`` times per second, so callers may update as
often as they like.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MISSING = "—"
REFRESH_PER_S = 4.0


def _num(v: Any, fmt: str = ",") -> str:
    return MISSING if v is None else format(v, fmt)


def _seconds(v: Any) -> str:
    return MISSING if v is None else f"{v:.2f} s"


def _mb(v: Any) -> str:
    return MISSING if v is None else f"{v / 2**20:,.1f} MB"


def _pct(v: Any) -> str:
    return MISSING if v is None else f"{100 * v:.1f}%"


def _str(v: Any) -> str:
    return MISSING if v is None or v == "" else str(v)


def _served(v: Any) -> str:
    return MISSING if v is None else f"v{v}"


# (section, [(label, key, formatter)]): the layout of the view, top to bottom.
_LAYOUT: list[tuple[str, list[tuple[str, str, Callable[[Any], str]]]]] = [
    (
        "ingest",
        [
            ("rows ingested", "rows_ingested", _num),
            ("rows quarantined", "rows_quarantined", _num),
            ("shards ingested", "shards_ingested", _num),
        ],
    ),
    (
        "buffer",
        [
            ("rows", "buffer_rows", _num),
            ("size", "buffer_bytes", _mb),
        ],
    ),
    (
        "train",
        [
            ("samples/s", "train_samples_per_s", lambda v: _num(v, ",.0f")),
            ("steps", "train_steps", _num),
            ("loss", "train_loss", lambda v: _num(v, ".4f")),
        ],
    ),
    (
        "gate",
        [
            ("proposed", "versions_proposed", _num),
            ("promoted", "versions_promoted", _num),
            ("served version", "served_version", _served),
            ("rejected", "versions_rejected", _num),
            ("rolled back", "versions_rolled_back", _num),
            ("prequential acc.", "prequential_accuracy", _pct),
            ("window acc.", "prequential_accuracy_window", _pct),
            ("drift alarms", "drift_alarms", _num),
            ("last decision", "last_decision", _str),
        ],
    ),
    (
        "serving",
        [
            ("freshness p50", "freshness_p50_s", _seconds),
            ("freshness p95", "freshness_p95_s", _seconds),
            ("endpoint", "endpoint", _str),
        ],
    ),
]


def render(snapshot: dict[str, Any], title: str = "livetrain") -> Panel:
    """The view of one snapshot; a key that is missing (or None) shows "—"."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    for section, rows in _LAYOUT:
        for i, (label, key, fmt) in enumerate(rows):
            table.add_row(section if i == 0 else "", label, fmt(snapshot.get(key)))
    elapsed = snapshot.get("elapsed_s")
    subtitle = "elapsed " + (MISSING if elapsed is None else f"{elapsed:,.0f} s")
    return Panel(table, title=Text(title, style="bold"), subtitle=subtitle, expand=False)


class LiveView:
    """A rich ``Live`` panel on stderr, refreshed from snapshot dicts.

    ``with LiveView(enabled, title) as view: view.update(snapshot)``. Does
    nothing when ``enabled`` is false or the console is not a terminal.
    """

    def __init__(self, enabled: bool, title: str, console: Console | None = None) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.title = title
        self.active = enabled and self.console.is_terminal
        """Whether anything is drawn at all."""
        self._snapshot: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None

    def _renderable(self) -> Panel:
        with self._lock:
            snapshot = dict(self._snapshot)
        return render(snapshot, self.title)

    def update(self, s: dict[str, Any]) -> None:
        """Show ``s`` from the next refresh on (cheap: nothing renders here)."""
        with self._lock:
            self._snapshot = dict(s)

    def __enter__(self) -> LiveView:
        if self.active:
            self._live = Live(
                console=self.console,
                get_renderable=self._renderable,
                refresh_per_second=REFRESH_PER_S,
                transient=False,  # leave the last frame on screen
                redirect_stdout=False,  # stdout is for the final JSON line only
                redirect_stderr=True,  # log lines print above the panel
            )
            self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()  # renders the latest snapshot one last time
            self._live = None
