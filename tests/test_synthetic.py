"""The synthetic drifting stream: determinism, shard files, drift, pacing."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livetrain.actors import synthetic
from livetrain.actors.synthetic import (
    AGRAWAL_HIGH,
    AGRAWAL_LOW,
    SyntheticStream,
    feature_names,
    shard_name,
)
from livetrain.config import DriftPoint, SyntheticConfig

SEA_THRESHOLDS = {0: 8.0, 1: 9.0, 2: 7.0, 3: 9.5}


def sea(**kw: object) -> SyntheticConfig:
    return SyntheticConfig(**{"generator": "sea", "seed": 7, "rows_per_shard": 500, **kw})  # type: ignore[arg-type]


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    names = [n for n in table.column_names if n != "label"]
    x = np.stack([table[n].to_numpy() for n in names], axis=1)
    return x, table["label"].to_numpy()


def sea_rule(x: np.ndarray, variant: int) -> tuple[np.ndarray, np.ndarray]:
    """River's SEA label on the unscaled features, and a mask of rows far enough
    from the threshold that float32 rounding cannot flip the comparison."""
    s = x[:, 0].astype(np.float64) * 10 + x[:, 1].astype(np.float64) * 10
    thr = SEA_THRESHOLDS[variant]
    return (s > thr).astype(np.int64), np.abs(s - thr) > 1e-4


# --- shape and determinism ----------------------------------------------------


def test_feature_names_match_each_generator() -> None:
    assert feature_names(SyntheticConfig(generator="sea")) == ["x0", "x1", "x2"]
    assert feature_names(SyntheticConfig(generator="agrawal")) == [f"x{i}" for i in range(9)]
    assert feature_names(SyntheticConfig(generator="hyperplane", num_features=5)) == [f"x{i}" for i in range(5)]


@pytest.mark.parametrize("generator", ["sea", "agrawal", "hyperplane"])
def test_same_seed_writes_identical_shards(tmp_path: Path, generator: str) -> None:
    cfg = SyntheticConfig(generator=generator, seed=3, rows_per_shard=200, num_features=4, noise=0.1)
    a = [SyntheticStream(cfg, tmp_path / "a").write_shard() for _ in range(1)]
    b = [SyntheticStream(cfg, tmp_path / "b").write_shard() for _ in range(1)]
    c = SyntheticStream(SyntheticConfig(generator=generator, seed=4, rows_per_shard=200, num_features=4), tmp_path / "c")
    assert a[0] is not None and b[0] is not None
    assert a[0].read_bytes() == b[0].read_bytes()
    assert not np.array_equal(read(a[0])[0], c.next_rows(200)[0])


def test_rows_do_not_depend_on_how_they_are_chunked(tmp_path: Path) -> None:
    cfg = sea(drifts=[DriftPoint(at_row=400, variant=2, width=300)])
    whole = SyntheticStream(cfg, tmp_path / "a").next_rows(1000)
    parts = SyntheticStream(cfg, tmp_path / "b")
    pieces = [parts.next_rows(n) for n in (1, 299, 450, 250)]
    np.testing.assert_array_equal(whole[0], np.concatenate([p[0] for p in pieces]))
    np.testing.assert_array_equal(whole[1], np.concatenate([p[1] for p in pieces]))


def test_shards_are_parquet_with_float32_features_and_int64_label(tmp_path: Path) -> None:
    stream = SyntheticStream(SyntheticConfig(generator="hyperplane", num_features=6, rows_per_shard=321), tmp_path)
    path = stream.write_shard()
    assert path is not None and path.suffix == ".parquet"
    schema = pq.read_schema(path)
    assert schema.names == [f"x{i}" for i in range(6)] + ["label"]
    assert all(schema.field(f"x{i}").type == pa.float32() for i in range(6))
    assert schema.field("label").type == pa.int64()
    assert pq.read_metadata(path).num_rows == 321
    assert set(np.unique(read(path)[1])) <= {0, 1}


def test_sea_features_are_scaled_to_unit_range(tmp_path: Path) -> None:
    x, _ = SyntheticStream(sea(), tmp_path).next_rows(5000)
    assert x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.95


def test_agrawal_features_are_scaled_to_unit_range(tmp_path: Path) -> None:
    x, y = SyntheticStream(SyntheticConfig(generator="agrawal", seed=1), tmp_path).next_rows(3000)
    assert x.shape == (3000, 9) and x.dtype == np.float32
    assert -0.01 <= x.min() and x.max() <= 1.01
    # function 0 is "age < 40 or age >= 60"; age is column 2
    age = np.rint(x[:, 2].astype(np.float64) * (AGRAWAL_HIGH[2] - AGRAWAL_LOW[2]) + AGRAWAL_LOW[2])
    np.testing.assert_array_equal(y, ((age < 40) | (age >= 60)).astype(np.int64))


# --- max_rows, files, restarts --------------------------------------------------


def test_max_rows_stops_the_stream_exactly(tmp_path: Path) -> None:
    stream = SyntheticStream(sea(rows_per_shard=300, max_rows=1000), tmp_path)
    paths = [stream.write_shard() for _ in range(4)]
    assert stream.write_shard() is None
    assert [pq.read_metadata(p).num_rows for p in paths] == [300, 300, 300, 100]  # type: ignore[arg-type]
    assert stream.rows_written == 1000 and stream.exhausted


def test_shard_names_sort_in_write_order_and_no_temp_files_remain(tmp_path: Path) -> None:
    stream = SyntheticStream(sea(rows_per_shard=10), tmp_path)
    paths = [stream.write_shard() for _ in range(12)]
    assert [p.name for p in paths] == sorted(p.name for p in paths)  # type: ignore[union-attr]
    assert paths[11].name == shard_name(11) == "shard-000000011.parquet"  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_name(i) for i in range(12)]


def test_restarted_stream_continues_after_existing_shards(tmp_path: Path) -> None:
    cfg = sea(rows_per_shard=100, drifts=[DriftPoint(at_row=150, variant=2)])
    first = SyntheticStream(cfg, tmp_path / "landing")
    first.write_shard()
    first.write_shard()
    (tmp_path / "landing" / f".{shard_name(2)}.tmp").write_bytes(b"half a shard")  # a crash mid-write
    again = SyntheticStream(cfg, tmp_path / "landing")
    assert again.rows_written == 200
    resumed = again.write_shard()
    reference = SyntheticStream(cfg, tmp_path / "reference")
    expected = [reference.write_shard() for _ in range(3)][2]
    assert resumed is not None and expected is not None
    assert resumed.name == shard_name(2)
    assert resumed.read_bytes() == expected.read_bytes()
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == [shard_name(i) for i in range(3)]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"variant": 4}, "synthetic.variant"),
        ({"drifts": [DriftPoint(at_row=10, variant=9)]}, "synthetic.drifts[0].variant"),
        ({"drifts": [DriftPoint(at_row=10, variant=1, width=0)]}, "synthetic.drifts[0].width"),
        ({"seed": -1}, "synthetic.seed"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        SyntheticStream(sea(**kw), tmp_path)


# --- drift --------------------------------------------------------------------


def test_abrupt_drift_switches_sea_to_the_new_threshold(tmp_path: Path) -> None:
    at = 3000
    stream = SyntheticStream(sea(drifts=[DriftPoint(at_row=at, variant=2)]), tmp_path)
    x, y = stream.next_rows(6000)
    old, old_ok = sea_rule(x, 0)
    new, new_ok = sea_rule(x, 2)
    before, after = slice(0, at), slice(at, None)
    np.testing.assert_array_equal(y[before][old_ok[before]], old[before][old_ok[before]])
    np.testing.assert_array_equal(y[after][new_ok[after]], new[after][new_ok[after]])
    # Would fail without the drift: rows with 7 < x0 + x1 <= 8 now have label 1.
    assert (y[after] == old[after]).mean() < 0.95
    assert [stream.concept_at(r) for r in (0, at - 1, at, 5999)] == [0, 0, 2, 2]


def test_abrupt_drift_changes_the_agrawal_function(tmp_path: Path) -> None:
    cfg = SyntheticConfig(generator="agrawal", seed=2, drifts=[DriftPoint(at_row=2000, variant=2)])
    x, y = SyntheticStream(cfg, tmp_path).next_rows(4000)
    age = np.rint(x[:, 2].astype(np.float64) * 60 + 20)
    function_0 = ((age < 40) | (age >= 60)).astype(np.int64)
    assert (y[:2000] == function_0[:2000]).all()
    assert (y[2000:] == function_0[2000:]).mean() < 0.8


def test_hyperplane_variants_are_different_planes(tmp_path: Path) -> None:
    cfg = SyntheticConfig(generator="hyperplane", num_features=10, drifts=[DriftPoint(at_row=3000, variant=1)])
    x, y = SyntheticStream(cfg, tmp_path).next_rows(6000)
    # Fit the first concept's plane by least squares; it explains the old rows, not the new ones.
    design = np.c_[x[:3000], np.ones(3000)]
    w, *_ = np.linalg.lstsq(design, y[:3000] * 2.0 - 1.0, rcond=None)
    predict = (np.c_[x, np.ones(6000)] @ w > 0).astype(np.int64)
    assert (predict[:3000] == y[:3000]).mean() > 0.95
    assert (predict[3000:] == y[3000:]).mean() < 0.85


def test_gradual_drift_mixes_concepts_over_the_width(tmp_path: Path) -> None:
    at, width = 6000, 2000
    cfg = sea(drifts=[DriftPoint(at_row=at, variant=2, width=width)])
    x, y = SyntheticStream(cfg, tmp_path).next_rows(10_000)
    s = (x[:, 0].astype(np.float64) + x[:, 1]) * 10
    telling = (s > 7.0 + 1e-4) & (s < 8.0 - 1e-4)  # the two concepts disagree here: old 0, new 1

    def new_share(lo: int, hi: int) -> float:
        rows = telling[lo:hi]
        return float(y[lo:hi][rows].mean())

    assert new_share(0, at - width) < 0.05
    # An abrupt switch would give 0 and 1 in the half-widths either side of the centre.
    assert 0.1 < new_share(at - width // 2, at) < 0.45
    assert 0.55 < new_share(at, at + width // 2) < 0.9
    assert new_share(at + width, 10_000) > 0.95


# --- run: pacing and stopping ---------------------------------------------------


def test_run_stops_promptly_when_stop_is_set(tmp_path: Path) -> None:
    stream = SyntheticStream(sea(rows_per_shard=1000, rows_per_second=1.0), tmp_path)  # a shard per 1000 s
    stop = threading.Event()
    thread = threading.Thread(target=stream.run, args=(stop,))
    thread.start()
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0
    assert stream.rows_written == 0


def test_run_writes_until_max_rows_then_returns(tmp_path: Path) -> None:
    stream = SyntheticStream(sea(rows_per_shard=250, rows_per_second=1e7, max_rows=1100), tmp_path)
    stream.run(threading.Event())
    assert stream.rows_written == 1100
    assert len(list(tmp_path.glob("*.parquet"))) == 5


def test_run_paces_shards_at_rows_per_second(tmp_path: Path) -> None:
    stream = SyntheticStream(sea(rows_per_shard=100, rows_per_second=2000.0, max_rows=400), tmp_path)
    started = time.monotonic()
    stream.run(threading.Event())
    elapsed = time.monotonic() - started
    assert stream.rows_written == 400
    assert elapsed >= 0.19  # the 400th row is due at 0.2 s
    assert elapsed < 2.0


def test_module_does_not_import_ray() -> None:
    tree = ast.parse(Path(synthetic.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(m == "ray" or m.startswith("ray.") for m in imported)
