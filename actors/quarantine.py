"""The quarantine: where bad rows and unusable shards go, with the reason.

Layout under ``<state_dir>/quarantine/``:

* ``<shard stem>.bad.parquet``: a shard's bad rows, its columns plus
  ``reason`` and ``source_shard``;
* ``whole/<shard name>`` + ``whole/<shard name>.reason.txt``: a shard rejected
  whole, copied as it was, and why (first line: the error; second: where it
  came from). In their own folder, so no shard name can take a bad-rows
  file's (state dirs from before it have them beside the bad rows: still read).

Every file is written to a temporary name in the same directory and renamed
into place, so a crash never leaves half a file under a real name; writing
the same shard again (after a crash and a retry) replaces it. Pure: no Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from livetrain.storage import read_shard_chunks, shard_path

QUARANTINE_DIR = "quarantine"
WHOLE_DIR = "whole"
BAD_ROWS_SUFFIX = ".bad.parquet"
REASON_SUFFIX = ".reason.txt"
SOURCE_COLUMN = "source_shard"


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined shard, or the bad rows of one."""

    shard: str
    """Name of the shard the entry came from."""
    path: Path
    """The bad-rows Parquet file, or the copy of the shard rejected whole."""
    rows: int | None
    """Rows quarantined; None for a shard rejected whole (it may not be readable)."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Reason -> rows; a whole-shard entry has its error with count 1."""
    error: str | None = None
    """Why the shard was rejected whole; None for a bad-rows entry."""


def quarantine_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / QUARANTINE_DIR


def write_quarantine(
    state_dir: str | Path,
    shard_name: str,
    bad: pa.Table | None,
    error: str | None,
    source_path: str | Path,
) -> Path | None:
    """Quarantine what ``read_and_validate`` rejected; return the file written, or None if nothing was bad.

    With ``error`` set the shard is rejected whole: the original file is copied
    (if it still exists) and ``<name>.reason.txt`` says why; the returned path is
    the copy, or the reason file when there was nothing to copy.
    """
    qdir = quarantine_dir(state_dir)
    qdir.mkdir(parents=True, exist_ok=True)
    if error is not None:
        (qdir / WHOLE_DIR).mkdir(exist_ok=True)
        return _quarantine_whole(qdir / WHOLE_DIR, shard_name, error, shard_path(source_path))
    if bad is None or bad.num_rows == 0:
        return None
    rows = bad.append_column(SOURCE_COLUMN, pa.array([shard_name] * bad.num_rows, pa.string()))
    target = qdir / f"{Path(shard_name).stem}{BAD_ROWS_SUFFIX}"
    with _atomic(target) as tmp:
        pq.write_table(rows, tmp)
    return target


def list_quarantine(state_dir: str | Path) -> list[QuarantineEntry]:
    """Everything in the quarantine, sorted by shard name (for ``livetrain quarantine``)."""
    qdir = quarantine_dir(state_dir)
    if not qdir.is_dir():
        return []
    entries = []
    for path in sorted(qdir.iterdir()):
        if path.name.startswith("."):  # an unfinished temporary file
            continue
        if path.name.endswith(BAD_ROWS_SUFFIX) and not path.with_name(path.name + REASON_SUFFIX).exists():
            entries.append(_bad_rows_entry(path))
        elif path.name.endswith(REASON_SUFFIX):  # a state dir from before whole/
            entries.append(_whole_shard_entry(path))
    if (qdir / WHOLE_DIR).is_dir():
        entries += [_whole_shard_entry(p) for p in (qdir / WHOLE_DIR).glob(f"*{REASON_SUFFIX}")]
    return sorted(entries, key=lambda e: e.shard)


# --- helpers ---------------------------------------------------------------------


def _quarantine_whole(qdir: Path, shard_name: str, error: str, source: Path | str) -> Path:
    copy = qdir / shard_name
    reason_file = qdir / f"{shard_name}{REASON_SUFFIX}"
    copied = True
    try:
        with _atomic(copy) as tmp, open(tmp, "wb") as out:
            for chunk in read_shard_chunks(source):  # local or s3://
                out.write(chunk)
    except FileNotFoundError:  # the source vanished; the reason alone still tells the story
        copied = False
    # The reason is written last: its presence means the entry is complete.
    with _atomic(reason_file) as tmp:
        tmp.write_text(f"{' '.join(error.split())}\nsource: {source}\n")
    return copy if copied else reason_file


