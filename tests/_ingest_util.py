"""Shards with row ids, and by-id accounting of where every row went."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _util import wait_until
from livetrain.actors.quarantine import BAD_ROWS_SUFFIX, quarantine_dir
from livetrain.config import load_config


def write_id_shard(path: Path, first_id: int, n: int, bad_every: int = 0, seed: int = 0) -> set[int]:
    """A shard of ``n`` rows with ids ``first_id..``; every ``bad_every``-th row is bad
    (NaN feature or unknown label, alternately). Written atomically. Returns the bad ids."""
    rng = np.random.default_rng(seed + first_id)
    x = rng.random((n, 3))
    label = (x[:, 0] + x[:, 1] > 1).astype(np.int64)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    bad: set[int] = set()
    if bad_every:
        for k, i in enumerate(range(0, n, bad_every)):
            if k % 2:
                x[i, 1] = np.nan
            else:
                label[i] = 7
            bad.add(int(ids[i]))
    table = pa.table({"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "label": label, "id": ids})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=max(1, n // 3))
    os.replace(tmp, path)
    return bad


def quarantined_ids(state: Path) -> list[int]:
    out: list[int] = []
    for f in sorted(quarantine_dir(state).glob(f"*{BAD_ROWS_SUFFIX}")):
        out += pq.read_table(f, columns=["id"])["id"].to_pylist()
    return out


def buffer_ids(buffer) -> list[int]:
    import ray

    from livetrain.messages import fetch_blocks

    held = ray.get(buffer.held_blocks.remote())
    blocks = fetch_blocks([b for _, b in held])
    return [int(i) for b in blocks for i in b["id"]]


def assert_exactly_once(all_ids: set[int], in_buffer: list[int], quarantined: list[int]) -> None:
    assert len(in_buffer) == len(set(in_buffer)), "a row is in the buffer twice"
    assert len(quarantined) == len(set(quarantined)), "a row is quarantined twice"
    assert not set(in_buffer) & set(quarantined), "a row is both in the buffer and quarantined"
    assert set(in_buffer) | set(quarantined) == all_ids, f"{len(all_ids - set(in_buffer) - set(quarantined))} rows lost"


def make_loop(state: Path, *overrides: str):
    from livetrain.actors.buffer_actor import ReplayBufferActor
    from livetrain.actors.ingest import IngestLoop
    from livetrain.actors.manifest import Manifest

    cfg = load_config(None, [
        f"state_dir={state}", f"source.path={state / 'landing'}", "schema.features=[x0, x1, x2]", "schema.id_column=id",
        "buffer.capacity_rows=100000", "buffer.window_rows=100000", *overrides,
    ])
    buffer = ReplayBufferActor.remote(cfg.buffer, str(state), cfg.schema, cfg.ingest.block_rows)
    loop = IngestLoop(cfg, Manifest(state), buffer, None)
    return cfg, loop, buffer


def run_until_done(loop, timeout_s: float = 60) -> None:
    def done():
        loop.step(0.2)
        # and every batch answered: the buffer marks shards ingested before the loop counts them
        return (loop.manifest.pending_count() == 0 and not loop.in_flight() and not loop.unregistered()
                and not loop.committing())

    wait_until(done, timeout_s, "every shard ingested or quarantined", interval_s=0)


def close(loop, buffer) -> None:
    import ray

    loop.shutdown()
    loop.manifest.close()
    ray.kill(buffer)


