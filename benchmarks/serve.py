"""Serving throughput and latency of livetrain's endpoint against a plain
single-process FastAPI + uvicorn + PyTorch server, on the same model, weights
and inputs, in one run; then livetrain under the same load while a new
version is promoted every ``--promote-every`` seconds.

    python benchmarks/serve.py [--seconds 8] [--concurrency 16] [--swap-seconds 20]

Load generator: one asyncio process (aiohttp, a keep-alive connection pool)
running ``--concurrency`` closed-loop clients, in the driver process. It is
the same for both servers; on a 2-core machine it shares the CPUs with them,
so absolute figures are lower than with a separate client machine.

Both servers predict with one torch thread. livetrain runs one replica with
the default ``serve.*`` config (dynamic batching: 32 requests, 2 ms).
Promotions go through the real registry actor (propose, then unseen rows for
the gate) while the load runs. Swap time is from the registry's promotion
timestamp to the first response the client receives naming the new version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from _common import emit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

FEATURES = ["x0", "x1", "x2"]


# --- the plain server (runs in its own process) -------------------------------


class PlainRequest(BaseModel):
    instances: list[list[float]]


def plain_server(port: int, weights_path: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    from livetrain.training.checkpoint import load_model

    torch.set_num_threads(1)
    model, _ = load_model(weights_path)
    app = FastAPI()

    @app.post("/predict")
    def predict(req: PlainRequest) -> dict:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor(req.instances, dtype=torch.float32)), 1).numpy()
        return {"predictions": probs.argmax(1).tolist(), "probabilities": probs.round(6).tolist(), "model_version": 0}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- load generation -----------------------------------------------------------


async def _load(url: str, body: bytes, concurrency: int, seconds: float, records: list) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=30)
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        payload = await r.read()
                        status = r.status
                    version = json.loads(payload)["model_version"] if status == 200 else None
                except Exception as e:  # a failed request, counted
                    status, version = repr(e)[:80], None
                records.append((t0, time.perf_counter(), time.time(), status, version))

        await asyncio.gather(*(client() for _ in range(concurrency)))


def run_load(url: str, rows: np.ndarray, concurrency: int, seconds: float) -> list:
    records: list = []
    asyncio.run(_load(url + "/predict", json.dumps({"instances": rows.tolist()}).encode(), concurrency, seconds, records))
    return records


def summarise(records: list, seconds: float) -> dict:
    ok = [r for r in records if r[3] == 200]
    lat = np.array([r[1] - r[0] for r in ok]) * 1000
    return {
        "rps": len(ok) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "failed": len(records) - len(ok),
        "requests": len(records),
    }


# --- the run -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.2)  # polling for a server to come up
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0, help="load per measurement")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    ap.add_argument("--swap-seconds", type=float, default=20.0, help="load while promoting")
    ap.add_argument("--promote-every", type=float, default=2.0)
    ap.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE", help="Ray Serve flags set before ray.init, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    ap.add_argument("--plain-server", nargs=2, metavar=("PORT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        return plain_server(int(args.plain_server[0]), args.plain_server[1])

    import ray
    import torch
    from ray import serve

    from livetrain.config import load_config, shipped_config
    from livetrain.serving.app import start_serving
    from livetrain.training.checkpoint import CheckpointData, save_checkpoint
    from livetrain.training.models import model_spec
    from test_serving_http import Promoter, start_registry

    os.environ.setdefault("WANDB_MODE", "disabled")
    state = Path(tempfile.mkdtemp(prefix="livetrain-bench-serve-"))
    port, plain_port = free_port(), free_port()
    cfg = load_config(shipped_config("demo"), [f"state_dir={state}", f"serve.port={port}", "gate.tolerance=1.0", "gate.min_eval_rows=10"])
    spec = model_spec(cfg.model, len(FEATURES), len(cfg.schema.classes))
    rng = np.random.default_rng(0)
    inputs = {n: rng.random((n, len(FEATURES)), dtype=np.float32) for n in (1, 64)}

    for kv in args.serve_env:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    ray.init(num_cpus=4, include_dashboard=False, namespace="livetrain-bench", configure_logging=False, log_to_driver=False)
    plain = None
    try:
        registry = start_registry(cfg, "livetrain_bench_registry", "livetrain-bench")
        promoter = Promoter(registry, spec)
        v1 = promoter.promote(seed=0)
        ckpt = save_checkpoint(state / "plain", CheckpointData(spec, {k: torch.from_numpy(a) for k, a in promoter.weights[v1].items()}))
        plain = subprocess.Popen([sys.executable, __file__, "--plain-server", str(plain_port), str(ckpt)])
        url = start_serving(cfg, "livetrain_bench_registry", "livetrain-bench", FEATURES)
        plain_url = f"http://127.0.0.1:{plain_port}"
        wait_http(plain_url + "/docs", 60)
        wait_http(url + "/healthz", 60)
        common = dict(concurrency=args.concurrency, seconds=args.seconds, load_generator="aiohttp asyncio, 1 process", serve_env=args.serve_env)

        steady = {}
        for n, x in inputs.items():
            run_load(url, x, args.concurrency, 1.0)  # warm-up
            run_load(plain_url, x, args.concurrency, 1.0)
            lt = summarise(run_load(url, x, args.concurrency, args.seconds), args.seconds)
            pl = summarise(run_load(plain_url, x, args.concurrency, args.seconds), args.seconds)
            steady[n] = lt
            emit(f"serve_requests_per_s_rows{n}", round(lt["rps"], 1), "req/s", baseline=round(pl["rps"], 1), rows_per_request=n, rows_per_s=round(lt["rps"] * n), **common)
            emit(f"serve_p50_ms_rows{n}", round(lt["p50_ms"], 2), "ms", baseline=round(pl["p50_ms"], 2), rows_per_request=n, **common)
            emit(f"serve_p99_ms_rows{n}", round(lt["p99_ms"], 2), "ms", baseline=round(pl["p99_ms"], 2), rows_per_request=n, **common)
            emit(f"serve_failed_requests_rows{n}", lt["failed"], "requests", baseline=pl["failed"], requests=lt["requests"])

        promoted: dict[int, float] = {}
        stop = threading.Event()

        def promote_loop() -> None:
            while not stop.wait(args.promote_every):
                v = promoter.promote()
                promoted[v] = ray.get(registry.served_info.remote())["promoted_at"]

        t = threading.Thread(target=promote_loop, daemon=True)
        t.start()
        records = run_load(url, inputs[1], args.concurrency, args.swap_seconds)
        stop.set()
        t.join(30)
        s = summarise(records, args.swap_seconds)
        first: dict[int, float] = {}
        for _, _, wall_end, status, v in records:
            if status == 200 and v not in first:
                first[v] = wall_end
        swaps = [first[v] - at for v, at in promoted.items() if v in first]
        near = [r for r in records if r[3] == 200 and any(0 <= r[2] - at <= 1.0 for at in promoted.values())]
        near_p99 = float(np.percentile([(r[1] - r[0]) * 1000 for r in near], 99)) if near else None
        swap_common = {**common, "rows_per_request": 1, "promotions": len(promoted), "promote_every_s": args.promote_every, "seconds": args.swap_seconds}
        emit("swap_failed_requests", s["failed"], "requests", requests=s["requests"], **swap_common)
        emit("swap_p99_ms", round(s["p99_ms"], 2), "ms", baseline=round(steady[1]["p99_ms"], 2), note="whole promotion phase vs steady state", **swap_common)
        emit("swap_p99_ms_within_1s_of_promotion", round(near_p99, 2) if near_p99 else None, "ms", baseline=round(steady[1]["p99_ms"], 2), requests=len(near), **swap_common)
        emit("swap_requests_per_s", round(s["rps"], 1), "req/s", baseline=round(steady[1]["rps"], 1), **swap_common)
        emit("swap_time_p50_ms", round(float(np.median(swaps)) * 1000, 1) if swaps else None, "ms", note="registry promoted_at -> first response naming it", swaps_seen=len(swaps), **swap_common)
        emit("swap_time_max_ms", round(float(np.max(swaps)) * 1000, 1) if swaps else None, "ms", swaps_seen=len(swaps), **swap_common)
    finally:
        if plain is not None:
            plain.terminate()
            plain.wait(10)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
