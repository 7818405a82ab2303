"""``livetrain history``: the decision log and the drift alarms of a state
directory, merged in time order. Reads files only; works while livetrain runs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a torn last line after a crash
            continue
    return out


def read_history(state_dir: str | Path, include_superseded: bool = False) -> list[dict[str, Any]]:
    state = Path(state_dir)
    events = [{"kind": "decision", **d} for d in _lines(state / "decisions.jsonl")]
    if not include_superseded:
        events = [e for e in events if e["action"] != "supersede"]
    events += [{"kind": "alarm", **a} for a in _lines(state / "alarms.jsonl")]
    events.sort(key=lambda e: e["at"])
    for e in events:
        e["at_iso"] = dt.datetime.fromtimestamp(e["at"]).isoformat(timespec="seconds")
    return events
