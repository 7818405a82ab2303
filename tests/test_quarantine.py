"""The quarantine keeps bad rows and unusable shards, with reasons, written atomically."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from livetrain.actors.quarantine import list_quarantine, quarantine_dir, write_quarantine
from livetrain.actors.schema import NAN_FEATURE, UNKNOWN_LABEL, read_and_validate
from livetrain.config import SchemaConfig

SCHEMA = SchemaConfig(features=["a", "b"], classes=[0, 1])


def _shard_with_bad_rows(path):
    pq.write_table(
        pa.table({"a": [1.0, np.nan, 3.0, 4.0], "b": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 7, 1]}),
        path,
    )
    return path


def test_bad_rows_are_written_with_reason_and_source_shard(tmp_path):
    source = _shard_with_bad_rows(tmp_path / "s-001.parquet")
    shard = read_and_validate(source, SCHEMA)
    written = write_quarantine(tmp_path / "state", "s-001.parquet", shard.bad, shard.error, source)

    assert written == tmp_path / "state" / "quarantine" / "s-001.bad.parquet"
    rows = pq.read_table(written).to_pylist()
    assert [r["reason"] for r in rows] == [NAN_FEATURE, UNKNOWN_LABEL]
    assert {r["source_shard"] for r in rows} == {"s-001.parquet"}
    assert rows[1]["label"] == 7 and rows[1]["a"] == 3.0


def test_nothing_is_written_for_a_clean_shard(tmp_path):
    assert write_quarantine(tmp_path, "s.parquet", None, None, tmp_path / "s.parquet") is None
    assert list_quarantine(tmp_path) == []


def test_a_shard_rejected_whole_is_copied_as_is_beside_its_reason(tmp_path):
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"not parquet at all")
    shard = read_and_validate(source, SCHEMA)
    written = write_quarantine(tmp_path / "state", source.name, shard.bad, shard.error, source)

    assert written == quarantine_dir(tmp_path / "state") / "whole" / "broken.parquet"
    assert written.read_bytes() == source.read_bytes()
    reason = (written.parent / "broken.parquet.reason.txt").read_text().splitlines()
    assert reason[0] == shard.error
    assert reason[1] == f"source: {source}"


def test_a_vanished_shard_still_gets_its_reason_file(tmp_path):
    gone = tmp_path / "gone.parquet"
    written = write_quarantine(tmp_path, gone.name, None, "not a readable parquet file", gone)
    assert written.name == "gone.parquet.reason.txt"
    (entry,) = list_quarantine(tmp_path)
    assert entry.shard == "gone.parquet" and entry.error == "not a readable parquet file"


def test_list_quarantine_summarises_both_kinds_of_entry(tmp_path):
    state = tmp_path / "state"
    bad_source = _shard_with_bad_rows(tmp_path / "b.parquet")
    shard = read_and_validate(bad_source, SCHEMA)
    write_quarantine(state, "b.parquet", shard.bad, shard.error, bad_source)
    broken = tmp_path / "a.parquet"
    broken.write_bytes(b"junk")
    write_quarantine(state, "a.parquet", None, "not a readable parquet file: magic", broken)

    whole, rows = list_quarantine(state)
    assert (whole.shard, whole.rows) == ("a.parquet", None)
    assert whole.error == "not a readable parquet file: magic"
    assert whole.path == quarantine_dir(state) / "whole" / "a.parquet"
    assert (rows.shard, rows.rows, rows.error) == ("b.parquet", 2, None)
    assert rows.reasons == {NAN_FEATURE: 1, UNKNOWN_LABEL: 1}


def test_quarantining_a_shard_again_replaces_the_entry(tmp_path):
    source = _shard_with_bad_rows(tmp_path / "s.parquet")
    shard = read_and_validate(source, SCHEMA)
    write_quarantine(tmp_path, "s.parquet", shard.bad, None, source)
    write_quarantine(tmp_path, "s.parquet", shard.bad, None, source)
    (entry,) = list_quarantine(tmp_path)
    assert entry.rows == 2


def test_no_temporary_files_are_left_behind(tmp_path):
    source = _shard_with_bad_rows(tmp_path / "s.parquet")
    shard = read_and_validate(source, SCHEMA)
    write_quarantine(tmp_path, "s.parquet", shard.bad, None, source)
    write_quarantine(tmp_path, "t.parquet", None, "zero rows", source)
    names = sorted(str(p.relative_to(quarantine_dir(tmp_path))) for p in quarantine_dir(tmp_path).rglob("*"))
    assert names == ["s.bad.parquet", "whole", "whole/t.parquet", "whole/t.parquet.reason.txt"]


def test_a_shard_named_like_a_bad_rows_file_keeps_both_entries(tmp_path):
    """``day1.bad.parquet`` rejected whole must not take the place of ``day1.parquet``'s
    bad rows, nor be read as bad rows."""
    source = _shard_with_bad_rows(tmp_path / "day1.parquet")
    shard = read_and_validate(source, SCHEMA)
    write_quarantine(tmp_path, "day1.parquet", shard.bad, None, source)
    junk = tmp_path / "day1.bad.parquet"
    junk.write_bytes(b"junk")
    write_quarantine(tmp_path, junk.name, None, "not a readable parquet file", junk)
    entries = {e.shard: e for e in list_quarantine(tmp_path)}
    assert entries["day1.parquet"].rows == 2 and entries["day1.bad.parquet"].error == "not a readable parquet file"


def test_a_state_dir_from_before_whole_is_still_listed(tmp_path):
    """Shards rejected whole used to be kept beside the bad rows."""
    qdir = quarantine_dir(tmp_path)
    qdir.mkdir()
    (qdir / "x.bad.parquet").write_bytes(b"junk")
    (qdir / "x.bad.parquet.reason.txt").write_text("zero rows\nsource: x\n")
    (entry,) = list_quarantine(tmp_path)
    assert (entry.shard, entry.error, entry.path) == ("x.bad.parquet", "zero rows", qdir / "x.bad.parquet")


def test_an_unfinished_temporary_file_is_not_listed(tmp_path):
    qdir = quarantine_dir(tmp_path)
    qdir.mkdir()
    (qdir / ".s.bad.parquet.abc.tmp").write_bytes(b"half")
    assert list_quarantine(tmp_path) == []


def test_a_bad_rows_file_the_user_broke_or_trimmed_is_still_listed(tmp_path):
    source = _shard_with_bad_rows(tmp_path / "s.parquet")
    shard = read_and_validate(source, SCHEMA)
    written = write_quarantine(tmp_path, "s.parquet", shard.bad, None, source)
    pq.write_table(pq.read_table(written).drop_columns(["reason"]), written)  # edited before --reingest
    (entry,) = list_quarantine(tmp_path)
    assert (entry.shard, entry.rows, entry.reasons) == ("s.parquet", 2, {"(no reason column)": 2})
    written.write_bytes(b"garbage")
    (entry,) = list_quarantine(tmp_path)
    assert entry.shard == "s" and entry.rows == 0 and next(iter(entry.reasons)).startswith("unreadable: ")
