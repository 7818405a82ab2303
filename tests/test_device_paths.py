"""What ``train.use_gpu: true`` and ``serve.num_gpus`` run, without Ray: the
worker's step as ``train_loop_per_worker`` sets it up (model and optimizer
built on the host, then moved and wrapped in DDP, AMP by ``train.amp``), the
checkpoint and optimizer-state round-trip across devices, and a replica
predicting on its device. Each test runs on the CPU (gloo) everywhere and on
CUDA (NCCL) where a GPU is present, so a GPU machine runs it as is:

    python -m pytest tests/test_device_paths.py   # needs torch, numpy, pyyaml
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from livetrain.config import ModelConfig
from livetrain.messages import ServedVersion
from livetrain.serving.predictor import load_version, replica_device
from livetrain.training.checkpoint import CheckpointData, load_checkpoint, save_checkpoint, state_dict_numpy, unwrap
from livetrain.training.learner import (
    Learner,
    amp_dtype_for,
    lean_step,
    make_optimizer,
    max_over_ranks,
    reset_weights,
    weights_finite,
)
from livetrain.training.models import build_model, model_spec

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]
MODELS = {
    "mlp": (ModelConfig(name="mlp", hidden=[64, 64]), 16, 3),
    "cnn": (ModelConfig(name="cnn", options={"image_shape": [1, 8, 8], "channels": [8, 16]}), 64, 3),
}


def separable(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose class is the argmax of a fixed projection: learnable in a few hundred steps."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = np.random.default_rng(99).standard_normal((d, classes)).astype(np.float32)
    return x, (x @ w).argmax(axis=1).astype(np.int64)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x).to(device)).argmax(dim=1).cpu().numpy()
    return float((pred == y).mean())


@pytest.fixture
def process_group(request):
    """A one-rank process group on loopback, as Ray Train's TorchConfig makes
    it: NCCL for CUDA, gloo for the CPU."""
    device = request.param
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    try:
        yield torch.device(device)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("process_group", DEVICES, indirect=True)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_worker_step_learns_and_resumes_on_its_device(process_group, model_name, tmp_path):
    device = process_group
    cfg, d, classes = MODELS[model_name]
    spec = model_spec(cfg, d, classes)
    x, y = separable(4096, d, classes)
    amp = amp_dtype_for("auto", device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        assert amp is torch.bfloat16  # train.amp: auto -> bf16 on a GPU that has it

    def worker(weights=None, optimizer_state=None):
        # the order of train_loop_per_worker: build and make the optimizer on
        # the host, load weights, move and wrap (prepare_model), then load the
        # optimizer's state so it follows the parameters' device
        torch.manual_seed(0)
        model = build_model(spec)
        opt = make_optimizer(model, 3e-3)
        if weights is not None:
            model.load_state_dict(weights)
        model = model.to(device)
        model = DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        return Learner(model, opt, 256, device=device, amp_dtype=amp)

    learner = worker()
    before = accuracy(learner.model, x, y, device)
    first = learner.train_round(x, y, 60)
    second = learner.train_round(x, y, 60)
    assert np.isfinite(first.loss) and second.loss < first.loss
    assert all(p.device.type == device.type for p in learner.model.parameters())
    trained = accuracy(learner.model, x, y, device)
    assert trained > before + 0.15, (before, trained)

    # the loop's flags, one collective per round; a shard seq beyond float32's exact range survives
    assert max_over_ranks([0.0, 1.0, 0.5, 2.0**40 + 1], device) == [0.0, 1.0, 0.5, 2.0**40 + 1]

    saved = CheckpointData(spec, unwrap(learner.model).state_dict(), {"step": 120}, learner.optimizer.state_dict())
    save_checkpoint(tmp_path, saved)
    data = load_checkpoint(tmp_path)
    assert all(t.device.type == "cpu" for t in data.weights.values())  # readable on a host without the GPU
    resumed = worker(data.weights, data.optimizer)
    assert accuracy(resumed.model, x, y, device) == trained
    state = resumed.optimizer.state_dict()["state"]
    assert state and all(s["exp_avg"].device.type == device.type for s in state.values())
    third = resumed.train_round(x, y, 60)
    assert np.isfinite(third.loss) and third.loss < first.loss


@pytest.mark.parametrize("device", DEVICES)
def test_replica_answers_on_its_device_as_on_the_host(device):
    cfg, d, classes = MODELS["mlp"]
    spec = model_spec(cfg, d, classes)
    torch.manual_seed(1)
    weights = state_dict_numpy(build_model(spec))
    served = ServedVersion(3, None, spec, 3, 0.0, 1.0, {})
    on_device = load_version(served, weights, device=replica_device(1 if device == "cuda" else 0, torch.cuda.is_available()))
    on_host = load_version(served, weights, device="cpu")
    assert on_device.device.type == device
    x = np.random.default_rng(2).standard_normal((33, d), dtype=np.float32)
    np.testing.assert_allclose(on_device.probabilities(x), on_host.probabilities(x), atol=1e-5)
    answers = on_device.predict_many([x[:1], x[1:]], [10, 20, 30])
    assert [len(a["predictions"]) for a in answers] == [1, 32]
    assert answers[1]["predictions"] == on_host.predict(x[1:], [10, 20, 30])["predictions"]
    assert all(a["model_version"] == 3 for a in answers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_the_lean_optimizer_step_updates_exactly_as_opt_step(device, kind):
    """Same weights, same gradients: ``lean_step`` (one fused kernel call)
    and ``opt.step`` leave the same weights and optimizer state, to the bit,
    through a learning-rate change and weight decay."""
    torch.manual_seed(0)
    made = [build_model(model_spec(ModelConfig(name="mlp", hidden=[16, 16]), 5, 3)).to(device) for _ in range(2)]
    made[1].load_state_dict(made[0].state_dict())
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opts = [cls(m.parameters(), lr=3e-3, weight_decay=0.05, fused=True) for m in made]
    x = torch.randn(64, 5, device=device)
    y = torch.randint(0, 3, (64,), device=device)

    def grads(m):
        for p in m.parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(m(x), y).backward()

    assert lean_step(opts[1]) is None  # no state before the first step: torch's path
    for m, o in zip(made, opts):
        grads(m)
        o.step()
    lean = lean_step(opts[1])
    assert lean is not None
    for i in range(6):
        if i == 3:
            for o in opts:
                o.param_groups[0]["lr"] = 1e-2
        for m in made:
            grads(m)
        opts[0].step()
        lean()
    for a, b in zip(made[0].state_dict().values(), made[1].state_dict().values()):
        assert torch.equal(a, b)
    for pa, pb in zip(opts[0].param_groups[0]["params"], opts[1].param_groups[0]["params"]):
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert float(opts[1].state[pb]["step"]) == 7


def test_the_lean_step_leaves_what_it_does_not_cover_to_torch():
    m = torch.nn.Linear(3, 2)

    def stepped(opt):
        m(torch.randn(4, 3)).sum().backward()
        opt.step()
        return opt

    assert lean_step(stepped(torch.optim.AdamW(m.parameters(), fused=True))) is not None
    assert lean_step(stepped(torch.optim.AdamW(m.parameters()))) is None  # not fused
    assert lean_step(stepped(torch.optim.AdamW(m.parameters(), fused=True, amsgrad=True))) is None
    assert lean_step(stepped(torch.optim.SGD(m.parameters(), lr=0.1))) is None
    hooked = stepped(torch.optim.AdamW(m.parameters(), fused=True))
    hooked.register_step_post_hook(lambda *a: None)
    assert lean_step(hooked) is None  # hooks must run: torch's path
    two_groups = torch.optim.AdamW([{"params": [m.weight]}, {"params": [m.bias], "lr": 0.1}], fused=True)
    assert lean_step(stepped(two_groups)) is None


def test_amp_auto_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch):
    """A T4 (sm75) or V100 (sm70) only emulates bf16, though torch.cuda.is_bf16_supported()
    says True there: ``auto`` trains in fp32 on them, as cluster.yaml says."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, want in (((7, 5), None), ((7, 0), None), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert amp_dtype_for("auto", cuda) is want, capability
    assert amp_dtype_for("auto", torch.device("cpu")) is None
    assert amp_dtype_for("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize("process_group", DEVICES, indirect=True)
def test_diverged_training_goes_on_from_the_served_weights_with_a_fresh_optimizer(process_group):
    """A learning rate that blows the weights up: the round leaves non-finite
    weights, ``weights_finite`` says so, and ``reset_weights`` puts the served
    version's back (through the process group's broadcast) and empties Adam's
    state; training then goes on and learns. Weights of another model fall back
    to fresh ones."""
    device = process_group
    cfg, d, classes = MODELS["mlp"]
    spec = model_spec(cfg, d, classes)
    x, y = separable(2048, d, classes)
    torch.manual_seed(0)
    served = state_dict_numpy(build_model(spec))
    model = DistributedDataParallel(build_model(spec).to(device), device_ids=[0] if device.type == "cuda" else None)
    opt = make_optimizer(model, 1e30)
    learner = Learner(model, opt, 256, device=device)
    for _ in range(5):
        learner.train_round(x, y, 20)
        if not weights_finite(model):
            break
    assert not weights_finite(model) and opt.state
    assert reset_weights(model, opt, served, lambda: build_model(spec))
    assert weights_finite(model) and not opt.state
    assert all(np.array_equal(v, served[k]) for k, v in state_dict_numpy(model).items())
    learner.base_lrs = [3e-3]
    learner.set_lr_scale(1.0)
    learner.train_round(x, y, 300)
    assert weights_finite(model) and accuracy(model, x, y, device) > 0.8

    other = state_dict_numpy(build_model(model_spec(ModelConfig(name="mlp", hidden=[8]), d, classes)))
    torch.manual_seed(1)
    assert not reset_weights(model, opt, other, lambda: build_model(spec))
    assert weights_finite(model)
