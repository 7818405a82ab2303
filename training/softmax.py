"""Softmax and cross-entropy over the class dimension that stay fast on the CPU
when there are few classes.

torch's CPU kernels for (log-)softmax over the last dimension vectorise across
it, and a dimension narrower than one SIMD register (16 floats with AVX-512)
takes a slow path: on one thread, ``log_softmax`` of a [1024, 7] tensor costs
~105 us against ~17 us for [1024, 16] (torch 2.13, AVX-512). Cross-entropy's
forward and backward at [1024, 7] took ~195 us, a quarter of a small MLP's
whole training step. Padding the logits to 16 columns with the dtype's lowest
value leaves every result unchanged (those columns' probabilities are exactly
0, and their gradients too) and brings it to ~90 us. CUDA tensors, and 16 or
more classes, go straight to torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_MIN_WIDTH = 16
"""Classes below which CPU logits are padded: one AVX-512 register of float32."""
CPU_PAD_FROM = 3
"""Two classes are not padded: the slow path is cheap that narrow, and the pad
itself costs more (cross-entropy forward and backward at [1024, 2]: ~70 us
as it is, ~97 us padded; at 3 classes they are even, at 7 ~205 against ~105)."""


def _padded(logits: torch.Tensor) -> torch.Tensor:
    width = logits.shape[-1]
    if logits.device.type != "cpu" or not CPU_PAD_FROM <= width < CPU_MIN_WIDTH:
        return logits
    return F.pad(logits, (0, CPU_MIN_WIDTH - width), value=torch.finfo(logits.dtype).min)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, target)`` (mean over rows) for [rows, classes] logits."""
    return F.cross_entropy(_padded(logits), target)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(logits, dim=1)`` for [rows, classes] logits."""
    width = logits.shape[-1]
    return torch.softmax(_padded(logits), dim=1)[:, :width]
