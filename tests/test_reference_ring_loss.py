"""Hand-worked checks of the reference Ring loss."""

import pytest
import torch

from facekernels.reference import ring_loss

F64 = torch.float64


def test_ring_loss_hand_value_and_gradients():
    # f0 = (3, 4): |f0| = 5; f1 = (0, 1): |f1| = 1; R = 2, lambda = 0.01, m = 2.
    # L = 0.01 / 4 * ((5 - 2)^2 + (1 - 2)^2) = 0.0025 * 10 = 0.025
    # dL/dR = 0.0025 * sum -2 (|f| - R) = 0.0025 * -2 * (3 - 1) = -0.01
    # dL/df0 = 0.0025 * 2 * 3 * f0/|f0| = 0.015 * (0.6, 0.8) = (0.009, 0.012)
    # dL/df1 = 0.0025 * 2 * -1 * (0, 1) = (0, -0.005)
    f = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64, requires_grad=True)
    radius = torch.tensor(2.0, dtype=F64, requires_grad=True)
    loss = ring_loss(f, radius, loss_weight=0.01)
    torch.testing.assert_close(loss, torch.tensor(0.025, dtype=F64))
    loss.backward()
    torch.testing.assert_close(radius.grad, torch.tensor(-0.01, dtype=F64))
    torch.testing.assert_close(f.grad, torch.tensor([[0.009, 0.012], [0.0, -0.005]], dtype=F64))


def test_ring_loss_zero_on_the_ring():
    # Every feature already has norm R = 5: the loss is 0.
    f = torch.tensor([[3.0, 4.0], [-5.0, 0.0], [0.0, 5.0]], dtype=F64)
    torch.testing.assert_close(ring_loss(f, 5.0, loss_weight=1.0), torch.tensor(0.0, dtype=F64))


def test_ring_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 3, dtype=F64, generator=g, requires_grad=True)
    radius = torch.tensor(1.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, r: ring_loss(f, r, loss_weight=0.5), (f, radius))


def test_ring_loss_empty_batch_raises():
    with pytest.raises(ValueError, match="at least one row"):
        ring_loss(torch.empty(0, 3), 1.0)
