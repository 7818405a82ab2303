"""The continuous trainer: ONE long-running ``TorchTrainer`` job.

Each worker loops until the buffer closes:

    sample refs from the buffer (waits for ``min_buffer_rows``; the next
    round's draw goes out before this round trains, so the buffer answers it
    meanwhile; unseen blocks first, a backlog shared out among the ranks)
      -> one all_reduce of control flags (stop / propose / checkpoint / no data),
         so every rank takes the same branch and calls ``report`` equally often
      -> fetch the blocks zero-copy, K DDP steps (weights that went non-finite
         are neither proposed nor checkpointed; the next round every rank goes
         on from the served version's weights, with a fresh optimizer state)
      -> rank 0: propose weights to the registry (object store) on its cadence
      -> all: ``ray.train.report`` with rank 0's checkpoint on its cadence

A killed worker makes Ray Train restart the group (``FailureConfig``); the
loop resumes from ``ray.train.get_checkpoint()``. The buffer and the registry
are separate actors and carry on meanwhile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from livetrain.config import Config
from livetrain.messages import Candidate, ModelSpec, fetch_blocks
from livetrain.storage import TRAIN_RUN, Store, check_train_storage, record_train_storage
from livetrain.training.checkpoint import (
    CheckpointData,
    load_checkpoint,
    save_checkpoint,
    state_dict_numpy,
    unwrap,
    weights_from_bytes,
)
from livetrain.training.learner import (
    Cadence,
    Holdout,
    Learner,
    amp_dtype_for,
    make_optimizer,
    max_over_ranks,
    reset_weights,
    restore_optimizer,
    say,
    weights_finite,
)
from livetrain.training.models import build_model

STOP, PROPOSE, CHECKPOINT, NO_DATA, LR_SCALE, NEWEST, NEW_BLOCKS, DIVERGED, NEWEST_WRITTEN, ANCHOR = range(10)
ANCHOR_POLL_S = 30.0
"""Rank 0's long-poll for a newly served version (``train.anchor_l2``), renewed when it ends."""
PROPOSAL_SHARE = 0.1
"""At most this share of rank 0's time goes to copying its weights out for a proposal: a
large model proposes less often than ``train.propose_every_s``."""


@dataclass
class Progress:
    """What a worker resumes from (stored in the checkpoint's meta)."""

    step: int = 0
    fresh_after: int = -1
    """Newest shard seq this worker has trained on (its unseen-first draws start after it).
    A checkpoint stores the lowest over the ranks."""
    trained_through: int = -1
    """Newest shard seq any worker has trained on: the shared weights' lineage.
    Training leaves out that shard's held-out rows (``gate.holdout_fraction``)."""
    data_written_at: float = 0.0
    last_proposed_through: int = -1


REPORT_LOG_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")
"""Where Ray Train logs each ``report`` at INFO: "Checkpoint successfully created at ..."
and, from every rank, "Reporting training result N: TrainingReport(...)"."""


