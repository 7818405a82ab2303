"""Durable state on an S3-compatible object store: a real moto server on
loopback (``moto[server]``), reached through pyarrow's S3 filesystem exactly
as AWS would be; no client is mocked."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from _util import S3_ENV, free_port
from livetrain.config import ConfigError, StorageConfig, load_config
from livetrain.storage import Store, check_train_storage, filesystem, record_train_storage

def test_store_put_get_list_restore_never_overwrites_local(s3: str, tmp_path: Path):
    store = Store(StorageConfig(uri="s3://livetrain-test/unit", endpoint=s3))
    store.check()
    store.put_bytes("served/v000001/model.pt", b"weights-1")
    store.put_bytes("decisions.jsonl", b'{"v": 1}\n')
    store.put_bytes("ray_train/livetrain/ckpt", b"ray's own")
    assert store.get_bytes("served/v000001/model.pt") == b"weights-1"
    assert store.get_bytes("nope") is None
    assert store.list() == ["decisions.jsonl", "served/v000001/model.pt"]  # Ray Train's files are not mirrored

    (tmp_path / "decisions.jsonl").write_text("local is newer\n")
    fetched = store.restore(tmp_path)
    assert fetched == ["served/v000001/model.pt"]
    assert (tmp_path / "served/v000001/model.pt").read_bytes() == b"weights-1"
    assert (tmp_path / "decisions.jsonl").read_text() == "local is newer\n"
    assert store.restore(tmp_path / "other", only=("served",)) == ["served/v000001/model.pt"]


def test_a_log_is_pushed_a_part_at_a_time_and_restored_whole(s3: str, tmp_path: Path, monkeypatch):
    """A decision log that grows for months: each push uploads only the part its new
    lines went into (not the whole log again), a log pushed whole by an older livetrain
    is split into parts once (its whole copy removed), parts the store lost are put
    back, and a fresh state dir gets the log back line for line."""
    from livetrain import storage

    monkeypatch.setattr(storage, "LOG_PART_LINES", 3)
    store = Store(StorageConfig(uri="s3://livetrain-test/logs", endpoint=s3))
    local = tmp_path / "state" / "decisions.jsonl"
    local.parent.mkdir()
    old = [f'{{"v": {i}}}\n' for i in range(4)]
    local.write_text("".join(old) + '{"v": 4, "torn')  # a crash mid-line: the next line starts afresh
    store.put_bytes("decisions.jsonl", "".join(old).encode())  # pushed whole before
    puts: list[tuple[str, int]] = []
    put = store.put_bytes
    monkeypatch.setattr(store, "put_bytes", lambda rel, data: (puts.append((rel, data.count(b"\n"))), put(rel, data)))
    mirror = storage.LogMirror(store, local, "decisions.jsonl")
    assert store.list() == ["decisions.jsonl.parts/00000000", "decisions.jsonl.parts/00000001"]
    with storage.open_lines(local) as f:
        new = [f'{{"v": {i}}}\n' for i in range(5, 12)]
        for line in new:
            f.write(line)
            f.flush()
            puts.clear()
            mirror.push([line])
            assert all(n <= 3 for _, n in puts) and len(puts) <= 2  # the newest part, and one it completed
    whole = local.read_text()
    assert whole.count("\n") == 12
    assert store.restore(tmp_path / "fresh") == ["decisions.jsonl"]
    assert (tmp_path / "fresh" / "decisions.jsonl").read_text() == whole
    store.delete("decisions.jsonl.parts/00000001")  # lost on the store: put back at the next start
    store.put_bytes("decisions.jsonl.parts/00000009", b'{"v": "from a run this state dir never saw"}\n')
    storage.LogMirror(store, local, "decisions.jsonl")  # ... and a part past the log's end removed
    assert store.restore(tmp_path / "again") == ["decisions.jsonl"]
    assert (tmp_path / "again" / "decisions.jsonl").read_text() == whole


def test_store_pushes_a_consistent_sqlite_copy(s3: str, tmp_path: Path):
    from livetrain.actors.manifest import Manifest

    store = Store(StorageConfig(uri="s3://livetrain-test/sqlite", endpoint=s3))
    with Manifest(tmp_path / "a") as m:
        m.set_meta("k", "v")
        store.push_sqlite(m.backup, "manifest.sqlite")
    store.restore(tmp_path / "b")
    with sqlite3.connect(tmp_path / "b" / "manifest.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'k'").fetchone() == ("v",)


def test_store_travels_by_pickle_without_its_client(s3: str):
    import pickle

    store = Store(StorageConfig(uri="s3://livetrain-test/pickled", endpoint=s3))
    store.put_bytes("x", b"1")
    copy = pickle.loads(pickle.dumps(store))
    assert copy._fs is None and copy.get_bytes("x") == b"1"


def test_unreachable_or_bucketless_storage_is_a_clear_error(s3: str):
    with pytest.raises(ConfigError, match="s3://no-such-bucket/x"):
        Store(StorageConfig(uri="s3://no-such-bucket/x", endpoint=s3)).check()
    with pytest.raises(ConfigError, match="names no bucket"):
        Store(StorageConfig(uri="s3://", endpoint=s3)).check()
    with pytest.raises(ConfigError, match="scheme"):
        StorageConfig(uri="s3://livetrain-test/x", endpoint="127.0.0.1:9000")


@pytest.mark.parametrize(
    "key, uri, message",
    [
        ("storage.uri", "s3://bucket/prefix?region=eu-west-1", "has a query string; set storage.endpoint / storage.region"),
        ("storage.uri", "s3:///x", "names no bucket"),
        ("source.path", "s3://bucket/landing?endpoint_override=localhost", "has a query string"),
        ("source.path", "s3:///landing", "names no bucket"),
    ],
)
def test_an_s3_uri_with_a_query_or_no_bucket_is_refused_when_loaded(key: str, uri: str, message: str):
    with pytest.raises(ConfigError, match=rf"^{key}: '{re.escape(uri)}' {message}"):
        load_config(overrides=[f"{key}={uri}"])
    with pytest.raises(ConfigError, match=message):
        filesystem(uri)


def _upload(local: Path, fs: pafs.FileSystem, prefix: str) -> None:
    """Every shard of ``local`` not yet under ``prefix``, oldest name first (S3 mtimes are seconds)."""
    have = {i.base_name for i in fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))}
    for f in sorted(local.glob("*.parquet")):
        if f.name not in have:
            with fs.open_output_stream(f"{prefix}/{f.name}") as out:
                out.write(f.read_bytes())


def _checkpoint(train_dir: Path) -> None:
    (train_dir / "livetrain" / "checkpoint_000003").mkdir(parents=True)


def test_adding_storage_uri_to_a_state_dir_that_trained_is_refused_until_its_checkpoints_move(tmp_path: Path):
    """Ray Train's storage moves from the state dir to the URI: it would find no checkpoint."""
    state, shared = tmp_path / "state", tmp_path / "shared"
    _checkpoint(state / "ray_train")
    store = Store(StorageConfig(uri=str(shared)))
    cfg = load_config(overrides=[f"state_dir={state}", f"storage.uri={shared}", "tracking.wandb=disabled"])
    from livetrain.training.trainer import make_trainer

    with pytest.raises(ConfigError, match=rf"^storage.uri: this state dir's training checkpoints are under "
                                          rf"{state}/ray_train/livetrain, but this run keeps them under "
                                          rf"{shared}/ray_train/livetrain, where there are none"):
        make_trainer(cfg, None, None, None)
    _checkpoint(shared / "ray_train")  # copied, as the message says
    assert check_train_storage(state, store) == f"{shared}/ray_train"


