"""Ingest and sampling throughput (one JSON line per figure).

    python benchmarks/ingest.py [--shards 48] [--rows 100000] [--features 20] [--repeat 3]
                                [--large-rows 4000000] [--commit-rows 500000] [--set KEY=VALUE ...]

``--set`` applies config overrides to the ingest figures 1 and 2b (for example
``--set ingest.block_rows=131072``: one block per 100k-row shard).

1. Rows/s and MB/s (Parquet bytes on disk) from shard files into the replay
   buffer through the real path (manifest, ingest actors, validation, buffer
   commit), with 1 and 2 ingest actors, against reading the same files with
   pyarrow into numpy in this one process (baseline, same run).
2. Rows/s one training worker draws from the buffer (sample refs, fetch the
   blocks zero-copy, concatenate; the next draw's call in flight meanwhile, as
   the trainer does) against slicing as many rows out of a local numpy array
   as large as the buffer; the two alternate in ten slices each, so a noisy
   spell hits both alike.
2a. Rows/s the registry scores (``Registry.observe`` on 65,536-row blocks,
   one torch thread: the served and the previous version's answers,
   prequential figures, both drift detectors) against the served model's
   forward alone. Every block is scored before it is trained on, so one
   registry actor bounds the whole pipeline's ingest at this rate (figure 1
   runs without it).
2b. The 2-actor ingest of the same shards into a buffer that is already full
   (``--fill-rounds``, default 4, times as many other shards went in first,
   untimed, through the same actors): it evicts as they go in, and the actors
   have written into the store's memory before. The steady state of a long
   run; ``--fill-rounds 0`` (or ``--no-full-buffer``) skips it.
3. The same 2-actor ingest through ``IngestLoop.run`` (the pipeline's loop)
   while ``--old-shards`` (default 20,000) shards already ingested lie in the
   landing directory, against the same loop with an empty one: the shard
   files are the log, so they pile up, and every listing sees them.
4. One large shard (``--large-rows``, default 4M rows, ~330 MB of blocks) into
   a 100k-row buffer: the object store's peak while it goes in by parts
   (``ingest.commit_rows``) against the same shard committed whole, and rows/s
   for both.

Each figure is the median of ``--repeat`` runs (the machine is shared and
noisy); ``runs`` lists them all.

Where the time goes (2 cores; per-process CPU from psutil around the timed
loop, per-shard thread times inside ``read_shard``; 48 shards, 2 actors):
the baseline's ``read_table`` uses ~0.19 s of CPU per 12 shards (decode on
Arrow's pool, ~1.3 cores). The same decode plus validation costs ~0.22 s in
one process, so two perfectly parallel processes would reach ~0.95x. Inside
an ingest actor that work is the same, but each yielded block also costs
~1.5 ms of CPU to serialise into the object store and ~6 ms of wall time in
the yield (object creation through the raylet's plasma store, which competes
for the same 2 cores), and Ray's own threads in the actor use ~0.25 s of CPU
per 24 shards. With the driver's loop (~0.4 s: claims, waits, the buffer
commit round trips), the raylet (~0.15 s) and the buffer actor (~0.1 s), the
whole path uses ~2.3 s of CPU for what one process does in ~0.9 s: both
cores are saturated, so the ratio is bounded by Ray's per-object cost on 2
cores, not by waiting. Validation's share got smaller on 2026-12-06: the
feature columns go into the row-major block through a small staging buffer
(``schema._interleave``: one transposed copy instead of a strided write per
column, ~4.7 -> ~1.4 ms per 65,536 x 20 block), and a shard is read several
blocks per record batch (``schema.read_rows``; each batch read costs ~2 ms of
CPU on top of its rows). Read and validation of one 100k-row shard, in one
process: ~24 -> ~20 ms of wall time, ~31 -> ~27 ms of CPU. The 2-actor
ratio moved from 0.70-0.73 to 0.74-0.76 (cold) and from 0.64-0.67 to
0.76-0.84 (full buffer) on that day's machine (two runs each); the actors'
CPU per shard, measured around the timed loop, stayed ~41-50 ms either way,
within the noise of the shared machine. Hashing every file for duplicate detection is BLAKE3
on a thread of the driver (~4.4 GB/s; sha256 was ~1.8 GB/s inline in the
loop and cost ~0.05-0.1 of the ratio). Arrow's threads inside the actors
(``use_threads``) and a deeper generator backpressure made no measurable
difference.

Page faults (counted from ``/proc/PID/stat`` around the timed loop): the
ingest actors take ~2,300 minor faults per shard, one per 4 KiB page of
blocks written into the object store (the same read and validation in one
process: ~35). A first write to a shared-memory page costs ~3.5 us in this
VM (a page already allocated but new to the process ~1.5 us, touching it
again ~0.08 us), so ~8 ms of CPU per shard, about half of the read and
validation itself, goes to the store's memory; ``RAY_preallocate_plasma_memory``
changed neither the count nor the time. Into a buffer filled once before,
the actors still fault ~1,300 times per shard: the store hands an actor memory
another process wrote last, which is new to its page tables. Filled four times
over (figure 2b, the default ``--fill-rounds``) they fault ~700 times per shard
and the ratio is ~0.47 against ~0.43 cold in the same run: the faults fall
with a run's age, but the Ray per-object cost below stays. A tmpfs with huge
pages as the store's directory (``--plasma-directory``) took the count to ~300
(cold) and ~20 (warm), but not the time in one try: the first write of new
memory still has to zero it. One block per
shard (``ingest.block_rows`` >= the shard's rows: one object, not two, per
100k-row shard) takes the ratio from ~0.44 to ~0.55 (an earlier machine), and
on 2026-12-06 from 0.75 to 0.84 (medians of four alternating runs in one Ray
session, ``ingest.block_rows=131072``): the rest of the cost per object
(creating and sealing it, reporting it to the driver, the buffer borrowing its
ref) is ~5 ms of wall time on 2 cores. Bare Ray, an actor yielding ready-made
blocks to the driver, which hands the refs to another actor: ~2.5-3.3 ms per
65,536-row block, ~1.6 ms per 16,384-row one. The same day: deeper
``ingest.max_in_flight`` (8, 16) made no difference (the two cores are busy,
the loop is not waiting on the actors), and the driver's own Python (claims,
commits, SQLite) is ~0.3 s of CPU per 48 shards, the rest of its wall time in
``ray.wait``.

Chunks (later on 2026-12-06): an ingest actor now sends each read of a shard
(~32 MB, at most 8 blocks) as one object and a small item naming its blocks,
instead of one object per block; the buffer still keeps, samples and evicts
blocks (a ``BlockRef``: the chunk's ref and the block's rows in it). Per
100k-row shard, 2 actors, 96 shards, psutil around the timed loop (medians of
6 runs, 3 per process, alternating with the code before; now vs before):
ingest actors ~31.6 vs ~34.6 ms of CPU, raylet ~1.3 vs ~2.2 ms, driver ~11 ms
either way; ~25.4 vs ~27.1 ms of wall time per shard. Three alternating runs of
``--repeat 2 --large-rows 0 --old-shards 0 --fill-rounds 0``: 2 actors
3.47/3.53/3.36M rows/s against 3.26/3.31/3.25M before (+5%); the ratio moved
less than the baseline's own spread between runs (4.3-5.2M rows/s). Inside one
actor, reading and validating a shard costs ~19-22 ms of CPU with or without
Ray; streaming the blocks to the driver adds ~2-4 ms per shard into store
memory the actor wrote before, ~9 ms into fresh memory (~2,200 page faults).

Content hash (the evening of 2026-12-06): new state dirs hash shards with
XXH3-128 instead of BLAKE3, read into one reused buffer. Hashing a 12 MB
shard took ~5.2 ms of CPU (BLAKE3, a fresh 1 MiB ``bytes`` per read: ~1 ms
of it page faults), now ~2.0 ms; the driver's CPU per shard went from
~10.9 to ~8.2 ms (2 actors, 96 shards, three runs each, alternating) and the
wall time per shard from ~24.8 to ~23.2 ms (means of six runs each). The
next full run gave 0.775 cold and 0.904 full buffer (the run before the
change: 0.75-0.77 and 0.75-0.85).

Prefaulting the store (later that evening): each ingest actor now maps twice
``buffer.capacity_bytes`` of the store into its page tables when it starts
(``ingest.prefault_store``, ``madvise(MADV_POPULATE_WRITE)``;
``actors/store_memory.py``). The store's allocator hands out its region from
the low end, so that prefix covers what the buffer, the chunks on their way
and the objects freed but not yet deleted take up: the actors' faults per
shard went from ~2,300 to ~120-180 (cold) and from ~610 to ~310-360 (full
buffer). Eight alternating pairs in one Ray session (2 actors, 48 shards,
each pair beside a baseline run): 4.31 M rows/s against 3.72 M (medians;
ratio 0.91 against 0.79; the pair's on/off ratio 0.96-1.31, median 1.10).
Prefaulting only 1x ``capacity_bytes`` left ~2,060 faults per shard (the
benchmark's earlier runs' objects lie below); 2x took it to ~150. The cost
moved to start-up: ~0.6 s per GB in the first process to touch the memory,
~0.15 s per GB in each one after it (a restarted actor).

Registry: a 65,536-row block (20 features) cost ~85 ms to score, ~30 ms of
it binning every row for the PSI; the PSI now compares at most 16,384 rows
strided over the chunk, and the block stays float32: ~0.7-0.85 M -> ~1.4-1.8
M rows/s (ADWIN, per row in river, ~14 ms; the two forwards ~20 ms).

Sampling: one draw of 8 blocks (~340k rows, 27 MB) costs ~1.5-3 ms for the
buffer's ``sample`` call, ~0.7 ms to fetch the refs and ~3-7 ms to
concatenate (the local baseline: ~2.7 ms). With the call for the next draw
in flight while one is used (as the trainer does) the ratio
went from ~0.47 to ~0.65-0.85 (four runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit  # noqa: E402


def write_shards(landing: Path, shards: int, rows: int, d: int, seed: int = 0, prefix: str = "s") -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(shards):
        x = rng.random((rows, d), dtype=np.float32)
        cols = {f"f{j}": x[:, j] for j in range(d)}
        cols["label"] = (x[:, 0] > 0.5).astype(np.int64)
        path = landing / f"{prefix}-{i:04d}.parquet"
        pq.write_table(pa.table(cols), path)
        out.append(path)
    return out


def pyarrow_baseline(paths: list[Path], d: int) -> float:
    t0 = time.perf_counter()
    for p in paths:
        t = pq.read_table(p)
        x = np.empty((t.num_rows, d), dtype=np.float32)
        for j in range(d):
            x[:, j] = t.column(j).to_numpy()
        t.column("label").to_numpy()
    return time.perf_counter() - t0


def minor_faults(pid: int) -> int | None:
    """Minor page faults of process ``pid`` so far (Linux; None elsewhere)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


