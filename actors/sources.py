"""Shard sources. The directory is the durable log: a source only reports
which ``*.parquet`` files have landed; the manifest decides what is new."""

from __future__ import annotations

import os
from pathlib import Path


class DirectorySource:
    """Lists new or rewritten ``*.parquet`` files in a landing directory, oldest first.

    Files are expected to appear atomically (written under another name, then
    renamed), which is what the synthetic stream and most writers do. A file
    is reported again when its size or mtime changes (rewritten in place): the
    manifest decides whether that is a duplicate delivery.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, tuple[int, int]] = {}

    def poll(self) -> list[Path]:
        new: list[tuple[int, str, Path]] = []
        with os.scandir(self.path) as it:
            for entry in it:
                if not entry.name.endswith(".parquet") or not entry.is_file():
                    continue
                st = entry.stat()
                if self._seen.get(entry.name) == (st.st_size, st.st_mtime_ns):
                    continue
                self._seen[entry.name] = (st.st_size, st.st_mtime_ns)
                new.append((st.st_mtime_ns, entry.name, Path(entry.path)))
        new.sort()
        return [p for _, _, p in new]
