"""Read one Parquet shard and split it into good rows and quarantined rows.

Pure: pyarrow and numpy only, no Ray. An ingest actor reads a shard in
parts (``iter_reads``); ``read_and_validate`` reads one whole (tools, tests).
Both split rows alike.

Two kinds of failure:

* **whole-shard** (``ValidatedShard.error`` set, ``x``/``y`` empty): the file
  is not Parquet, is truncated or corrupt, has zero rows, lacks a schema
  column, has a column the schema does not declare, has a column of the
  wrong type, or a feature list of the wrong width. Nothing in it is trusted;
  the file is quarantined as it is.
* **per row** (``ValidatedShard.bad``): a null feature, a NaN, an infinity, a
  null label, a label outside ``schema.classes``, or a null id. Good rows are kept, in
  file order; each bad row gets one reason (the first in ``REASONS`` order).

Type rules: feature columns (or the list's values) may be any float or
integer type and are cast to float32; a float64 value beyond float32's range
becomes inf and is quarantined as such. The label must be an integer type:
float labels are a type error even when every value is integral, because a
float label column almost always means an upstream bug (a join that
introduced nulls, a pandas round trip). A feature list may be a
``fixed_size_list`` of the declared width or a variable ``list`` whose every
non-null entry has that width; any other width fails the whole shard.

With ``schema.infer`` the features come from the first shard that fits
(``infer_schema``: numeric columns or one list column beside the label and id);
``actors/schema_pin.py`` pins the result in the manifest.

Work is vectorised over record batches (``ParquetFile.iter_batches``), so
memory beyond the output is one batch; the output block is preallocated from
the footer's row count and filled in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from livetrain.config import SchemaConfig
from livetrain.storage import is_uri, open_shard

NULL_FEATURE = "null feature"
NAN_FEATURE = "nan feature"
INF_FEATURE = "inf feature"
NULL_LABEL = "null label"
UNKNOWN_LABEL = "label not in classes"
NULL_ID = "null id"
REASONS = (NULL_FEATURE, NAN_FEATURE, INF_FEATURE, NULL_LABEL, UNKNOWN_LABEL, NULL_ID)
"""Per-row quarantine reasons, in priority order (a row gets the first that applies)."""

REASON_COLUMN = "reason"
BATCH_BYTES = 32 * 2**20
"""Feature bytes (as float64) per record batch read: bounds the working memory
besides the output. Larger batches read faster; 32 MiB is ~200k rows of 20 features."""


class SchemaError(ValueError):
    """A shard cannot be used at all; the message says why (and names columns)."""


@dataclass
class ValidatedShard:
    """One shard, split: good rows as a block, bad rows with reasons."""

    x: np.ndarray
    """float32 [n_good, d], C-contiguous, rows in file order."""
    y: np.ndarray
    """int64 [n_good]."""
    bad: pa.Table | None = None
    """The bad rows (the schema's columns) plus a string ``reason`` column."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Reason -> number of rows."""
    error: str | None = None
    """Why the whole shard was rejected; None when it was readable."""

    @property
    def good_rows(self) -> int:
        return len(self.y)

    @property
    def bad_rows(self) -> int:
        return 0 if self.bad is None else self.bad.num_rows



def read_and_validate(path: str | Path, schema: SchemaConfig) -> ValidatedShard:
    """Read ``path`` and validate it against ``schema``; never raises for bad data."""
    d = int(schema.num_features)
    try:
        pf = pq.ParquetFile(open_shard(path))
    except (pa.ArrowException, OSError) as e:
        return _rejected(d, f"not a readable parquet file: {_first_line(e)}")
    try:
        check_schema(pf.schema_arrow, schema)
        if pf.metadata.num_rows == 0:
            raise SchemaError("zero rows")
        return _read_rows(pf, schema)
    except SchemaError as e:
        return _rejected(d, str(e))
    except (pa.ArrowException, OSError) as e:  # corrupt pages, truncated row groups
        return _rejected(d, f"unreadable parquet data: {_first_line(e)}")
    finally:
        pf.close()


def check_schema(arrow_schema: pa.Schema, schema: SchemaConfig) -> None:
    """Raise ``SchemaError`` unless the file's columns are exactly the schema's, with usable types."""
    names = arrow_schema.names
    expected = _columns(schema)
    missing = [c for c in expected if c not in names]
    if missing:
        raise SchemaError(f"missing columns: {missing}")
    extra = [c for c in names if c not in expected]
    if extra:
        raise SchemaError(f"extra columns: {extra}")
    if len(set(names)) != len(names):
        raise SchemaError(f"duplicate column names: {names}")
    for name in schema.features or []:
        _check_numeric(name, arrow_schema.field(name).type)
    if schema.feature_list_column is not None:
        list_type = arrow_schema.field(schema.feature_list_column).type
        _check_list(schema.feature_list_column, list_type, schema)
    if schema.id_column is not None and not pa.types.is_integer(arrow_schema.field(schema.id_column).type):
        raise SchemaError(
            f"column {schema.id_column!r}: id has type {arrow_schema.field(schema.id_column).type}, "
            "expected an integer type"
        )
    label_type = arrow_schema.field(schema.label).type
    if not pa.types.is_integer(label_type):
        note = " (float labels are rejected even when integral)" if pa.types.is_floating(label_type) else ""
        raise SchemaError(
            f"column {schema.label!r}: label has type {label_type}, expected an integer type{note}"
        )


def infer_schema(path: str | Path, declared: SchemaConfig) -> SchemaConfig:
    """The schema ``path`` defines under ``declared`` (``infer: true``); ``SchemaError`` if it does not fit.

    Rules: the file is readable Parquet with rows; ``declared.label`` (and
    ``id_column`` if declared) are integer columns; every other column is a
    feature: all numeric scalars (features in file order), or exactly one list
    of numbers whose width is fixed by its type or, for a variable list, by its
    first record batch. The first record batch must then validate with at
    least one good row, so an all-bad shard never defines the schema.
    """
    try:
        pf = pq.ParquetFile(open_shard(path))
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"not a readable parquet file: {_first_line(e)}") from None
    try:
        if pf.metadata.num_rows == 0:
            raise SchemaError("zero rows")
        arrow = pf.schema_arrow
        taken = [declared.label, *([declared.id_column] if declared.id_column else [])]
        missing = [c for c in taken if c not in arrow.names]
        if missing:
            raise SchemaError(f"missing columns: {missing}")
        rest = [f for f in arrow if f.name not in taken]
        if not rest:
            raise SchemaError("no feature columns besides the label and id")
        if len(rest) == 1 and _is_list(rest[0].type):
            width = _list_width(pf, rest[0])
            found = {"feature_list_column": rest[0].name, "num_features": width}
        else:
            odd = [f"{f.name!r} ({f.type})" for f in rest if not _is_number(f.type)]
            if odd:
                raise SchemaError(f"columns neither numeric features nor one list column: {', '.join(odd)}")
            found = {"features": [f.name for f in rest]}
        inferred = dataclasses.replace(declared, infer=False, **found)
        check_schema(arrow, inferred)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"unreadable parquet data: {_first_line(e)}") from None
    finally:
        pf.close()
    parts = iter_parts(path, inferred, 4096)
    try:
        first = next(parts)
    finally:
        parts.close()
    if first.good_rows == 0:
        raise SchemaError(f"no good row in its first {first.row_end} rows: {first.reasons}")
    return inferred


