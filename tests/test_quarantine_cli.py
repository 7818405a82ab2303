"""``livetrain quarantine``: list what was set aside and why, fix it, re-ingest it;
every row id ends up in the buffer exactly once (real Ray for the ingestion)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from _ingest_util import assert_exactly_once, buffer_ids, close, make_loop, quarantined_ids, run_until_done, write_id_shard

pytestmark = [pytest.mark.ray]


def quarantine(state: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "livetrain.cli", "quarantine", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_quarantine_lists_reasons_and_reingests_fixed_rows_and_shards(ray_session, tmp_path):
    cfg, loop, buffer = make_loop(tmp_path, "ingest.block_rows=250")
    landing = cfg.landing_dir
    bad = write_id_shard(landing / "q-000.parquet", 0, 1000, bad_every=100)
    write_id_shard(tmp_path / "good-001.parquet", 10_000, 500)
    (landing / "q-001.parquet").write_bytes((tmp_path / "good-001.parquet").read_bytes()[:700])  # truncated
    run_until_done(loop)
    listing = quarantine(tmp_path)
    assert "q-000.parquet\t10 rows\tlabel not in classes: 5, nan feature: 5" in listing
    assert "q-001.parquet\twhole shard\tnot a readable parquet file" in listing
    assert set(quarantined_ids(tmp_path)) == bad

    # the user fixes the cause: the bad rows in place, the broken shard by replacing it in landing
    bad_file = tmp_path / "quarantine" / "q-000.bad.parquet"
    t = pq.read_table(bad_file)
    t = t.set_column(t.column_names.index("label"), "label", pc.if_else(pc.equal(t["label"], 7), 0, t["label"]))
    t = t.set_column(t.column_names.index("x1"), "x1", pc.fill_null(pc.if_else(pc.is_nan(t["x1"]), 0.5, t["x1"]), 0.5))
    pq.write_table(t, bad_file)
    (landing / "q-001.parquet").write_bytes((tmp_path / "good-001.parquet").read_bytes())
    out = quarantine(tmp_path, "--all")
    assert "10 rows re-ingested as q-000.reingest-" in out and "q-001.parquet: re-reading" in out
    assert quarantine(tmp_path, "--all") == ""  # nothing left: a second run is harmless
    assert '"entries": 0' in quarantine(tmp_path)

    run_until_done(loop)
    assert loop.manifest.get("q-001.parquet").status == "ingested"
    assert_exactly_once(set(range(1000)) | set(range(10_000, 10_500)), buffer_ids(buffer), quarantined_ids(tmp_path))
    assert quarantined_ids(tmp_path) == []
    close(loop, buffer)