def test_removing_storage_uri_after_training_there_is_refused(tmp_path: Path):
    state, shared = tmp_path / "state", tmp_path / "shared"
    state.mkdir()
    store = Store(StorageConfig(uri=f"{shared}/"))
    _checkpoint(shared / "ray_train")
    record_train_storage(state, check_train_storage(state, store))
    with pytest.raises(ConfigError, match=rf"checkpoints are under {shared}/ray_train/livetrain, but this run keeps "
                                          rf"them under {state}/ray_train/livetrain.*delete {state}/ray_train_at$"):
        check_train_storage(state, None)
    assert check_train_storage(state, store) == f"{shared}/ray_train"  # set back: goes on


def test_a_state_dir_that_never_trained_may_take_or_drop_storage_uri(tmp_path: Path):
    store = Store(StorageConfig(uri=str(tmp_path / "shared")))
    assert check_train_storage(tmp_path, store) == f"{tmp_path}/shared/ray_train"
    record_train_storage(tmp_path, "state_dir")
    assert check_train_storage(tmp_path, store) == f"{tmp_path}/shared/ray_train"  # no checkpoint anywhere
    assert check_train_storage(tmp_path, None) == "state_dir"


@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.slow
def test_run_restarts_on_a_fresh_state_dir_from_s3(s3: str, tmp_path: Path):
    """Shards land on S3 and state goes there. The head's disk is lost between
    two runs: the second starts on an empty state dir and continues from the
    object store — no shard read twice, training steps continue from the S3
    checkpoint, the served version and the W&B run come back."""
    from test_cli import livetrain_until, manifest_rows, write_shards

    local = tmp_path / "written"
    store = Store(StorageConfig(uri="s3://livetrain-test/run", endpoint=s3))
    landing = "livetrain-test/landing"
    cfg = {
        "live_view": False,
        "source": {"kind": "directory", "path": f"s3://{landing}"},
        "schema": {"features": ["x0", "x1", "x2"], "label": "label", "classes": [0, 1]},
        "train": {"checkpoint_every_s": 3.0, "min_buffer_rows": 500},
        "serve": {"port": free_port()},
        "tracking": {"wandb": "offline"},
        "storage": {"uri": "s3://livetrain-test/run", "endpoint": s3, "sync_interval_s": 1.0},
    }
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **S3_ENV}
    write_shards(local, 12)
    _upload(local, store.fs, landing)
    with store.fs.open_output_stream(f"{landing}/zz-not-parquet.parquet") as out:
        out.write(b"this is not parquet")
    done = threading.Event()

    def trickle() -> None:  # new rows keep arriving: the gate judges candidates on rows they have not seen
        while not done.wait(1.0):
            write_shards(local, 1)
            _upload(local, store.fs, landing)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        first, _ = livetrain_until(
            lambda m: (m["shards_ingested"] >= 12 and m["shards_quarantined"] >= 1 and m["train_steps"] > 0
                       and m.get("served_version") is not None),
            "the first shards in, the bad one quarantined, a served version", "run", "--config", str(path),
            state=tmp_path / "a", env=env)
    finally:
        done.set()
        feeder.join()
    assert first["shards_ingested"] >= 12 and first["served_version"] is not None and first["train_steps"] > 0
    assert first["shards_quarantined"] == 1  # copied whole from S3 into quarantine/whole/, with its reason
    assert (tmp_path / "a" / "quarantine" / "whole" / "zz-not-parquet.parquet").read_bytes() == b"this is not parquet"

    held = store.list()
    assert {"manifest.sqlite", "decisions.jsonl.parts/00000000", "buffer_snapshot.json", "wandb_run_id"} <= set(held)
    assert "decisions.jsonl" not in held  # the log goes up a part at a time
    assert f"served/v{first['served_version']:06d}/model.pt" in held
    ckpts = store.fs.get_file_info(pafs.FileSelector(store.path("ray_train"), recursive=True))
    assert any(i.path.endswith("model.pt") for i in ckpts), "no Ray Train checkpoint on S3"
    run_log = b"".join(f.read_bytes() for f in (tmp_path / "a" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert f"s3://livetrain-test/run/served/v{first['served_version']:06d}/model.pt".encode() in run_log  # a model artifact

    write_shards(local, 6)
    _upload(local, store.fs, landing)
    total = len(list(local.glob("*.parquet")))
    fresh = tmp_path / "b"  # an empty state dir: everything durable comes from S3
    second, output = livetrain_until(
        lambda m: m["shards_ingested"] >= total - first["shards_ingested"] and m["train_steps"] > first["train_steps"],
        "every shard the first run left and training past it", "run", "--config", str(path), state=fresh, env=env)
    assert "restored" in output
    # exactly once across the two runs: the second reads only what the first did not
    assert second["shards_ingested"] == total - first["shards_ingested"] >= 6
    assert second["buffer_rebuilt_rows"] > 0  # the buffer came back from the snapshot + the shards on S3
    rows = manifest_rows(fresh)
    assert len(rows) == total + 1 and [s for _, s in rows].count("ingested") == total
    assert "resumed from checkpoint" in output
    assert second["train_steps"] > first["train_steps"]
    assert second["served_version"] >= first["served_version"]
    # the version restored at start-up is not this run's first promotion
    assert (second["first_promotion_s"] is None) == (second["versions_promoted"] == 0)
    assert (fresh / "wandb_run_id").read_text() == (tmp_path / "a" / "wandb_run_id").read_text()
    # the first run's log, put back together from its parts, line for line, then the second's
    assert (fresh / "decisions.jsonl").read_text().startswith((tmp_path / "a" / "decisions.jsonl").read_text())
    history = [json.loads(line) for line in (fresh / "decisions.jsonl").read_text().splitlines()]
    assert any(d["action"] == "promote" and d["version"] == first["served_version"] for d in history)


def test_directory_source_lists_an_s3_prefix_and_reports_rewrites(s3: str, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from livetrain import storage
    from livetrain.actors.sources import DirectorySource

    storage.configure(StorageConfig(endpoint=s3))
    fs, _ = storage.filesystem("s3://livetrain-test", s3)
    pq.write_table(pa.table({"x": [1]}), "livetrain-test/dsrc/a.parquet", filesystem=fs)
    pq.write_table(pa.table({"x": [2]}), "livetrain-test/dsrc/b.parquet", filesystem=fs)
    with fs.open_output_stream("livetrain-test/dsrc/notes.txt") as f:
        f.write(b"not a shard")
    src = DirectorySource("s3://livetrain-test/dsrc/")
    got = src.poll()
    assert sorted(got) == ["s3://livetrain-test/dsrc/a.parquet", "s3://livetrain-test/dsrc/b.parquet"]
    assert src.poll() == []  # nothing new
    pq.write_table(pa.table({"x": [3, 4]}), "livetrain-test/dsrc/a.parquet", filesystem=fs)  # rewritten
    assert src.poll() == ["s3://livetrain-test/dsrc/a.parquet"]
    assert pq.ParquetFile(storage.open_shard(got[0])).read().column("x").to_pylist() == [3, 4]
    size, _ = storage.shard_stat(got[0])
    assert size == sum(len(c) for c in storage.read_shard_chunks(got[0]))
    with pytest.raises(FileNotFoundError):
        storage.shard_stat("s3://livetrain-test/dsrc/gone.parquet")
