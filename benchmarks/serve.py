"""Serving throughput and latency of livetrain's endpoint against a plain
single-process FastAPI + uvicorn + PyTorch server, on the same model, weights
and inputs, in one run; then livetrain under the same load while a new
version is promoted every ``--promote-every`` seconds; then freshness in a
continuously fed run (the whole pipeline, synthetic stream, under load).

    python benchmarks/serve.py [--seconds 8] [--concurrency 16] [--swap-seconds 20]
                               [--fresh-seconds 60] [--ingress haproxy|proxy] [--scale-replicas 2]

Load generator: one asyncio process (aiohttp, a keep-alive connection pool)
running ``--concurrency`` closed-loop clients, in the driver process. It is
the same for both servers; on a 2-core machine it shares the CPUs with them,
so absolute figures are lower than with a separate client machine.

Both servers predict with one torch thread. livetrain runs one replica with
the default ``serve.*`` config (dynamic batching: 32 requests, 2 ms) behind
the HAProxy ingress (``serve.ingress=haproxy``, opt-in in the config);
``--ingress proxy`` measures the shipped default, Serve's Python proxy.
Promotions go through the real registry actor (propose, then unseen rows for
the gate) while the load runs. Swap time is from the registry's promotion
timestamp to the first response the client receives naming the new version.

Freshness: ``Pipeline`` runs in this process as ``livetrain demo`` would
(synthetic SEA stream at 2,000 rows/s, 2 train workers, the registry's gate)
behind the same endpoint, with ``--fresh-concurrency`` clients on /predict
paced at ``--fresh-rps`` together. ``freshness_p50/p95`` are the registry's
own figures (shard written -> first answer from a version trained on it; they
include the shards written while training started up); ``freshness_steady_*``
count only shards written after
the first answered version, from the client's side: first response naming
a version that trained through the shard, minus the shard file's mtime.
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


async def _load(url: str, body: bytes, concurrency: int, seconds: float, records: list, rate: float | None = None) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=30)
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def client() -> None:
            next_at = time.perf_counter()
            while time.perf_counter() < deadline:
                if rate:  # paced: concurrency clients share ``rate`` requests/s
                    next_at += concurrency / rate
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
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


def run_load(url: str, rows: np.ndarray, concurrency: int, seconds: float, rate: float | None = None) -> list:
    records: list = []
    asyncio.run(_load(url + "/predict", json.dumps({"instances": rows.tolist()}).encode(), concurrency, seconds, records, rate))
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
    ap.add_argument("--fresh-seconds", type=float, default=60.0, help="fed run, after the first promotion")
    ap.add_argument("--fresh-concurrency", type=int, default=4, help="clients during the fed run")
    ap.add_argument("--fresh-rps", type=float, default=200.0, help="requests/s they send together (0: as fast as they can)")
    ap.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                    help="serve.ingress (default haproxy, the fast opt-in; the shipped config's default is proxy)")
    ap.add_argument("--only", nargs="*", choices=["steady", "swap", "fresh"], default=["steady", "swap", "fresh"])
    ap.add_argument("--scale-replicas", type=int, default=0, help="then the steady load again on this many replicas (0: skip)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. serve.num_replicas=2")
    ap.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE", help="more Ray Serve flags set before ray.init, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    ap.add_argument("--plain-server", nargs=2, metavar=("PORT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        return plain_server(int(args.plain_server[0]), args.plain_server[1])

    import ray
    import torch
    from ray import serve

    from livetrain.config import load_config, shipped_config
    from livetrain.serving.app import APP_NAME, start_serving
    from livetrain.serving.deployment import ray_env
    from livetrain.training.checkpoint import CheckpointData, save_checkpoint
    from livetrain.training.models import model_spec
    from test_serving_http import Promoter, start_registry

    os.environ.setdefault("WANDB_MODE", "disabled")
    state = Path(tempfile.mkdtemp(prefix="livetrain-bench-serve-"))
    port, plain_port = free_port(), free_port()
    overrides = [f"state_dir={state}", f"serve.port={port}", *args.set] + ([f"serve.ingress={args.ingress}"] if args.ingress else [])
    cfg = load_config(shipped_config("demo"), [*overrides, "gate.tolerance=1.0", "gate.min_eval_rows=10"])
    spec = model_spec(cfg.model, len(FEATURES), len(cfg.schema.classes))
    rng = np.random.default_rng(0)
    inputs = {n: rng.random((n, len(FEATURES)), dtype=np.float32) for n in (1, 64)}

    os.environ.update(ray_env(cfg.serve))  # what livetrain does before it starts Ray
    for kv in args.serve_env:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    ray.init(num_cpus=4, include_dashboard=False, namespace="livetrain-bench", configure_logging=False, log_to_driver=False)
    plain = None
    common = dict(concurrency=args.concurrency, seconds=args.seconds, load_generator="aiohttp asyncio, 1 process",
                  ingress=cfg.serve.ingress, serve_env=args.serve_env, overrides=args.set)
    try:
        registry = start_registry(cfg, "livetrain_bench_registry", "livetrain-bench")
        promoter = Promoter(registry, spec)
        v1 = promoter.promote(seed=0)
        url = start_serving(cfg, "livetrain_bench_registry", "livetrain-bench", FEATURES)
        wait_http(url + "/healthz", 60)
        steady: dict[int, dict] = {}
        plain_url = f"http://127.0.0.1:{plain_port}"
        if "steady" in args.only or args.scale_replicas:
            ckpt = save_checkpoint(state / "plain", CheckpointData(spec, {k: torch.from_numpy(a) for k, a in promoter.weights[v1].items()}))
            plain = subprocess.Popen([sys.executable, __file__, "--plain-server", str(plain_port), str(ckpt)])
            wait_http(plain_url + "/docs", 60)
        if "steady" in args.only:
            steady = steady_phase(url, plain_url, inputs, args, {**common, "replicas": cfg.serve.num_replicas})
        if "swap" in args.only:
            swap_phase(url, registry, promoter, inputs[1], steady.get(1), args, common)
        if args.scale_replicas:  # the same, with more replicas (the plain server stays one process)
            cfg.serve.num_replicas = args.scale_replicas
            start_serving(cfg, "livetrain_bench_registry", "livetrain-bench", FEATURES)
            wait_replicas(args.scale_replicas)
            steady_phase(url, plain_url, inputs, args, {**common, "replicas": args.scale_replicas}, suffix=f"_replicas{args.scale_replicas}")
        if plain is not None:
            plain.terminate()
            plain.wait(10)
            plain = None
        if "fresh" in args.only:
            serve.delete(APP_NAME)
            ray.kill(registry)
            fresh_phase(load_config(shipped_config("demo"), [*overrides, "live_view=false", "tracking.wandb=disabled",
                                                             f"state_dir={state / 'fed'}"]), args)
    finally:
        if plain is not None:
            plain.terminate()
            plain.wait(10)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def wait_replicas(n: int, timeout_s: float = 120) -> None:
    """Until the app runs exactly ``n`` replicas (the old ones gone)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get("livetrain")
        states = {} if app is None else app.deployments["ModelServer"].replica_states
        if app is not None and app.status == "RUNNING" and states == {"RUNNING": n}:
            return
        time.sleep(0.5)  # polling Serve's status
    raise RuntimeError(f"the app did not reach {n} replicas in {timeout_s}s: {states}")