def _bad_rows_entry(path: Path) -> QuarantineEntry:
    """The user edits these files (to fix rows before ``--reingest``): one they broke,
    or whose ``reason``/``source_shard`` columns they dropped, is still listed."""
    stem = path.name[: -len(BAD_ROWS_SUFFIX)]
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in ("reason", SOURCE_COLUMN) if c in names])
    except (pa.ArrowInvalid, OSError) as e:
        return QuarantineEntry(shard=stem, path=path, rows=0, reasons={f"unreadable: {' '.join(str(e).split())}": 0})
    if "reason" in names:
        reasons = {c["values"]: c["counts"] for c in pc.value_counts(table["reason"]).to_pylist()}
    else:
        reasons = {"(no reason column)": table.num_rows}
    sources = table[SOURCE_COLUMN] if SOURCE_COLUMN in names else []
    return QuarantineEntry(
        shard=sources[0].as_py() if len(sources) else stem,
        path=path,
        rows=table.num_rows,
        reasons=reasons,
    )


def _whole_shard_entry(reason_file: Path) -> QuarantineEntry:
    shard = reason_file.name[: -len(REASON_SUFFIX)]
    error = reason_file.read_text().splitlines()[0] if reason_file.stat().st_size else ""
    copy = reason_file.with_name(shard)
    return QuarantineEntry(
        shard=shard,
        path=copy if copy.exists() else reason_file,
        rows=None,
        reasons={error: 1},
        error=error,
    )


@contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- re-ingesting after the user fixed the cause -----------------------------------

REINGESTED_DIR = "reingested"
"""Quarantine entries that were re-ingested move here (kept, no longer listed)."""


def reingest(state_dir: str | Path, landing_dir: str | Path, entry: QuarantineEntry, manifest) -> str:
    """Send one quarantine entry through ingestion again; return what was done.

    * A shard rejected whole: ``landing/<name>`` is read again (replace it
      there with the fixed file; if it is gone, the quarantined copy, which you
      may fix in place, is put back first). The manifest gives it a new
      ``seq``; bytes identical to another shard make it a duplicate instead.
    * Bad rows of a shard: the rows of ``quarantine/<stem>.bad.parquet``
      (fix them in that file; drop rows you do not want) are written to
      ``landing/<stem>.reingest-<hash>.parquet`` without the ``reason`` and
      ``source_shard`` columns, a new shard validated like any other.

    Either way the entry then moves to ``quarantine/reingested/``. Idempotent:
    running it again after a crash neither loses nor repeats rows.
    """
    if "://" in str(landing_dir):
        raise ValueError(
            f"re-ingest writes the fixed shard into the landing directory; {landing_dir} is remote: "
            "upload the fixed file there under a new name instead"
        )
    qdir, landing = quarantine_dir(state_dir), Path(landing_dir)
    done = qdir / REINGESTED_DIR
    done.mkdir(parents=True, exist_ok=True)
    if entry.error is not None:
        target, kept = landing / entry.shard, entry.path.parent  # whole/ (or quarantine/, from before it)
        if not target.exists():
            copy = kept / entry.shard
            if not copy.exists():
                raise FileNotFoundError(f"{entry.shard}: not in {landing} and no quarantined copy")
            with _atomic(target) as tmp:
                shutil.copyfile(copy, tmp)
        rec = manifest.get(entry.shard)
        if rec is not None and rec.status == "quarantined":
            rec = manifest.reingest(entry.shard, target)
        for p in (kept / entry.shard, kept / f"{entry.shard}{REASON_SUFFIX}"):
            if p.exists():
                os.replace(p, done / p.name)
        return f"{entry.shard}: re-reading {target} (now {rec.status if rec else 'unknown'}, seq {rec.seq if rec else '-'})"
    table = pq.read_table(entry.path)
    table = table.drop_columns([c for c in ("reason", SOURCE_COLUMN) if c in table.column_names])
    digest = _table_digest(table)
    target = landing / f"{Path(entry.shard).stem}.reingest-{digest}.parquet"
    if not target.exists():
        with _atomic(target) as tmp:
            pq.write_table(table, tmp)
    os.replace(entry.path, done / entry.path.name)
    return f"{entry.shard}: {table.num_rows} rows re-ingested as {target.name}"


def _table_digest(table: pa.Table) -> str:
    import hashlib

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:10]
