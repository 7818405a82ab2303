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
from livetrain.training.learner import Learner, amp_dtype_for, make_optimizer, max_over_ranks
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
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
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
