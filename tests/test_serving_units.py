"""The serving logic without Ray: body decoding, version following, pinning,
auth. The registry is a hand-written fake."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from _util import arrow_bytes, parquet_bytes
from livetrain.config import ConfigError, ServeConfig
from livetrain.messages import ModelSpec, ServedVersion
from livetrain.serving import bodies
from livetrain.serving.auth import AuthError, BearerAuth, token_digest
from livetrain.serving.deployment import ray_env, replica_actor_options
from livetrain.serving.predictor import BadRequest, load_version, replica_device
from livetrain.serving.versions import PinnedVersions, VersionFollower, VersionGone
from livetrain.training.checkpoint import CheckpointError, state_dict_numpy
from livetrain.training.models import build_model

F = ["x0", "x1", "x2"]
LIMITS = bodies.Limits(max_instances=10, max_bulk_rows=100, max_body_bytes=10_000)
SPEC = ModelSpec("mlp", {"num_features": 3, "num_classes": 2, "hidden": [8]})


def weights(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return state_dict_numpy(build_model(SPEC))


def served(version: int, w: Any = None) -> ServedVersion:
    return ServedVersion(version, w if w is not None else ("ref", version), SPEC, version, 0.0, 1.0, {})


# --- request bodies ----------------------------------------------------------


def test_json_arrow_and_parquet_bodies_give_the_same_rows():
    x = np.array([[0.1, 0.2, 0.3], [1, 2, 3]], dtype=np.float32)
    table = pa.table({f: x[:, j] for j, f in enumerate(F)})
    from_json = bodies.decode(b'{"instances": [[0.1, 0.2, 0.3], {"x0": 1, "x1": 2, "x2": 3}]}', "application/json", F, LIMITS)
    from_arrow = bodies.decode(arrow_bytes(table), bodies.ARROW, F, LIMITS)
    from_parquet = bodies.decode(parquet_bytes(table), "application/x-parquet; charset=binary", F, LIMITS)
    as_list = pa.table({"features": pa.array(x.tolist(), type=pa.list_(pa.float32(), 3))})
    from_list = bodies.decode(arrow_bytes(as_list), bodies.ARROW, F, LIMITS)
    for a in (from_json, from_arrow, from_parquet, from_list):
        assert a.dtype == np.float32 and np.array_equal(a, x)


BAD_JSON = [
    (b'{"instances": [[0.1, 0.2]]}', 422, "has 2 features, expected 3"),
    (b'{"instances": [[0.1, "a", 0.3]]}', 422, "'a' is not a number"),
    (b'{"instances": [[0.1, null, 0.3]]}', 422, "None is not a number"),
    (b'{"instances": [[0.1, true, 0.3]]}', 422, "True is not a number"),
    (b'{"instances": [[0.1, NaN, 0.3]]}', 422, "not finite"),
    (b'{"instances": [[0.1, Infinity, 0.3]]}', 422, "not finite"),
    (b'{"instances": [[0.1, 1e39, 0.3]]}', 422, "out of float32 range"),
    (b'{"instances": [[0.1, 1' + b"0" * 400 + b', 0.3]]}', 422, "out of float32 range"),
    (b'{"instances": [[0.1, 1' + b"0" * 4300 + b', 0.3]]}', 400, "a number of 4301 digits"),  # past int()'s limit
    (b'{"instances": [{"x0": 1, "x1": 2}]}', 422, "missing features ['x2']"),
    (b'{"instances": [{"x0": 1, "x1": 2, "x2": 3, "y": 4}]}', 422, "unknown features ['y']"),
    (b'{"instances": []}', 422, "empty"),
    (b'{"instances": "rows"}', 422, "must be a list"),
    (b'{"instances": [3]}', 422, "expected a list of 3 numbers"),
    (b'{"rows": [[1, 2, 3]]}', 422, "'instances' is missing"),
    (b"[[1, 2, 3]]", 422, "must be a JSON object"),
    (b'{"instances": [[1, 2, 3]]', 400, "malformed JSON"),
    (b"{not json", 400, "malformed JSON"),
    (b"", 400, "empty body"),
    (b"\xff\xfe{}", 400, "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 413, "larger than"),
    (b'{"instances": [' + b"[1,2,3]," * 11 + b"[1,2,3]]}", 413, "too many instances: 12 > 10"),
]


@pytest.mark.parametrize("raw, status, message", BAD_JSON, ids=[m for _, _, m in BAD_JSON])
def test_bad_json_bodies_are_refused_naming_the_problem(raw, status, message):
    with pytest.raises(BadRequest) as e:
        bodies.decode(raw, "application/json", F, LIMITS)
    assert e.value.status == status and message in str(e.value)


def test_deeply_nested_json_is_a_400_not_a_crash():
    deep = b"[" * 5000 + b"]" * 5000
    with pytest.raises(BadRequest) as e:
        bodies.decode(deep, "application/json", F, bodies.Limits(10, 10, 1_000_000))
    assert e.value.status in (400, 422)


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"x0": [1.0], "x1": [2.0]}), "missing feature columns ['x2']"),
        (pa.table({"x0": [1.0], "x1": [2.0], "x2": ["a"]}), "column 'x2' is string"),
        (pa.table({"x0": [1.0], "x1": [2.0], "x2": pa.array([None], pa.float64())}), "1 null values"),
        (pa.table({"x0": [1.0], "x1": [2.0], "x2": [float("nan")]}), "row 0: a feature is NaN or infinite"),
        (pa.table({"x0": [1.0], "x1": [2.0], "x2": [1e300]}), "out of float32 range"),
        (pa.table({f: pa.array([], pa.float32()) for f in F}), "no rows"),
        (pa.table({"f": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))}), "has 2 features, expected 3"),
        (pa.table({f: np.zeros(101) for f in F}), "too many rows: 101 > 100"),
        (pa.Table.from_arrays([pa.array([1.0])] * 4, names=[*F, "x0"]), "columns ['x0'] appear more than once"),
    ],
)
def test_bad_bulk_tables_are_refused_naming_the_problem(table, message):
    for raw, kind in ((arrow_bytes(table), bodies.ARROW), (parquet_bytes(table), bodies.PARQUET)):
        with pytest.raises(BadRequest, match=None) as e:
            bodies.decode(raw, kind, F, LIMITS)
        assert message in str(e.value), (kind, str(e.value))


def compressed(kind: str, table: pa.Table, times: int) -> bytes:
    """``table`` written ``times`` over with zstd: a small body that reads as a large table."""
    sink = pa.BufferOutputStream()
    if kind == bodies.ARROW:
        with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            for _ in range(times):
                w.write_table(table)
    else:
        with pq.ParquetWriter(sink, table.schema, compression="zstd") as w:
            for _ in range(times):
                w.write_table(table)
    return sink.getvalue().to_pybytes()


ZEROS = pa.table({f: np.zeros(1_000_000, np.float32) for f in F})


@pytest.mark.parametrize(
    "kind, table, times, message",
    [
        (bodies.ARROW, ZEROS, 10, "too many rows: 10000000 > 100"),
        (bodies.PARQUET, ZEROS, 10, "too many rows: 10000000 > 100"),
        (bodies.ARROW, pa.table({"features": pa.array([np.zeros(200_000)])}), 1, "decompresses to 1600008 bytes"),  # one row
    ],
)
def test_a_compressed_bulk_body_is_refused_before_it_is_decompressed(kind, table, times, message):
    raw = compressed(kind, table, times)
    limits = bodies.Limits(max_instances=10, max_bulk_rows=100, max_body_bytes=1_000_000)
    assert len(raw) < limits.max_body_bytes
    pool = pa.default_memory_pool()
    peak = pool.max_memory()
    with pytest.raises(BadRequest, match=message) as e:
        bodies.decode(raw, kind, F, limits)
    assert e.value.status == 413
    assert pool.max_memory() - peak < 1_000_000  # read, the rows take 120 MB


_PROXIES: list[pa.MemoryPool] = []
"""Kept for the whole session: Arrow buffers point at their pool without owning it."""


def arrow_peak_bytes(read: Callable[[], Any]) -> int:
    """The most bytes Arrow held at once while ``read`` ran (through a proxy of its pool)."""
    base = pa.default_memory_pool()
    proxy = pa.proxy_memory_pool(base)
    _PROXIES.append(proxy)
    pa.set_memory_pool(proxy)
    try:
        read()
    finally:
        pa.set_memory_pool(base)
    return proxy.max_memory()


HUGE = 10_000_000
"""Rows of zeros in one cell: 80 MB read, a few KB as zstd."""


def test_a_parquet_body_decompresses_only_the_columns_the_model_reads():
    x = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    table = pa.table({**{f: x[:, j] for j, f in enumerate(F)}, "junk": pa.array([np.zeros(HUGE)])})
    raw = compressed(bodies.PARQUET, table, 1)
    got: list[np.ndarray] = []
    peak = arrow_peak_bytes(lambda: got.append(bodies.decode(raw, bodies.PARQUET, F, LIMITS)))
    assert len(raw) < LIMITS.max_body_bytes and np.array_equal(got[0], x)
    assert peak < 100_000


@pytest.mark.parametrize(
    "table, message",
    [  # built in the test: held from collection on, they would take 160 MB all session
        (lambda: pa.table({"x0": [1.0], "x1": [2.0], "x2": pa.array(["0" * (8 * HUGE)])}),
         "column 'x2' is string, expected a number type"),
        (lambda: pa.table({"features": pa.ListArray.from_arrays(pa.array([0, HUGE], pa.int32()), pa.repeat("0", HUGE))}),
         "column 'features' holds string, expected numbers"),
    ],
    ids=["string column", "list column of strings"],
)
def test_a_parquet_column_of_the_wrong_type_is_refused_from_the_schema_before_it_is_read(
    table: Callable[[], pa.Table], message: str
) -> None:
    raw = compressed(bodies.PARQUET, table(), 1)

    def refused() -> None:
        with pytest.raises(BadRequest, match=re.escape(message)):
            bodies.decode(raw, bodies.PARQUET, F, LIMITS)

    assert len(raw) < LIMITS.max_body_bytes and arrow_peak_bytes(refused) < 100_000


@pytest.mark.parametrize("kind", [bodies.ARROW, bodies.PARQUET])
def test_bytes_that_are_not_arrow_or_parquet_are_a_400(kind):
    with pytest.raises(BadRequest) as e:
        bodies.decode(b"PAR1 certainly not a table", kind, F, LIMITS)
    assert e.value.status == 400 and "not a readable" in str(e.value)


def test_an_arrow_body_corrupt_inside_is_a_400_not_a_500():
    """Well-formed messages around bad contents: list offsets past the values, a
    column name that is not UTF-8. Refused when read, not halfway through answering."""
    table = pa.table({"x0": np.arange(4, dtype=np.float32), "xs": pa.array([[1.0], [2.0], [3.0], [4.0]])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    raw = sink.getvalue().to_pybytes()
    offsets = np.arange(5, dtype=np.int32).tobytes()
    assert raw.count(offsets) == 1
    for body in (raw.replace(offsets, np.array([0, 1, 2, 3, 400], dtype=np.int32).tobytes()),
                 raw.replace(b"x0", b"\xff0")):
        with pytest.raises(BadRequest) as e:
            bodies.read_table(body, bodies.ARROW, LIMITS)
        assert e.value.status == 400 and "not a readable Arrow IPC stream" in str(e.value)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_unsupported_content_type_is_a_415_naming_it(ctype):
    with pytest.raises(BadRequest) as e:
        bodies.media_type(ctype)
    assert e.value.status == 415 and ctype.split(";")[0] in str(e.value)


def test_declared_oversized_body_is_refused_before_reading():
    with pytest.raises(BadRequest) as e:
        bodies.check_length("10001", LIMITS)
    assert e.value.status == 413 and "serve.max_body_bytes" in str(e.value)
    bodies.check_length("10000", LIMITS)
    with pytest.raises(BadRequest, match="not a number"):
        bodies.check_length("ten", LIMITS)


# --- versions ----------------------------------------------------------------


class FakeRegistry:
    """``wait_for_version`` / ``get_version`` over a dict of served versions."""

    def __init__(self) -> None:
        self.store: dict[Any, dict[str, np.ndarray]] = {}
        self.versions: dict[int, ServedVersion] = {}
        self.served: ServedVersion | None = None
        self.fetched: list[Any] = []

    def promote(self, version: int, w: dict[str, np.ndarray]) -> None:
        ref = ("ref", version)
        self.store[ref] = w
        self.versions[version] = self.served = served(version, ref)

    def wait_for_version(self, have: int, timeout_s: float) -> ServedVersion | None:
        return None if self.served is None or self.served.version == have else self.served

    def fetch(self, ref: Any) -> dict[str, np.ndarray]:
        self.fetched.append(ref)
        return self.store[ref]


def test_follower_swaps_to_each_promoted_version_and_back_on_rollback():
    reg = FakeRegistry()
    f = VersionFollower(reg.wait_for_version, reg.fetch, log=lambda _: None)
    assert not f.step(0) and f.current is None and f.health_problem() is None  # startup: no model yet is healthy
    reg.promote(1, weights(1))
    assert f.step(0) and f.current.version == 1
    reg.promote(2, weights(2))
    before = f.current
    assert f.step(0) and f.current.version == 2
    assert before.version == 1, "a Loaded already handed to a request never changes"
    reg.served = reg.versions[1]  # rollback
    assert f.step(0) and f.current.version == 1 and f.swaps == 3


def test_mismatched_or_corrupt_weights_are_refused_while_the_current_version_keeps_serving():
    reg = FakeRegistry()
    f = VersionFollower(reg.wait_for_version, reg.fetch, log=lambda _: None)
    reg.promote(1, weights(1))
    f.step(0)
    wrong_width = {k: v for k, v in weights(2).items()}
    wrong_width["net.1.weight"] = np.zeros((8, 5), np.float32)
    reg.promote(2, wrong_width)
    assert not f.step(0) and f.current.version == 1
    assert "refused v2" in f.last_error and "do not fit" in f.refused[2]
    assert not f.step(0), "a refused version is not fetched again"
    nan = weights(3)
    nan["net.1.bias"][0] = np.nan
    reg.promote(3, nan)
    assert not f.step(0) and f.current.version == 1 and "not finite" in f.refused[3]
    reg.promote(4, weights(4))
    assert f.step(0) and f.current.version == 4
    assert f.health_problem() is None


def refused_v2_serving_v1() -> tuple[FakeRegistry, VersionFollower]:
    reg = FakeRegistry()
    f = VersionFollower(reg.wait_for_version, reg.fetch, log=lambda _: None)
    reg.promote(1, weights(1))
    f.step(0)
    bad = weights(2)
    bad.pop("net.1.bias")
    reg.promote(2, bad)
    assert not f.step(0) and 2 in f.refused and f.last_error is not None
    return reg, f


def test_a_refused_version_is_not_fetched_again_while_the_registry_serves_it():
    reg, f = refused_v2_serving_v1()
    for _ in range(3):
        assert not f.step(0)
    assert reg.fetched == [("ref", 1), ("ref", 2)]


def test_a_rollback_to_the_version_still_served_after_a_refusal_loads_nothing():
    reg, f = refused_v2_serving_v1()
    current = f.current
    reg.served = reg.versions[1]  # the registry rolls v2 back to v1, which this replica never left
    assert not f.step(0)
    assert f.current is current and f.swaps == 1 and reg.fetched == [("ref", 1), ("ref", 2)]
    assert f.announced == 1 and f.health_problem() is None


def test_a_swap_after_a_refusal_clears_the_last_error():
    reg, f = refused_v2_serving_v1()
    reg.promote(3, weights(3))
    assert f.step(0) and f.current.version == 3 and f.last_error is None


def test_a_replica_without_a_model_is_unhealthy_once_the_registry_serves_one():
    reg = FakeRegistry()
    f = VersionFollower(reg.wait_for_version, reg.fetch, log=lambda _: None)
    bad = weights(1)
    bad.pop("net.1.bias")
    reg.promote(1, bad)
    f.step(0)
    assert f.current is None and "no model loaded while the registry serves v1" in f.health_problem()
    reg.promote(2, weights(2))
    f.step(0)
    assert f.health_problem() is None


def test_follower_run_retries_after_transient_errors_until_stopped():
    reg = FakeRegistry()
    reg.promote(1, weights(1))
    calls = {"n": 0}
    stop = threading.Event()

    def flaky_wait(have, timeout_s):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("registry restarting")
        if have == 1:
            stop.set()
            return None
        return reg.wait_for_version(have, timeout_s)

    f = VersionFollower(flaky_wait, reg.fetch, log=lambda _: None)
    f.run(stop, poll_s=0, backoff_s=0)
    assert f.current.version == 1 and calls["n"] >= 3


def test_pinned_versions_load_on_demand_keep_a_few_and_404_when_gone():
    reg = FakeRegistry()
    for v in (1, 2, 3):
        reg.promote(v, weights(v))
    pins = PinnedVersions(lambda v: reg.versions.get(v), reg.fetch, capacity=2)
    assert pins.get(1).version == 1 and pins.get(1).version == 1 and pins.loads == 1
    pins.get(2), pins.get(3)
    pins.get(1)
    assert pins.loads == 4, "the least recently used version was dropped"
    with pytest.raises(VersionGone, match="model version 99 is not available"):
        pins.get(99)


def test_pinned_versions_drop_the_least_recently_used_not_the_first_loaded():
    reg = FakeRegistry()
    for v in (1, 2, 3):
        reg.promote(v, weights(v))
    pins = PinnedVersions(lambda v: reg.versions.get(v), reg.fetch, capacity=2)
    for v in (1, 2, 1, 2):
        pins.get(v)
    assert pins.loads == 2, "two versions fit: each is loaded once"
    pins.get(1)
    pins.get(3)  # 2 is now the least recently used
    pins.get(1)
    assert pins.loads == 3
    pins.get(2)
    assert pins.loads == 4 and reg.fetched == [("ref", 1), ("ref", 2), ("ref", 3), ("ref", 2)]


def test_a_pinned_lookup_answered_with_another_version_is_gone():
    reg = FakeRegistry()
    reg.promote(5, weights(5))
    pins = PinnedVersions(lambda v: reg.served, reg.fetch, capacity=2)  # a lookup that answers the served one
    with pytest.raises(VersionGone, match="model version 4 is not available"):
        pins.get(4)
    assert pins.loads == 0 and pins.get(5).version == 5


def test_a_batch_is_answered_by_one_version_with_the_same_numbers_as_alone():
    loaded = load_version(served(7), weights(7))
    xs = [np.random.default_rng(i).random((n, 3), dtype=np.float32) for i, n in enumerate((1, 5, 64))]
    together = loaded.predict_many(xs, [0, 1])
    alone = [loaded.predict(x, [0, 1]) for x in xs]
    assert [a["model_version"] for a in together] == [7, 7, 7]
    for t, a, x in zip(together, alone, xs):
        assert len(t["predictions"]) == len(x)
        assert np.allclose(t["probabilities"], a["probabilities"], atol=1e-5)


def overflowing() -> tuple[Any, np.ndarray]:
    """A version standardising with variance 0.25 (features of std 0.5), and rows with a
    feature of 3e38: finite float32, accepted by the body checks, inf once standardised."""
    w = weights(7)
    w["net.0.running_var"] = np.full_like(w["net.0.running_var"], 0.25)
    x = np.array([[0.1, 0.2, 0.3], [3e38, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, -3e38, 0.3]], dtype=np.float32)
    return load_version(served(7), w), x


def test_rows_the_model_cannot_score_are_a_422_naming_them_and_the_rest_of_the_batch_is_answered():
    loaded, x = overflowing()
    assert not np.isfinite(loaded.probabilities(x)).all()  # the overflow this guards against
    ok, refused = loaded.predict_many([x[:1], x], [0, 1])
    assert ok["model_version"] == 7 and np.isfinite(ok["probabilities"]).all()
    assert isinstance(refused, BadRequest) and refused.status == 422
    assert "rows [1, 3]" in str(refused) and "v7" in str(refused)
    for answer in (lambda: loaded.predict(x, [0, 1]), lambda: loaded.scores(x, [0, 1])):
        with pytest.raises(BadRequest, match=r"rows \[1, 3\]"):
            answer()


def test_load_version_refuses_weights_for_another_model():
    other = ModelSpec("mlp", {"num_features": 4, "num_classes": 2, "hidden": [8]})
    torch.manual_seed(0)
    w = state_dict_numpy(build_model(other))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_version(served(1), w)


# --- auth and config -----------------------------------------------------------


def test_bearer_token_is_checked_by_digest_and_off_by_default():
    BearerAuth(None).check(None)
    digest = token_digest("LT_TOKEN", {"LT_TOKEN": "s3cret"})
    assert digest is not None and "s3cret" not in digest
    auth = BearerAuth(digest)
    auth.check("Bearer s3cret")
    for header, message in [(None, "missing"), ("Basic abc", "must be 'Bearer"), ("Bearer nope", "wrong")]:
        with pytest.raises(AuthError, match=message):
            auth.check(header)
    with pytest.raises(ValueError, match="LT_TOKEN is not set"):
        token_digest("LT_TOKEN", {})


def test_serve_config_binds_loopback_and_checks_batching_fields():
    assert ServeConfig().host == "127.0.0.1" and ServeConfig().auth_token_env is None
    with pytest.raises(ConfigError, match="serve.max_ongoing_requests"):
        ServeConfig(max_batch_size=64, max_ongoing_requests=32)
    with pytest.raises(ConfigError, match="serve.batch_wait_timeout_s"):
        ServeConfig(batch_wait_timeout_s=-1)
    with pytest.raises(ConfigError, match="serve.auth_token_env"):
        ServeConfig(auth_token_env="Bearer abc.def")


@pytest.mark.parametrize(
    "accept, answer",
    [
        (None, bodies.JSON),
        ("*/*", bodies.JSON),
        ("application/json", bodies.JSON),
        (bodies.ARROW, bodies.ARROW),
        (f"{bodies.ARROW}, application/json;q=0.5", bodies.ARROW),
        (f"application/json, {bodies.ARROW};q=0.9", bodies.JSON),
        (f"application/json;q=0.8, {bodies.ARROW};q=0.8", bodies.ARROW),  # a tie goes to Arrow
        (f"application/json, {bodies.ARROW}", bodies.ARROW),
        (f"{bodies.ARROW};q=0", bodies.JSON),
        (f"{bodies.ARROW};q=oops", bodies.JSON),
        ("application/vnd.apache.arrow.file", bodies.JSON),
        ("Application/VND.Apache.Arrow.Stream", bodies.ARROW),
    ],
)
def test_arrow_answers_only_when_accept_prefers_them(accept, answer):
    assert bodies.answer_type(accept) == answer


def test_arrow_answer_has_every_row_and_names_the_version():
    loaded = load_version(served(7), weights(0))
    x = np.random.default_rng(0).random((50, 3), dtype=np.float32)
    raw = bodies.encode_arrow(*loaded.scores(x, [3, 5]), loaded.version)
    with pa.ipc.open_stream(pa.py_buffer(raw)) as reader:
        table = reader.read_all()
    assert table.schema.metadata[b"model_version"] == b"7"
    as_json = loaded.predict(x, [3, 5])
    assert table.column("predictions").to_pylist() == as_json["predictions"]
    probs = np.array(table.column("probabilities").to_pylist())
    assert probs.shape == (50, 2) and np.allclose(probs, as_json["probabilities"], atol=1e-6)


def test_replicas_get_the_configured_cpus_and_gpus_and_predict_where_they_are():
    assert replica_actor_options(ServeConfig()) == {"num_cpus": 0.1}
    assert replica_actor_options(ServeConfig(num_cpus=1, num_gpus=0.5)) == {"num_cpus": 1, "num_gpus": 0.5}
    assert replica_device(0, cuda_available=True) == "cpu"
    assert replica_device(1, cuda_available=True) == "cuda"
    with pytest.raises(RuntimeError, match="serve.num_gpus=1"):
        replica_device(1, cuda_available=False)
    with pytest.raises(ConfigError, match="serve.num_gpus"):
        ServeConfig(num_gpus=-1)


def test_ingress_choice_sets_the_ray_serve_flags():
    env = ray_env(ServeConfig(ingress="haproxy"))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 5
    assert ray_env(ServeConfig())["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the portable, loopback-only default
    with pytest.raises(ConfigError, match="serve.ingress"):
        ServeConfig(ingress="nginx")


def test_pure_serving_modules_never_import_ray():
    mods = ["bodies", "predictor", "versions", "auth", "deployment"]
    code = "import sys\n" + "".join(f"import livetrain.serving.{m}\n" for m in mods) + "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
