"""Ingest actors map their share of Ray's object store in at start
(``ingest.prefault_store``), so writing blocks does not fault per page."""

from __future__ import annotations

import os
import platform

import pytest

from _ingest_util import close, make_loop, run_until_done, write_id_shard
from _util import wait_until
from livetrain.actors.ingest import IngestActor
from livetrain.actors.store_memory import prefault_object_store, store_mapping
from livetrain.config import ConfigError, load_config

MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234                       /usr/bin/python3.11
7f10a0000000-7f10a0021000 rw-p 00000000 00:00 0
7f1100000000-7f1140000000 rw-p 00000000 00:1b 977                        /dev/shm/plasmaAbCdEf (deleted)
7f362b1a0000-7f37ec000000 rw-s 00000000 00:1b 978                        /dev/shm/plasmaWlKpbF (deleted)
7f3800000000-7f3900000000 rw-s 00000000 08:01 979                        /tmp/plasmaFallback (deleted)
"""


def test_the_store_is_the_shared_writable_plasma_file_on_tmpfs():
    assert store_mapping(MAPS) == (0x7F362B1A0000, 0x7F37EC000000 - 0x7F362B1A0000)
    private_or_on_disk = "\n".join(line for line in MAPS.splitlines() if "WlKpbF" not in line)
    assert store_mapping(private_or_on_disk) is None
    assert store_mapping(MAPS.replace("rw-s", "r--s")) is None


def test_nothing_to_prefault_outside_a_ray_worker_or_for_zero_bytes():
    assert prefault_object_store(0) == 0
    assert prefault_object_store(1 << 20, 1 << 20) == 0
    if store_mapping() is None:  # this test process has not mapped a store: nothing happens
        assert prefault_object_store(1 << 20) == 0


def test_prefault_store_must_be_a_non_negative_multiple():
    assert load_config(None, ["ingest.prefault_store=0"]).ingest.prefault_store == 0
    with pytest.raises(ConfigError, match="ingest.prefault_store"):
        load_config(None, ["ingest.prefault_store=-1"])


def _kernel_has_populate_write() -> bool:
    try:
        major, minor = (int(v) for v in platform.release().split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 14)


def _store_rss(actor) -> int | None:
    """Bytes of the object store mapped in ``actor``'s process (its smaps Rss)."""
    import ray

    def rss(_self):
        mapping = store_mapping()
        if mapping is None:
            return None
        start = f"{mapping[0]:x}-"
        lines = open(f"/proc/{os.getpid()}/smaps").read().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(start):
                return next(int(x.split()[1]) * 1024 for x in lines[i + 1:] if x.startswith("Rss:"))
        return None

    return ray.get(actor.__ray_call__.remote(rss))


@pytest.mark.ray
def test_an_ingest_actor_maps_twice_the_buffers_bytes_of_the_store_in_at_start(ray_session, tmp_path):
    import ray

    mib = 2**20
    on, off = tmp_path / "on", tmp_path / "off"
    cfg, loop, buffer = make_loop(on, f"buffer.capacity_bytes={16 * mib}")  # default ingest.prefault_store: 2
    _, loop_off, buffer_off = make_loop(off, f"buffer.capacity_bytes={16 * mib}", "ingest.prefault_store=0")
    try:
        actor, actor_off = loop.actors[0], loop_off.actors[0]
        rss, rss_off = _store_rss(actor), _store_rss(actor_off)
        if rss is None or not _kernel_has_populate_write():
            pytest.skip(f"no object store on tmpfs or no MADV_POPULATE_WRITE here (Linux {platform.release()})")
        assert ray.get(actor.__ray_call__.remote(lambda a: a.prefaulted)) == 32 * mib
        assert ray.get(actor_off.__ray_call__.remote(lambda a: a.prefaulted)) == 0
        assert rss >= 32 * mib > rss_off, (rss, rss_off)
        # and the prefaulted actor ingests as ever
        write_id_shard(cfg.landing_dir / "p-000.parquet", 0, 3000)
        run_until_done(loop)
        assert loop.counters.rows_ingested == 3000

        # past the first prefault_sync_bytes, the rest goes in on a thread: the actor
        # takes work at once (a large buffer's tens of GB would hold it up for seconds)
        big = IngestActor.remote(cfg.schema, str(on), 1000, None, 48 * mib, 8 * mib)
        assert ray.get(big.__ray_call__.remote(lambda a: a.prefaulting is not None))
        wait_until(lambda: ray.get(big.__ray_call__.remote(lambda a: a.prefaulted)) == 48 * mib, 60,
                   "the rest prefaulted on the thread")
        assert _store_rss(big) >= 48 * mib
        ray.kill(big)
    finally:
        close(loop, buffer)
        close(loop_off, buffer_off)
