"""Schema inference (``schema.infer``), the schema pinned in the manifest, and the
refusal of a config that disagrees with the pin. Pure: no Ray."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livetrain.actors.manifest import Manifest
from livetrain.actors.schema import SchemaError, infer_schema, iter_parts
from livetrain.actors.schema_pin import FROM_CONFIG, resolve_schema
from livetrain.config import ConfigError, SchemaConfig, load_config

INFER = SchemaConfig(infer=True, classes=[0, 1, 2])


def _write(path: Path, columns: dict, mtime_s: float | None = None) -> Path:
    pq.write_table(pa.table(columns), path)
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))
    return path


def _scalars(path: Path, n: int = 20, mtime_s: float | None = None, **extra) -> Path:
    rng = np.random.default_rng(0)
    columns = {"b": rng.random(n), "a": rng.integers(0, 9, n).astype(np.int32), "label": np.arange(n) % 3}
    return _write(path, {**columns, **extra}, mtime_s)


# --- the rules --------------------------------------------------------------------


def test_numeric_columns_become_the_features_in_file_order(tmp_path):
    s = infer_schema(_scalars(tmp_path / "s.parquet", id=np.arange(20)), SchemaConfig(infer=True, id_column="id"))
    assert (s.features, s.num_features, s.feature_list_column, s.infer) == (["b", "a"], 2, None, False)
    assert s.id_column == "id" and s.classes == [0, 1]


def test_one_fixed_width_list_column_becomes_the_feature_list(tmp_path):
    values = pa.array([[float(i), i + 0.5, i + 0.25] for i in range(10)], type=pa.list_(pa.float32(), 3))
    s = infer_schema(_write(tmp_path / "s.parquet", {"f": values, "label": np.zeros(10, np.int64)}), INFER)
    assert (s.feature_list_column, s.num_features, s.features) == ("f", 3, None)


def test_a_variable_list_of_one_width_gives_that_width(tmp_path):
    values = pa.array([[1.0, 2.0], None, [3.0, 4.0]])
    s = infer_schema(_write(tmp_path / "s.parquet", {"f": values, "label": [0, 1, 0]}), INFER)
    assert (s.feature_list_column, s.num_features) == ("f", 2)


@pytest.mark.parametrize(
    "columns, fragment",
    [
        ({"a": [1.0, 2.0], "name": ["x", "y"], "label": [0, 1]}, "'name' (string)"),
        ({"a": [1.0, 2.0], "label": [0.0, 1.0]}, "label has type double"),
        ({"a": [1.0, 2.0], "y": [0, 1]}, "missing columns: ['label']"),
        ({"label": [0, 1]}, "no feature columns"),
        ({"f": pa.array([[1.0], [2.0, 3.0]]), "label": [0, 1]}, "list widths [1, 2]"),
        ({"f": pa.array([[1.0], [2.0]]), "a": [1.0, 2.0], "label": [0, 1]}, "'f' (list<"),
        ({"a": [1.0, 2.0], "label": [5, 6]}, "no good row"),
        ({"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())}, "zero rows"),
    ],
)
def test_a_shard_that_does_not_fit_says_why(tmp_path, columns, fragment):
    with pytest.raises(SchemaError) as e:
        infer_schema(_write(tmp_path / "s.parquet", columns), SchemaConfig(infer=True))
    assert fragment in str(e.value)


def test_a_file_that_is_not_parquet_does_not_fit(tmp_path):
    (tmp_path / "s.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match="not a readable parquet file"):
        infer_schema(tmp_path / "s.parquet", INFER)


def test_the_inferred_schema_validates_the_shard_it_came_from(tmp_path):
    path = _scalars(tmp_path / "s.parquet", n=50)
    parts = list(iter_parts(path, infer_schema(path, INFER), 1000))
    assert sum(p.good_rows for p in parts) == 50


def test_infer_excludes_declared_features():
    with pytest.raises(ConfigError, match="schema.infer"):
        SchemaConfig(infer=True, features=["a"])
    assert load_config(None, ["schema.infer=true"]).schema.features is None


# --- the pin ----------------------------------------------------------------------


def test_the_first_shard_that_fits_is_pinned_and_later_runs_use_it(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "a.parquet").write_bytes(b"garbage")  # oldest, unreadable: skipped
    os.utime(landing / "a.parquet", (1, 1))
    _scalars(landing / "b.parquet", mtime_s=2)
    _write(landing / "c.parquet", {"z": [1.0], "label": [0]}, mtime_s=3)  # newer: not looked at
    with Manifest(tmp_path) as m:
        s = resolve_schema(INFER, m, landing)
        assert s.features == ["b", "a"]
        fields, source = m.pinned_schema()
        assert fields["features"] == ["b", "a"] and source == "b.parquet"
    (landing / "b.parquet").unlink()  # the next run does not read shards to know its schema
    with Manifest(tmp_path) as m:
        assert resolve_schema(INFER, m, landing).features == ["b", "a"]
        declared = SchemaConfig(features=["b", "a"], classes=[0, 1, 2])
        assert resolve_schema(declared, m, landing) == s


def test_a_declared_schema_is_pinned_from_the_config(tmp_path):
    declared = SchemaConfig(features=["x0", "x1"])
    with Manifest(tmp_path) as m:
        assert resolve_schema(declared, m, tmp_path / "landing") == declared
        assert m.pinned_schema()[1] == FROM_CONFIG


def _ingest_one(m: Manifest, landing: Path) -> None:
    (shard,) = m.discover([_scalars(landing / "s.parquet")])
    m.claim("me", 1)
    m.mark_ingested(shard.name, 20, 0)


def test_a_config_that_differs_from_the_pin_is_refused_naming_the_difference(tmp_path):
    with Manifest(tmp_path) as m:
        resolve_schema(SchemaConfig(features=["x0", "x1"], id_column="id"), m, tmp_path)
        _ingest_one(m, tmp_path)
        with pytest.raises(ConfigError) as e:
            resolve_schema(SchemaConfig(features=["x0", "x1", "x2"], id_column="id"), m, tmp_path)
        assert "schema.features: pinned ['x0', 'x1'], config ['x0', 'x1', 'x2']" in str(e.value)
        assert "the config of its first run" in str(e.value)
        with pytest.raises(ConfigError, match=r"schema.classes: pinned \[0, 1\], config \[0, 1, 2\]"):
            resolve_schema(SchemaConfig(infer=True, id_column="id", classes=[0, 1, 2]), m, tmp_path)
        # infer with the same label, classes and id: takes the pin
        assert resolve_schema(SchemaConfig(infer=True, id_column="id"), m, tmp_path).features == ["x0", "x1"]


def test_a_declared_schema_may_replace_the_pin_until_rows_went_in(tmp_path):
    with Manifest(tmp_path) as m:
        resolve_schema(SchemaConfig(features=["x0", "x1"]), m, tmp_path)
        fixed = SchemaConfig(features=["x0", "x1", "x2"])
        assert resolve_schema(fixed, m, tmp_path) == fixed
        (shard,) = m.discover([_scalars(tmp_path / "s.parquet")])
        m.claim("me", 1)
        m.mark_ingested_many([], parts=[(shard.name, 10)])  # its first part is in the buffer
        with pytest.raises(ConfigError, match="schema.features"):
            resolve_schema(SchemaConfig(features=["x0"]), m, tmp_path)
        m.mark_ingested(shard.name, 20, 0)
        with pytest.raises(ConfigError, match="schema.features"):
            resolve_schema(SchemaConfig(features=["x0"]), m, tmp_path)


def test_the_first_pin_wins_when_two_processes_race(tmp_path):
    with Manifest(tmp_path) as a, Manifest(tmp_path) as b:
        a.pin_schema({"features": ["x"]}, "one.parquet")
        assert b.pin_schema({"features": ["y"]}, "two.parquet") == ({"features": ["x"]}, "one.parquet")


def test_waiting_for_a_shard_ends_with_a_clear_error_when_stopped(tmp_path):
    stop = threading.Event()
    stop.set()
    with Manifest(tmp_path) as m, pytest.raises(ConfigError, match="stopped before a shard that fits"):
        resolve_schema(INFER, m, tmp_path / "landing", stop, poll_s=0.01)
    with Manifest(tmp_path) as m:
        assert m.pinned_schema() is None, "nothing is pinned when nothing was inferred"


def test_infer_with_the_synthetic_source_takes_the_streams_own_schema():
    from livetrain.pipeline import _declared_schema

    cfg = load_config(None, ["source.kind=synthetic", "schema.infer=true", "synthetic.generator=agrawal"])
    assert _declared_schema(cfg).features == [f"x{i}" for i in range(9)]
    with pytest.raises(ConfigError, match="synthetic"):
        _declared_schema(load_config(None, ["source.kind=synthetic", "schema.infer=true", "schema.classes=[0, 1, 2]"]))


def test_quarantine_reasons_are_flattened_into_numbers():
    from livetrain.pipeline import _numbers

    out = _numbers({"rows_quarantined": 5, "endpoint": "http://x", "quarantine_reasons":
                    {"nan feature": 3, "label not in classes": 2, "extra columns": 1}})
    assert out == {"rows_quarantined": 5, "quarantine/nan_feature": 3, "quarantine/label_not_in_classes": 2,
                   "quarantine/extra_columns": 1}
