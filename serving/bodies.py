"""Request bodies of ``POST /predict`` -> a float32 [rows, features] array.

Pure (pyarrow, numpy; no Ray). Three content types:

- ``application/json``: ``{"instances": [[...], ...]}`` or rows as objects
  keyed by feature name (also the default when no content type is sent);
- ``application/vnd.apache.arrow.stream``: an Arrow IPC stream;
- ``application/x-parquet``: a Parquet file.

The bulk formats hold either one numeric column per feature (by name) or a
single list column of the full width. Every refusal is a ``BadRequest``
whose message names the problem and whose status is the HTTP answer.

Answers are JSON unless the request's ``Accept`` prefers an Arrow IPC
stream (``answer_type``): then ``encode_arrow`` writes one row per input row
(``predictions``, ``probabilities``) with the version in the schema metadata.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from livetrain.serving.predictor import FLOAT32_MAX, BadRequest, instances_to_array

JSON = "application/json"
ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/x-parquet"
CONTENT_TYPES = (JSON, ARROW, PARQUET)
_ALIASES = {"application/vnd.apache.parquet": PARQUET, "application/parquet": PARQUET}


@dataclass(frozen=True)
class Limits:
    max_instances: int
    """Rows in one JSON request."""
    max_bulk_rows: int
    """Rows in one Arrow or Parquet request."""
    max_body_bytes: int


def media_type(content_type: str | None) -> str:
    """The content type we read the body as (415 if none of ours)."""
    if not content_type:
        return JSON
    base = content_type.split(";", 1)[0].strip().lower()
    base = _ALIASES.get(base, base)
    if base == JSON or (base.startswith("application/") and base.endswith("+json")):
        return JSON
    if base in CONTENT_TYPES:
        return base
    raise BadRequest(f"unsupported content type {content_type[:80]!r}: send one of {', '.join(CONTENT_TYPES)}", 415)


def answer_type(accept: str | None) -> str:
    """``ARROW`` when ``Accept`` lists the Arrow stream type with a q-value at
    least that of JSON (and above 0); ``JSON`` otherwise, including no header."""
    if not accept or "arrow" not in accept.lower():
        return JSON
    q = {JSON: -1.0, ARROW: -1.0}
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        kind = kind.lower()
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if kind in q:
            q[kind] = max(q[kind], weight)
    return ARROW if q[ARROW] > 0 and q[ARROW] >= q[JSON] else JSON


def encode_arrow(labels: np.ndarray, probabilities: np.ndarray, version: int) -> bytes:
    """An Arrow IPC stream: ``predictions`` (int64), ``probabilities``
    (fixed-size list of float32, one per class); ``model_version`` in the
    schema metadata."""
    k = probabilities.shape[1]
    probs = pa.FixedSizeListArray.from_arrays(pa.array(probabilities.astype(np.float32, copy=False).reshape(-1)), k)
    schema = pa.schema(
        [pa.field("predictions", pa.int64()), pa.field("probabilities", probs.type)],
        metadata={"model_version": str(version)},
    )
    batch = pa.record_batch([pa.array(labels.astype(np.int64, copy=False)), probs], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def check_length(content_length: str | None, limits: Limits) -> None:
    """Refuse a declared oversized body before reading it."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise BadRequest(f"content-length {content_length[:40]!r} is not a number", 400) from None
    if n > limits.max_body_bytes:
        raise BadRequest(too_large_message(n, limits), 413)


def too_large_message(n: int | str, limits: Limits) -> str:
    return f"request body of {n} bytes is larger than {limits.max_body_bytes} (serve.max_body_bytes)"


def decode(raw: bytes, content_type: str | None, features: list[str], limits: Limits) -> np.ndarray:
    kind = media_type(content_type)
    if len(raw) > limits.max_body_bytes:
        raise BadRequest(too_large_message(len(raw), limits), 413)
    if kind == JSON:
        return decode_json(raw, features, limits.max_instances)
    return table_to_array(read_table(raw, kind, limits, features), features, limits.max_bulk_rows)


def decode_json(raw: bytes, features: list[str], max_instances: int) -> np.ndarray:
    if not raw.strip():
        raise BadRequest("empty body: send a JSON object with 'instances'", 400)
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadRequest(f"malformed JSON: not UTF-8 text ({e.reason} at byte {e.start})", 400) from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", 400) from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply", 400) from None
    except ValueError as e:  # Python's int-string limit (CVE-2020-10735): a plain ValueError
        raise BadRequest(f"JSON not read: {_digits(e)}", 400) from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object with 'instances', got a JSON {type(body).__name__}")
    if "instances" not in body:
        raise BadRequest("'instances' is missing: send {\"instances\": [[...], ...]}")
    return instances_to_array(body["instances"], features, max_instances)


