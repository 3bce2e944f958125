"""Hand-worked checks of the reference contrastive losses on the 4-point square
(1, 0), (0, 1), (-1, 0), (0, -1): adjacent points are sqrt(2) apart (cosine 0),
opposite points 2 apart (cosine -1)."""

import math

import pytest
import torch

from facekernels.reference import double_margin_contrastive_loss, pairwise_contrastive_loss

F64 = torch.float64
SQRT2 = math.sqrt(2.0)
SQUARE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=F64)


def test_pairwise_contrastive_hand_value():
    # pair 0: similar (y = 0), D = |(3, 4)| = 5: 1/2 * 25 = 12.5
    # pair 1: dissimilar, D = 0.5 < m = 1: 1/2 * (1 - 0.5)^2 = 0.125
    # pair 2: dissimilar, D = 5 > m: 0.   mean = 12.625 / 3 = 4.2083333...
    emb1 = torch.zeros(3, 2, dtype=F64)
    emb2 = torch.tensor([[3.0, 4.0], [0.5, 0.0], [3.0, 4.0]], dtype=F64)
    y = torch.tensor([0, 1, 1])
    torch.testing.assert_close(pairwise_contrastive_loss(emb1, emb2, y), torch.tensor(12.625 / 3, dtype=F64))


def test_pairwise_contrastive_hand_gradient():
    # Dissimilar pair at D = 0.5, m = 2: L = 1/2 (2 - D)^2, dL/demb2 = -(2 - D) * (emb2 - emb1)/D
    # = -1.5 * (1, 0) = (-1.5, 0); emb1 gets the opposite.
    emb1 = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    emb2 = torch.tensor([[0.5, 0.0]], dtype=F64, requires_grad=True)
    loss = pairwise_contrastive_loss(emb1, emb2, torch.tensor([1.0]), margin=2.0)
    torch.testing.assert_close(loss, torch.tensor(1.125, dtype=F64))
    loss.backward()
    torch.testing.assert_close(emb2.grad, torch.tensor([[-1.5, 0.0]], dtype=F64))
    torch.testing.assert_close(emb1.grad, torch.tensor([[1.5, 0.0]], dtype=F64))


@pytest.mark.parametrize("y", [0.0, 1.0])
def test_pairwise_contrastive_identical_points_finite_gradient(y):
    # D = 0: loss 0 (similar) or m^2/2 (dissimilar); the gradient must be finite, not NaN.
    emb = torch.ones(1, 3, dtype=F64, requires_grad=True)
    other = torch.ones(1, 3, dtype=F64, requires_grad=True)
    loss = pairwise_contrastive_loss(emb, other, torch.tensor([y]), margin=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.5 * y, dtype=F64))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(other.grad).all()


def test_pairwise_contrastive_gradcheck():
    g = torch.Generator().manual_seed(0)
    emb1 = torch.randn(6, 3, dtype=F64, generator=g, requires_grad=True)
    emb2 = torch.randn(6, 3, dtype=F64, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda a, b: pairwise_contrastive_loss(a, b, y, margin=3.0), (emb1, emb2))


def test_double_margin_hand_values_euclidean():
    # labels (0, 0, 1, 1). Ordered positive pairs (0,1), (1,0), (2,3), (3,2): all adjacent, d = sqrt(2).
    # Ordered negative pairs: 4 adjacent (0-3, 1-2 both ways) d = sqrt(2), 4 opposite d = 2.
    # pos_margin 0.5: pos part = mean(sqrt(2) - 0.5) = sqrt(2) - 0.5.
    # neg_margin 1.5: opposite relu(1.5 - 2) = 0, adjacent 1.5 - sqrt(2) > 0: neg part = 1.5 - sqrt(2)
    # (mean over the non-zero terms only). Total = 1.0.
    labels = torch.tensor([0, 0, 1, 1])
    loss = double_margin_contrastive_loss(SQUARE, labels, pos_margin=0.5, neg_margin=1.5)
    torch.testing.assert_close(loss, torch.tensor(1.0, dtype=F64))
    # neg_margin 1: every negative term is 0, so the neg part is 0: total sqrt(2) - 0.5.
    loss = double_margin_contrastive_loss(SQUARE, labels, pos_margin=0.5, neg_margin=1.0)
    torch.testing.assert_close(loss, torch.tensor(SQRT2 - 0.5, dtype=F64))
    # Normalization makes the scale irrelevant.
    loss = double_margin_contrastive_loss(3 * SQUARE, labels, pos_margin=0.5, neg_margin=1.5)
    torch.testing.assert_close(loss, torch.tensor(1.0, dtype=F64))


