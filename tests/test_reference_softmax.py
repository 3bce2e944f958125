"""Hand-worked checks of the reference softmax cross-entropy and L2-constrained softmax."""

import math

import pytest
import torch

from facekernels.reference import l2_softmax_loss, softmax_cross_entropy

F64 = torch.float64
EYE2 = torch.eye(2, dtype=F64)  # class 0 weight (1, 0), class 1 weight (0, 1)


def test_softmax_cross_entropy_hand_values():
    # x0 = (1, 0) -> logits (1, 0), label 0: -1 + log(e^1 + e^0) = log(1 + e^-1) = 0.3132616875...
    # x1 = (0, 2) -> logits (0, 2), label 0: -0 + log(1 + e^2) = 2.1269280110...
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    labels = torch.tensor([0, 0])
    per_row = softmax_cross_entropy(x, EYE2, labels, reduction="none")
    torch.testing.assert_close(per_row, torch.tensor([0.31326168751822286, 2.1269280110429727], dtype=F64))
    torch.testing.assert_close(softmax_cross_entropy(x, EYE2, labels), torch.tensor(1.2200948492805977, dtype=F64))
    torch.testing.assert_close(
        softmax_cross_entropy(x, EYE2, labels, reduction="sum"), torch.tensor(2.4401896985611455, dtype=F64)
    )


def test_softmax_cross_entropy_bias():
    # x = (1, 0), b = (0, 1) -> logits (1, 1): loss = log 2 whatever the label.
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    bias = torch.tensor([0.0, 1.0], dtype=F64)
    for label in (0, 1):
        loss = softmax_cross_entropy(x, EYE2, torch.tensor([label]), bias=bias)
        torch.testing.assert_close(loss, torch.tensor(math.log(2), dtype=F64))


def test_softmax_cross_entropy_hand_gradient():
    # dL/dlogits = softmax - onehot = (sigma(1) - 1, sigma(-1)) = (-sigma(-1), sigma(-1)) with
    # sigma(-1) = 1 / (1 + e) = 0.2689414213...; W = I so dL/dx equals dL/dlogits.
    x = torch.tensor([[1.0, 0.0]], dtype=F64, requires_grad=True)
    softmax_cross_entropy(x, EYE2, torch.tensor([0]), reduction="sum").backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.2689414213699951, 0.2689414213699951]], dtype=F64))


def test_l2_softmax_rescales_features_to_alpha():
    # (2, 0) with alpha = 1 becomes (1, 0): logits (1, 0), label 0 -> log(1 + e^-1).
    # (0, -3) with alpha = 2 becomes (0, -2): logits (0, -2), label 1 -> 2 + log(1 + e^-2) = 2.1269280110...
    loss = l2_softmax_loss(torch.tensor([[2.0, 0.0]], dtype=F64), EYE2, torch.tensor([0]), alpha=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.31326168751822286, dtype=F64))
    loss = l2_softmax_loss(torch.tensor([[0.0, -3.0]], dtype=F64), EYE2, torch.tensor([1]), alpha=2.0)
    torch.testing.assert_close(loss, torch.tensor(2.1269280110429727, dtype=F64))


def test_l2_softmax_invariant_to_feature_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=F64, generator=g)
    w = torch.randn(3, 4, dtype=F64, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    scales = torch.tensor([[0.1], [3.0], [7.0], [1.0], [0.5]], dtype=F64)
    torch.testing.assert_close(l2_softmax_loss(x, w, labels), l2_softmax_loss(x * scales, w, labels))


@pytest.mark.parametrize("fn", [softmax_cross_entropy, l2_softmax_loss])
def test_gradcheck(fn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, dtype=F64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=F64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, labels, bias=b), (x, w, b))


@pytest.mark.parametrize("fn", [softmax_cross_entropy, l2_softmax_loss])
def test_unknown_reduction_raises(fn):
    with pytest.raises(ValueError, match="reduction"):
        fn(torch.ones(1, 2), torch.eye(2), torch.tensor([0]), reduction="avg")
