"""Shared bits of the benchmarks: one JSON line per figure, process-tree memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(name: str, value: Any, unit: str, baseline: float | None = None, **extra: Any) -> None:
    line: dict[str, Any] = {"name": name, "value": value, "unit": unit}
    if baseline is not None:
        line["baseline"] = baseline
        line["ratio"] = (value / baseline) if (baseline and value is not None) else None
    line.update(extra)
    print(json.dumps(line), flush=True)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants (shared pages split fairly)."""
    total = 0
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total

