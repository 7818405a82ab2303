"""Shard validation: good rows kept in order, bad rows quarantined with a reason,
unusable shards rejected whole with a message that says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livetrain.actors.schema import (
    INF_FEATURE,
    INTERLEAVE_ROWS,
    NAN_FEATURE,
    NULL_FEATURE,
    NULL_ID,
    NULL_LABEL,
    UNKNOWN_LABEL,
    SchemaError,
    ValidatedShard,
    _interleave,
    iter_parts,
    iter_reads,
    read_and_validate,
)
from livetrain.config import SchemaConfig

FEATURES = ["a", "b", "c"]
SCHEMA = SchemaConfig(features=FEATURES, classes=[0, 1, 2])
LIST_SCHEMA = SchemaConfig(feature_list_column="f", num_features=3, classes=[0, 1, 2])


def _features(n: int) -> np.ndarray:
    """Row i is [i, i + 0.25, i + 0.5]: each row says where it came from."""
    return np.arange(n, dtype=np.float32)[:, None] + np.array([0.0, 0.25, 0.5], dtype=np.float32)


def _write(path: Path, columns: dict[str, pa.Array | np.ndarray | list], **kw) -> Path:
    pq.write_table(pa.table(columns), path, **kw)
    return path


def _column_shard(path: Path, n: int = 10, **overrides) -> Path:
    x = _features(n)
    cols = {name: x[:, j] for j, name in enumerate(FEATURES)}
    cols["label"] = np.arange(n, dtype=np.int64) % 3
    cols.update(overrides)
    return _write(path, cols)


def _assert_rejected(shard: ValidatedShard, *fragments: str) -> None:
    assert shard.error is not None
    for fragment in fragments:
        assert fragment in shard.error
    assert shard.x.shape == (0, 3) and shard.x.dtype == np.float32
    assert shard.y.shape == (0,) and shard.y.dtype == np.int64
    assert shard.bad is None and shard.reasons == {}


# --- good data -------------------------------------------------------------------


def test_good_shard_becomes_one_float32_block(tmp_path):
    shard = read_and_validate(_column_shard(tmp_path / "s.parquet", n=1000), SCHEMA)
    assert shard.error is None and shard.bad is None and shard.reasons == {}
    assert shard.x.dtype == np.float32 and shard.x.flags["C_CONTIGUOUS"]
    assert shard.y.dtype == np.int64
    np.testing.assert_array_equal(shard.x, _features(1000))
    np.testing.assert_array_equal(shard.y, np.arange(1000) % 3)


def test_features_are_read_in_schema_order_not_file_order(tmp_path):
    x = _features(4)
    columns = {"label": [0, 1, 2, 0], "c": x[:, 2], "a": x[:, 0], "b": x[:, 1]}
    path = _write(tmp_path / "s.parquet", columns)
    np.testing.assert_array_equal(read_and_validate(path, SCHEMA).x, x)


def test_fixed_size_list_column_gives_the_same_block_as_feature_columns(tmp_path):
    x = _features(50)
    path = _write(
        tmp_path / "s.parquet",
        {"f": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3), "label": np.arange(50) % 3},
    )
    shard = read_and_validate(path, LIST_SCHEMA)
    assert shard.error is None
    np.testing.assert_array_equal(shard.x, x)
    np.testing.assert_array_equal(shard.y, np.arange(50) % 3)


def test_variable_list_column_of_the_right_width_is_accepted(tmp_path):
    x = _features(5)
    path = _write(tmp_path / "s.parquet", {"f": pa.array(x.tolist()), "label": [0] * 5})
    shard = read_and_validate(path, LIST_SCHEMA)
    assert shard.error is None
    np.testing.assert_array_equal(shard.x, x)


def test_integer_and_float64_features_are_cast_to_float32(tmp_path):
    path = _column_shard(
        tmp_path / "s.parquet",
        n=3,
        a=pa.array([1, 2, 3], pa.int32()),
        b=pa.array([0.5, 1.5, 2.5], pa.float64()),
    )
    shard = read_and_validate(path, SCHEMA)
    assert shard.error is None and shard.x.dtype == np.float32
    np.testing.assert_array_equal(shard.x[:, 0], [1, 2, 3])
    np.testing.assert_array_equal(shard.x[:, 1], [0.5, 1.5, 2.5])


def test_any_integer_label_type_is_accepted(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, label=pa.array([2, 0, 1], pa.uint8()))
    shard = read_and_validate(path, SCHEMA)
    assert shard.error is None and shard.y.dtype == np.int64
    np.testing.assert_array_equal(shard.y, [2, 0, 1])


def test_many_row_groups_are_read_in_order(tmp_path):
    x = _features(10_000)
    cols = {name: x[:, j] for j, name in enumerate(FEATURES)}
    cols["label"] = np.zeros(10_000, np.int64)
    path = _write(tmp_path / "s.parquet", cols, row_group_size=777)
    assert pq.ParquetFile(path).metadata.num_row_groups > 10
    np.testing.assert_array_equal(read_and_validate(path, SCHEMA).x, x)


def test_columns_land_in_their_place_across_the_staging_passes(tmp_path):
    """``_interleave`` copies a few thousand rows per pass: rows past a pass's end,
    a short last pass and the casts must come out as ``out[:, j] = column``."""
    n = 2 * INTERLEAVE_ROWS + 5
    rng = np.random.default_rng(0)
    columns = [rng.integers(-1000, 1000, n).astype(np.int16), rng.normal(size=n), rng.random(n, dtype=np.float32)]
    expected = np.empty((n, 3), dtype=np.float32)
    for j, col in enumerate(columns):
        expected[:, j] = col
    out = np.full((n, 3), -1.0, dtype=np.float32)
    _interleave(columns, out)
    np.testing.assert_array_equal(out, expected)

    path = _column_shard(tmp_path / "s.parquet", n=n, a=columns[0], b=columns[1], c=columns[2])
    np.testing.assert_array_equal(read_and_validate(path, SCHEMA).x, expected)


# --- row-level quarantine --------------------------------------------------------


def test_bad_rows_are_quarantined_with_reasons_and_good_rows_keep_their_order(tmp_path):
    n = 12
    x = _features(n)
    a = x[:, 0].copy()
    b = x[:, 1].copy()
    a[1] = np.nan
    b[3] = np.inf
    a[5] = -np.inf
    label = (np.arange(n) % 3).tolist()
    label[7] = 9
    label[8] = None
    path = _write(
        tmp_path / "s.parquet",
        {
            "a": a,
            "b": b,
            "c": pa.array([None if i == 10 else float(v) for i, v in enumerate(x[:, 2])], pa.float32()),
            "label": pa.array(label, pa.int64()),
        },
    )
    shard = read_and_validate(path, SCHEMA)
    assert shard.error is None
    good = [0, 2, 4, 6, 9, 11]
    np.testing.assert_array_equal(shard.x, x[good])
    np.testing.assert_array_equal(shard.y, np.array(good) % 3)
    assert shard.reasons == {
        NULL_FEATURE: 1, NAN_FEATURE: 1, INF_FEATURE: 2, NULL_LABEL: 1, UNKNOWN_LABEL: 1
    }
    assert shard.bad.column_names == ["a", "b", "c", "label", "reason"]
    assert shard.bad.num_rows == shard.bad_rows == 6
    rows = shard.bad.to_pylist()
    expected = [NAN_FEATURE, INF_FEATURE, INF_FEATURE, UNKNOWN_LABEL, NULL_LABEL, NULL_FEATURE]
    assert [r["reason"] for r in rows] == expected
    assert rows[3]["label"] == 9 and rows[4]["label"] is None and rows[5]["c"] is None


def test_a_row_with_several_faults_is_counted_once_under_the_first_reason(tmp_path):
    path = _column_shard(
        tmp_path / "s.parquet",
        n=3,
        a=pa.array([np.nan, 1.0, 2.0], pa.float32()),
        b=pa.array([None, 1.0, 2.0], pa.float32()),
        label=pa.array([7, 1, 2], pa.int64()),
    )
    shard = read_and_validate(path, SCHEMA)
    assert shard.reasons == {NULL_FEATURE: 1}
    assert shard.good_rows == 2


def test_a_nan_row_with_a_null_label_or_id_is_counted_under_nan(tmp_path):
    """NaN comes before null label and null id in REASONS; null label before null id."""
    path = _column_shard(
        tmp_path / "s.parquet",
        n=4,
        a=pa.array([np.nan, np.nan, 1.0, 2.0], pa.float32()),
        label=pa.array([None, 1, None, 2], pa.int64()),
        id=pa.array([0, None, None, 3], pa.int64()),
    )
    schema = SchemaConfig(features=FEATURES, classes=[0, 1, 2], id_column="id")
    (part,) = iter_parts(path, schema, 10)  # what ingestion reads
    assert part.reasons == {NAN_FEATURE: 2, NULL_LABEL: 1} and NULL_ID not in part.reasons
    assert [r["reason"] for r in part.bad.to_pylist()] == [NAN_FEATURE, NAN_FEATURE, NULL_LABEL]
    assert part.good_rows == 1
    assert read_and_validate(path, schema).reasons == part.reasons


def test_a_null_id_is_a_bad_row_whether_the_shard_is_read_whole_or_in_parts(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, id=pa.array([0, None, 2], pa.int64()))
    schema = SchemaConfig(features=FEATURES, classes=[0, 1, 2], id_column="id")
    (part,) = iter_parts(path, schema, 10)
    assert part.reasons == {NULL_ID: 1} == read_and_validate(path, schema).reasons


def test_float64_beyond_float32_range_is_quarantined_as_inf(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, a=pa.array([1e300, 1.0, 2.0], pa.float64()))
    assert read_and_validate(path, SCHEMA).reasons == {INF_FEATURE: 1}


def test_finite_features_whose_row_sum_overflows_are_good(tmp_path):
    """A row's features sum to inf in float32 (the cheap first check) yet are all finite."""
    big = pa.array([3e38, 1.0, -3e38, np.inf], pa.float32())
    path = _column_shard(tmp_path / "s.parquet", n=4, a=big, b=big, c=pa.array([3e38, 2.0, 3e38, 1.0], pa.float32()))
    shard = read_and_validate(path, SCHEMA)
    assert shard.reasons == {INF_FEATURE: 1} and shard.good_rows == 3
    np.testing.assert_array_equal(shard.x[:, 0], np.array([3e38, 1.0, -3e38], np.float32))