def ingest_seconds(paths: list[Path], d: int, actors: int, root: Path, run: int | str = 0,
                   capacity_rows: int | None = None, overrides: tuple[str, ...] = (), fill: list[Path] = ()):
    """``(seconds, buffer, faults)``: seconds for ``paths`` to go into a fresh buffer
    (capacity: their rows) and the ingest actors' minor page faults per shard
    meanwhile; with ``fill``, those shards go in first, untimed, by the same actors:
    the buffer is then full and evicts as ``paths`` go in, and the actors have
    written into the store's memory before (the steady state of a run that has been
    going for a while)."""
    import ray

    from livetrain.actors.buffer_actor import ReplayBufferActor
    from livetrain.actors.ingest import IngestLoop
    from livetrain.actors.manifest import Manifest
    from livetrain.config import load_config

    state = root / f"state-{actors}-{run}"
    landing = state / "landing"
    landing.mkdir(parents=True)
    for p in fill or paths:
        (landing / p.name).hardlink_to(p)
    rows = capacity_rows or sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    cfg = load_config(None, [
        f"state_dir={state}", f"schema.features=[{', '.join(f'f{j}' for j in range(d))}]",
        f"ingest.num_actors={actors}", f"ingest.max_in_flight={2 * actors}",
        f"buffer.capacity_rows={rows}", f"buffer.window_rows={rows}", f"buffer.capacity_bytes={rows * (4 * d + 16)}",
        *overrides,
    ])
    buffer = ReplayBufferActor.remote(cfg.buffer, str(state), cfg.schema, cfg.ingest.block_rows)
    ray.get(buffer.stats.remote())
    manifest = Manifest(state)
    loop = IngestLoop(cfg, manifest, buffer, None)
    ray.get([a.__ray_ready__.remote() for a in loop.actors])
    while loop.counters.shards_ingested < len(fill):
        loop.step(0.05)
    for p in paths if fill else ():
        (landing / p.name).hardlink_to(p)
    pids = ray.get([a.__ray_call__.remote(lambda _: os.getpid()) for a in loop.actors])
    before = [minor_faults(pid) for pid in pids]
    t0 = time.perf_counter()
    while loop.counters.shards_ingested < len(fill) + len(paths):
        loop.step(0.05)
    seconds = time.perf_counter() - t0
    after = [minor_faults(pid) for pid in pids]
    faults = None if None in before + after else (sum(after) - sum(before)) / len(paths)
    loop.shutdown()
    manifest.close()
    return seconds, buffer, faults


