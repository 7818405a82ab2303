"""The per-worker training step, in plain PyTorch (runs in one process; DDP
is only a wrapper that ``prepare_model`` puts around the model)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from livetrain.training.gate import held_out
from livetrain.training.softmax import cross_entropy


@dataclass
class RoundResult:
    loss: float
    samples: int
    seconds: float


class Learner:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        seed: int = 0,
        anchor_l2: float = 0.0,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        """bf16 autocast on the forward pass (None: full precision)."""
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.anchor_l2 = anchor_l2
        self.anchor: dict[str, torch.Tensor] | None = None
        """Weights of the last promoted version: L2-to-anchor pulls towards them."""
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        """Warm the learning rate (drift reaction): ``scale`` x the configured one."""
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * scale

    def set_anchor(self, weights: dict[str, np.ndarray]) -> bool:
        """Anchor on ``weights``; False (and no anchor) when they are another model's,
        as when the served version predates a change of ``model`` in the config."""
        params = dict(_unwrap(self.model).named_parameters())
        if any(k not in weights or tuple(np.shape(weights[k])) != tuple(p.shape) for k, p in params.items()):
            self.anchor = None
            return False
        self.anchor = {k: torch.from_numpy(np.array(weights[k])).to(self.device) for k in params}
        return True

    def _anchor_penalty(self) -> torch.Tensor | float:
        if not self.anchor_l2 or self.anchor is None:
            return 0.0
        params = dict(_unwrap(self.model).named_parameters())
        return 0.5 * self.anchor_l2 * sum(((params[k] - a) ** 2).sum() for k, a in self.anchor.items())

    def train_round(self, x: np.ndarray, y: np.ndarray, steps: int) -> RoundResult:
        """``steps`` minibatch updates drawn uniformly from the rows ``x``, ``y``."""
        t0 = time.perf_counter()
        xt, yt = self._to_device(x), self._to_device(y)
        n = len(yt)
        bs = min(self.batch_size, n)
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt_step = lean_step(self.optimizer) or self.optimizer.step
        amp = self.amp_dtype is not None
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            idx = torch.randint(n, (bs,), generator=self.gen, device=self.device)
            if amp:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    loss = cross_entropy(self.model(xt.index_select(0, idx)), yt.index_select(0, idx))
            else:  # no context at all: entering a disabled autocast costs a small model ~2% a step
                loss = cross_entropy(self.model(xt.index_select(0, idx)), yt.index_select(0, idx))
            total += loss.detach()
            if self.anchor is not None and self.anchor_l2:
                loss = loss + self._anchor_penalty()
            for p in params:  # zero_grad(set_to_none=True) without its wrappers (~5% of a small model's step)
                p.grad = None
            loss.backward()
            opt_step()
        return RoundResult(total.item() / steps, steps * bs, time.perf_counter() - t0)  # one sync per round

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        # pinned staging buffer, then an asynchronous copy that overlaps with queued kernels
        return t.pin_memory().to(self.device, non_blocking=True)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel where the parameters' device has one
    (CPU and CUDA): one kernel updates every parameter, where the default on
    CPU loops over them in Python; a small model's step costs ~20% less."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lean_step(opt: torch.optim.Optimizer) -> Callable[[], None] | None:
    """``opt.step`` as one call of torch's fused Adam(W) kernel, for a fused
    Adam or AdamW with one parameter group on one device and dtype whose
    state exists (after its first ``step``); None otherwise, and the caller
    uses ``opt.step``. The update is the same to the bit (tested): this is
    what ``opt.step`` ends in, without what wraps it (hooks, profiler
    records, grouping the tensors by device again at every step). On one CPU
    thread that wrapping cost ~50-100 us of a small MLP's ~700 us step, the
    kernel itself ~25 us. Build it anew after ``opt.load_state_dict``: it
    holds the state's tensors."""
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if not g.get("fused") or g["amsgrad"] or g["maximize"] or g.get("capturable") or g.get("differentiable"):
        return None
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _global_optimizer_hooks():
        return None
    params = list(g["params"])
    state = [opt.state.get(p) for p in params]
    if not params or any(not st for st in state) or len({(p.device, p.dtype) for p in params}) != 1:
        return None
    exp_avgs, exp_avg_sqs = [st["exp_avg"] for st in state], [st["exp_avg_sq"] for st in state]
    steps = [st["step"] for st in state]
    decoupled = isinstance(opt, torch.optim.AdamW) or g.get("decoupled_weight_decay", False)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    beta1, beta2 = (float(b) for b in g["betas"])

    def step() -> None:
        grads = [p.grad for p in params]
        if isinstance(g["lr"], torch.Tensor) or any(gr is None for gr in grads):
            opt.step()  # what this does not cover: torch's own path
            return
        torch._foreach_add_(steps, 1)
        kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=g["lr"], beta1=beta1,
               beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
               grad_scale=None, found_inf=None)

    return step


def _global_optimizer_hooks() -> bool:
    from torch.optim import optimizer

    return bool(optimizer._global_optimizer_pre_hooks or optimizer._global_optimizer_post_hooks)