def steady_phase(url: str, plain_url: str, inputs: dict, args, common: dict, suffix: str = "") -> dict[int, dict]:
    steady = {}
    for n, x in inputs.items():
        run_load(url, x, args.concurrency, 1.0)  # warm-up
        run_load(plain_url, x, args.concurrency, 1.0)
        lt = summarise(run_load(url, x, args.concurrency, args.seconds), args.seconds)
        pl = summarise(run_load(plain_url, x, args.concurrency, args.seconds), args.seconds)
        steady[n] = lt
        emit(f"serve_requests_per_s_rows{n}{suffix}", round(lt["rps"], 1), "req/s", baseline=round(pl["rps"], 1), rows_per_request=n, rows_per_s=round(lt["rps"] * n), **common)
        emit(f"serve_p50_ms_rows{n}{suffix}", round(lt["p50_ms"], 2), "ms", baseline=round(pl["p50_ms"], 2), rows_per_request=n, **common)
        emit(f"serve_p99_ms_rows{n}{suffix}", round(lt["p99_ms"], 2), "ms", baseline=round(pl["p99_ms"], 2), rows_per_request=n, **common)
        emit(f"serve_failed_requests_rows{n}{suffix}", lt["failed"], "requests", baseline=pl["failed"], requests=lt["requests"])
    return steady