def _is_number(tp: pa.DataType) -> bool:
    return pa.types.is_floating(tp) or pa.types.is_integer(tp)


def _is_list(tp: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(tp) or pa.types.is_list(tp) or pa.types.is_large_list(tp)


def _list_width(pf: pq.ParquetFile, fld: pa.Field) -> int:
    if pa.types.is_fixed_size_list(fld.type):
        return fld.type.list_size
    batch = next(pf.iter_batches(batch_size=4096, columns=[fld.name]))
    lengths = pc.drop_null(pc.list_value_length(batch.column(0))).to_numpy(zero_copy_only=False)
    widths = sorted({int(w) for w in np.unique(lengths)})
    if len(widths) != 1 or widths[0] < 1:
        raise SchemaError(f"column {fld.name!r}: list widths {widths} in the first rows; need one width >= 1")
    return widths[0]


def _columns(schema: SchemaConfig) -> list[str]:
    features = schema.features if schema.features is not None else [schema.feature_list_column]
    ids = [schema.id_column] if schema.id_column is not None else []
    return [*features, schema.label, *ids]


def _check_numeric(name: str, tp: pa.DataType) -> None:
    if not (pa.types.is_floating(tp) or pa.types.is_integer(tp)):
        raise SchemaError(f"column {name!r}: type {tp}, expected a float or integer type")


def _check_list(name: str, tp: pa.DataType, schema: SchemaConfig) -> None:
    if pa.types.is_fixed_size_list(tp):
        if tp.list_size != schema.num_features:
            raise SchemaError(
                f"column {name!r}: wrong list width {tp.list_size}, expected {schema.num_features}"
            )
    elif not (pa.types.is_list(tp) or pa.types.is_large_list(tp)):
        raise SchemaError(f"column {name!r}: type {tp}, expected a list of {schema.num_features} floats")
    _check_numeric(f"{name}[]", tp.value_type)


# --- the row pass --------------------------------------------------------------


def _read_rows(pf: pq.ParquetFile, schema: SchemaConfig) -> ValidatedShard:
    d = int(schema.num_features)
    total = pf.metadata.num_rows
    x = np.empty((total, d), dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    classes = np.asarray(sorted(schema.classes), dtype=np.int64)
    counts = np.zeros(len(REASONS), dtype=np.int64)
    bad_parts: list[pa.Table] = []
    read = kept = 0
    batch_rows = min(max(BATCH_BYTES // (8 * d), 4096), 1 << 20)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=_columns(schema)):
        n = batch.num_rows
        if read + n > total:
            raise SchemaError(f"more rows than the footer declares ({total})")
        xb = x[read : read + n]
        code = _fill_features(batch, schema, xb)
        _check_label(batch.column(schema.label), classes, code, y[read : read + n])
        _check_ids(batch, schema, code)
        bad = code < len(REASONS)
        nbad = int(np.count_nonzero(bad))
        if nbad:
            counts += np.bincount(code[bad], minlength=len(REASONS))[: len(REASONS)]
            bad_parts.append(_bad_table(batch, bad, code))
            good = np.flatnonzero(~bad)
            # take() copies before the write (overlap is safe) and beats a boolean index ~2x
            x[kept : kept + n - nbad] = xb.take(good, axis=0)
            y[kept : kept + n - nbad] = y[read : read + n].take(good)
        elif kept != read:
            x[kept : kept + n] = xb
            y[kept : kept + n] = y[read : read + n]
        read += n
        kept += n - nbad
    if read != total:
        raise SchemaError(f"read {read} rows, the footer declares {total}")
    return ValidatedShard(
        x=_shrink(x, kept),
        y=_shrink(y, kept),
        bad=pa.concat_tables(bad_parts) if bad_parts else None,
        reasons={r: int(c) for r, c in zip(REASONS, counts) if c},
        error=None,
    )


def _fill_features(batch: pa.RecordBatch, schema: SchemaConfig, out: np.ndarray) -> np.ndarray:
    """Write the batch's features into ``out`` (float32 [n, d]); return per-row reason codes.

    Code ``len(REASONS)`` means good so far; lower codes index ``REASONS``.
    """
    n = batch.num_rows
    code = np.full(n, len(REASONS), dtype=np.int8)
    null_rows = np.zeros(n, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float32 overflow becomes inf
        if schema.features is not None:
            columns = []
            for name in schema.features:
                col = batch.column(name)
                if col.null_count:
                    null_rows |= _is_null(col)
                columns.append(col.to_numpy(zero_copy_only=False))
            _interleave(columns, out)
        else:
            values, list_nulls = _list_values(batch.column(schema.feature_list_column), schema)
            null_rows |= list_nulls
            out[...] = values
        rows = _nonfinite_rows(out)
    if rows.size:
        block = out[rows]
        code[rows[np.isinf(block).any(axis=1)]] = REASONS.index(INF_FEATURE)
        code[rows[np.isnan(block).any(axis=1)]] = REASONS.index(NAN_FEATURE)
    code[null_rows] = REASONS.index(NULL_FEATURE)
    return code


INTERLEAVE_ROWS = 8192
"""Rows per pass of ``_interleave``: its staging buffer (d x this, float32) stays in cache."""


def _interleave(columns: list[np.ndarray], out: np.ndarray) -> None:
    """``out[:, j] = columns[j]`` for every j, ~3x faster than that loop.

    Writing a column into a row-major block touches every cache line of the
    block once per column (a 4-byte store every ``4 * d`` bytes), so ``d``
    passes over it. Instead, a few thousand rows at a time: the columns are
    copied into a [d, rows] staging buffer (contiguous copies), and one
    transposed copy writes those rows of ``out`` in order. Casts (float64 or
    integers to float32) happen in the first copy, as in the plain loop.
    """
    n = out.shape[0]
    staged = np.empty((len(columns), min(n, INTERLEAVE_ROWS)), dtype=out.dtype)
    for lo in range(0, n, INTERLEAVE_ROWS):
        hi = min(lo + INTERLEAVE_ROWS, n)
        for j, col in enumerate(columns):
            staged[j, : hi - lo] = col[lo:hi]
        out[lo:hi] = staged[:, : hi - lo].T


def _nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``block`` holding a NaN or an inf.

    A per-row ``isfinite(...).all(axis=1)`` costs ~8x a whole-block check, so:
    whole block first (``all``: no negated copy and count, ~0.3 against ~0.5 ms
    per 65,536 x 20); then candidate rows from row sums (NaN and inf propagate
    through a sum; an overflowing sum only adds a candidate that the caller's
    exact check drops); then a count confirms the candidates hold every
    non-finite value, else the slow exact path. The row sums are a BLAS call,
    made only for a block with a bad value: on every block, BLAS threads
    spinning between calls cost more CPU than the sums save.
    """
    if np.isfinite(block).all():
        return np.empty(0, dtype=np.intp)
    rows = np.flatnonzero(~np.isfinite(block @ np.ones(block.shape[1], dtype=block.dtype)))
    if np.count_nonzero(~np.isfinite(block[rows])) != np.count_nonzero(~np.isfinite(block)):
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
    return rows


def _list_values(col: pa.Array, schema: SchemaConfig) -> tuple[np.ndarray, np.ndarray]:
    """A list column as a [n, d] array (nulls as NaN) and the rows holding any null."""
    d = int(schema.num_features)
    n = len(col)
    if not pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        widths = np.unique(lengths[~np.isnan(lengths)] if lengths.dtype.kind == "f" else lengths)
        if widths.size and not (widths.size == 1 and widths[0] == d):
            found = sorted(int(w) for w in widths)
            raise SchemaError(
                f"column {schema.feature_list_column!r}: wrong list width {found}, expected {d}"
            )
        col = col.cast(pa.list_(col.type.value_type, d))
    # .values ignores the array's offset and keeps the slots of null lists: slice it ourselves.
    flat = col.values.slice(col.offset * d, n * d)
    null_rows = _is_null(col) if col.null_count else np.zeros(n, dtype=bool)
    if flat.null_count:
        null_rows |= _is_null(flat).reshape(n, d).any(axis=1)
    return flat.to_numpy(zero_copy_only=False).reshape(n, d), null_rows


def _check_label(col: pa.Array, classes: np.ndarray, code: np.ndarray, out: np.ndarray) -> None:
    """Write labels into ``out`` (int64); mark null / unknown labels in ``code`` if still good."""
    still_good = code == len(REASONS)
    if col.null_count:
        nulls = _is_null(col)
        code[nulls & still_good] = REASONS.index(NULL_LABEL)
        still_good &= ~nulls
        col = pc.fill_null(col, pa.scalar(0, col.type))  # any value: these rows are already bad
    raw = col.to_numpy(zero_copy_only=False)
    # Membership on the raw dtype, before the cast: a huge uint64 must not wrap into a class.
    code[~_known_labels(raw, classes) & still_good] = REASONS.index(UNKNOWN_LABEL)
    out[:] = raw  # wraps only for values already marked unknown


def _known_labels(raw: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Whether each label is one of ``classes`` (sorted and distinct, as ``schema.classes``
    must be: with a repeat, a gap could pass for a run), on the labels' own dtype.

    Integer labels and classes that are one run of integers (``0..k-1``, the
    usual case) need only two comparisons: ~0.06 ms per 65,536 labels against
    ~1.2 ms for ``np.isin``, which the rest still take.
    """
    lo, hi = int(classes[0]), int(classes[-1])
    if raw.dtype.kind in "iu" and hi - lo + 1 == len(classes):
        return (raw >= lo) & (raw <= hi)
    return np.isin(raw, classes)


def _is_null(arr: pa.Array) -> np.ndarray:
    return arr.is_null().to_numpy(zero_copy_only=False)


def _bad_table(batch: pa.RecordBatch, bad: np.ndarray, code: np.ndarray) -> pa.Table:
    rows = pa.Table.from_batches([batch]).filter(pa.array(bad))
    reasons = np.asarray(REASONS, dtype=object)[code[bad]]
    return rows.append_column(REASON_COLUMN, pa.array(reasons, type=pa.string()))


def _shrink(a: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` rows; copied when most of the buffer would otherwise be dead weight."""
    if n == len(a):
        return a
    return a[:n].copy() if n < len(a) * 7 // 8 else a[:n]


def _rejected(d: int, error: str) -> ValidatedShard:
    return ValidatedShard(
        x=np.empty((0, d), dtype=np.float32),
        y=np.empty(0, dtype=np.int64),
        bad=None,
        reasons={},
        error=error,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def warm_up() -> None:
    """Pay pyarrow's lazy imports now: its first array conversion imports pandas
    when installed (~0.7 s here), which would otherwise land on the first shard."""
    pa.array(np.zeros(1)).to_numpy(zero_copy_only=False)


# --- streaming by parts ----------------------------------------------------------


@dataclass
class Part:
    """One record batch of a shard, validated: its good rows become one buffer block."""

    row_start: int
    """File row index of the batch's first row (good or bad)."""
    row_end: int
    """One past the batch's last file row."""
    x: np.ndarray
    y: np.ndarray
    """Labels as read (declared values, not class indices)."""
    ids: np.ndarray | None
    """int64 row ids when ``schema.id_column`` is set."""
    bad: pa.Table | None
    reasons: dict[str, int]
    kept: np.ndarray | None = None
    """Batch-relative indices of the good rows; None when every row was good."""

    @property
    def good_rows(self) -> int:
        return len(self.y)

    def from_row(self, row: int) -> Part:
        """The good rows at file row ``row`` or later (bad rows stay with the whole part)."""
        return self.between(row, self.row_end)

    def between(self, lo: int, hi: int) -> Part:
        """The good rows at file rows ``[lo, hi)`` within this part (bad rows stay with the whole part).

        Views, not copies: good rows keep file order, so those in a row range are
        contiguous in ``x``, ``y`` and ``ids``."""
        lo, hi = max(lo, self.row_start), min(hi, self.row_end)
        if (lo, hi) == (self.row_start, self.row_end):
            return self
        where = np.arange(self.row_end - self.row_start) if self.kept is None else self.kept
        a, b = np.searchsorted(where, [lo - self.row_start, max(lo, hi) - self.row_start])
        return Part(lo, max(lo, hi), self.x[a:b], self.y[a:b], None if self.ids is None else self.ids[a:b],
                    self.bad, self.reasons, where[a:b] - (lo - self.row_start))

    def split(self, part_rows: int) -> list[Part]:
        """This part cut every ``part_rows`` file rows (views); its bad rows go with the first."""
        cuts = range(self.row_start, self.row_end, part_rows)
        out = [self.between(lo, lo + part_rows) for lo in cuts]
        return [out[0]] + [dataclasses.replace(p, bad=None, reasons={}) for p in out[1:]]

    @staticmethod
    def join(parts: list[Part]) -> Part:
        """Adjacent parts (file rows in order, no gap) as one; their bad rows are not carried."""
        if len(parts) == 1:
            return parts[0]
        lo = parts[0].row_start
        kept = [(np.arange(p.row_end - p.row_start) if p.kept is None else p.kept) + (p.row_start - lo) for p in parts]
        ids = None if parts[0].ids is None else np.concatenate([p.ids for p in parts])
        return Part(lo, parts[-1].row_end, np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                    ids, None, {}, np.concatenate(kept))


def read_rows(part_rows: int, schema: SchemaConfig) -> int:
    """Rows ``iter_parts`` reads at once: as many whole parts as fit ``BATCH_BYTES``, at least one."""
    return part_rows * max(1, BATCH_BYTES // (part_rows * 8 * int(schema.num_features)))


def iter_parts(path: str | Path, schema: SchemaConfig, part_rows: int):
    """Validate ``path`` ``part_rows`` rows at a time (the last part may be shorter):
    ``iter_reads``, each read cut into parts (views of it)."""
    for read in iter_reads(path, schema, part_rows):
        yield from read.split(part_rows)


def iter_reads(path: str | Path, schema: SchemaConfig, part_rows: int):
    """Validate ``path`` one read at a time: each a ``Part`` of a whole multiple of
    ``part_rows`` file rows (``read_rows``; the last may be shorter).

    Whole-shard problems raise ``SchemaError`` (before the first read for the
    footer and columns; mid-file for corrupt pages), so a caller must treat the
    parts it already got as void when that happens. Part boundaries depend only
    on the file and ``part_rows``: reading again yields the same parts.

    The file is read several parts at a time (within ``BATCH_BYTES``) and each
    read validated at once: every record batch read costs ~2 ms of CPU on top
    of decoding its rows, so a 100k-row shard of 20 features read as one batch
    instead of two takes ~13.5 instead of ~16 ms; and an ingest actor sends
    the good rows of a read's parts to the object store as one object (a chunk,
    ``actors/ingest.py``). Record batches run across row groups, so the
    boundaries are those of reading ``part_rows`` at a time.
    """
    try:
        pf = pq.ParquetFile(open_shard(path))
    except (pa.ArrowException, OSError) as e:
        _raise_if_transient(path, e)
        raise SchemaError(f"not a readable parquet file: {_first_line(e)}") from None
    try:
        check_schema(pf.schema_arrow, schema)
        total = pf.metadata.num_rows
        if total == 0:
            raise SchemaError("zero rows")
        classes = np.asarray(sorted(schema.classes), dtype=np.int64)
        read = 0
        try:
            for batch in pf.iter_batches(batch_size=read_rows(part_rows, schema), columns=_columns(schema)):
                if read + batch.num_rows > total:
                    raise SchemaError(f"more rows than the footer declares ({total})")
                yield _validate_batch(batch, schema, classes, read)
                read += batch.num_rows
        except (pa.ArrowException, OSError) as e:  # corrupt pages, truncated row groups
            _raise_if_transient(path, e)
            raise SchemaError(f"unreadable parquet data: {_first_line(e)}") from None
        if read != total:
            raise SchemaError(f"read {read} rows, the footer declares {total}")
    finally:
        pf.close()


def _raise_if_transient(path: str | Path, e: BaseException) -> None:
    """Re-raise an I/O error reading a remote shard as it is, not as a ``SchemaError``:
    a reset connection or a throttled request says nothing of the file, so its reader
    fails and the shard is read again (``MAX_ATTEMPTS`` in ``actors/ingest.py``)
    rather than quarantined at once. (Arrow reports a bad footer as ``ArrowInvalid``;
    corrupt pages can surface as a plain ``OSError`` too, and are then quarantined
    after the retries.)"""
    if is_uri(path) and isinstance(e, OSError) and not isinstance(e, (pa.ArrowInvalid, FileNotFoundError)):
        raise e


def _check_ids(batch: pa.RecordBatch, schema: SchemaConfig, code: np.ndarray) -> np.ndarray | None:
    """int64 row ids (``schema.id_column``), a null one marked ``null id`` in ``code``."""
    if schema.id_column is None:
        return None
    col = batch.column(schema.id_column)
    if col.null_count:
        code[_is_null(col) & (code == len(REASONS))] = REASONS.index(NULL_ID)
        col = pc.fill_null(col, pa.scalar(0, col.type))
    return col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _validate_batch(batch: pa.RecordBatch, schema: SchemaConfig, classes: np.ndarray, start: int) -> Part:
    n = batch.num_rows
    x = np.empty((n, int(schema.num_features)), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    code = _fill_features(batch, schema, x)
    _check_label(batch.column(schema.label), classes, code, y)
    ids = _check_ids(batch, schema, code)
    bad = code < len(REASONS)
    if not bad.any():
        return Part(start, start + n, x, y, ids, None, {})
    good = np.flatnonzero(~bad)
    counts = np.bincount(code[bad], minlength=len(REASONS))[: len(REASONS)]
    return Part(
        start,
        start + n,
        x.take(good, axis=0),
        y.take(good),
        None if ids is None else ids.take(good),
        _bad_table(batch, bad, code),
        {r: int(c) for r, c in zip(REASONS, counts) if c},
        good,
    )
