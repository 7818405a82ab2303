"""Durable state on shared storage (``storage.uri``): ``s3://bucket/prefix``,
any other URI pyarrow's filesystems open, or a path on a shared mount.

The state directory stays the working copy on the node that runs each part:
SQLite wants a local disk, and the ingest, buffer and registry files are
written there first. A ``Store`` mirrors the durable ones to the URI as their
writers produce them, and ``restore`` fills a fresh state directory from it,
so livetrain restarts on another node (or after losing the head's disk) where
it stopped:

    what                          written by                 pushed
    ray_train/ (checkpoints)      Ray Train, directly        (no local copy)
    served/v<N>/model.pt          ModelRegistry              at promotion
    decisions.jsonl, alarms.jsonl ModelRegistry              each record (``LogMirror``: the newest
                                                             part of 1,000 lines, <name>.parts/NNNNNNNN)
    hold.json                     ModelRegistry              each change of a drift alarm's hold
    buffer_snapshot.json          ReplayBufferActor          each snapshot
    manifest.sqlite               driver (SQLite backup)     every storage.sync_interval_s, at stop
    wandb_run_id                  Tracker                    at start
    ray_train_at                  make_trainer               (local only: where ray_train/ was)

Objects are written whole (S3 PUTs are atomic per object), so a reader sees
an old or a new copy, never half of one.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Callable, Iterable, TextIO

import pyarrow.fs as pafs

from livetrain.config import ConfigError, StorageConfig, s3_bucket_path

TRAIN_DIR = "ray_train"
"""Ray Train's storage under the URI (checkpoints); never mirrored locally."""
LOG_PART_LINES = 1000
"""Lines of a JSON-lines log per object on the store (``LogMirror``)."""
PARTS = ".parts"
TRAIN_RUN = "livetrain"
"""Ray Train's run name: its checkpoints are ``<storage>/ray_train/livetrain/checkpoint_*``."""
TRAIN_AT = "ray_train_at"
"""A file in the state dir: where Ray Train kept its checkpoints last (``state_dir``
or ``<storage.uri>/ray_train``), so a run that would keep them elsewhere can tell."""


def filesystem(uri: str, endpoint: str | None = None, region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a URI or a local path."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    if uri.startswith("s3://"):
        bucket_path = s3_bucket_path(uri, "storage")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region), bucket_path
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:
        raise ConfigError(f"storage: cannot open {uri!r}: {e}") from e