def say(message: str) -> None:
    """One line on this process's stdout. Not ``print``: in a Ray Train
    worker ``print`` is patched to go to Train's logger and also to a wrapped
    stdout, so each line reached the driver's console twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def restore_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any], lr: float, who: str,
                      weight_decay: float | None = None) -> bool:
    """Load a checkpoint's optimizer state (Adam's moments and step counts) with the
    configured ``lr`` (a drift reaction may have scaled the saved one) and
    ``weight_decay`` (the config may have changed since). False, and the optimizer left
    fresh, when the state is for other parameters: an MLP saved before its
    input norm lost its affine part has two more (its weights fold into the
    new layout on load; Adam's moments for them cannot)."""
    try:
        opt.load_state_dict(state)
    except ValueError as e:  # raised before anything is loaded
        say(f"livetrain: {who}: the checkpoint's optimizer state does not fit the model's parameters ({e}): "
            "the optimizer starts afresh, the weights are the checkpoint's")
        return False
    for group in opt.param_groups:
        group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    return True


def amp_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """``train.amp``: ``auto`` -> bf16 on a CUDA device that computes in it (compute
    capability 8.0 on: A100, L4, H100), else full precision. Not
    ``torch.cuda.is_bf16_supported()``: it is True on a T4 or V100 too, which only
    emulate bf16 (slower than fp32, and no bf16 convolutions in cuDNN)."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return None


def weights_finite(model: nn.Module) -> bool:
    """No NaN or infinite parameter (one device sync). DDP keeps every rank's
    parameters equal, so every rank gets the same answer."""
    params = [p.detach() for p in _unwrap(model).parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def reset_weights(model: nn.Module, opt: torch.optim.Optimizer, weights: dict[str, Any] | None,
                  fresh: Callable[[], nn.Module]) -> bool:
    """After training diverged (non-finite weights): load ``weights`` (the served
    version's), or ``fresh()``'s when there are none or they are another model's,
    and empty the optimizer's state (Adam's moments are as broken as the weights).
    Every rank calls it: rank 0's result is broadcast to the others, so the
    ranks agree even if they fetched different versions. True if ``weights`` were used."""
    target = _unwrap(model)
    used = False
    if weights is not None:
        try:
            target.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            used = True
        except (RuntimeError, KeyError):  # another model's weights (the config changed since)
            pass
    if not used:
        target.load_state_dict(fresh().state_dict())
    if dist.is_available() and dist.is_initialized():
        for t in target.state_dict().values():
            dist.broadcast(t, src=0)
        flag = torch.tensor([float(used)], device=next(target.parameters()).device)
        dist.broadcast(flag, src=0)
        used = bool(flag.item())
    opt.state.clear()
    return used


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over the DDP group (the values themselves when no
    group is set up): one collective per round for every rank's flags. NCCL
    reduces device tensors only; float64 holds any shard seq exactly."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def concat_blocks(blocks: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One contiguous (x, y) from object-store blocks (one copy, needed anyway)."""
    return np.concatenate([b["x"] for b in blocks]), np.concatenate([b["y"] for b in blocks])


class Holdout:
    """The rows training leaves out for the gate (``gate.holdout_fraction``):
    the held-out rows (``gate.held_out``) of blocks whose shard seq is
    ``hold_from`` or newer, i.e. of the newest shard trained on. The masks of
    that shard's blocks are cached by block key (``BlockRef.key``: never
    reused), since its blocks are drawn round after round; the cache empties
    when a newer shard arrives."""

    def __init__(self, fraction: float, min_rows: int, small_min_rows: int | None = None) -> None:
        self.fraction = fraction
        self.min_rows = min_rows
        self.small_min_rows = min_rows if small_min_rows is None else small_min_rows
        """``gate.holdout_min_rows``: for a shard the registry tested during a hold."""
        self._from = -1
        self._masks: dict[Any, np.ndarray] = {}

    def training_rows(self, blocks: list[dict[str, np.ndarray]], seqs: list[int], keys: list[Any],
                      hold_from: int, small: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``small``: shard ``hold_from`` holds rows out down to ``small_min_rows``
        (``Registry.small_holdout``); fixed while it is the newest."""
        if self.fraction <= 0:
            return concat_blocks(blocks)
        if hold_from != self._from:
            self._from, self._masks = hold_from, {}
        min_rows = self.small_min_rows if small else self.min_rows
        xs, ys = [b["x"] for b in blocks], [b["y"] for b in blocks]
        for i, (seq, key) in enumerate(zip(seqs, keys)):
            if seq < hold_from:
                continue
            held = self._masks.get(key)
            if held is None:
                held = self._masks[key] = held_out(xs[i], self.fraction, min_rows)
            if held.any():
                xs[i], ys[i] = xs[i][~held], ys[i][~held]
        return np.concatenate(xs), np.concatenate(ys)


class Cadence:
    """True once every ``period_s`` (monotonic clock); ``due_at_start``: the first call too."""

    def __init__(self, period_s: float, due_at_start: bool = False, clock=time.monotonic) -> None:
        self.period_s = period_s
        self.clock = clock
        self._next = clock() + (0.0 if due_at_start else period_s)

    def due(self) -> bool:
        now = self.clock()
        if now < self._next:
            return False
        self._next = now + self.period_s
        return True

    def at_least(self, seconds: float) -> None:
        """Not due again for ``seconds`` from now, if that is later than the period says."""
        self._next = max(self._next, self.clock() + seconds)
