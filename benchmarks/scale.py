"""livetrain on a local two-node Ray cluster: training samples/s and
object-store transfer rates with the blocks crossing nodes, against the same
on one node, in one run.

    python benchmarks/scale.py [--seconds 10] [--workers 1,2] [--transfer-mib 64]

The cluster is started here like ``tests/test_jobs.py`` does it: a head
(``ray start --head`` on loopback, token auth) that alone has the
``scale_head`` resource, and a second node that alone has ``scale_far``. The
driver, and with it livetrain's buffer, registry and ingest actors, sits on
the head, so every block lives in the head's object store. Each training
figure is one real ``livetrain`` pipeline (synthetic stream -> ingest ->
buffer -> ONE ``TorchTrainer`` job, gloo) with the workers placed by
``train.worker_resources``: on the second node (blocks fetched across nodes)
or on the head (blocks mapped from the local store). The figure is what rank
0 reports per round (sample refs, fetch blocks, K steps), the median over
``--seconds``. The live stream keeps new blocks arriving, and the sampler
draws unseen blocks first, so the workers keep pulling blocks they never
held.

Both nodes share this machine: "cross-node" is the object manager's transfer
over loopback TCP plus a copy into the second node's store, not a network.
The cluster is torn down by killing only the processes it started; never
``ray stop``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from _common import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

HEAD, FAR = "scale_head", "scale_far"
"""Custom resources: only the head has HEAD, only the second node has FAR."""
MiB = 2**20
LOOPBACK_NOTE = "both nodes run on this machine: cross-node = Ray object manager transfer over loopback TCP"


@dataclass(frozen=True)
class Placement:
    name: str
    resource: str
    """Custom resource the training workers (or the transfer reader) reserve."""


ONE_NODE = Placement("one_node", HEAD)
CROSS_NODE = Placement("cross_node", FAR)


# --- the local cluster ------------------------------------------------------------


def ray_start_commands(ray_bin: str, port: int, temp: Path, head_cpus: int, far_cpus: int, store_bytes: int) -> list[list[str]]:
    """``ray start`` for the head, then for the second node; loopback only."""
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--object-store-memory={store_bytes}"]
    head = [ray_bin, "start", "--head", f"--port={port}", f"--num-cpus={head_cpus}",
            f"--resources={json.dumps({HEAD: 100})}", "--include-dashboard=false", f"--temp-dir={temp}", *common]
    far = [ray_bin, "start", f"--address=127.0.0.1:{port}", f"--num-cpus={far_cpus}",
           f"--resources={json.dumps({FAR: 100})}", *common]
    return [head, far]


class LocalCluster:
    """A head and a second node on loopback; ``close`` kills only their processes."""

    def __init__(self, head_cpus: int, far_cpus: int, store_bytes: int) -> None:
        from _util import free_port

        self.temp = Path("/tmp") / f"lt-sc-{os.getpid()}"  # short: Ray's socket paths are length-limited
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # the head enables token auth when ~/.ray/auth_token exists; every client must then send it
        self.env = {**os.environ, "RAY_TMPDIR": str(self.temp), "RAY_AUTH_MODE": "token"}
        self._cmds = ray_start_commands(str(Path(sys.executable).parent / "ray"), self.port, self.temp,
                                        head_cpus, far_cpus, store_bytes)

    def __enter__(self) -> Self:
        ray_bin = self._cmds[0][0]
        try:
            subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, capture_output=True, env=self.env, timeout=60)
            for cmd in self._cmds:
                subprocess.run(cmd, check=True, capture_output=True, env=self.env, timeout=180)
        except subprocess.CalledProcessError as e:
            self.close()
            raise RuntimeError(f"{' '.join(e.cmd[:3])} failed: {e.stderr.decode(errors='replace')[-2000:]}") from e
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        from test_cli import kill_processes_mentioning

        kill_processes_mentioning({str(self.temp), self.address})
        shutil.rmtree(self.temp, ignore_errors=True)


def node_of(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


# --- training ---------------------------------------------------------------------


def pipeline_overrides(state: Path, address: str, port: int, workers: int, place: Placement, args) -> list[str]:
    """The livetrain config of one training figure (``--set`` comes last and wins)."""
    features = [f"x{i}" for i in range(args.features)]
    return [
        f"state_dir={state}", "live_view=false", "tracking.wandb=disabled", f"serve.port={port}",
        f"ray.address={address}", "source.kind=synthetic", "synthetic.generator=hyperplane",
        f"synthetic.num_features={args.features}", f"synthetic.rows_per_shard={args.rows_per_shard}",
        f"synthetic.rows_per_second={args.rows_per_s}", f"schema.features={json.dumps(features)}",
        f"train.num_workers={workers}", f"train.worker_resources={json.dumps({place.resource: 1})}",
        *args.set,
    ]


def train_rate(overrides: list[str], seconds: float) -> dict[str, Any]:
    """Median of rank 0's samples/s over ``seconds`` of one pipeline, and where its workers ran."""
    from _util import wait_until

    from livetrain.config import load_config
    from livetrain.pipeline import Pipeline

    p = Pipeline(load_config(None, overrides), probe_traffic=False)
    p.start()
    try:
        wait_until(lambda: p.snapshot()["train_samples_per_s"], 300, "the trainer's first report", 0.5)
        rates, t0 = [], time.monotonic()
        while time.monotonic() - t0 < seconds:
            rates.append(p.snapshot()["train_samples_per_s"])
            time.sleep(1.0)  # sampling period of the figure
        placed = {cls: actor_nodes(cls) for cls in ("RayTrainWorker", "ReplayBufferActor")}
    finally:
        p.stop()
    return {"samples_per_s": statistics.median(rates), "placed": placed}