class Store:
    """The mirror of one state directory at ``storage.uri``.

    Picklable (it travels to the buffer and registry actors): only the config
    crosses; each process opens its own filesystem client on first use.
    """

    def __init__(self, cfg: StorageConfig) -> None:
        if cfg.uri is None:
            raise ValueError("Store needs storage.uri")
        self.cfg = cfg
        self._fs: pafs.FileSystem | None = None
        self._root = ""

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Store | None:
        return None if cfg.uri is None else cls(cfg)

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def __repr__(self) -> str:
        return f"Store({self.cfg.uri!r})"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs, self._root = filesystem(self.cfg.uri, self.cfg.endpoint, self.cfg.region)
        return self._fs

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` under the URI."""
        _ = self.fs  # the first use resolves the URI, and with it ``self._root``
        return f"{self._root}/{rel}" if rel else self._root

    def check(self) -> None:
        """Fail early, naming the URI, when the store cannot be reached or written."""
        try:
            info = self.fs.get_file_info(self.path(""))
            if info.type == pafs.FileType.File:
                raise ConfigError(f"storage.uri {self.cfg.uri!r} is a file, not a directory or prefix")
            self.put_bytes(".livetrain", b"livetrain state\n")
        except ConfigError:
            raise
        except OSError as e:
            raise ConfigError(f"storage.uri {self.cfg.uri!r}: cannot write there: {e}") from e

    def ray_train(self) -> tuple[str, pafs.FileSystem]:
        """``RunConfig(storage_path=..., storage_filesystem=...)`` for Ray Train."""
        return self.path(TRAIN_DIR), self.fs

    # --- objects -----------------------------------------------------------------

    def put_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if isinstance(self.fs, pafs.LocalFileSystem):
            # local or a shared mount: temp file + rename, so readers never see half a file
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=Path(path).parent, prefix=".tmp-", delete=False) as f:
                f.write(data)
            os.replace(f.name, path)
            return
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def put_file(self, local: str | Path, rel: str) -> None:
        self.put_bytes(rel, Path(local).read_bytes())

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def delete(self, rel: str) -> None:
        """Remove ``rel`` from the store; already gone is fine."""
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` (relative paths, sorted), Ray Train's excepted."""
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        root = self.path("") + "/"
        out = []
        for info in self.fs.get_file_info(selector):
            rel = info.path[len(root):] if info.path.startswith(root) else info.path
            if info.type == pafs.FileType.File and not rel.startswith(TRAIN_DIR + "/") and not rel.split("/")[-1].startswith("."):
                out.append(rel)
        return sorted(out)

    def restore(self, state_dir: str | Path, only: Iterable[str] | None = None) -> list[str]:
        """Download what the store holds and ``state_dir`` lacks; the names fetched.

        A file already in ``state_dir`` is newer than (or the same as) its
        copy: it is never overwritten. ``only``: relative names or prefixes.
        """
        state = Path(state_dir)
        wanted = None if only is None else tuple(only)
        files, logs = [], {}  # a log mirrored in parts (LogMirror) is put together again, never fetched whole
        for rel in self.list():
            head, _, part = rel.rpartition("/")
            if head.endswith(PARTS) and part.isdigit():
                logs.setdefault(head.removesuffix(PARTS), []).append(rel)
            else:
                files.append(rel)
        fetched = []
        for rel in [*(f for f in files if f not in logs), *logs]:
            if wanted is not None and not any(rel == w or rel.startswith(w.rstrip("/") + "/") for w in wanted):
                continue
            target = state / rel
            if target.exists():
                continue
            chunks = [self.get_bytes(p) for p in logs.get(rel, [rel])]  # listed sorted: parts in order
            if any(c is None for c in chunks):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.restore")
            tmp.write_bytes(b"".join(chunks))
            os.replace(tmp, target)
            fetched.append(rel)
        return fetched

    def push_sqlite(self, backup: Callable[[sqlite3.Connection], None], rel: str) -> None:
        """A consistent copy of a live SQLite database: ``backup(target)`` runs
        SQLite's online backup into ``target`` (e.g. ``Manifest.backup``)."""
        with tempfile.TemporaryDirectory() as d:
            copy = sqlite3.connect(Path(d) / "copy.sqlite")
            try:
                backup(copy)
            finally:
                copy.close()
            self.put_file(Path(d) / "copy.sqlite", rel)


class LogMirror:
    """A JSON-lines log mirrored to a ``Store`` in parts of ``LOG_PART_LINES`` lines
    (``<rel>.parts/00000000``, ...): a push uploads only the part the new lines went
    into (and one they completed), so a log that grows for months costs the same to
    push at every record. ``Store.restore`` puts the parts together again."""

    def __init__(self, store: Store, local: Path, rel: str) -> None:
        self.store, self.rel = store, rel
        text = local.read_text() if local.exists() else ""
        lines = [line if line.endswith("\n") else line + "\n" for line in text.splitlines(keepends=True)]
        n = LOG_PART_LINES
        self._part, self._tail = len(lines) // n, lines[len(lines) // n * n :]
        have = set(store.list(rel + PARTS))
        for i in range(self._part):  # a log pushed whole before, or parts the store lost: once, at start
            if self._name(i) not in have:
                store.put_bytes(self._name(i), "".join(lines[i * n : (i + 1) * n]).encode())
        if self._tail:
            store.put_bytes(self._name(self._part), "".join(self._tail).encode())
        last = self._part if self._tail else self._part - 1  # the last part the local log fills
        for name in have:  # parts past its end (a store ahead of this state dir) would join it
            index = name.rpartition("/")[2]
            if index.isdigit() and int(index) > last:
                store.delete(name)
        if store.exists(rel):  # the whole copy an older livetrain pushed: the parts have it all now
            store.delete(rel)

    def _name(self, part: int) -> str:
        return f"{self.rel}{PARTS}/{part:08d}"

    def push(self, lines: list[str]) -> None:
        """``lines`` were just appended to the local log (each ending in a newline)."""
        for line in lines:
            self._tail.append(line)
            if len(self._tail) == LOG_PART_LINES:
                self.store.put_bytes(self._name(self._part), "".join(self._tail).encode())
                self._part, self._tail = self._part + 1, []
        if lines and self._tail:
            self.store.put_bytes(self._name(self._part), "".join(self._tail).encode())


# --- shard files: local paths or URIs (source.path = s3://bucket/landing) ------

_shard_storage = StorageConfig()
"""Endpoint and region for shard URIs in this process (``configure``)."""