def test_double_margin_squared_euclidean_and_unnormalized():
    labels = torch.tensor([0, 0, 1, 1])
    # squared: positives d = 2 -> relu(2 - 0.5) = 1.5; negatives 2 and 4 vs margin 3: only the
    # adjacent ones (3 - 2 = 1) count: total 1.5 + 1 = 2.5.
    loss = double_margin_contrastive_loss(
        SQUARE, labels, pos_margin=0.5, neg_margin=3.0, distance="squared_euclidean"
    )
    torch.testing.assert_close(loss, torch.tensor(2.5, dtype=F64))
    # Half-size square, not normalized: adjacent d = sqrt(2)/2, opposite 1. pos_margin 0,
    # neg_margin 1: pos part sqrt(2)/2, neg part 1 - sqrt(2)/2 (opposite terms are 0): total 1.
    loss = double_margin_contrastive_loss(
        0.5 * SQUARE, labels, pos_margin=0.0, neg_margin=1.0, normalize_embeddings=False
    )
    torch.testing.assert_close(loss, torch.tensor(1.0, dtype=F64))


def test_double_margin_hand_value_cosine():
    # Similarities: positives 0 -> relu(0.9 - 0) = 0.9. Negatives: adjacent s = 0 ->
    # relu(0 - (-0.5)) = 0.5, opposite s = -1 -> 0: neg part 0.5. Total 1.4.
    labels = torch.tensor([0, 0, 1, 1])
    loss = double_margin_contrastive_loss(SQUARE, labels, pos_margin=0.9, neg_margin=-0.5, distance="cosine")
    torch.testing.assert_close(loss, torch.tensor(1.4, dtype=F64))


def test_double_margin_indices_tuple():
    # Only pairs (0, 1) positive (d = sqrt(2)) and (0, 2) negative (d = 2 > 1.5, so 0): sqrt(2).
    idx = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    loss = double_margin_contrastive_loss(SQUARE, None, pos_margin=0.0, neg_margin=1.5, indices_tuple=idx)
    torch.testing.assert_close(loss, torch.tensor(SQRT2, dtype=F64))


def test_double_margin_single_identity():
    # No negatives: neg part 0. 12 ordered positive pairs: 8 adjacent (sqrt(2)), 4 opposite (2):
    # pos part = (8 sqrt(2) + 8) / 12 = (2 sqrt(2) + 2) / 3.
    x = SQUARE.clone().requires_grad_(True)
    loss = double_margin_contrastive_loss(x, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(loss, torch.tensor((2 * SQRT2 + 2) / 3, dtype=F64))
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_double_margin_no_violations_is_zero_with_zero_gradient():
    # One identity with pos_margin above every distance: all terms 0, loss 0, gradient 0.
    x = SQUARE.clone().requires_grad_(True)
    loss = double_margin_contrastive_loss(x, torch.zeros(4, dtype=torch.long), pos_margin=3.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_double_margin_duplicate_embeddings_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-1.0, 0.5], [-1.0, 0.5]], dtype=F64, requires_grad=True)
    loss = double_margin_contrastive_loss(x, torch.tensor([0, 0, 1, 0]), neg_margin=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_double_margin_gradcheck(distance):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, dtype=F64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0])
    margins = (0.2, 0.1) if distance == "cosine" else (0.3, 1.2)
    fn = lambda x: double_margin_contrastive_loss(  # noqa: E731
        x, labels, pos_margin=margins[0], neg_margin=margins[1], distance=distance
    )
    assert torch.autograd.gradcheck(fn, (x,))


def test_double_margin_bad_arguments():
    with pytest.raises(ValueError, match="distance"):
        double_margin_contrastive_loss(SQUARE, torch.tensor([0, 0, 1, 1]), distance="manhattan")
    with pytest.raises(ValueError, match="indices_tuple"):
        double_margin_contrastive_loss(SQUARE, None, indices_tuple=(torch.tensor([0]),) * 2)