def beside_old_shards(paths: list[Path], d: int, root: Path, old: int, run: str) -> tuple[float, float]:
    """Seconds for ``paths`` to go in through ``IngestLoop.run`` (2 actors) once they land
    beside ``old`` shards the manifest already names as ingested; and seconds of the loop's
    first step (it lists and looks up every old shard once)."""
    import threading

    import ray

    from livetrain.actors.buffer_actor import ReplayBufferActor
    from livetrain.actors.ingest import IngestLoop
    from livetrain.actors.manifest import Manifest
    from livetrain.config import load_config

    state = root / f"state-old-{old}-{run}"
    landing = state / "landing"
    landing.mkdir(parents=True)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    cfg = load_config(None, [
        f"state_dir={state}", f"schema.features=[{', '.join(f'f{j}' for j in range(d))}]",
        "ingest.num_actors=2", "ingest.max_in_flight=4",
        f"buffer.capacity_rows={rows}", f"buffer.window_rows={rows}", f"buffer.capacity_bytes={rows * (4 * d + 16)}",
    ])
    manifest = Manifest(state)
    buffer = ReplayBufferActor.remote(cfg.buffer, str(state), cfg.schema, cfg.ingest.block_rows)
    ray.get(buffer.stats.remote())  # rebuilt from an empty manifest: it never reads the stand-ins below
    stand_ins = []
    for i in range(old):  # stand-ins: the loop only lists them, never reads them
        p = landing / f"a-old-{i:06d}.parquet"
        p.write_bytes(b"PAR1")
        os.utime(p, ns=(1, 1))
        stand_ins.append(p)
    manifest.discover(stand_ins, {p.name: f"{i:064x}" for i, p in enumerate(stand_ins)})
    while recs := manifest.claim("bench", 1000):
        manifest.mark_ingested_many([(r.name, 1, 0) for r in recs])
    loop = IngestLoop(cfg, manifest, buffer, None)
    ray.get([a.__ray_ready__.remote() for a in loop.actors])
    t0 = time.perf_counter()
    loop.step()  # the first listing: every stand-in is new to the loop and looked up (a start-up cost)
    first = time.perf_counter() - t0
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,))
    runner.start()
    t0 = time.perf_counter()
    for p in paths:
        (landing / p.name).hardlink_to(p)
    while loop.counters.shards_ingested < len(paths):
        time.sleep(0.005)
    seconds = time.perf_counter() - t0
    stop.set()
    runner.join()
    loop.shutdown()
    manifest.close()
    ray.kill(buffer)
    return seconds, first


