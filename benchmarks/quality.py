"""Prequential quality of livetrain against river's online learners, on the
same stream in the same order, in one run.

    python benchmarks/quality.py [--rows 20000] [--streams sea,hyperplane,rbf,rbf-fast,shuttle]
    python benchmarks/quality.py --parquet DIR --features a,b,c --label y --classes 0,1

Learners, each answering every row before it learns from it:

- ``livetrain``: the production loop without Ray, block by block::

      block (B rows) --> served.predict (scored) --> Registry.observe --> ReplayBuffer.add
        --> Learner.train_round on buffer.sample(...) blocks, fixed steps per block
            (the newest block's held-out rows left out, ``gate.holdout_fraction``;
            down to ``gate.holdout_min_rows`` while the gate holds after an alarm)
        --> Registry.propose(weights) every ``train.propose_every_s`` of the simulated
            clock (rows arrive at ``synthetic.rows_per_second``, 2,000/s: with the
            shipped 0.25 s, after every 500-row block): the gate decides what is served next

  One learner stands in for the DDP group: its batch is ``batch_size x
  num_workers`` and each round draws ``blocks_per_round`` blocks once per
  worker (fresh blocks in every draw, as every rank gets them). The training
  budget is ``--samples-per-row`` (default 25: the demo trains ~50k samples/s
  while ingesting 2k rows/s). The registry's drift reaction warms the learning
  rate as the trainer does; its clock is simulated, so decisions do not depend
  on speed. Shipped ``Config()`` defaults unless ``--config``/``--set``.
- ``static``: the same MLP trained once on the first ``--static-rows`` rows
  with the same samples-per-row budget, never updated.
- river's ``ARFClassifier``, ``HoeffdingAdaptiveTreeClassifier`` and
  ``StandardScaler | LogisticRegression`` (multi-class: ``OneVsRestClassifier``
  of it), with their defaults, row by row.
- ``arf-lag`` and ``logreg-lag`` (diagnostics, not baselines): the same river
  models, but each block is answered by their copy trained through two blocks
  back, the freshest model livetrain's gate can serve by default (one block
  back with ``gate.holdout_fraction`` and blocks of at least
  ``gate.min_eval_rows / gate.holdout_fraction`` rows, and for a candidate
  that clears the bar of a drift alarm's hold on ``gate.holdout_min_rows``
  held-out rows). The distance from
  ``logreg`` to ``logreg-lag`` is what the gate's lag alone costs
  (``arf-lag`` runs only when ``--learners`` names it: it is slow).

``value`` is the accuracy over rows ``[eval_from, rows)``, the same rows for
every learner (``eval_from`` = ``--static-rows``: the static model has not
been trained before, and livetrain's gate needs unseen rows before it serves
anything); a row a learner cannot answer counts as wrong.
``accuracy_all_rows`` counts from row 0. Drifts are known points of the
stream: ``dip`` is the accuracy over the ``--window`` rows just before the
drift (ending where the transition starts) minus the lowest accuracy over
``--window`` rows starting after that and ending before the next drift (every
``STRIDE`` rows); ``rows_to_recover`` the rows from the drift to the first
row from which the next ``--window`` rows are answered within one point of the
level before it again, after the first window that fell below it (0 when none
fell by more; null when none came back). A later slump does not undo a
recovery. Noise alone makes a dip: ~1-2 points at 90% accuracy, the lowest
of ~60 windows of 1,000 rows.
``rows_per_s`` is each learner's own test+train time (scoring bookkeeping
excluded); torch runs on one thread, as river does. livetrain's is the median
of ``--repeats`` replays (default 3), which must answer identically. When
ARF runs too, the replays are spread evenly over ARF's run (the first before
its first row, the last after its last, none of it counted in ARF's time):
the two sides of the rows/s ratio are then timed over the same minutes of a
shared machine, whose speed drifts by +/-25% over a run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from _common import emit
from livetrain.actors.replay_buffer import ReplayBuffer
from livetrain.config import Config, load_config
from livetrain.messages import BlockMeta, Candidate, Decision
from livetrain.training.checkpoint import state_dict_numpy
from livetrain.training.learner import Cadence, Holdout, Learner, make_optimizer
from livetrain.training.models import build_model, model_spec
from livetrain.training.registry import Registry, Version

STREAMS = ("sea", "hyperplane", "rbf", "rbf-fast", "shuttle")
LEARNERS = ("livetrain", "static", "arf", "hat", "logreg", "arf-lag", "logreg-lag")
DEFAULT_LEARNERS = ("livetrain", "static", "arf", "hat", "logreg", "logreg-lag")
"""``arf-lag`` is opt-in: copying the forest every block triples ARF's time."""
RIVER = ("arf", "hat", "logreg")
LAGGED = ("arf-lag", "logreg-lag")
"""Diagnostics, not baselines: river's model served with livetrain's gate lag."""
STRIDE = 100
"""Rows between two points of the windowed-accuracy curve."""


