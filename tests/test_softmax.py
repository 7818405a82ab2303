"""Softmax and cross-entropy padded for few classes on the CPU: the same
answers and gradients as torch's own, whatever the number of classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from livetrain.training.softmax import CPU_MIN_WIDTH, cross_entropy, softmax


@pytest.mark.parametrize("classes", [1, 2, 7, CPU_MIN_WIDTH - 1, CPU_MIN_WIDTH, CPU_MIN_WIDTH + 3])
def test_the_loss_and_its_gradient_are_torchs(classes):
    g = torch.Generator().manual_seed(classes)
    logits = (torch.randn(300, classes, generator=g) * 20).requires_grad_()  # wide logits: the padding must stay out
    target = torch.randint(classes, (300,), generator=g)

    ours = cross_entropy(logits, target)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = F.cross_entropy(logits, target)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)

    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert grad_ours.shape == logits.shape


@pytest.mark.parametrize("classes", [1, 2, 5, CPU_MIN_WIDTH + 1])
def test_probabilities_are_torchs_over_the_real_classes_only(classes):
    logits = torch.randn(64, classes, generator=torch.Generator().manual_seed(3)) * 30
    probs = softmax(logits)
    assert probs.shape == (64, classes)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64))


def test_a_logit_at_the_dtypes_lowest_value_stays_finite():
    logits = torch.tensor([[torch.finfo(torch.float32).min, 0.0, 3.0]], requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([2]))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(softmax(logits.detach()), torch.softmax(logits.detach(), dim=1))
