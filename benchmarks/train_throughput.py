"""Training samples/s of livetrain's DDP loop (Ray Train, 2 CPU workers,
gloo, blocks drawn from the replay buffer) against a plain single-process
PyTorch loop on the same model, optimizer and global batch, in one run.

    python benchmarks/train_throughput.py [--seconds 30]

The DDP figure is what rank 0 reports: global samples per second over a
round (sampling refs, fetching blocks, K steps), i.e. including the data path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def plain_loop(x: np.ndarray, y: np.ndarray, batch: int, threads: int, seconds: float, spec) -> float:
    from livetrain.training.learner import Learner
    from livetrain.training.models import build_model

    torch.set_num_threads(threads)
    model = build_model(spec)
    learner = Learner(model, torch.optim.AdamW(model.parameters(), lr=3e-3), batch)
    learner.train_round(x, y, 20)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += learner.train_round(x, y, 20).samples
    return done / (time.perf_counter() - t0)


def _gloo_worker(rank: int, world: int, port: int, batch: int, seconds: float, spec, out) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from livetrain.training.learner import Learner
    from livetrain.training.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = DistributedDataParallel(build_model(spec))
    learner = Learner(model, torch.optim.AdamW(model.parameters(), lr=3e-3), batch, seed=rank)
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(8000, spec.kwargs["num_features"], generator=g).numpy()
    y = (x[:, 0] + x[:, 1] > 0.7).astype(np.int64)
    learner.train_round(x, y, 20)
    dist.barrier()
    done, t0 = 0, time.perf_counter()
    while True:  # ranks agree on when to stop, or DDP would hang
        done += learner.train_round(x, y, 20).samples
        stop = torch.tensor([float(time.perf_counter() - t0 >= seconds)])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            break
    if rank == 0:
        out.put(world * done / (time.perf_counter() - t0))
    dist.destroy_process_group()


def raw_ddp(batch: int, world: int, seconds: float, spec) -> float:
    """The same DDP step with torch.multiprocessing and gloo, no Ray, no buffer."""
    import torch.multiprocessing as mp

    from _util import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_gloo_worker, args=(world, free_port(), batch, seconds, spec, out), nprocs=world, start_method="spawn")
    return out.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()

    from _util import free_port, wait_until
    from livetrain.actors.synthetic import SyntheticStream
    from livetrain.config import SyntheticConfig, load_config
    from livetrain.pipeline import Pipeline
    from livetrain.training.models import model_spec

    tmp = Path(tempfile.mkdtemp(prefix="livetrain-bench-train-"))
    stream = SyntheticStream(SyntheticConfig(generator="sea", variant=2, rows_per_shard=1000, seed=1), tmp / "landing")
    for _ in range(100):
        stream.write_shard()
    cfg = load_config(
        None,
        [f"state_dir={tmp / 'state'}", "live_view=false", "tracking.wandb=disabled", f"serve.port={free_port()}",
         "source.kind=directory", f"source.path={tmp / 'landing'}"],
    )
    spec = model_spec(cfg.model, 3, 2)
    x, y = SyntheticStream(SyntheticConfig(generator="sea", variant=2, seed=2), tmp / "x").next_rows(100_000)
    global_batch = cfg.train.batch_size * cfg.train.num_workers

    p = Pipeline(cfg, probe_traffic=False)
    p.start()
    try:
        wait_until(lambda: p.snapshot()["train_samples_per_s"], 180, "the trainer's first report")
        rates, t0 = [], time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            rates.append(p.snapshot()["train_samples_per_s"])
            time.sleep(1.0)
    finally:
        p.stop()
    ddp = statistics.median(rates)
    plain2 = plain_loop(x, y, global_batch, 2, args.seconds / 2, spec)
    plain1 = plain_loop(x, y, cfg.train.batch_size, 1, args.seconds / 2, spec)
    raw = raw_ddp(cfg.train.batch_size, cfg.train.num_workers, args.seconds / 2, spec)
    model = f"mlp 3-{'-'.join(map(str, cfg.model.hidden))}-2"
    emit("train_ddp_samples_per_s", round(ddp), "samples/s", baseline=round(plain2),
         baseline_is=f"plain PyTorch, 1 process, 2 threads, batch {global_batch}", model=model,
         ddp=f"{cfg.train.num_workers} workers x batch {cfg.train.batch_size}, gloo, 1 thread each")
    emit("train_raw_ddp_samples_per_s", round(raw), "samples/s", note="the same DDP step with torch.multiprocessing + gloo: no Ray, no buffer")
    emit("train_ddp_vs_raw_ddp", round(ddp / raw, 3), "ratio", note="what Ray Train, the buffer and the data path cost over bare DDP")
    emit("train_plain_1thread_samples_per_s", round(plain1), "samples/s",
         note=f"plain PyTorch, 1 thread, batch {cfg.train.batch_size} (one DDP worker's share, no communication)")


if __name__ == "__main__":
    main()
