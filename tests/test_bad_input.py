"""Regression tests for the bad-input cases reported against the losses (issue "Never
silent"): each is a ValueError or TypeError naming the argument as the caller wrote it,
raised before any state changes. The property-based version is test_fuzz.py."""

import pytest
import torch

import facekernels
from facekernels.ops.margin_softmax import margin_softmax_rows

NAN, INF = float("nan"), float("inf")


def embeddings(n=6, d=8, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("make, error, match", [
    (lambda: facekernels.ArcFaceLoss(10, 8, margin=NAN), ValueError, "ArcFaceLoss: margin must be"),
    (lambda: facekernels.CosFaceLoss(10, 8, margin=INF), ValueError, "CosFaceLoss: margin must be"),
    (lambda: facekernels.CombinedMarginLoss(10, 8, m3=NAN), ValueError, "CombinedMarginLoss: m3 must be"),
    (lambda: facekernels.CombinedMarginLoss(10, 8, m1=-1.0), ValueError, "CombinedMarginLoss: m1 must be"),
    (lambda: facekernels.ArcFaceLoss(10, 8, scale=NAN), ValueError, "ArcFaceLoss: scale must be"),
    (lambda: facekernels.L2SoftmaxLoss(10, 8, alpha=NAN), ValueError, "L2SoftmaxLoss: alpha must be"),
    (lambda: facekernels.SphereFaceLoss(10, 8, lambda_base=NAN), ValueError, "SphereFaceLoss: lambda_base must be"),
    (lambda: facekernels.SphereFaceLoss(10, 8, lambda_min=-1.0), ValueError, "SphereFaceLoss: lambda_min must be"),
    (lambda: facekernels.ArcFaceLoss(10, 8, chunk_size=2**63), ValueError, "ArcFaceLoss: chunk_size must be"),
    (lambda: facekernels.RingLoss(loss_weight=NAN), ValueError, "RingLoss: loss_weight must be"),
    (lambda: facekernels.RingLoss(radius=INF), ValueError, "RingLoss: radius must be"),
    (lambda: facekernels.JointIdentificationVerificationLoss(10, 8, margin=NAN), ValueError,
     "JointIdentificationVerificationLoss: margin must be"),
    (lambda: facekernels.JointIdentificationVerificationLoss(10, 8, verification_weight=-1.0), ValueError,
     "verification_weight must be"),
])
def test_constructors_name_their_own_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("call, error, match", [
    (lambda: facekernels.RingLoss()(torch.randn(0, 8)), ValueError, "RingLoss: embeddings must hold at least one row"),
    (lambda: facekernels.RingLoss()(torch.randn(8)), ValueError, "RingLoss: embeddings must be 2-D"),
    (lambda: facekernels.RingLoss()(torch.ones(4, 8, dtype=torch.int64)), TypeError, "RingLoss: embeddings must be a floating-point"),
    (lambda: facekernels.contrastive_loss(torch.randn(0, 4), torch.randn(0, 4), torch.zeros(0)), ValueError, "emb1 must hold at least one row"),
    (lambda: facekernels.contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 2, 1])), ValueError, "y must hold 0"),
    (lambda: facekernels.contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, -1, 1])), ValueError, "y must hold 0"),
    (lambda: facekernels.contrastive_loss([[0.0]], torch.randn(1, 1), torch.zeros(1)), TypeError, "emb1 must be a floating-point"),
    (lambda: facekernels.contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), [0, 1, 0]), ValueError, "y must be a tensor"),
    (lambda: facekernels.ArcFaceLoss(10, 8).get_logits(torch.randn(3, 5)), ValueError, "get_logits: embeddings must have 8 columns"),
    (lambda: facekernels.margin_softmax_loss(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), chunk_size=2**63), ValueError, "chunk_size must be a positive int below 2"),
    (lambda: facekernels.margin_softmax_loss(torch.randn(3, 0), torch.randn(10, 0), torch.zeros(3, dtype=torch.long)), ValueError, "embeddings must have at least one column"),
    (lambda: facekernels.CenterLoss(10, 0), ValueError, "embedding_size must be a positive int"),
    (lambda: facekernels.TripletMarginLoss()(torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), ValueError, "embeddings must have at least one column"),
    (lambda: facekernels.pairwise_distance([[1.0]]), TypeError, "pairwise_distance: x must be a floating-point"),
    (lambda: facekernels.pairwise_distance(torch.randn(3, 4), torch.randn(2, 5)), ValueError, "ref must have x's dtype and width"),
])
def test_forward_rejects_with_the_argument_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_an_expanded_centers_buffer_is_refused_and_left_alone():
    criterion = facekernels.CenterLoss(10, 8)
    criterion.centers = torch.randn(1, 8).expand(10, 8)
    before = criterion.centers.clone()
    with pytest.raises(ValueError, match="centers is expanded"):
        criterion(embeddings(), torch.arange(6))
    assert torch.equal(criterion.centers, before)


