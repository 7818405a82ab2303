"""Soak: the object store must not grow under a stream that never ends.

    python benchmarks/soak.py [--seconds 120] [--rows-per-second 10000]

Runs the whole loop in-process on a synthetic stream much larger than the
buffer (rows/s x seconds >> buffer.capacity_rows) and samples the plasma
store's usage (``memory_summary``) and the buffer's rows every 2 s. Flat means
the last quarter's mean store usage is about the second quarter's (the first
quarter is the fill-up).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def plasma_mib() -> float:
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(m.group(1)) if m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--rows-per-second", type=float, default=10_000.0)
    args = ap.parse_args()

    from _util import free_port
    from livetrain.config import load_config, shipped_config
    from livetrain.pipeline import Pipeline

    state = Path(tempfile.mkdtemp(prefix="livetrain-soak-"))
    cfg = load_config(shipped_config("demo"), [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={free_port()}",
        f"synthetic.rows_per_second={args.rows_per_second}", "synthetic.rows_per_shard=2000",
        "buffer.capacity_rows=50000", "buffer.window_rows=5000",
    ])
    p = Pipeline(cfg, probe_traffic=True)
    p.start()
    samples: list[tuple[float, float, int]] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            samples.append((time.monotonic() - t0, plasma_mib(), p.snapshot()["buffer_rows"]))
            time.sleep(2.0)
        rows = p.ingest.counters.rows_ingested
    finally:
        p.stop()
    q = max(1, len(samples) // 4)
    second = sum(s[1] for s in samples[q : 2 * q]) / q
    last = sum(s[1] for s in samples[-q:]) / q
    emit("soak_rows_ingested", rows, "rows", seconds=args.seconds, buffer_capacity_rows=cfg.buffer.capacity_rows)
    emit("soak_object_store_last_quarter_mean", round(last, 1), "MiB", baseline=round(second, 1),
         baseline_is="mean over the second quarter of the run")
    emit("soak_object_store_max", max(s[1] for s in samples), "MiB")
    emit("soak_buffer_rows_max", max(s[2] for s in samples), "rows", bound=cfg.buffer.capacity_rows)


if __name__ == "__main__":
    main()