def test_bad_rows_in_a_list_column_are_quarantined(tmp_path):
    x = _features(4).astype(np.float64).tolist()
    x[1][2] = None
    x[2] = None
    x[3][0] = float("nan")
    path = _write(
        tmp_path / "s.parquet",
        {"f": pa.array(x, pa.list_(pa.float32(), 3)), "label": [0, 1, 2, 0]},
    )
    shard = read_and_validate(path, LIST_SCHEMA)
    assert shard.error is None
    assert shard.reasons == {NULL_FEATURE: 2, NAN_FEATURE: 1}
    np.testing.assert_array_equal(shard.x, _features(1))


@pytest.mark.parametrize("bad_rows", [slice(None, None, 7), [3, 5000, 5001]], ids=["every-7th", "early-only"])
def test_good_rows_are_compacted_across_batches(tmp_path, monkeypatch, bad_rows):
    import livetrain.actors.schema as schema_module

    monkeypatch.setattr(schema_module, "BATCH_BYTES", 1)  # -> the 4096-row minimum batch
    n = 20_000
    x = _features(n)
    a = x[:, 0].copy()
    a[bad_rows] = np.nan
    path = _column_shard(tmp_path / "s.parquet", n=n, a=a)
    shard = read_and_validate(path, SCHEMA)
    keep = np.ones(n, dtype=bool)
    keep[bad_rows] = False
    np.testing.assert_array_equal(shard.x, x[keep])
    np.testing.assert_array_equal(shard.y, (np.arange(n) % 3)[keep])
    assert shard.reasons == {NAN_FEATURE: int((~keep).sum())}
    assert shard.x.flags["C_CONTIGUOUS"]


