"""Durable state on an S3-compatible object store: a real moto server on
loopback (``moto[server]``), reached through pyarrow's S3 filesystem exactly
as AWS would be; no client is mocked."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from _util import free_port
from livetrain.config import ConfigError, StorageConfig
from livetrain.storage import Store

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """``(endpoint, env)`` of a moto S3 server on loopback with a bucket ``livetrain-test``."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir("livetrain-test")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.slow
def test_run_restarts_on_a_fresh_state_dir_from_s3(s3: str, tmp_path: Path):
    """The head's disk is lost between two runs: the second starts on an empty
    state dir and continues from the object store — no shard read twice,
    training steps continue from the S3 checkpoint, the served version and the
    W&B run come back."""
    from test_cli import livetrain, manifest_rows, write_shards

    landing = tmp_path / "landing"
    cfg = {
        "live_view": False,
        "source": {"kind": "directory", "path": str(landing)},
        "schema": {"features": ["x0", "x1", "x2"], "label": "label", "classes": [0, 1]},
        "train": {"checkpoint_every_s": 3.0, "min_buffer_rows": 500},
        "serve": {"port": free_port()},
        "tracking": {"wandb": "offline"},
        "storage": {"uri": "s3://livetrain-test/run", "endpoint": s3, "sync_interval_s": 1.0},
    }
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **S3_ENV}
    write_shards(landing, 12)
    first, _ = livetrain("run", "--config", str(path), "--state-dir", str(tmp_path / "a"), "--duration", "20", env=env)
    assert first["shards_ingested"] == 12 and first["served_version"] is not None and first["train_steps"] > 0

    store = Store(StorageConfig(uri="s3://livetrain-test/run", endpoint=s3))
    held = store.list()
    assert {"manifest.sqlite", "decisions.jsonl", "buffer_snapshot.json", "wandb_run_id"} <= set(held)
    assert f"served/v{first['served_version']:06d}/model.pt" in held
    ckpts = store.fs.get_file_info(pafs.FileSelector(store.path("ray_train"), recursive=True))
    assert any(i.path.endswith("model.pt") for i in ckpts), "no Ray Train checkpoint on S3"

    write_shards(landing, 6)
    fresh = tmp_path / "b"  # an empty state dir: everything durable comes from S3
    second, proc = livetrain("run", "--config", str(path), "--state-dir", str(fresh), "--duration", "20", env=env)
    assert "restored" in proc.stderr
    assert second["shards_ingested"] == 6 and second["rows_ingested"] == 3_000  # no shard twice
    rows = manifest_rows(fresh)
    assert len(rows) == 18 and {s for _, s in rows} == {"ingested"}
    assert "resumed from checkpoint" in proc.stdout + proc.stderr
    assert second["train_steps"] > first["train_steps"]
    assert second["served_version"] >= first["served_version"]
    assert (fresh / "wandb_run_id").read_text() == (tmp_path / "a" / "wandb_run_id").read_text()
    history = [json.loads(line) for line in (fresh / "decisions.jsonl").read_text().splitlines()]
    assert any(d["action"] == "promote" and d["version"] == first["served_version"] for d in history)