def test_sphereface_iteration_is_unchanged_by_a_rejected_call():
    head = facekernels.SphereFaceLoss(10, 8)
    head(embeddings(), torch.arange(6))
    with pytest.raises(ValueError, match="labels must be int64 with values in"):
        head(embeddings(), torch.arange(6) + 5)
    assert head.iteration == 1


def test_non_finite_embeddings_give_nan_rows_only():
    x = embeddings()
    x[1, 3], x[4, 0] = NAN, INF
    head = facekernels.ArcFaceLoss(10, 8, reduction="none")
    loss = head(x, torch.arange(6))
    assert torch.isnan(loss).tolist() == [False, True, False, False, True, False]
    assert torch.isnan(facekernels.ArcFaceLoss(10, 8)(x, torch.arange(6)))


LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("call, error, match", [
    (lambda: facekernels.TripletMarginLoss(embedding_regularizer=5), TypeError,
     "TripletMarginLoss: embedding_regularizer must be None or a callable"),
    (lambda: facekernels.ContrastiveLoss(embedding_regularizer="l2"), TypeError,
     "ContrastiveLoss: embedding_regularizer must be None or a callable"),
    (lambda: facekernels.TripletMarginLoss(mining=["hard"]), ValueError, "TripletMarginLoss: mining must be one of"),
    (lambda: facekernels.TripletMiner(type_of_triplets=["hard"]), ValueError,
     "TripletMiner: type_of_triplets must be one of"),
    (lambda: facekernels.sphereface_loss(embeddings(), torch.randn(3, 8), LABELS % 3, margin=-1), ValueError,
     "sphereface_loss: margin must be"),
    (lambda: facekernels.sphereface_loss(embeddings(), torch.randn(3, 8), LABELS % 3, lambda_=NAN), ValueError,
     "sphereface_loss: lambda_ must be"),
    (lambda: facekernels.ArcFaceLoss(10, 8, reduction="avg"), ValueError, "ArcFaceLoss: reduction must be"),
    (lambda: facekernels.triplet_margin_loss(embeddings(), LABELS.to("meta")), ValueError,
     "labels is on meta"),
    (lambda: facekernels.TripletMiner()(embeddings(), LABELS.to("meta")), ValueError, "TripletMiner: labels is on meta"),
    (lambda: facekernels.ContrastiveLoss()(embeddings(), LABELS.to("meta")), ValueError,
     "ContrastiveLoss: labels is on meta"),
])
def test_round_two_unclear_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("extra, match", [
    (dict(labels_in_range="yes"), "margin_softmax_loss: labels_in_range must be a bool, got 'yes'"),
    (dict(rows=[0, 2, 4]), "margin_softmax_loss: rows must be an int64 tensor or None, got list"),
])
def test_margin_softmax_rows_types(extra, match):
    with pytest.raises(TypeError, match=match):
        margin_softmax_rows(embeddings(), torch.randn(9, 8), LABELS, kind=0, scale=16.0, m1=1.0, m2=0.5,
                            m3=0.0, sphere_lambda=0.0, gradient="exact", normalize_embeddings=True,
                            normalize_weight=True, chunk_size=4, **extra)