def test_all_rows_bad_gives_an_empty_block_not_an_error(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, label=pa.array([5, 6, 7], pa.int64()))
    shard = read_and_validate(path, SCHEMA)
    assert shard.error is None and shard.x.shape == (0, 3) and shard.reasons == {UNKNOWN_LABEL: 3}


def test_counts_summarise_the_shard(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=4, label=pa.array([0, 1, 9, 2], pa.int64()))
    shard = read_and_validate(path, SCHEMA)
    assert (shard.good_rows, shard.bad_rows) == (3, 1)
    assert shard.reasons == {UNKNOWN_LABEL: 1} and shard.error is None


# --- whole-shard rejection -------------------------------------------------------


def test_a_file_that_is_not_parquet_is_rejected_whole(tmp_path):
    path = tmp_path / "s.parquet"
    path.write_text("a,b,c,label\n1,2,3,0\n")
    _assert_rejected(read_and_validate(path, SCHEMA), "not a readable parquet file")


def test_an_empty_file_is_rejected_whole(tmp_path):
    path = tmp_path / "s.parquet"
    path.write_bytes(b"")
    _assert_rejected(read_and_validate(path, SCHEMA), "not a readable parquet file")


def test_a_parquet_file_cut_in_half_is_rejected_whole(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=5000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_rejected(read_and_validate(path, SCHEMA), "parquet")


def test_corrupt_column_data_behind_a_valid_footer_is_rejected_whole(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=5000)
    data = bytearray(path.read_bytes())
    data[4:2000] = b"\xff" * 1996  # page headers and values, footer untouched
    path.write_bytes(bytes(data))
    _assert_rejected(read_and_validate(path, SCHEMA), "parquet")


def test_zero_rows_is_rejected_whole(tmp_path):
    columns = {name: pa.array([], pa.float32()) for name in FEATURES}
    path = _write(tmp_path / "s.parquet", {**columns, "label": pa.array([], pa.int64())})
    _assert_rejected(read_and_validate(path, SCHEMA), "zero rows")


def test_a_missing_column_is_rejected_whole_naming_it(tmp_path):
    path = _write(tmp_path / "s.parquet", {"a": [1.0], "c": [1.0], "label": [0]})
    _assert_rejected(read_and_validate(path, SCHEMA), "missing columns", "'b'")


def test_an_extra_column_is_rejected_whole_naming_it(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, note=["x", "y", "z"])
    _assert_rejected(read_and_validate(path, SCHEMA), "extra columns", "'note'")


def test_a_string_feature_column_is_rejected_whole(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, b=["1.0", "2.0", "3.0"])
    _assert_rejected(read_and_validate(path, SCHEMA), "'b'", "string")


def test_a_float_label_column_is_rejected_whole_even_when_integral(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3, label=pa.array([0.0, 1.0, 2.0], pa.float64()))
    _assert_rejected(read_and_validate(path, SCHEMA), "'label'", "integer")


def test_a_fixed_size_list_of_the_wrong_width_is_rejected_whole(tmp_path):
    path = _write(
        tmp_path / "s.parquet",
        {"f": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8, np.float32)), 4), "label": [0, 1]},
    )
    _assert_rejected(read_and_validate(path, LIST_SCHEMA), "wrong list width 4", "expected 3")


