"""The demo's figures: seconds to the first promoted version, freshness
p50/p95, peak memory of the whole process tree, and the summary.

    python benchmarks/demo.py [--duration 60] [key=value ...]

Runs ``livetrain demo`` as a user would (a subprocess with its own Ray),
polls ``GET /model`` to time the first promotion from the command's start,
and samples the PSS of the command and every process it started.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from _common import emit, tree_pss_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the demo")
    args = ap.parse_args()
    port = free_port()
    state = tempfile.mkdtemp(prefix="livetrain-bench-demo-")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "livetrain.cli", "demo", "--duration", str(args.duration), "--no-live",
         "--wandb", "disabled", "--state-dir", state, f"serve.port={port}",
         *args.overrides],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    peak = [0]
    first_version_s: list[float] = []

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            if not first_version_s:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=2) as r:
                        if json.loads(r.read()).get("model_version") is not None:
                            first_version_s.append(time.monotonic() - t0)
                except OSError:
                    pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    summary = json.loads(out.strip().splitlines()[-1])
    emit("demo_seconds_to_first_promoted_version", first_version_s[0] if first_version_s else None, "s")
    emit("demo_freshness_p50", summary["freshness_p50_s"], "s")
    emit("demo_freshness_p95", summary["freshness_p95_s"], "s")
    emit("demo_peak_memory_pss", round(peak[0] / 2**20, 1), "MiB")
    emit("demo_prequential_accuracy", summary["prequential_accuracy"], "fraction")
    emit("demo_train_samples_per_s", summary["train_samples_per_s"], "samples/s")
    emit("demo_versions_promoted", summary["versions_promoted"], "versions", proposed=summary["versions_proposed"])
    emit("demo_rows_ingested", summary["rows_ingested"], "rows", seconds=summary["elapsed_s"])


if __name__ == "__main__":
    main()
