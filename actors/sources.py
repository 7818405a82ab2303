"""Shard sources. The directory is the durable log: a source only reports
which ``*.parquet`` files have landed; the manifest decides what is new."""

from __future__ import annotations

import os
from pathlib import Path


class DirectorySource:
    """Lists new ``*.parquet`` files in a landing directory, oldest first.

    Files are expected to appear atomically (written under another name, then
    renamed), which is what the synthetic stream and most writers do.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._seen: set[str] = set()

    def poll(self) -> list[Path]:
        new: list[tuple[int, str, Path]] = []
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name in self._seen or not entry.name.endswith(".parquet") or not entry.is_file():
                    continue
                self._seen.add(entry.name)
                new.append((entry.stat().st_mtime_ns, entry.name, Path(entry.path)))
        new.sort()
        return [p for _, _, p in new]