def quiet_report_logs() -> None:
    """Raise Ray Train's per-report INFO lines to WARNING in this worker. A
    continuous job reports every ``train.checkpoint_every_s`` for as long as it
    runs: three console lines each time, forever (and into W&B's console log).
    The checkpoints are where they were (``<state_dir>/ray_train/`` or under
    ``storage.uri``), and a restarted worker still says which one it resumed
    from. One module names its logger by its file path, hence the spec lookup
    (no import); a Ray without these modules is left as it is."""
    for module in REPORT_LOG_MODULES:
        try:
            spec = importlib.util.find_spec(module)
        except ImportError:
            continue
        if spec is not None and spec.origin:
            for name in (module, spec.origin):
                logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: Config = config["cfg"]
    spec: ModelSpec = config["spec"]
    buffer, registry = config["buffer"], config["registry"]
    tc = cfg.train
    quiet_report_logs()
    torch.set_num_threads(tc.torch_threads)
    rank = ray.train.get_context().get_world_rank()

    model = build_model(spec)
    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    progress = Progress()
    ckpt, data = ray.train.get_checkpoint(), None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            data = load_checkpoint(d)
        try:
            model.load_state_dict(data.weights)
        except RuntimeError:  # the config names another model since (widths, layers): train it afresh
            say(f"livetrain: rank {rank}: the latest checkpoint holds model {data.spec.name} {data.spec.kwargs}, "
                f"the config asks for {spec.name} {spec.kwargs}: training starts from fresh weights "
                "(the served version keeps serving until a candidate of the new model passes the gate)")
            model = build_model(spec)  # load_state_dict copied the tensors that fitted before it failed
            opt = make_optimizer(model, tc.lr, tc.weight_decay)
            progress, data = Progress(step=data.meta["progress"]["step"]), None  # steps go on counting
        else:
            progress = Progress(**data.meta["progress"])
            progress.trained_through = max(progress.trained_through, progress.fresh_after)  # older checkpoints
            say(f"livetrain: rank {rank} resumed from checkpoint at step {progress.step}")
    else:
        say(f"livetrain: rank {rank} starting without a checkpoint")
    resumed_from_step = progress.step
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP
    if data is not None and data.optimizer is not None:
        restore_optimizer(opt, data.optimizer, tc.lr, f"rank {rank}", tc.weight_decay)  # after the move: state follows the params' device
    learner = Learner(
        model,
        opt,
        tc.batch_size,
        seed=1000 * rank + progress.step,
        anchor_l2=tc.anchor_l2,
        device=device,
        amp_dtype=amp_dtype_for(tc.amp, device),
    )
    holdout = Holdout(cfg.gate.holdout_fraction, cfg.gate.min_eval_rows, cfg.gate.holdout_min_rows)
    small_holdout = (-1, False)  # (shard, does it hold rows out as during a hold): the registry's answer
    knobs: dict[str, float] = {"lr_scale": 1.0}
    knobs_ref: ray.ObjectRef | None = None
    anchor_version = -1
    anchor_ref: ray.ObjectRef | None = None
    """Rank 0's long-poll (``wait_for_version``) for a version served after the anchor."""
    # propose right after the first round: on a backlog, the candidate is then
    # judged on the shards it has not reached yet instead of waiting for new ones
    propose_clock = Cadence(tc.propose_every_s, due_at_start=True)
    ckpt_clock = Cadence(tc.checkpoint_every_s)
    last_result = None
    pending_proposal: ray.ObjectRef | None = None

    # blocks of the newest shard this rank has drawn: a large shard goes into the buffer
    # in parts, and each new part is worth a new candidate although its seq is the same
    newest_blocks: tuple[int, set[str]] = (-1, set())
    grown = False
    """Trained on blocks of the newest shard since the last proposal (same seq)."""
    diverged, divergences = False, 0
    """The last round left non-finite weights (checked on every rank; DDP keeps them equal)."""

    world = ray.train.get_context().get_world_size()

    def draw(fresh_after: int) -> ray.ObjectRef:  # the ranks share out a backlog
        return buffer.sample.remote(tc.blocks_per_round, fresh_after, tc.min_buffer_rows, 0.5, rank, world)

    next_sample = draw(progress.fresh_after)
    while True:
        sample = ray.get(next_sample)
        flags = [0.0] * 10
        flags[NO_DATA] = float(not sample.blocks)
        flags[DIVERGED] = float(diverged)
        flags[NEWEST] = max((m.seq for m in sample.metas), default=-1)
        flags[NEWEST_WRITTEN] = max((m.written_at for m in sample.metas), default=0.0)  # float64: exact
        if flags[NEWEST] > newest_blocks[0]:
            newest_blocks = (int(flags[NEWEST]), set())
        keys = {b.key for b, m in zip(sample.blocks, sample.metas) if m.seq == newest_blocks[0]}
        flags[NEW_BLOCKS] = float(bool(keys - newest_blocks[1]))
        newest_blocks[1].update(keys)
        if rank == 0:
            if knobs_ref is not None and ray.wait([knobs_ref], timeout=0)[0]:
                knobs, knobs_ref = ray.get(knobs_ref), None
            flags[LR_SCALE] = knobs["lr_scale"]
            flags[STOP] = float(sample.closed)
            flags[PROPOSE] = float(propose_clock.due())
            flags[CHECKPOINT] = float(ckpt_clock.due() or sample.closed)
            if tc.anchor_l2:  # a newly served version, as version + 1 (0: none); no call per round
                if anchor_ref is None:
                    anchor_ref = registry.wait_for_version.remote(anchor_version, ANCHOR_POLL_S)
                if ray.wait([anchor_ref], timeout=0)[0]:
                    served, anchor_ref = ray.get(anchor_ref), None
                    flags[ANCHOR] = float(served.version + 1) if served is not None else 0.0
        flags = max_over_ranks(flags, device)
        trains = not flags[NO_DATA] and not flags[STOP]
        if not flags[STOP]:  # one round ahead: the call's round trip (~1-3 ms) overlaps this round
            seen = max([progress.fresh_after, *(m.seq for m in sample.metas)]) if trains else progress.fresh_after
            next_sample = draw(seen)  # unseen-first after what this round trains on

        learner.set_lr_scale(float(flags[LR_SCALE]) or 1.0)  # rank 0's knob, on every rank
        if flags[DIVERGED]:  # every rank, together: the weights come from rank 0
            divergences += 1
            _recover(model, opt, spec, registry, rank, progress.step, divergences)
            diverged = False
        if flags[ANCHOR]:  # every rank, together: anchor on the version served now
            anchor_version = _refresh_anchor(learner, registry, anchor_version)
        if trains:
            t0 = time.perf_counter()
            # every rank leaves out the held-out rows of the newest shard any rank drew
            through = max(progress.trained_through, int(flags[NEWEST]))
            if through != small_holdout[0]:  # the same on every rank: ask once, all ranks follow rank 0
                asked = float(ray.get(registry.small_holdout.remote(through))) if rank == 0 else 0.0
                small_holdout = (through, bool(max_over_ranks([asked], device)[0]))
            x, y = holdout.training_rows(fetch_blocks(sample.blocks), [m.seq for m in sample.metas],
                                         [b.key for b in sample.blocks], through, small_holdout[1])
            last_result = learner.train_round(x, y, tc.steps_per_round)
            last_result.seconds = time.perf_counter() - t0
            diverged = not weights_finite(model)  # neither proposed nor checkpointed; reset next round
            progress.step += tc.steps_per_round
            grown = grown or (bool(flags[NEW_BLOCKS]) and through == progress.trained_through)
            progress.trained_through = through
            # the newest data any rank trained on (a rank's share of a backlog may be older)
            progress.data_written_at = max(progress.data_written_at, flags[NEWEST_WRITTEN])
            progress.fresh_after = max(progress.fresh_after, max(m.seq for m in sample.metas))

        if rank == 0 and flags[PROPOSE] and last_result is None:
            propose_clock = Cadence(tc.propose_every_s, due_at_start=True)  # no round yet: stay due
        if rank == 0 and flags[PROPOSE] and last_result is not None:
            knobs_ref = registry.report_train.remote(
                {
                    "steps": progress.step,
                    "loss": last_result.loss,
                    "samples_per_s": world * last_result.samples / max(last_result.seconds, 1e-9),
                    "trained_through": progress.trained_through,
                    "resumed_from_step": resumed_from_step,
                    "divergences": divergences,
                }
            )
            proposal_free = pending_proposal is None or ray.wait([pending_proposal], timeout=0)[0]
            if (progress.trained_through > progress.last_proposed_through or grown) and proposal_free and not diverged:
                t0 = time.perf_counter()
                weights = ray.put(state_dict_numpy(model))
                propose_clock.at_least((time.perf_counter() - t0) / PROPOSAL_SHARE)
                pending_proposal = registry.propose.remote(
                    Candidate(
                        weights=weights,
                        spec=spec,
                        trained_through=progress.trained_through,
                        data_written_at=progress.data_written_at,
                        train_step=progress.step,
                        proposed_at=time.time(),
                        train_loss=last_result.loss,
                        small_holdout=small_holdout == (progress.trained_through, True),
                    )
                )
                progress.last_proposed_through, grown = progress.trained_through, False

        if flags[CHECKPOINT]:
            _report(rank, model, opt, spec, cfg, progress, last_result, device, with_weights=not diverged)
        if flags[STOP]:
            return