def test_a_variable_list_with_a_wrong_width_row_is_rejected_whole(tmp_path):
    path = _write(tmp_path / "s.parquet", {"f": [[1.0, 2.0, 3.0], [1.0, 2.0]], "label": [0, 1]})
    _assert_rejected(read_and_validate(path, LIST_SCHEMA), "wrong list width [2, 3]")


def test_feature_columns_where_a_list_is_declared_are_rejected_whole(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=3)
    _assert_rejected(read_and_validate(path, LIST_SCHEMA), "missing columns", "'f'")


def test_a_missing_file_is_rejected_whole(tmp_path):
    _assert_rejected(read_and_validate(tmp_path / "gone.parquet", SCHEMA), "not a readable parquet file")


def test_the_module_does_not_import_ray():
    import livetrain.actors.manifest
    import livetrain.actors.quarantine
    import livetrain.actors.schema

    for module in (livetrain.actors.schema, livetrain.actors.quarantine, livetrain.actors.manifest):
        source = Path(module.__file__).read_text()
        assert "import ray" not in source and "from ray" not in source


@pytest.mark.parametrize("label_type", [pa.int8(), pa.int16(), pa.int32(), pa.uint16(), pa.uint64()])
def test_labels_outside_the_classes_are_caught_for_every_integer_type(tmp_path, label_type):
    path = _column_shard(tmp_path / "s.parquet", n=3, label=pa.array([0, 3, 2], label_type))
    shard = read_and_validate(path, SCHEMA)
    assert shard.reasons == {UNKNOWN_LABEL: 1}
    np.testing.assert_array_equal(shard.y, [0, 2])


@pytest.mark.parametrize("labels, label_type", [
    ([0, -1, 2, -128, 1], pa.int8()),  # below the classes' range
    ([0, 2**64 - 1, 2, 2**63, 1], pa.uint64()),  # would wrap to -1 and below as int64
    ([0, 2**63 - 1, 2, -(2**63), 1], pa.int64()),
], ids=["int8", "uint64", "int64"])
def test_labels_far_outside_the_classes_range_are_unknown_not_wrapped(tmp_path, labels, label_type):
    path = _column_shard(tmp_path / "s.parquet", n=5, label=pa.array(labels, label_type))
    shard = read_and_validate(path, SCHEMA)
    assert shard.reasons == {UNKNOWN_LABEL: 2}
    np.testing.assert_array_equal(shard.y, [0, 2, 1])


def test_classes_with_gaps_accept_exactly_their_labels(tmp_path):
    path = _column_shard(tmp_path / "s.parquet", n=6, label=pa.array([1, 5, 3, 9, 0, 10], pa.int32()))
    shard = read_and_validate(path, SchemaConfig(features=FEATURES, classes=[9, 1, 5]))
    assert shard.reasons == {UNKNOWN_LABEL: 3}
    np.testing.assert_array_equal(shard.y, [1, 5, 9])


# --- resuming a part at a row (a large shard's watermark) ----------------------------


@pytest.mark.parametrize("nan_rows", [[], [2, 5, 6]], ids=["all good", "some bad"])
def test_a_part_resumed_at_a_row_keeps_exactly_the_good_rows_from_that_row(tmp_path, nan_rows):
    from livetrain.actors.schema import iter_parts

    x = _features(10)
    x[nan_rows, 1] = np.nan
    path = _column_shard(tmp_path / "s.parquet", 10, **{name: x[:, j] for j, name in enumerate(FEATURES)})
    (part,) = iter_parts(path, SCHEMA, 10)
    for row in (0, 4, 5, 9, 10):
        rest = part.from_row(row)
        expected = [i for i in range(row, 10) if i not in nan_rows]
        assert rest.x[:, 0].tolist() == expected and rest.y.tolist() == [i % 3 for i in expected]
        assert (rest.row_start, rest.row_end) == (max(row, 0), 10)
        again = rest.from_row(row + 1)  # positions stay right on a second cut
        assert again.x[:, 0].tolist() == [i for i in expected if i >= row + 1]


@pytest.mark.parametrize("layout", ["columns", "fixed list", "variable list"])
def test_parts_cut_from_one_read_hold_the_rows_of_reading_a_part_at_a_time(tmp_path, layout):
    """``iter_parts`` reads several parts at once and cuts the read into parts: the
    cuts (slices with an offset into the read) must give each part its own rows,
    nulls and bad rows, at the boundaries of reading ``part_rows`` at a time."""
    from livetrain.actors.schema import iter_parts, read_rows

    n, part = 1000, 64
    x = _features(n)
    x[[3, 64, 130, 999], 1] = np.nan
    label = np.arange(n) % 3
    null_row = 200
    if layout == "columns":
        cols = {name: x[:, j] for j, name in enumerate(FEATURES)}
        cols["b"] = pa.array(np.where(np.arange(n) == null_row, None, x[:, 1]).tolist(), pa.float32())
        schema = SCHEMA
    else:
        lists = [None if i == null_row else row for i, row in enumerate(x.tolist())]
        cols = {"f": pa.array(lists, pa.list_(pa.float32(), 3) if layout == "fixed list" else pa.list_(pa.float32()))}
        schema = LIST_SCHEMA
    path = _write(tmp_path / "s.parquet", {**cols, "label": label}, row_group_size=300)
    assert read_rows(part, schema) >= n  # the whole file is one read here, cut into 16 parts

    parts = list(iter_parts(path, schema, part))
    assert [(p.row_start, p.row_end) for p in parts] == [(lo, min(lo + part, n)) for lo in range(0, n, part)]
    bad = {3, 64, 130, 999, null_row}
    good = [i for i in range(n) if i not in bad]
    np.testing.assert_array_equal(np.concatenate([p.x for p in parts]), x[good])
    np.testing.assert_array_equal(np.concatenate([p.y for p in parts]), label[good])
    assert sorted(r for p in parts if p.bad is not None for r in p.bad.column("label").to_pylist()) == sorted(
        label[sorted(bad)].tolist())
    whole = read_and_validate(path, schema)
    np.testing.assert_array_equal(whole.x, x[good])
    assert whole.reasons == {NULL_FEATURE: 1, NAN_FEATURE: 4}


@pytest.mark.parametrize("error, transient", [
    (OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56"), True),
    (OSError("Corrupt snappy compressed data."), True),  # remote: retried, then quarantined by the loop
    (FileNotFoundError("s3://bucket/landing/a.parquet"), False),
    (pa.ArrowInvalid("Parquet magic bytes not found in footer."), False),
])
def test_an_io_error_reading_a_remote_shard_is_raised_for_a_retry_not_taken_for_a_bad_file(
        monkeypatch, error, transient):
    """A reset connection or a throttled request says nothing of the file: quarantined
    at once, a good shard on S3 would be lost (no ``--reingest`` for a remote landing
    directory). The same errors on a local file are the file's."""
    import livetrain.actors.schema as schema_module

    def fails(path):
        raise error

    monkeypatch.setattr(schema_module, "open_shard", fails)
    schema = SchemaConfig(features=["x0"])
    with pytest.raises(type(error) if transient else SchemaError, match=str(error)[:20]):
        list(iter_reads("s3://bucket/landing/a.parquet", schema, 100))
    with pytest.raises(SchemaError):
        list(iter_reads("/landing/a.parquet", schema, 100))
