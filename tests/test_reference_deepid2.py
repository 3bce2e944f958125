"""Hand-worked checks of the reference DeepID2 joint identification-verification loss."""

import math

import torch

from facekernels.reference import joint_identification_verification_loss

F64 = torch.float64
SQUARE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=F64)


def test_deepid2_hand_value_on_square():
    # W = 0: every logit 0, Ident = log 2.
    # Unordered pairs of labels (0, 0, 1, 1): same (0,1), (2,3) at d = sqrt(2): 1/2 * 2 = 1 each.
    # Different: (0,2), (1,3) at d = 2 > m = 1.5: 0; (0,3), (1,2) at d = sqrt(2): 1/2 (1.5 - sqrt(2))^2.
    # Verif = (2 + (1.5 - sqrt(2))^2) / 6; loss = log 2 + 0.05 Verif = 0.7098751748...
    loss = joint_identification_verification_loss(
        SQUARE, torch.zeros(2, 2, dtype=F64), torch.tensor([0, 0, 1, 1]), margin=1.5, verification_weight=0.05
    )
    torch.testing.assert_close(loss, torch.tensor(0.7098751748339512, dtype=F64))


def test_deepid2_features_are_not_normalized():
    # Twice the square: same pairs d = 2 sqrt(2): 1/2 * 8 = 4 each; different pairs d >= 2 sqrt(2) > 1.5: 0.
    # Verif = 8 / 6, lambda = 1.5: loss = log 2 + 2.
    loss = joint_identification_verification_loss(
        2 * SQUARE, torch.zeros(2, 2, dtype=F64), torch.tensor([0, 0, 1, 1]), margin=1.5, verification_weight=1.5
    )
    torch.testing.assert_close(loss, torch.tensor(math.log(2) + 2.0, dtype=F64))


def test_deepid2_hand_gradient_of_verification():
    # x0 = (0, 0), x1 = (1, 0), same identity; W = 0 so Ident = log 2 with zero gradient.
    # Verif = 1/2 |x0 - x1|^2 = 1/2; dL/dx0 = lambda (x0 - x1) = 0.05 * (-1, 0).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64, requires_grad=True)
    loss = joint_identification_verification_loss(x, torch.zeros(3, 2, dtype=F64), torch.tensor([2, 2]))
    torch.testing.assert_close(loss, torch.tensor(math.log(3) + 0.05 * 0.5, dtype=F64))
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.05, 0.0], [0.05, 0.0]], dtype=F64))


def test_deepid2_identification_part_with_bias():
    # One sample: no pairs, Verif = 0. x = (1, 0), W = I, b = (0, 1): logits (1, 1): log 2.
    loss = joint_identification_verification_loss(
        torch.tensor([[1.0, 0.0]], dtype=F64), torch.eye(2, dtype=F64), torch.tensor([0]),
        bias=torch.tensor([0.0, 1.0], dtype=F64),
    )
    torch.testing.assert_close(loss, torch.tensor(math.log(2), dtype=F64))


def test_deepid2_duplicate_embeddings_finite_gradient():
    # Duplicates of different identities sit at d = 0 < m: the hinge is active at the kink of |.|.
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], dtype=F64, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64, requires_grad=True)
    loss = joint_identification_verification_loss(x, w, torch.tensor([0, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_deepid2_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=F64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=F64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 3, 2, 1])
    fn = lambda x, w, b: joint_identification_verification_loss(  # noqa: E731
        x, w, labels, bias=b, margin=2.5, verification_weight=0.3
    )
    assert torch.autograd.gradcheck(fn, (x, w, b))