def _refresh_anchor(learner: Learner, registry: Any, have: int) -> int:
    """Anchor on the served version's weights (rank 0 saw it change; a promotion
    since then is taken too: the pull is towards what serves now)."""
    served = ray.get(registry.wait_for_version.remote(have, 0.0))
    if served is None:
        return have
    learner.set_anchor(weights_from_bytes(ray.get(served.weights)))
    return served.version


def _recover(model, opt, spec: ModelSpec, registry: Any, rank: int, step: int, count: int) -> None:
    """Training diverged: go on from the served version's weights (fresh ones if
    none is served, or it is another model), with a fresh optimizer state. Said
    the first time and every 100th (a learning rate far too high diverges every round)."""
    served = ray.get(registry.wait_for_version.remote(-1, 0.0)) if rank == 0 else None
    weights = weights_from_bytes(ray.get(served.weights)) if served is not None else None
    torch.manual_seed(step)
    used = reset_weights(model, opt, weights, lambda: build_model(spec))
    if rank == 0 and (count == 1 or count % 100 == 0):
        whence = f"served v{served.version}'s weights" if used else "fresh weights"
        say(f"livetrain: training diverged at step {step} (non-finite weights; {count} time(s) so far, "
            f"train_divergences): it goes on from {whence}, with a fresh optimizer state")


def _report(rank, model, opt, spec, cfg, progress, result, device, with_weights: bool = True) -> None:
    """Every rank calls it together (a collective): a resumed run starts every
    rank's unseen-first draws after the *lowest* rank's ``fresh_after``, so a
    backlog the ranks shared out is not skipped past where one of them was."""
    resume = dataclasses.replace(progress, fresh_after=int(-max_over_ranks([-progress.fresh_after], device)[0]))
    metrics = {"step": progress.step, "trained_through": progress.trained_through}
    if result is not None:
        metrics["loss"] = result.loss
    if rank != 0 or not with_weights:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(
            d,
            CheckpointData(
                spec=spec,
                weights=unwrap(model).state_dict(),
                meta={"progress": dataclasses.asdict(resume), "config": cfg.to_dict()},
                optimizer=opt.state_dict(),
            ),
        )
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def make_trainer(cfg: Config, spec: ModelSpec, buffer: Any, registry: Any) -> TorchTrainer:
    tc = cfg.train
    store = Store.from_config(cfg.storage)
    # storage.uri added or removed since the last run: refuse, rather than train from scratch
    record_train_storage(cfg.state_dir, check_train_storage(cfg.state_dir, store))
    if store is not None:  # every node reaches the checkpoints there
        storage_path, storage_fs = store.ray_train()
    else:
        local = Path(cfg.state_dir).resolve() / "ray_train"
        local.mkdir(parents=True, exist_ok=True)
        storage_path, storage_fs = str(local), None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "spec": spec, "buffer": buffer, "registry": registry},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **tc.worker_resources},
        ),
        run_config=RunConfig(
            name=TRAIN_RUN,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )

