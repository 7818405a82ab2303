"""Helpers shared by the integration tests."""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.25) -> T:
    """Poll ``cond`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval_s)  # polling interval of a condition wait, not synchronisation
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, raw: bytes | None = None, ctype: str = "application/json", timeout: float = 10) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload)
        except ValueError:
            return e.code, payload.decode(errors="replace")


def arrow_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC stream of ``table`` (a bulk /predict body)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet file bytes (a bulk /predict body)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Credentials for the tests' local S3 server (moto accepts any)."""