# --- streams ---------------------------------------------------------------------


@dataclass
class Stream:
    name: str
    x: np.ndarray
    """float32 [n, d]"""
    y: np.ndarray
    """int64 [n], class indices 0..num_classes-1"""
    num_classes: int
    drifts: list[tuple[int, int]] = field(default_factory=list)
    """Known drift points: (centre row, width in rows; 1 is abrupt)."""
    note: str = ""


def _rows(it: Iterator[tuple[dict, Any]], n: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(itertools.islice(it, n))
    x = np.array([list(xd.values()) for xd, _ in pairs], dtype=np.float32)
    return x, np.array([int(y) for _, y in pairs], dtype=np.int64)


def _switch(concepts: list[Any], drifts: list[tuple[int, int]], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Concept ``i + 1`` takes row r with river's ConceptDriftStream sigmoid around
    drift ``i`` (a step when width is 1); the last drift that takes it wins.
    Each concept continues its own generator, so no row repeats."""
    rng = np.random.default_rng(seed)
    owner = np.zeros(n, dtype=np.int64)
    r = np.arange(n)
    for i, (at, width) in enumerate(drifts):
        if width <= 1:
            takes = r >= at
        else:
            takes = rng.random(n) < 1.0 / (1.0 + np.exp(np.clip(-4.0 * (r - at) / width, -50, 50)))
        owner[takes] = i + 1
    iters = [iter(c) for c in concepts]
    parts = [_rows(iters[c], int((owner == c).sum())) for c in range(len(concepts))]
    x = np.empty((n, parts[0][0].shape[1]), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    for c, (xc, yc) in enumerate(parts):
        x[owner == c], y[owner == c] = xc, yc
    return x, y


def sea(n: int, seed: int) -> Stream:
    from river.datasets import synth

    drifts = [(int(0.4 * n), 1), (int(0.7 * n), 1)]
    concepts = [synth.SEA(variant=v, noise=0.1, seed=seed + v) for v in (0, 2, 3)]
    return Stream("sea", *_switch(concepts, drifts, n, seed), 2, drifts, "SEA 10% noise, variant 0 -> 2 -> 3, abrupt")


def hyperplane(n: int, seed: int) -> Stream:
    from river.datasets import synth

    drifts = [(n // 2, max(2, n // 10))]
    concepts = [synth.Hyperplane(seed=seed + i, n_features=10, n_drift_features=0, noise_percentage=0.05) for i in (0, 1)]
    return Stream("hyperplane", *_switch(concepts, drifts, n, seed), 2, drifts, "10 features, 5% noise, two planes, gradual switch")


def rbf(n: int, seed: int, speed: float = 1e-4, name: str = "rbf") -> Stream:
    """MOA's usual settings: 1e-4 is "moderate" incremental drift, 1e-3 "fast"."""
    from river.datasets import synth

    gen = synth.RandomRBFDrift(seed_model=seed, seed_sample=seed, n_classes=5, n_features=10, change_speed=speed)
    note = f"RandomRBFDrift 5 classes, 10 features, 50 centroids all moving {speed:g}/row (incremental)"
    return Stream(name, *_rows(iter(gen), n), 5, [], note)


def rbf_fast(n: int, seed: int) -> Stream:
    return rbf(n, seed, 1e-3, "rbf-fast")


def shuttle(n: int, seed: int) -> Stream:
    from river import datasets

    x, y = _rows(iter(datasets.Shuttle()), n)
    return Stream("shuttle", x, y, 2, [], "river's bundled Shuttle (ODDS binary: ~7% anomalies), file order")


def parquet(directory: str, features: list[str], label: str, classes: list[int], drifts: list[int]) -> Stream:
    """Every ``*.parquet`` shard of ``directory`` in file-name order; rows whose label is
    not declared or whose features are not finite are dropped (livetrain quarantines them)."""
    import pyarrow.parquet as pq

    xs, ys = [], []
    for path in sorted(Path(directory).glob("*.parquet")):
        t = pq.read_table(path, columns=[*features, label])
        xs.append(np.column_stack([t[c].to_numpy(zero_copy_only=False) for c in features]).astype(np.float32))
        ys.append(t[label].to_numpy(zero_copy_only=False))
    if not xs:
        raise SystemExit(f"--parquet: no *.parquet files in {directory}")
    x, raw = np.concatenate(xs), np.concatenate(ys)
    index = {c: i for i, c in enumerate(classes)}
    keep = np.isin(raw, classes) & np.isfinite(x).all(axis=1)
    y = np.array([index[v] for v in raw[keep].tolist()], dtype=np.int64)
    note = f"{len(xs)} shards, {int((~keep).sum())} rows dropped"
    kept_before = np.concatenate([[0], np.cumsum(keep)])  # --drift-at counts the files' rows: moved past the dropped
    at = [int(kept_before[min(d, len(raw))]) for d in drifts]
    return Stream(Path(directory).resolve().name, x[keep], y, len(classes), [(d, 1) for d in at], note)


# --- learners: each returns per-row outcomes (1 right, 0 wrong, -1 no answer) and seconds


@dataclass
class Run:
    outcome: np.ndarray
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _learner(cfg: Config, s: Stream, seed: int) -> tuple[Learner, Any]:
    torch.manual_seed(seed)
    spec = model_spec(cfg.model, s.x.shape[1], s.num_classes)
    model = build_model(spec)
    opt = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    batch = cfg.train.batch_size * cfg.train.num_workers
    return Learner(model, opt, batch, seed=seed, anchor_l2=cfg.train.anchor_l2), spec


def run_livetrain(s: Stream, cfg: Config, block_rows: int, samples_per_row: float, seed: int,
                  decisions: list[tuple[int, Decision, Version | None]] | None = None) -> Run:
    """``decisions``, when given, gets every gate decision with the row count ingested
    when it was taken and the version served right after it (``benchmarks/poison.py``)."""
    tc = cfg.train
    learner, spec = _learner(cfg, s, seed)
    clock = [0.0]  # simulated: rows arrive at the synthetic stream's rate
    registry = Registry(cfg.gate, s.num_classes, clock=lambda: clock[0], drift=cfg.drift,
                        recent_fraction=cfg.buffer.recent_fraction, window_rows=cfg.buffer.window_rows)
    buffer: ReplayBuffer[dict[str, np.ndarray]] = ReplayBuffer(cfg.buffer)
    steps_per_block = max(1, round(block_rows * samples_per_row / learner.batch_size))
    holdout = Holdout(cfg.gate.holdout_fraction, cfg.gate.min_eval_rows, cfg.gate.holdout_min_rows)
    outcome = np.full(len(s.y), -1, dtype=np.int8)
    fresh_after, written_at, step, anchored, scoring = -1, 0.0, 0, None, 0.0
    propose_clock = Cadence(tc.propose_every_s, due_at_start=True, clock=lambda: clock[0])  # as the trainer's
    proposals = 0
    t0 = time.perf_counter()
    for seq, lo in enumerate(range(0, len(s.y), block_rows)):
        x, y = s.x[lo : lo + block_rows], s.y[lo : lo + block_rows]
        clock[0] = (lo + len(y)) / cfg.synthetic.rows_per_second
        if registry.served is not None:  # the same answers observe() scores, kept per row
            t = time.perf_counter()
            outcome[lo : lo + len(y)] = registry.served.predict(x) == y
            scoring += time.perf_counter() - t
        meta = BlockMeta(f"block-{seq:06d}", seq, len(y), x.nbytes + y.nbytes, clock[0], clock[0])
        taken = registry.observe(meta, x, y)
        if decisions is not None:
            decisions += [(lo + len(y), d, registry.served) for d in taken]
        buffer.add({"x": x, "y": y}, meta)
        if buffer.stats().rows < tc.min_buffer_rows:
            continue
        r = registry.reaction  # the drift reactions, applied as production applies them
        if REACTIONS in ("all", "lr"):
            learner.set_lr_scale(r.lr_scale)
        if REACTIONS in ("all", "mix"):
            buffer.set_mix(r.recent_fraction, min(1.0, r.window_rows_scale))
        if tc.anchor_l2 and registry.served is not None and registry.served.version != anchored:
            learner.set_anchor(registry.served.weights)
            anchored = registry.served.version
        left, loss = steps_per_block, 0.0
        while left:
            steps = min(left, tc.steps_per_round)
            entries = [e for _ in range(tc.num_workers) for e in buffer.sample(tc.blocks_per_round, fresh_after)]
            newest = max(entries, key=lambda e: e.meta.seq).meta
            if newest.seq > fresh_after:
                fresh_after, written_at = newest.seq, newest.written_at
            seqs = [e.meta.seq for e in entries]  # one block per seq here: the seq is its key
            xy = holdout.training_rows([e.handle for e in entries], seqs, seqs, fresh_after,
                                       registry.small_holdout(fresh_after))  # as the trainer asks the registry
            loss = learner.train_round(*xy, steps).loss
            left, step = left - steps, step + steps
        if not propose_clock.due():
            continue
        proposals += 1
        cand = Candidate(weights=None, spec=spec, trained_through=fresh_after, data_written_at=written_at,
                         train_step=step, proposed_at=clock[0], train_loss=loss,
                         small_holdout=registry.small_holdout(fresh_after))
        taken = registry.propose(cand, state_dict_numpy(learner.model))[1]
        if decisions is not None:
            decisions += [(lo + len(y), d, registry.served) for d in taken]
    seconds = time.perf_counter() - t0 - scoring
    st = registry.stats()
    answered = np.flatnonzero(outcome >= 0)
    return Run(outcome, seconds, {
        "first_answer_row": int(answered[0]) if len(answered) else None,
        "steps_per_block": steps_per_block, "train_steps": step, "proposals": proposals,
        "ingest_rows_per_s": cfg.synthetic.rows_per_second, "propose_every_s": tc.propose_every_s,
        "versions_promoted": st["versions_promoted"], "versions_rejected": st["versions_rejected"],
        "rollbacks": st["versions_rolled_back"], "drift_alarms": st["drift_alarms"],
        "registry_prequential_accuracy": st["prequential_accuracy"],
    })


def repeated(run: Callable[[], Run], times: int) -> Run:
    """``run`` done ``times`` times: see ``median_run``."""
    return median_run([run() for _ in range(max(1, times))])


def median_run(runs: list[Run]) -> Run:
    """The first run with the median seconds. livetrain replays a 20k-row
    stream in ~0.5 s, where a burst of a noisy neighbour's load moves one
    run's rows/s by +/-25%; river's learners run 20-40x longer, so one run
    of theirs averages that noise out already. The replay is deterministic
    (one thread, seeded): a run that answers differently is a bug, and stops
    the benchmark."""
    for r in runs[1:]:
        if not np.array_equal(r.outcome, runs[0].outcome):
            raise SystemExit("quality.py: two replays of the same stream answered differently (not deterministic)")
    seconds = sorted(r.seconds for r in runs)
    return Run(runs[0].outcome, seconds[len(seconds) // 2],
               {**runs[0].extra, "seconds_per_replay": [round(t, 3) for t in seconds]})


def run_static(s: Stream, cfg: Config, rows: int, block_rows: int, samples_per_row: float, seed: int) -> Run:
    learner, _ = _learner(cfg, s, seed)
    steps = max(1, round(rows * samples_per_row / learner.batch_size))
    outcome = np.full(len(s.y), -1, dtype=np.int8)
    t0 = time.perf_counter()
    learner.train_round(s.x[:rows], s.y[:rows], steps)
    model = learner.model.eval()
    with torch.no_grad():
        for lo in range(rows, len(s.y), block_rows):
            pred = model(torch.from_numpy(s.x[lo : lo + block_rows])).argmax(dim=1).numpy()
            outcome[lo : lo + block_rows] = pred == s.y[lo : lo + block_rows]
    return Run(outcome, time.perf_counter() - t0, {"trained_rows": rows, "train_steps": steps})


def river_model(name: str, num_classes: int, seed: int) -> tuple[Any, str]:
    from river import forest, linear_model, multiclass, preprocessing, tree

    if name == "arf":
        return forest.ARFClassifier(seed=seed), "forest.ARFClassifier()"
    if name == "hat":
        return tree.HoeffdingAdaptiveTreeClassifier(seed=seed), "tree.HoeffdingAdaptiveTreeClassifier()"
    if num_classes > 2:
        ovr = multiclass.OneVsRestClassifier(linear_model.LogisticRegression())
        return preprocessing.StandardScaler() | ovr, "StandardScaler | OneVsRestClassifier(LogisticRegression)"
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(), "StandardScaler | LogisticRegression"


def run_river_lagged(model: Any, description: str, rows: list[dict[int, float]], labels: list[int], block_rows: int) -> Run:
    """The same river model, but each block is answered by its copy trained
    through two blocks back: the freshest model livetrain's gate can serve by
    default (a candidate trained through block k is judged on block k + 1,
    then answers block k + 2). What the gate's lag alone costs a learner."""
    outcome = np.full(len(labels), -1, dtype=np.int8)
    served = newest = None
    t0 = time.perf_counter()
    for lo in range(0, len(labels), block_rows):
        hi = min(lo + block_rows, len(labels))
        for i in range(lo, hi):
            if served is not None:
                p = served.predict_one(rows[i])
                outcome[i] = -1 if p is None else int(p == labels[i])
        for i in range(lo, hi):
            model.learn_one(rows[i], labels[i])
        served, newest = newest, copy.deepcopy(model)
    return Run(outcome, time.perf_counter() - t0, {"model": description, "served_lag": "trained through block k-2 answers block k"})


def run_river(model: Any, description: str, rows: list[dict[int, float]], labels: list[int],
              between: Callable[[], None] | None = None, calls: int = 0) -> Run:
    """Row by row. ``between`` is called ``calls`` times, evenly spread from
    before the first row to after the last, outside the timed work."""
    outcome = np.empty(len(labels), dtype=np.int8)
    at = sorted(np.linspace(0, len(labels), calls).round().astype(int).tolist()) if between else []
    seconds, t0 = 0.0, time.perf_counter()
    for i, (xd, y) in enumerate(zip(rows, labels)):
        while at and at[0] == i:
            seconds += time.perf_counter() - t0
            at.pop(0)
            between()
            t0 = time.perf_counter()
        p = model.predict_one(xd)
        outcome[i] = -1 if p is None else int(p == y)
        model.learn_one(xd, y)
    seconds += time.perf_counter() - t0
    for _ in at:
        between()
    return Run(outcome, seconds, {"model": description})


# --- scoring ---------------------------------------------------------------------


def windowed(right: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    cs = np.concatenate([[0.0], np.cumsum(right)])
    return (cs[ends] - cs[ends - window]) / window


def drift_figures(outcome: np.ndarray, drifts: list[tuple[int, int]], window: int) -> list[dict[str, Any]]:
    right, n, out = (outcome == 1).astype(np.float64), len(outcome), []
    for i, (at, width) in enumerate(drifts):
        start = at - width // 2
        end = drifts[i + 1][0] - drifts[i + 1][1] // 2 if i + 1 < len(drifts) else n
        starts = np.arange(start, end - window + 1, STRIDE)  # windows [s, s + window) from the drift on
        if start < window or not len(starts):
            out.append({"at": at, "width": width, "dip": None, "rows_to_recover": None})
            continue
        before = float(windowed(right, np.array([start]), window)[0])
        acc = windowed(right, starts + window, window)
        low = int(np.argmin(acc))
        dip = before - float(acc[low])
        recover = 0
        if dip > 0.01:  # back after the first window that fell: a later slump does not undo it
            fell = int(np.argmax(acc < before - 0.01))
            back = starts[fell:][acc[fell:] >= before - 0.01]
            recover = max(0, int(back[0]) - at) if len(back) else None
        out.append({"at": at, "width": width, "before": round(before, 4), "lowest": round(float(acc[low]), 4),
                    "dip": round(dip, 4), "rows_to_recover": recover})
    return out


def report(s: Stream, runs: dict[str, Run], eval_from: int, window: int) -> None:
    acc: dict[str, float] = {}
    for name, r in runs.items():
        acc[name] = float((r.outcome[eval_from:] == 1).mean())
        emit(f"quality/{s.name}/{name}", round(acc[name], 4), "accuracy",
             rows_per_s=round(len(s.y) / r.seconds, 1), drifts=drift_figures(r.outcome, s.drifts, window),
             accuracy_all_rows=None if name == "static" else round(float((r.outcome == 1).mean()), 4),
             rows=len(s.y), eval_from=eval_from, torch_threads=torch.get_num_threads(), **r.extra)
    river = {k: v for k, v in acc.items() if k in RIVER}
    if "livetrain" not in acc or not river:
        return
    best = max(river, key=river.get)
    speed = (len(s.y) / runs["livetrain"].seconds) / (len(s.y) / runs["arf"].seconds) if "arf" in runs else None
    met = acc["livetrain"] >= river[best] - 0.01 and speed is not None and speed >= 20
    lagged = {k: round(v, 4) for k, v in acc.items() if k in LAGGED}
    emit(f"quality/{s.name}/summary", round(acc["livetrain"], 4), "accuracy", baseline=round(river[best], 4),
         best_river=best, gap_points=round(100 * (acc["livetrain"] - river[best]), 2),
         river_at_gate_lag=lagged or None,
         static=round(acc["static"], 4) if "static" in acc else None,
         rows_per_s_vs_arf=None if speed is None else round(speed, 2), target_met=met, stream=s.note)


# --- entry point -----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000, help="rows per stream")
    p.add_argument("--streams", default=",".join(STREAMS), help=f"comma list of {', '.join(STREAMS)}")
    p.add_argument("--learners", default=",".join(DEFAULT_LEARNERS), help=f"comma list of {', '.join(LEARNERS)}")
    p.add_argument("--block-rows", type=int, default=500, help="rows per block (one shard)")
    p.add_argument("--samples-per-row", type=float, default=25.0, help="livetrain samples trained per row ingested")
    p.add_argument("--static-rows", type=int, default=5000, help="rows the static model trains on (and eval_from)")
    p.add_argument("--window", type=int, default=1000, help="rows of the windowed accuracy for drift figures")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3,
                   help="livetrain replays of each stream; its rows/s is their median (the answers must not differ)")
    p.add_argument("--reactions", default="all", choices=["all", "none", "lr", "mix"],
                   help="which drift reactions livetrain applies (lr warm-up, sampling mix + window)")
    p.add_argument("--config", default=None, help="livetrain YAML config (default: the shipped Config() defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--parquet", default=None, help="replay this directory's *.parquet shards instead")
    p.add_argument("--features", default=None, help="with --parquet: feature columns, comma list")
    p.add_argument("--label", default="label", help="with --parquet: label column")
    p.add_argument("--classes", default="0,1", help="with --parquet: declared label values, comma list")
    p.add_argument("--drift-at", default="", help="with --parquet: known abrupt drift rows (of the files, dropped rows counted), comma list")
    args = p.parse_args(argv)
    if args.parquet and not args.features:
        p.error("--parquet needs --features")
    return args


def streams(args: argparse.Namespace) -> Iterator[Callable[[], Stream]]:
    if args.parquet:
        ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
        yield lambda: parquet(args.parquet, args.features.split(","), args.label, ints(args.classes), ints(args.drift_at))
        return
    makers = {"sea": sea, "hyperplane": hyperplane, "rbf": rbf, "rbf-fast": rbf_fast, "shuttle": shuttle}
    for name in args.streams.split(","):
        if name not in makers:
            raise SystemExit(f"--streams: unknown stream {name!r} (known: {', '.join(STREAMS)})")
        yield lambda name=name: makers[name](args.rows, args.seed)


REACTIONS = "all"
"""Which drift reactions the livetrain replay applies (``--reactions``)."""


def main(argv: list[str] | None = None) -> None:
    global REACTIONS
    args = parse_args(argv)
    REACTIONS = args.reactions
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    if args.block_rows < cfg.gate.min_eval_rows:  # a proposal per block would supersede every candidate
        print(f"quality.py: --block-rows {args.block_rows} < gate.min_eval_rows {cfg.gate.min_eval_rows}: "
              "livetrain will never promote", file=sys.stderr)
    learners = args.learners.split(",")
    if unknown := set(learners) - set(LEARNERS):
        raise SystemExit(f"--learners: unknown {sorted(unknown)} (known: {', '.join(LEARNERS)})")
    for make in streams(args):
        s = make()
        static_rows = min(args.static_rows, len(s.y) // 4)
        runs: dict[str, Run] = {}
        live = lambda s=s: run_livetrain(s, cfg, args.block_rows, args.samples_per_row, args.seed)  # noqa: E731
        replays: list[Run] = []
        interleaved = "livetrain" in learners and "arf" in learners
        if "livetrain" in learners:
            # with ARF, replayed while ARF runs (below); the placeholder keeps the report's order
            runs["livetrain"] = Run(np.empty(0, dtype=np.int8), 0.0) if interleaved else repeated(live, args.repeats)
        if "static" in learners:
            runs["static"] = run_static(s, cfg, static_rows, args.block_rows, args.samples_per_row, args.seed)
        rows, labels = [dict(enumerate(r)) for r in s.x.tolist()], s.y.tolist()
        for name in (n for n in RIVER if n in learners):
            if name == "arf" and interleaved:  # the rows/s ratio's two sides timed over the same minutes
                runs[name] = run_river(*river_model(name, s.num_classes, args.seed), rows, labels,
                                       between=lambda: replays.append(live()), calls=max(1, args.repeats))
                runs["livetrain"] = median_run(replays)
                runs["livetrain"].extra["interleaved_with"] = "arf"
                continue
            runs[name] = run_river(*river_model(name, s.num_classes, args.seed), rows, labels)
        for name in (n for n in LAGGED if n in learners):
            model, description = river_model(name.removesuffix("-lag"), s.num_classes, args.seed)
            runs[name] = run_river_lagged(model, description, rows, labels, args.block_rows)
        first = runs["livetrain"].extra.get("first_answer_row") if "livetrain" in runs else None
        if "livetrain" in runs and (first is None or first > static_rows):
            print(f"quality.py: {s.name}: livetrain first answered at row {first}, after the first row scored "
                  f"({static_rows}): its rows before that count as wrong", file=sys.stderr)
        report(s, runs, static_rows, args.window)


if __name__ == "__main__":
    main()
