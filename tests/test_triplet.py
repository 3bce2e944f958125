import itertools

import pytest
import torch

import facekernels
from facekernels import reference
from conftest import assert_close, assert_no_worse_than_reference

TYPES = ["all", "hard", "semihard", "easy", "batch_hard", "facenet"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]


def make_batch(n, dim, identities, device, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, identities, (n,), generator=g)
    return x.to(device, dtype), labels.to(device)


def assert_same_triplets(got, expected):
    assert all(t.dtype == torch.int64 for t in got)
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e.cpu())


@pytest.mark.parametrize("type_of_triplets, distance", list(itertools.product(TYPES, DISTANCES)))
def test_miner_matches_reference(device, type_of_triplets, distance):
    x, labels = make_batch(48, 8, 6, device)
    miner = facekernels.TripletMiner(0.1, type_of_triplets, distance)
    got = miner(x, labels)
    assert all(t.device == x.device for t in got)
    expected = reference.mine_triplets(
        x, labels, margin=0.1, type_of_triplets=type_of_triplets, distance=distance
    )
    assert_same_triplets(got, expected)


@pytest.mark.parametrize("type_of_triplets", TYPES)
def test_miner_with_a_reference_set(device, type_of_triplets):
    x, labels = make_batch(20, 6, 4, device)
    ref, ref_labels = make_batch(30, 6, 5, device, seed=1)
    got = facekernels.mine_triplets(x, labels, margin=0.3, type_of_triplets=type_of_triplets,
                                    ref_emb=ref, ref_labels=ref_labels)
    expected = reference.mine_triplets(x, labels, margin=0.3, type_of_triplets=type_of_triplets,
                                       ref_emb=ref, ref_labels=ref_labels)
    assert_same_triplets(got, expected)


def test_hand_made_layout():
    # Points on a line (no normalization): A0=0, A1=1 (identity A), B0=1.5, B1=4 (B).
    # Anchor A0: positive A1 (d=1); negatives B0 (1.5, t=0.5) and B1 (4, t=3).
    # Anchor A1: positive A0 (d=1); B0 (0.5, t=-0.5), B1 (3, t=2).
    # Anchor B0: positive B1 (2.5); A0 (1.5, t=-1), A1 (0.5, t=-2).
    # Anchor B1: positive B0 (2.5); A0 (4, t=1.5), A1 (3, t=0.5).
    x = torch.tensor([[0.0], [1.0], [1.5], [4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    mine = lambda kind: [t.tolist() for t in facekernels.mine_triplets(
        x, labels, margin=1.0, type_of_triplets=kind, normalize_embeddings=False)]
    assert mine("all") == [[0, 1, 2, 2, 3], [1, 0, 3, 3, 2], [2, 2, 0, 1, 1]]
    assert mine("hard") == [[1, 2, 2], [0, 3, 3], [2, 0, 1]]
    assert mine("semihard") == [[0, 3], [1, 2], [2, 1]]
    assert mine("easy") == [[0, 1, 3], [1, 0, 2], [3, 3, 0]]
    # batch_hard: each anchor's only positive; the nearest negative.
    assert mine("batch_hard") == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 2, 1, 1]]
    # facenet: nearest negative farther than the positive, else the farthest.
    assert mine("facenet") == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1]]
    # The loss over "all" with margin 1: relu(1 - t) for t = .5, -.5, -1, -2, .5: mean of
    # the non-zero terms (0.5, 1.5, 2, 3, 0.5) = 7.5 / 5.
    loss = facekernels.triplet_margin_loss(x, labels, margin=1.0, normalize_embeddings=False)
    assert loss.item() == pytest.approx(1.5)


REDUCTIONS = ["mean_nonzero", "mean", "sum", "none"]


def losses_and_grads(fn, x, labels, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, labels, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x) if loss.requires_grad else (torch.zeros_like(x),)
    return loss, grad


def assert_loss_matches_reference(x, labels, **kw):
    """The fused loss and its gradient against the reference formula's."""
    got = losses_and_grads(facekernels.triplet_margin_loss, x, labels, **kw)
    expected = losses_and_grads(reference.triplet_margin_loss, x, labels, **kw)
    for a, b in zip(got, expected):
        assert_close(a, b)