def actor_nodes(cls: str) -> set[str]:
    """Nodes where live actors of class ``cls`` run."""
    import ray

    return {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == cls and a["State"] == "ALIVE"}


def train_figures(rates: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    """Cross-node samples/s per worker count against one node; 2-vs-1 worker scaling."""
    out = []
    for w in sorted({w for _, w in rates}):
        cross, one = rates.get((CROSS_NODE.name, w)), rates.get((ONE_NODE.name, w))
        if cross is not None:
            out.append({"name": f"scale_train_{w}w_cross_node_samples_per_s", "value": round(cross),
                        "unit": "samples/s", "baseline": None if one is None else round(one),
                        "baseline_is": f"{w} worker(s) on the head beside the buffer (one node)"})
    for place in (CROSS_NODE, ONE_NODE):
        one_w, two_w = rates.get((place.name, 1)), rates.get((place.name, 2))
        if one_w and two_w:
            out.append({"name": f"scale_train_{place.name}_2w_vs_1w", "value": round(two_w / one_w, 3), "unit": "ratio"})
    return out


# --- object-store transfer --------------------------------------------------------


def transfer_seconds(reader: Any, payload: np.ndarray, repeats: int) -> float:
    """Median seconds of ray.put on the head (this driver) + ray.get in ``reader``."""
    import ray

    ray.get(reader.fetch.remote([ray.put(payload[:1024])]))  # warm the actor and its connection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = ray.put(payload)  # a new object each time: nothing is cached on the reader's node
        ray.get(reader.fetch.remote([ref]))
        times.append(time.perf_counter() - t0)
        del ref
    return statistics.median(times)


def transfer_figures(sizes: dict[str, int], seconds: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """MiB/s across nodes against one node, per payload size."""
    out = []
    for label, nbytes in sizes.items():
        cross, one = seconds[(CROSS_NODE.name, label)], seconds[(ONE_NODE.name, label)]
        out.append({"name": f"scale_transfer_{label}_cross_node", "value": round(nbytes / MiB / cross, 1),
                    "unit": "MiB/s", "baseline": round(nbytes / MiB / one, 1), "bytes": nbytes,
                    "ms": round(cross * 1e3, 2), "baseline_ms": round(one * 1e3, 2),
                    "baseline_is": "ray.put on the head + ray.get in an actor on the head (shared-memory store)",
                    "note": f"ray.put on the head + ray.get in an actor on the second node; {LOOPBACK_NOTE}"})
    return out


def measure_transfers(sizes: dict[str, int], repeats: int) -> dict[tuple[str, str], float]:
    import ray

    @ray.remote(num_cpus=0)
    class Reader:
        def fetch(self, refs: list) -> int:
            return ray.get(refs[0]).nbytes

    seconds = {}
    for place in (ONE_NODE, CROSS_NODE):
        reader = Reader.options(resources={place.resource: 0.01}).remote()
        for label, nbytes in sizes.items():
            payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
            seconds[(place.name, label)] = transfer_seconds(reader, payload, repeats)
        ray.kill(reader)
    return seconds


def block_bytes(features: int, block_rows: int) -> int:
    """Bytes of one buffer block of ``block_rows`` rows: float32 features + int64 label."""
    return block_rows * (4 * features + 8)


# --- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per training figure")
    ap.add_argument("--workers", default="1,2", help="training worker counts, comma separated")
    ap.add_argument("--features", type=int, default=20, help="float features per row (hyperplane stream)")
    ap.add_argument("--rows-per-s", type=float, default=10_000, help="rate of the synthetic stream")
    ap.add_argument("--rows-per-shard", type=int, default=2000, help="rows per shard = per block")
    ap.add_argument("--transfer-mib", type=float, default=64, help="the large payload of the transfer figures")
    ap.add_argument("--repeats", type=int, default=7, help="transfers per payload and placement (median)")
    ap.add_argument("--only", choices=("train", "transfer"), help="run one part only")
    ap.add_argument("--head-cpus", type=int, default=4, help="logical CPUs of the head")
    ap.add_argument("--far-cpus", type=int, default=3, help="logical CPUs of the second node")
    ap.add_argument("--store-mib", type=int, default=1024, help="object store of each node")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="livetrain config override")
    args = ap.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if any(w < 1 for w in args.workers) or args.seconds <= 0 or args.repeats < 1:
        ap.error("--workers, --seconds and --repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ["RAY_AUTH_MODE"] = "token"  # read when ray is imported: this driver must send the token
    import ray
    from livetrain.actors.blocks import part_rows

    from livetrain.config import SchemaConfig, load_config

    cfg = load_config(None, args.set)
    tmp = Path(tempfile.mkdtemp(prefix="livetrain-bench-scale-"))
    with LocalCluster(args.head_cpus, args.far_cpus, args.store_mib * MiB) as cluster:
        ray.init(address=cluster.address, namespace=cfg.ray.namespace, configure_logging=False, log_to_driver=False)
        try:
            head = node_of(HEAD)
            if ray.get_runtime_context().get_node_id() != head:
                raise RuntimeError("the driver did not connect to the head node: the blocks would not live there")
            if args.only != "transfer":
                run_training(args, cluster.address, tmp, head, cfg.model.hidden)
            if args.only != "train":
                biggest = part_rows(cfg.ingest.block_rows, cfg.buffer.capacity_rows, cfg.buffer.capacity_bytes,
                                    SchemaConfig(features=[f"x{i}" for i in range(args.features)]))
                sizes = {f"{args.transfer_mib:g}MiB": int(args.transfer_mib * MiB),
                         f"block_{biggest}rows": block_bytes(args.features, biggest),
                         f"block_{args.rows_per_shard}rows": block_bytes(args.features, args.rows_per_shard)}
                for fig in transfer_figures(sizes, measure_transfers(sizes, args.repeats)):
                    emit(**fig)
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def run_training(args, address: str, tmp: Path, head: str, hidden: list[int]) -> None:
    from _util import free_port

    far, port, rates = node_of(FAR), free_port(), {}
    for w in args.workers:
        for place in (ONE_NODE, CROSS_NODE):
            state = tmp / f"{place.name}-{w}w"
            got = train_rate(pipeline_overrides(state, address, port, w, place, args), args.seconds)
            want = {"RayTrainWorker": {head if place is ONE_NODE else far}, "ReplayBufferActor": {head}}
            if got["placed"] != want:
                raise RuntimeError(f"{place.name}, {w} worker(s): actors ran on {got['placed']}, wanted {want}")
            rates[(place.name, w)] = got["samples_per_s"]
            gc.collect()  # drop the stopped pipeline's block refs before the next one fills the store
    model = f"mlp {args.features}-" + "-".join(map(str, hidden)) + "-2"
    for fig in train_figures(rates):
        fig.setdefault("note", f"{model}; blocks of {args.rows_per_shard} rows, stream {args.rows_per_s:g} rows/s; "
                               f"gloo, 1 CPU + 1 thread per worker; {LOOPBACK_NOTE}")
        emit(**fig)


if __name__ == "__main__":
    main()