def swap_phase(url: str, registry, promoter, x: np.ndarray, steady: dict | None, args, common: dict) -> None:
    import ray

    promoted: dict[int, float] = {}
    stop = threading.Event()

    def promote_loop() -> None:
        while not stop.wait(args.promote_every):
            v = promoter.promote()
            promoted[v] = ray.get(registry.served_info.remote())["promoted_at"]

    t = threading.Thread(target=promote_loop, daemon=True)
    t.start()
    records = run_load(url, x, args.concurrency, args.swap_seconds)
    stop.set()
    t.join(30)
    s = summarise(records, args.swap_seconds)
    first = first_answers(records)
    swaps = [first[v] - at for v, at in promoted.items() if v in first]
    near = [r for r in records if r[3] == 200 and any(0 <= r[2] - at <= 1.0 for at in promoted.values())]
    near_p99 = float(np.percentile([(r[1] - r[0]) * 1000 for r in near], 99)) if near else None
    base_p99 = round(steady["p99_ms"], 2) if steady else None
    swap_common = {**common, "rows_per_request": 1, "promotions": len(promoted), "promote_every_s": args.promote_every, "seconds": args.swap_seconds}
    emit("swap_failed_requests", s["failed"], "requests", requests=s["requests"], **swap_common)
    emit("swap_p99_ms", round(s["p99_ms"], 2), "ms", baseline=base_p99, note="whole promotion phase vs steady state", **swap_common)
    emit("swap_p99_ms_within_1s_of_promotion", round(near_p99, 2) if near_p99 else None, "ms", baseline=base_p99, requests=len(near), **swap_common)
    emit("swap_requests_per_s", round(s["rps"], 1), "req/s", baseline=round(steady["rps"], 1) if steady else None, **swap_common)
    emit("swap_time_p50_ms", round(float(np.median(swaps)) * 1000, 1) if swaps else None, "ms", note="registry promoted_at -> first response naming it", swaps_seen=len(swaps), **swap_common)
    emit("swap_time_max_ms", round(float(np.max(swaps)) * 1000, 1) if swaps else None, "ms", swaps_seen=len(swaps), **swap_common)


def first_answers(records: list) -> dict[int, float]:
    """Version -> wall time the client received its first answer naming it."""
    first: dict[int, float] = {}
    for _, _, wall_end, status, v in records:
        if status == 200 and v not in first:
            first[v] = wall_end
    return first


def fresh_phase(cfg, args) -> None:
    """The whole pipeline behind the endpoint, fed continuously, under load."""
    import ray

    from livetrain.actors.manifest import Manifest
    from livetrain.pipeline import Pipeline

    p = Pipeline(cfg, probe_traffic=False)  # the load below makes the first answers
    trained_through: dict[int, int] = {}
    stop = threading.Event()
    try:
        p.start()
        started = time.time()

        def follow() -> None:  # each served version's lineage, while the registry still holds it
            while not stop.wait(0.1):
                info = ray.get(p.registry.served_info.remote())
                if info and info.get("model_version") is not None:
                    trained_through[info["model_version"]] = info["trained_through_seq"]

        threading.Thread(target=follow, daemon=True).start()
        x = np.random.default_rng(1).random((1, len(FEATURES)), dtype=np.float32)
        while not trained_through:
            run_load(p.url, x, 1, 1.0)  # until the first promotion (~30 s: the train job starting)
            if time.time() - started > 300:
                raise RuntimeError("no version was promoted in 300 s")
        records = run_load(p.url, x, args.fresh_concurrency, args.fresh_seconds, args.fresh_rps or None)
        summary = p.summary()
        stop.set()
        first = first_answers(records)
        for v in set(first) - set(trained_through):  # served too briefly to be seen above
            served = ray.get(p.registry.get_version.remote(v))
            if served is not None:
                trained_through[v] = served.trained_through
        manifest = Manifest(p.state_dir)
        shards = manifest.ingested()
        manifest.close()
    finally:
        stop.set()
        p.stop()
    warm = min(first.values()) if first else float("inf")
    steady = []
    for shard in shards:
        if shard.written_at < warm:
            continue
        answered = [at for v, at in first.items() if trained_through.get(v, -1) >= shard.seq]
        if answered:
            steady.append(min(answered) - shard.written_at)
    s = summarise(records, args.fresh_seconds)
    fed = dict(seconds=args.fresh_seconds, concurrency=args.fresh_concurrency, target_rps=args.fresh_rps, rows_per_s_fed=cfg.synthetic.rows_per_second,
               versions_promoted=summary["versions_promoted"], requests_per_s=round(s["rps"], 1), failed_requests=s["failed"],
               ingress=cfg.serve.ingress)
    emit("freshness_p50_s", summary["freshness_p50_s"], "s", source="registry (includes shards written during start-up)", **fed)
    emit("freshness_p95_s", summary["freshness_p95_s"], "s", source="registry (includes shards written during start-up)", **fed)
    for q in (50, 95):
        value = round(float(np.percentile(steady, q)), 3) if steady else None
        emit(f"freshness_steady_p{q}_s", value, "s", shards=len(steady), source="client: shards written after the first answer", **fed)
    emit("fresh_failed_requests", s["failed"], "requests", requests=s["requests"], **fed)


if __name__ == "__main__":
    main()