FREE_PERIOD_MS = 50
"""Ray's ``free_objects_period_milliseconds`` for the large-shard figure (Ray's default: 1000)."""


def large_shard(root: Path, d: int, rows: int, commit_rows: int) -> dict[str, float]:
    """One shard of ``rows`` rows into a 100k-row buffer, committed in parts of
    ``commit_rows`` (0: whole), on a fresh Ray: seconds, and the object store's
    peak while it goes in."""
    import threading

    import ray

    from soak import plasma_mib

    big = root / "large" / "big.parquet"
    if not big.exists():
        big.parent.mkdir()
        rng = np.random.default_rng(0)
        with pq.ParquetWriter(big, pa.schema([*(pa.field(f"f{j}", pa.float32()) for j in range(d)),
                                              pa.field("label", pa.int64())])) as w:
            for lo in range(0, rows, 500_000):  # written in slices: the writer's memory stays small too
                x = rng.random((min(500_000, rows - lo), d), dtype=np.float32)
                w.write_table(pa.table({**{f"f{j}": x[:, j] for j in range(d)}, "label": (x[:, 0] > 0.5).astype(np.int64)}))
    # a fresh Ray: what earlier figures left in the store is freed asynchronously, if at all.
    # Ray deletes freed objects from the store in batches, by default once a second
    # (free_objects_period_milliseconds): at ~3M rows/s that is ~250 MB of blocks the
    # buffer let go of but the store still holds, as much as the whole shard here. Every
    # 50 ms instead, the peak is what the loop and the buffer hold.
    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _system_config={"free_objects_period_milliseconds": FREE_PERIOD_MS})
    base = plasma_mib()
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], plasma_mib())
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        seconds, buffer, _ = ingest_seconds([big], d, 1, root, f"large-{commit_rows}", capacity_rows=100_000,
                                            overrides=(f"ingest.commit_rows={commit_rows}",))
    finally:
        done.set()
        watcher.join()
    ray.kill(buffer)
    return {"seconds": seconds, "peak_mib": peak[0] - base, "mb": big.stat().st_size / 1e6}