def configure(cfg: StorageConfig) -> None:
    """Use ``cfg``'s endpoint and region for shard URIs opened in this process.

    Called by every process that reads shards (the driver, the ingest actors,
    the buffer when it rebuilds): one S3 endpoint serves both the state and the
    source, as on a cluster's object store.
    """
    global _shard_storage
    _shard_storage = cfg


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def shard_path(path: str | os.PathLike) -> str | Path:
    """A URI stays a string (``Path`` would fold ``s3://`` into ``s3:/``); a local path becomes a Path."""
    return str(path) if is_uri(path) else Path(path)


def shard_name(path: str | os.PathLike) -> str:
    """The file name: a shard's identity in the manifest."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else Path(path).name


def _shard_fs(path: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(path, _shard_storage.endpoint, _shard_storage.region)


def open_shard(path: str | os.PathLike):
    """Something ``pyarrow.parquet.ParquetFile`` reads: the path itself, or an open remote file."""
    if not is_uri(path):
        return path
    fs, inner = _shard_fs(str(path))
    return fs.open_input_file(inner)


def open_lines(path: str | os.PathLike, buffering: int = -1) -> TextIO:
    """``path`` opened to append lines (a JSON-lines log). A crash mid-write leaves a
    last line without its newline: it is ended first, else the next line joins the
    torn one and is lost with it."""
    f = open(path, "a", buffering=buffering)
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write("\n")
    return f


def shard_stat(path: str | os.PathLike) -> tuple[int, int]:
    """``(size, mtime_ns)``; FileNotFoundError when it is gone."""
    if not is_uri(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, inner = _shard_fs(str(path))
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(str(path))
    return info.size, info.mtime_ns or 0


def read_shard_chunks(path: str | os.PathLike, chunk_bytes: int = 1 << 20):
    """The file's bytes in chunks (for hashing and copying without holding it whole)."""
    if not is_uri(path):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(chunk_bytes):
                yield chunk
        return
    fs, inner = _shard_fs(str(path))
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


def list_parquet(directory: str) -> list[tuple[int, int, str, str]]:
    """``(mtime_ns, size, name, uri)`` of each ``*.parquet`` file directly under a URI."""
    fs, inner = _shard_fs(directory)
    scheme = directory.split("://", 1)[0]
    out = []
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"):
            out.append((info.mtime_ns or 0, info.size, info.base_name, f"{scheme}://{info.path}"))
    return out


def check_train_storage(state_dir: str | os.PathLike, store: Store | None) -> str:
    """Where this run's Ray Train keeps its checkpoints (what ``record_train_storage``
    writes). A ConfigError when there are none there but this state dir trained
    elsewhere before (``storage.uri`` added, removed or changed): Ray Train would
    find no checkpoint and training would silently start from scratch."""
    local = Path(state_dir).resolve() / TRAIN_DIR
    here = "state_dir" if store is None else f"{store.cfg.uri.rstrip('/')}/{TRAIN_DIR}"
    fs, path = (pafs.LocalFileSystem(), str(local)) if store is None else (store.fs, store.path(TRAIN_DIR))
    if _has_checkpoint(fs, path):
        return here
    marker = Path(state_dir) / TRAIN_AT
    before = marker.read_text().strip() if marker.exists() else None
    if before in (None, "state_dir"):  # the state dir: look (also one from before the marker)
        before = "state_dir" if store is not None and _has_checkpoint(pafs.LocalFileSystem(), str(local)) else None
    if before is None or before == here:
        return here
    where = {"state_dir": str(local)}
    afresh = f"{local}/{TRAIN_RUN}" if before == "state_dir" else str(marker)
    raise ConfigError(
        f"storage.uri: this state dir's training checkpoints are under {where.get(before, before)}/{TRAIN_RUN}, "
        f"but this run keeps them under {where.get(here, here)}/{TRAIN_RUN}, where there are none: training would "
        f"start from scratch. Copy that {TRAIN_RUN}/ folder there, or set storage.uri back, to go on where it "
        f"stopped; to start training afresh instead, delete {afresh}"
    )


def record_train_storage(state_dir: str | os.PathLike, here: str) -> None:
    """Note in the state dir where Ray Train keeps this run's checkpoints."""
    (Path(state_dir) / TRAIN_AT).write_text(here + "\n")


def _has_checkpoint(fs: pafs.FileSystem, train_path: str) -> bool:
    found = fs.get_file_info(pafs.FileSelector(f"{train_path}/{TRAIN_RUN}", allow_not_found=True))
    return any(info.base_name.startswith("checkpoint_") for info in found)