def _digits(e: ValueError) -> str:
    """What the int-string limit refused, said to a client (not "use sys.set_int_max_str_digits")."""
    m = re.search(r"limit \((\d+) digits\).*value has (\d+) digits", str(e))
    if m is None:
        return _first_line(e)
    return f"a number of {m[2]} digits: integers may have at most {m[1]}"


def read_table(raw: bytes, kind: str, limits: Limits, features: list[str] | None = None) -> pa.Table:
    """The body as a table, its rows (and, compressed, its size) checked from the
    metadata first: a few KB of zstd can hold GBs of zeros. With ``features``, a
    Parquet file's columns are chosen and type-checked from its schema, and only
    those the model reads are decompressed: a column it never uses may hold GBs."""
    name = "Arrow IPC stream" if kind == ARROW else "Parquet file"
    if not raw:
        raise BadRequest(f"empty body: expected an {name}", 400)
    try:
        if kind == ARROW:
            _check_arrow_stream(pa.py_buffer(raw), limits)
            with pa.ipc.open_stream(pa.py_buffer(raw)) as reader:
                table = reader.read_all()
        else:
            f = pq.ParquetFile(pa.BufferReader(raw))
            if f.metadata.num_rows > limits.max_bulk_rows:
                raise _too_many_rows(f.metadata.num_rows, limits.max_bulk_rows)
            # only the schema and the row count: per-column sizes abort the process on corrupt files
            table = f.read(columns=None if features is None else feature_columns(f.schema_arrow, features))
        table.validate(full=True)  # offsets and lengths in bounds: a corrupt body fails here, not mid-conversion
        table.column_names  # noqa: B018 -- names that are not UTF-8 fail here too
        return table
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, struct.error) as e:
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(f"body is not a readable {name}: {_first_line(e)}", 400) from None


def _too_many_rows(n: int, max_rows: int) -> BadRequest:
    return BadRequest(f"too many rows: {n} > {max_rows} per request (serve.max_bulk_rows)", 413)


def _check_arrow_stream(buf: pa.Buffer, limits: Limits) -> None:
    """Rows and decompressed bytes of every batch, from the messages' metadata: no
    batch is decompressed. A compressed body may hold no more than an uncompressed
    one (``max_body_bytes``)."""
    rows = size = 0
    for message in pa.ipc.MessageReader.open_stream(pa.BufferReader(buf)):
        batch = _record_batch(message.metadata.to_pybytes())
        if batch is None:
            continue
        length, buffers, compressed = batch
        if message.type == "record batch":
            rows += length
        for offset, n in buffers:
            if compressed and n >= 8:
                declared = struct.unpack("<q", message.body[offset:offset + 8].to_pybytes())[0]
                n = n - 8 if declared == -1 else declared
            size += n
    if rows > limits.max_bulk_rows:
        raise _too_many_rows(rows, limits.max_bulk_rows)
    if size > limits.max_body_bytes:
        raise BadRequest(f"the Arrow stream decompresses to {size} bytes, more than {limits.max_body_bytes} "
                         "(serve.max_body_bytes)", 413)


def _record_batch(meta: bytes) -> tuple[int, list[tuple[int, int]], bool] | None:
    """(length, body buffers as (offset, length), compressed?) of an IPC message that
    carries a record batch (itself or a dictionary's), from its flatbuffer (Arrow's
    Message.fbs); None for other messages."""
    message = _fb_table(meta, struct.unpack_from("<I", meta, 0)[0])
    kind, header = message(1), message(2)
    if kind is None or header is None:
        return None
    header = _fb_ref(meta, header)
    if meta[kind] == 2:  # DictionaryBatch: its data is a RecordBatch
        data = _fb_table(meta, header)(1)
        if data is None:
            return None
        header = _fb_ref(meta, data)
    elif meta[kind] != 3:  # not a RecordBatch (the schema)
        return None
    batch = _fb_table(meta, header)
    length = struct.unpack_from("<q", meta, batch(0))[0] if batch(0) is not None else 0
    buffers = []
    if batch(2) is not None:
        vec = _fb_ref(meta, batch(2))
        (count,) = struct.unpack_from("<I", meta, vec)
        buffers = [struct.unpack_from("<qq", meta, vec + 4 + 16 * i) for i in range(count)]
    return length, buffers, batch(3) is not None


def _fb_table(buf: bytes, pos: int) -> Callable[[int], int | None]:
    """A flatbuffer table at ``pos``: field index -> the field's position, or None if absent."""
    vtable = pos - struct.unpack_from("<i", buf, pos)[0]
    vsize = struct.unpack_from("<H", buf, vtable)[0]

    def field(i: int) -> int | None:
        at = 4 + 2 * i
        off = struct.unpack_from("<H", buf, vtable + at)[0] if at < vsize else 0
        return pos + off if off else None

    return field


def _fb_ref(buf: bytes, pos: int) -> int:
    """Follow the offset stored at ``pos`` (a table or vector field)."""
    return pos + struct.unpack_from("<I", buf, pos)[0]


def feature_columns(schema: pa.Schema, features: list[str]) -> list[str]:
    """The columns that hold the features, chosen and checked from the schema alone:
    one numeric column per feature (by name), else the one list column of numbers."""
    names = schema.names
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise BadRequest(f"columns {twice[:10]} appear more than once: send each column once")
    if all(f in names for f in features):
        for f in features:
            _check_number_type(schema.field(f).type, f)
        return list(features)
    lists = [n for n in names if _is_list(schema.field(n).type)]
    if len(lists) != 1:
        missing = [f for f in features if f not in names]
        raise BadRequest(f"missing feature columns {missing[:10]} (or one list column of width {len(features)}); got columns {names[:10]}")
    _check_list_type(schema.field(lists[0]).type, lists[0], len(features))
    return lists


def _check_number_type(tp: pa.DataType, name: str) -> None:
    if not (pa.types.is_floating(tp) or pa.types.is_integer(tp)):
        raise BadRequest(f"column {name!r} is {tp}, expected a number type")


def _check_list_type(tp: pa.ListType, name: str, d: int) -> None:
    if pa.types.is_fixed_size_list(tp) and tp.list_size != d:
        raise BadRequest(f"column {name!r} has {tp.list_size} features per row, expected {d}")
    values = tp.value_type
    if not (pa.types.is_floating(values) or pa.types.is_integer(values)):
        raise BadRequest(f"column {name!r} holds {values}, expected numbers")


def table_to_array(table: pa.Table, features: list[str], max_rows: int) -> np.ndarray:
    """Feature columns (by name) or one list column -> float32 [n, d], checked."""
    if table.num_rows == 0:
        raise BadRequest("the table has no rows: send at least one")
    if table.num_rows > max_rows:
        raise _too_many_rows(table.num_rows, max_rows)
    columns = feature_columns(table.schema, features)
    if columns == features:
        x = np.empty((table.num_rows, len(features)), dtype=np.float32)
        for j, f in enumerate(features):
            x[:, j] = _numeric_column(table.column(f), f)
    else:
        x = _list_column(table.column(columns[0]), columns[0], len(features))
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise BadRequest(f"row {int(np.argmax(bad))}: a feature is NaN or infinite ({int(bad.sum())} such rows)")
    return x


def _is_list(tp: pa.DataType) -> bool:
    return pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp)


def _numeric_column(col: pa.ChunkedArray, name: str) -> np.ndarray:
    """A feature column whose type ``feature_columns`` checked, as float64."""
    if col.null_count:
        raise BadRequest(f"column {name!r} has {col.null_count} null values")
    a = col.to_numpy().astype(np.float64, copy=False)
    if (np.abs(a[np.isfinite(a)]) > FLOAT32_MAX).any():
        raise BadRequest(f"column {name!r} has values out of float32 range")
    return a


def _list_column(col: pa.ChunkedArray, name: str, d: int) -> np.ndarray:
    """The list column ``feature_columns`` chose (value type and fixed width checked) -> [n, d]."""
    arr = col.combine_chunks()
    if arr.null_count:
        raise BadRequest(f"column {name!r} has {arr.null_count} null rows")
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != d).any():
            i = int(np.argmax(lengths != d))
            raise BadRequest(f"row {i} of column {name!r} has {int(lengths[i])} features, expected {d}")
    values = arr.flatten()
    if values.null_count:
        raise BadRequest(f"column {name!r} has {values.null_count} null features")
    v = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    if (np.abs(v[np.isfinite(v)]) > FLOAT32_MAX).any():
        raise BadRequest(f"column {name!r} has values out of float32 range")
    return v.astype(np.float32).reshape(len(arr), d)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