@pytest.mark.parametrize("mining", TYPES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_matches_reference(device, mining, distance, reduction):
    x, labels = make_batch(40, 8, 5, device)
    kw = dict(margin=0.2, mining=mining, distance=distance, reduction=reduction)
    assert_loss_matches_reference(x, labels, **kw)


@pytest.mark.parametrize("swap, smooth", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("mining", ["all", "semihard", "batch_hard"])
def test_swap_and_smooth_match_reference(device, swap, smooth, mining):
    x, labels = make_batch(30, 6, 4, device)
    kw = dict(margin=0.3, mining=mining, swap=swap, smooth_loss=smooth)
    assert_loss_matches_reference(x, labels, **kw)


def test_indices_from_any_miner(device):
    x, labels = make_batch(32, 8, 4, device)
    triplets = facekernels.TripletMiner(0.2, "semihard")(x, labels)
    criterion = facekernels.TripletMarginLoss(0.2)
    got = losses_and_grads(criterion, x, labels, indices_tuple=triplets)
    fused = losses_and_grads(facekernels.TripletMarginLoss(0.2, mining="semihard"), x, labels)
    for a, b in zip(got, fused):
        assert_close(a, b)


def test_reference_set_loss(device):
    x, labels = make_batch(16, 5, 3, device)
    ref, ref_labels = make_batch(25, 5, 4, device, seed=2)
    for mining in TYPES:
        kw = dict(mining=mining, ref_emb=ref, ref_labels=ref_labels)
        assert_loss_matches_reference(x, labels, **kw)


def test_fp32_is_no_worse_than_reference(device):
    x, labels = make_batch(64, 16, 8, device)
    truth = losses_and_grads(reference.triplet_margin_loss, x, labels)
    got = losses_and_grads(facekernels.triplet_margin_loss, x.float(), labels)
    ref = losses_and_grads(reference.triplet_margin_loss, x.float(), labels)
    for a, r, t in zip(got, ref, truth):
        assert_no_worse_than_reference(a, r, t)


def test_one_identity_gives_zero_loss_and_gradient(device):
    x, _ = make_batch(6, 4, 1, device)
    labels = torch.zeros(6, dtype=torch.int64, device=device)
    for mining in TYPES:
        assert all(t.numel() == 0 for t in facekernels.mine_triplets(x, labels, type_of_triplets=mining))
        loss, grad = losses_and_grads(facekernels.triplet_margin_loss, x, labels, mining=mining)
        assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_anchor_without_positive_is_skipped(device):
    x, labels = make_batch(10, 4, 3, device)
    labels[0] = 7  # a lonely identity: never an anchor, only a negative
    a, p, n = facekernels.mine_triplets(x, labels)
    assert 0 not in a.tolist() and 0 not in p.tolist() and 0 in n.tolist()
    assert_loss_matches_reference(x, labels)


@pytest.mark.parametrize("distance", DISTANCES)
def test_distances_round_like_the_reference(device, distance):
    """Bit for bit in fp32: a mean over the terms > 0 jumps by 1/T of itself when a term
    crosses 0, so the trainer's 1e-5 loss parity needs both sides to see the same distances."""
    x, labels = make_batch(96, 32, 8, device, torch.float32)
    ref, _ = make_batch(40, 32, 8, device, torch.float32, seed=1)
    for other in (None, ref):
        assert torch.equal(facekernels.pairwise_distance(x, other, distance),
                           reference.pairwise_distance(x, other, distance))
    # A margin at the median of d_an - d_ap puts half of the triplets at the hinge.
    d = reference.pairwise_distance(x, distance=distance)
    d = -d if distance == "cosine" else d  # larger = farther
    same = labels[:, None] == labels[None, :]
    t = (d[:, None, :] - d[:, :, None])[same[:, :, None] & ~same[:, None, :]]
    margin = float(t.median())
    got = facekernels.triplet_margin_loss(x, labels, margin=margin, distance=distance)
    expected = reference.triplet_margin_loss(x, labels, margin=margin, distance=distance)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_duplicate_embeddings_have_finite_gradients(device):
    x, labels = make_batch(8, 4, 2, device)
    x[1] = x[0]  # same point, same identity: distance exactly 0 through the GEMM
    x[5] = x[0]
    labels[5] = 1 - labels[0]  # and a negative at distance 0
    for distance in DISTANCES:
        loss, grad = losses_and_grads(facekernels.triplet_margin_loss, x, labels, distance=distance)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    dist = facekernels.pairwise_distance(x)
    assert dist[0, 1] == 0 and torch.equal(dist.diagonal(), torch.zeros(8, dtype=dist.dtype, device=device))


def test_gradcheck_fp64():
    x, labels = make_batch(12, 3, 3, "cpu")
    x.requires_grad_()
    for mining in ("all", "batch_hard", "facenet"):
        assert torch.autograd.gradcheck(
            lambda x: facekernels.triplet_margin_loss(x, labels, mining=mining, margin=0.5), (x,)
        )


def test_deterministic(device):
    x, labels = make_batch(200, 16, 20, device, torch.float32)
    first_mined = facekernels.mine_triplets(x, labels, type_of_triplets="all")
    first = losses_and_grads(facekernels.triplet_margin_loss, x, labels)
    for _ in range(2):
        assert_same_triplets(facekernels.mine_triplets(x, labels, type_of_triplets="all"), first_mined)
        for a, b in zip(losses_and_grads(facekernels.triplet_margin_loss, x, labels), first):
            assert torch.equal(a, b)


def test_opcheck(device):
    x, labels = make_batch(12, 4, 3, device, torch.float32)
    dist = facekernels.pairwise_distance(x)
    dist = (dist + torch.rand_like(dist)).t().requires_grad_()  # not symmetric, not contiguous
    for mining in range(6):
        torch.library.opcheck(
            torch.ops.facekernels.triplet_margin_forward.default,
            (dist, labels, labels, 0.2, mining, True, False),
        )
        torch.library.opcheck(
            torch.ops.facekernels.triplet_mine.default,
            (dist.detach(), labels, labels, 0.2, mining, True),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@pytest.mark.parametrize("mining", [None, "semihard"])
def test_torch_compile_fullgraph(device, mining):
    torch._dynamo.reset()
    criterion = facekernels.TripletMarginLoss(0.2, mining=mining)
    compiled = torch.compile(criterion, fullgraph=True)
    x, labels = make_batch(24, 8, 4, device, torch.float32)
    got = losses_and_grads(compiled, x, labels)
    expected = losses_and_grads(criterion, x, labels)
    for a, b in zip(got, expected):
        assert_close(a, b)


def test_contrastive_losses_match_reference(device):
    x, labels = make_batch(20, 6, 4, device)
    for distance, margins in (("euclidean", (0.1, 0.9)), ("cosine", (0.8, 0.2))):
        kw = dict(pos_margin=margins[0], neg_margin=margins[1], distance=distance)
        got = losses_and_grads(facekernels.ContrastiveLoss(**kw), x, labels)
        expected = losses_and_grads(reference.double_margin_contrastive_loss, x, labels, **kw)
        for a, b in zip(got, expected):
            assert_close(a, b)
    e1, e2 = x[:10].clone().requires_grad_(), x[10:].clone().requires_grad_()
    y = (labels[:10] != labels[10:]).long()
    got = facekernels.contrastive_loss(e1, e2, y, margin=2.0)
    expected = reference.pairwise_contrastive_loss(e1, e2, y, margin=2.0)
    assert_close(got, expected)
    assert_close(torch.autograd.grad(got, e1)[0], torch.autograd.grad(expected, e1)[0])


def test_deepid2_matches_reference(device):
    x, labels = make_batch(16, 8, 5, device)
    head = facekernels.JointIdentificationVerificationLoss(5, 8, margin=1.5, verification_weight=0.1)
    head = head.to(device, torch.float64)
    got = losses_and_grads(head, x, labels)
    expected = losses_and_grads(
        lambda x, y: reference.joint_identification_verification_loss(
            x, head.weight, y, margin=1.5, verification_weight=0.1), x, labels)
    for a, b in zip(got, expected):
        assert_close(a, b)


def test_same_as_pytorch_metric_learning(device):
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    x, labels = make_batch(40, 8, 5, device)
    for kind in ("all", "hard", "semihard", "easy"):
        expected = miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind)(x, labels)
        assert_same_triplets(facekernels.TripletMiner(0.2, kind)(x, labels), expected)
        pml_loss = losses.TripletMarginLoss(margin=0.2)
        got = losses_and_grads(facekernels.TripletMarginLoss(0.2, mining=kind), x, labels)
        want = losses_and_grads(lambda x, y: pml_loss(x, y, miners.TripletMarginMiner(0.2, kind)(x, y)), x, labels)
        for a, b in zip(got, want):
            assert_close(a, b)
    batch_hard = miners.BatchHardMiner()(x, labels)
    assert_same_triplets(facekernels.TripletMiner(type_of_triplets="batch_hard")(x, labels), batch_hard)
    got = losses_and_grads(facekernels.ContrastiveLoss(0.1, 0.8), x, labels)
    want = losses_and_grads(losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8), x, labels)
    for a, b in zip(got, want):
        assert_close(a, b)
    assert pml.__version__


@pytest.mark.parametrize("call, error, message", [
    (lambda x, y: facekernels.TripletMiner(type_of_triplets="hardest"), ValueError, "type_of_triplets must be one of"),
    (lambda x, y: facekernels.TripletMarginLoss(distance="manhattan"), ValueError, "distance must be one of"),
    (lambda x, y: facekernels.triplet_margin_loss(x, y, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda x, y: facekernels.triplet_margin_loss(x, y[:-1]), ValueError, r"labels must have shape \[10\]"),
    (lambda x, y: facekernels.mine_triplets(x, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda x, y: facekernels.mine_triplets(x[0], y), ValueError, "embeddings must be 2-D"),
    (lambda x, y: facekernels.mine_triplets(x, y, ref_emb=x), ValueError, "ref_labels is required"),
])
def test_bad_input_is_a_clear_error(call, error, message):
    x, labels = make_batch(10, 4, 3, "cpu")
    with pytest.raises(error, match=message):
        call(x, labels)


def near_duplicates(gap, device, dtype=torch.float32):
    """64 unit vectors and a copy of each moved about `gap` along the sphere, D=128."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 128, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + gap * torch.randn(64, 128, generator=g, dtype=torch.float64) / 128**0.5, dim=1)
    return torch.cat([x, y]).to(device, dtype)


@pytest.mark.parametrize("gap", [1e-2, 1e-4, 1e-5])
def test_distances_of_near_duplicates_are_accurate(device, gap):
    # The Gram form alone is off by 670% at gap 1e-4 (its absolute error is ~eps, not
    # eps * d); refined, every distance is within a few fp32 ulps of the fp64 truth.
    z = near_duplicates(gap, device)
    truth = torch.cdist(z.double(), z.double(), compute_mode="donot_use_mm_for_euclid_dist")
    off = ~torch.eye(len(z), dtype=torch.bool, device=device)
    for got, want in ((facekernels.pairwise_distance(z, normalize_embeddings=False), truth),
                      (facekernels.pairwise_distance(z, distance="squared_euclidean",
                                                     normalize_embeddings=False), truth.square()),
                      (facekernels.pairwise_distance(z[:64], z[64:], normalize_embeddings=False), truth[:64, 64:])):
        mask = off if got.shape == off.shape else torch.ones_like(got, dtype=torch.bool)
        ulps = ((got.double() - want).abs() / want)[mask].max() / torch.finfo(torch.float32).eps
        assert ulps <= 4, f"{ulps:.1f} ulps"
    # The reference applies the same rule and rounds alike.
    assert torch.equal(facekernels.pairwise_distance(z), reference.pairwise_distance(z))


def test_near_duplicate_triplets_are_classified_as_with_exact_distances():
    # An anchor, its positive 1e-4 away, and two negatives 5e-7 nearer and farther than the
    # positive: one hard and one semi-hard triplet, which the Gram form's rounding confused.
    z = near_duplicates(1e-4, "cpu", torch.float64)
    anchor, positive = z[0], z[64]
    direction = torch.nn.functional.normalize(positive - anchor, dim=0)
    d_ap = (positive - anchor).norm()
    negatives = [torch.nn.functional.normalize(anchor + (d_ap + step) * direction, dim=0)
                 for step in (-5e-7, 5e-7)]
    x = torch.stack([anchor, positive, *negatives]).float()
    labels = torch.tensor([0, 0, 1, 1])
    exact = torch.cdist(x.double(), x.double())
    assert exact[0, 2] < exact[0, 1] < exact[0, 3]
    for kind, want in (("hard", {(0, 1, 2)}), ("semihard", {(0, 1, 3)})):
        a, p, n = facekernels.mine_triplets(x, labels, margin=1e-5, type_of_triplets=kind,
                                            normalize_embeddings=False)
        assert {tr for tr in zip(a.tolist(), p.tolist(), n.tolist()) if tr[0] == 0} == want


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
@pytest.mark.parametrize("smooth", [False, True])
def test_every_triplet_matches_reference(device, distance, reduction, smooth):
    # mining=None (the default): no mining, PML's loss without a miner; fused pass.
    x, labels = make_batch(30, 6, 5, device)
    kw = dict(margin=0.1, distance=distance, reduction=reduction, smooth_loss=smooth)
    got = losses_and_grads(facekernels.triplet_margin_loss, x, labels, **kw)
    expected = losses_and_grads(reference.triplet_margin_loss, x, labels, mining=None, **kw)
    for a, b in zip(got, expected):
        assert_close(a, b)
    terms = facekernels.triplet_margin_loss(x, labels, reduction="none", **{k: v for k, v in kw.items() if k != "reduction"})
    same = labels[:, None] == labels[None, :]
    per_anchor = (same.sum(1) - 1) * (~same).sum(1)
    assert terms.numel() == per_anchor.sum()


@pytest.mark.parametrize("mining", [None, "all", "semihard", "batch_hard", "facenet"])
def test_a_nan_embedding_gives_a_nan_loss(device, mining):
    x, labels = make_batch(20, 6, 4, device)
    x[3, 2] = float("nan")
    for kw in ({}, {"swap": True}, {"reduction": "mean"}):
        assert torch.isnan(facekernels.triplet_margin_loss(x, labels, mining=mining, **kw))
    assert torch.isnan(facekernels.ContrastiveLoss()(x, labels))
    # Other rows' mining is untouched: the NaN row's triplets alone are dropped.
    if mining not in (None, "batch_hard", "facenet"):
        clean = x.clone()
        clean[3] = 1e3  # far from everything
        keep = lambda t: {tr for tr in zip(*(i.tolist() for i in t)) if 3 not in tr}  # noqa: E731
        with_nan = facekernels.mine_triplets(x, labels, type_of_triplets=mining)
        assert keep(with_nan) == set(zip(*(i.tolist() for i in with_nan)))
        assert keep(with_nan) == keep(facekernels.mine_triplets(clean, labels, type_of_triplets=mining))


@pytest.mark.parametrize("self_ref, squared", [(True, False), (False, False), (False, True)])
def test_distance_opcheck(device, self_ref, squared):
    z = near_duplicates(1e-3, device)[:20].requires_grad_()
    ref = z if self_ref else near_duplicates(1e-2, device)[5:17].requires_grad_()
    torch.library.opcheck(torch.ops.facekernels.pairwise_distance.default, (z, ref, self_ref, squared))
    dist = torch.ops.facekernels.pairwise_distance(z, ref, self_ref, squared)
    torch.library.opcheck(torch.ops.facekernels.pairwise_distance_backward.default,
                          (torch.randn_like(dist), dist.detach(), z.detach(), ref.detach(), squared))


def test_huge_fp32_norms_are_normalized_not_zeroed(device):
    x, labels = make_batch(12, 8, 3, device, torch.float32)
    for distance in DISTANCES:
        want = facekernels.pairwise_distance(x, distance=distance)
        got = facekernels.pairwise_distance(x * 1e20, distance=distance)
        assert_close(got, want)
        assert torch.equal(got, reference.pairwise_distance(x * 1e20, distance=distance))