def registry_observe(d: int, block_rows: int = 65_536, blocks: int = 8) -> tuple[float, float]:
    """Rows/s the registry scores (``Registry.observe``: the served model's answers,
    the previous version's shadow answers, prequential figures, both drift
    detectors) on blocks of ``block_rows``, one torch thread as in its actor; and
    rows/s of the served model's forward alone on the same rows (plain PyTorch)."""
    import torch

    from livetrain.config import DriftConfig, GateConfig, ModelConfig
    from livetrain.messages import BlockMeta, Candidate
    from livetrain.training.checkpoint import state_dict_numpy
    from livetrain.training.models import build_model, model_spec
    from livetrain.training.registry import Registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(2)
        x = rng.random((block_rows, d), dtype=np.float32)
        y = (x[:, 0] > 0.5).astype(np.int64)
        spec = model_spec(ModelConfig(), d, 2)
        reg = Registry(GateConfig(), 2, drift=DriftConfig())
        for v in range(2):  # a served version and the one before it (shadow-scored for rollback)
            reg.propose(Candidate(None, spec, v - 1, 0.0, 0, 0.0, 0.0), state_dict_numpy(build_model(spec)))
            reg.observe(BlockMeta(f"warm-{v}", v, block_rows, 0, 0.0, 0.0), x, y)
        t0 = time.perf_counter()
        for i in range(blocks):
            reg.observe(BlockMeta(f"b-{i}", 10 + i, block_rows, 0, 0.0, 0.0), x, y)
        observed = blocks * block_rows / (time.perf_counter() - t0)
        model = reg.served.model
        t0 = time.perf_counter()
        for _ in range(blocks):
            with torch.no_grad():
                model(torch.from_numpy(x)).argmax(dim=1)
        return observed, blocks * block_rows / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def sampling(buffer, d: int, seconds: float, blocks: int = 8, slices: int = 10):
    """Rows/s drawn from the buffer, and from local slicing: in alternating slices of
    ``seconds / slices`` each, so a noisy spell on the shared machine hits both alike."""
    import ray

    from livetrain.messages import fetch_blocks
    from livetrain.training.learner import concat_blocks

    pending = [buffer.sample.remote(blocks, 1 << 60, 1, 0.0)]

    def draw() -> int:  # as the trainer draws: the next call goes out before this draw is used
        s = ray.get(pending.pop())
        pending.append(buffer.sample.remote(blocks, 1 << 60, 1, 0.0))
        return len(concat_blocks(fetch_blocks(s.blocks))[1])

    rows = draw()
    block_rows = rows // blocks
    held = ray.get(buffer.stats.remote())["rows"]  # the local array holds as many rows as the buffer
    local_x = np.random.default_rng(0).random((held, d), dtype=np.float32)
    local_y = np.zeros(len(local_x), dtype=np.int64)
    rng = np.random.default_rng(1)

    def slice_locally() -> int:
        starts = rng.integers(0, len(local_x) - block_rows, blocks)
        return len(concat_blocks([{"x": local_x[s : s + block_rows], "y": local_y[s : s + block_rows]} for s in starts])[1])

    totals = {draw: [0, 0.0], slice_locally: [0, 0.0]}
    for _ in range(slices):
        for fn, total in totals.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / slices:
                total[0] += fn()
            total[1] += time.perf_counter() - t0
    return totals[draw][0] / totals[draw][1], totals[slice_locally][0] / totals[slice_locally][1]


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known)) if known else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=48)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported")
    ap.add_argument("--large-rows", type=int, default=4_000_000,
                    help="rows of the one large shard (0: skip that figure)")
    ap.add_argument("--commit-rows", type=int, default=500_000, help="ingest.commit_rows for the large shard")
    ap.add_argument("--old-shards", type=int, default=20_000,
                    help="shards already ingested beside the new ones (0: skip that figure)")
    ap.add_argument("--fill-rounds", type=int, default=4,
                    help="times the buffer is filled (untimed, by other shards) before figure 2b (0: skip it)")
    ap.add_argument("--no-full-buffer", dest="fill_rounds", action="store_const", const=0,
                    help="skip figure 2b (--fill-rounds 0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the ingest figures 1 and 2b (repeatable)")
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="livetrain-bench-ingest-"))
    try:
        (root / "files").mkdir()
        paths = write_shards(root / "files", args.shards, args.rows, args.features)
        fill = [p for k in range(args.fill_rounds)
                for p in write_shards(root / "files", args.shards, args.rows, args.features, seed=1 + k, prefix=f"fill{k}")]
        rows = args.shards * args.rows
        mb = sum(p.stat().st_size for p in paths) / 1e6
        pyarrow_baseline(paths[:2], args.features)  # warm the page cache
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
        base_runs, runs, full_runs, buffer = [], {1: [], 2: []}, [], None
        faults: dict[int | str, list[float]] = {1: [], 2: [], "full": []}
        for run in range(args.repeat):  # interleaved, so a noisy spell hits every figure alike
            base_runs.append(pyarrow_baseline(paths, args.features))
            for actors in (1, 2):
                s, buf, f = ingest_seconds(paths, args.features, actors, root, run, overrides=tuple(args.overrides))
                runs[actors].append(s)
                faults[actors].append(f)
                if buffer is not None:
                    ray.kill(buffer)
                buffer = buf
            if fill:
                s, buf, f = ingest_seconds(paths, args.features, 2, root, f"full-{run}", fill=fill,
                                           overrides=tuple(args.overrides))
                full_runs.append(s)
                faults["full"].append(f)
                ray.kill(buf)
        base_s = statistics.median(base_runs)
        emit("pyarrow_to_numpy_rows_per_s", rows / base_s, "rows/s", mb_per_s=mb / base_s,
             runs=[round(rows / t) for t in base_runs])
        for actors in (1, 2):
            s = statistics.median(runs[actors])
            emit(f"ingest_{actors}_actor_rows_per_s", rows / s, "rows/s", baseline=rows / base_s, mb_per_s=mb / s,
                 baseline_mb_per_s=mb / base_s, runs=[round(rows / t) for t in runs[actors]],
                 page_faults_per_shard=_median(faults[actors]), overrides=args.overrides)
        if full_runs:
            s = statistics.median(full_runs)
            emit("ingest_2_actor_rows_per_s_full_buffer", rows / s, "rows/s", baseline=rows / base_s,
                 mb_per_s=mb / s, runs=[round(rows / t) for t in full_runs], fill_rounds=args.fill_rounds,
                 page_faults_per_shard=_median(faults["full"]), overrides=args.overrides,
                 note=f"the same shards into a buffer already filled {args.fill_rounds} times over (by other "
                      "shards, untimed, through the same actors): it evicts as they go in, and the actors "
                      "have written into the object store's memory before")
        observed, forward = registry_observe(args.features)
        emit("registry_observe_rows_per_s", observed, "rows/s", baseline=forward, block_rows=65_536,
             baseline_is="the served model's forward alone on the same rows (plain PyTorch, 1 thread)",
             note="every block is scored before it is trained on: one registry actor bounds the "
                  "pipeline's ingest at this rate")
        buffered, local = sampling(buffer, args.features, args.sample_seconds)
        emit("sample_rows_per_s", buffered, "rows/s", baseline=local)
        ray.kill(buffer)
        if args.old_shards:
            with_old, empty, first = [], [], []
            for run in range(args.repeat):
                empty.append(beside_old_shards(paths, args.features, root, 0, str(run))[0])
                s, f = beside_old_shards(paths, args.features, root, args.old_shards, str(run))
                with_old.append(s)
                first.append(f)
            emit("ingest_2_actor_rows_per_s_beside_old_shards", rows / statistics.median(with_old), "rows/s",
                 baseline=rows / statistics.median(empty), old_shards=args.old_shards,
                 baseline_is="the same loop (IngestLoop.run) with an empty landing directory",
                 runs=[round(rows / t) for t in with_old])
            emit("first_listing_s_beside_old_shards", statistics.median(first), "s", old_shards=args.old_shards,
                 note="the loop's first step: it lists every old shard and looks them up in the manifest once")
        if args.large_rows:
            whole = large_shard(root, args.features, args.large_rows, 0)
            parts = large_shard(root, args.features, args.large_rows, args.commit_rows)
            emit("large_shard_peak_store_mib", parts["peak_mib"], "MiB", baseline=whole["peak_mib"],
                 note="peak plasma usage (sampled every 0.1 s) on a fresh Ray while the shard goes in; Ray "
                      f"deletes freed objects every {FREE_PERIOD_MS} ms (free_objects_period_milliseconds; "
                      "its default, 1000 ms, adds ~1 s of ingest to any peak)",
                 baseline_is="the same shard committed whole (ingest.commit_rows=0)", rows=args.large_rows,
                 shard_mb=round(parts["mb"], 1), commit_rows=args.commit_rows, buffer_capacity_rows=100_000)
            emit("large_shard_rows_per_s", args.large_rows / parts["seconds"], "rows/s",
                 baseline=args.large_rows / whole["seconds"], baseline_is="committed whole")
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
