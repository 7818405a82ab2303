"""The training step, the model builders, AMP and the checkpoint round-trip
on one accelerator, without Ray: what ``train.use_gpu: true`` runs inside
each DDP worker. Prints samples/s in fp32 and bf16 for the MLP and the CNN,
and the rows/s a serving replica predicts on the device against the CPU
(``serve.num_gpus``). ``tests/test_device_paths.py`` checks the same paths
for correctness (DDP on NCCL, resume, the replica on CUDA).

    python benchmarks/gpu_step.py [--seconds 5] [--device cuda]

Falls back to the CPU when no CUDA device is present (and says so in every
line), so the same script is also a smoke test here.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from _common import emit
from livetrain.config import ModelConfig
from livetrain.messages import ServedVersion
from livetrain.serving.predictor import load_version
from livetrain.training.checkpoint import CheckpointData, load_model, save_checkpoint, state_dict_numpy
from livetrain.training.learner import Learner, make_optimizer
from livetrain.training.models import build_model, model_spec

CASES = {
    "mlp": (ModelConfig(name="mlp", hidden=[1024, 1024]), 64, 10, 4096),
    # big enough that the matrix products, not the kernel launches, set the pace (where bf16 pays)
    "mlp-wide": (ModelConfig(name="mlp", hidden=[4096, 4096]), 256, 10, 16384),
    "cnn": (ModelConfig(name="cnn", options={"image_shape": [3, 32, 32], "channels": [32, 64]}), 3 * 32 * 32, 10, 256),
}


def rate(spec, device: torch.device, amp: torch.dtype | None, batch: int, seconds: float) -> float:
    model = build_model(spec).to(device)
    learner = Learner(model, make_optimizer(model, 1e-3), batch, device=device, amp_dtype=amp)
    n, d = 16 * batch, spec.kwargs["num_features"]
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, spec.kwargs["num_classes"], n)
    learner.train_round(x, y, 5)  # warm-up (cudnn autotune, allocator)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += learner.train_round(x, y, 20).samples  # includes the pinned host->device copy
    return done / (time.perf_counter() - t0)


def checkpoint_round_trip(spec, device: torch.device) -> float:
    model = build_model(spec).to(device).eval()
    x = torch.randn(8, spec.kwargs["num_features"], device=device)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, CheckpointData(spec, model.state_dict()))
        rebuilt, _ = load_model(d)
    with torch.no_grad():
        return float((rebuilt.to(device)(x) - model(x)).abs().max())


def predict_rate(spec, device: str, rows: int, seconds: float) -> float:
    """Rows/s of ``Loaded.probabilities`` (host array in, host array out) for requests of ``rows`` rows."""
    loaded = load_version(ServedVersion(1, None, spec, 1, 0.0, 0.0, {}), state_dict_numpy(build_model(spec)), device=device)
    x = np.random.default_rng(2).standard_normal((rows, spec.kwargs["num_features"]), dtype=np.float32)
    for _ in range(10):
        loaded.probabilities(x)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loaded.probabilities(x)
        done += rows
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no CUDA device)"
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    for name, (cfg, d, classes, batch) in CASES.items():
        spec = model_spec(cfg, d, classes)
        fp32 = rate(spec, device, None, batch, args.seconds)
        bf16 = rate(spec, device, torch.bfloat16, batch, args.seconds) if bf16_ok else None
        emit(f"gpu_step/{name}/fp32", round(fp32), "samples/s", device=where, batch=batch)
        emit(f"gpu_step/{name}/bf16", None if bf16 is None else round(bf16), "samples/s", baseline=round(fp32),
             device=where, batch=batch)
        emit(f"gpu_step/{name}/checkpoint_round_trip_max_abs_diff", checkpoint_round_trip(spec, device), "abs", device=where)
        if device.type == "cuda" and name != "mlp-wide":
            for rows in (1, 64, 4096):
                on_cpu = predict_rate(spec, "cpu", rows, args.seconds / 2)
                on_gpu = predict_rate(spec, str(device), rows, args.seconds / 2)
                emit(f"gpu_step/{name}/predict_{rows}_rows", round(on_gpu), "rows/s", baseline=round(on_cpu),
                     device=where, baseline_device="cpu")


if __name__ == "__main__":
    main()
