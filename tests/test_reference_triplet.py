"""Hand-worked checks of the reference triplet mining and triplet margin loss, plus a
brute-force comparison of every mining type.

Hand examples use the 4-point square (1, 0), (0, 1), (-1, 0), (0, -1): adjacent points are
sqrt(2) apart (cosine 0), opposite points 2 apart (cosine -1)."""

import itertools
import math

import pytest
import torch

from facekernels.reference import mine_triplets, pairwise_distance, triplet_margin_loss

F64 = torch.float64
SQRT2 = math.sqrt(2.0)
SQUARE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=F64)
LABELS = torch.tensor([0, 0, 1, 1])
TYPES = ["all", "hard", "semihard", "easy", "batch_hard", "facenet"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]


def triplets(idx):
    return list(zip(*(t.tolist() for t in idx)))


# With labels (0, 0, 1, 1) the 8 triplets all have d_ap = sqrt(2) (adjacent positives);
# t = d_an - d_ap is 0 for an adjacent negative and 2 - sqrt(2) = 0.586 for an opposite one.
T_ZERO = [(0, 1, 3), (1, 0, 2), (2, 3, 1), (3, 2, 0)]  # adjacent negative
T_POS = [(0, 1, 2), (1, 0, 3), (2, 3, 0), (3, 2, 1)]  # opposite negative
ALL8 = sorted(T_ZERO + T_POS)


def test_pairwise_distance_hand_values():
    r2 = SQRT2
    torch.testing.assert_close(
        pairwise_distance(SQUARE),
        torch.tensor([[0, r2, 2, r2], [r2, 0, r2, 2], [2, r2, 0, r2], [r2, 2, r2, 0]], dtype=F64),
    )
    torch.testing.assert_close(
        pairwise_distance(SQUARE, distance="squared_euclidean"),
        torch.tensor([[0, 2, 4, 2], [2, 0, 2, 4], [4, 2, 0, 2], [2, 4, 2, 0]], dtype=F64),
    )
    torch.testing.assert_close(
        pairwise_distance(SQUARE, distance="cosine"),
        torch.tensor([[1, 0, -1, 0], [0, 1, 0, -1], [-1, 0, 1, 0], [0, -1, 0, 1]], dtype=F64),
    )
    # Not normalized: (3, 4) vs (0, 0) and (3, 0): 5 and 4; cosine is the raw dot product.
    x = torch.tensor([[3.0, 4.0]], dtype=F64)
    y = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=F64)
    torch.testing.assert_close(
        pairwise_distance(x, y, normalize_embeddings=False), torch.tensor([[5.0, 4.0]], dtype=F64)
    )
    torch.testing.assert_close(
        pairwise_distance(x, y, distance="cosine", normalize_embeddings=False), torch.tensor([[0.0, 9.0]], dtype=F64)
    )
    # Normalized: (3, 4) -> (0.6, 0.8), (3, 0) -> (1, 0): |(-0.4, 0.8)|^2 = 0.8, cosine 0.6.
    torch.testing.assert_close(
        pairwise_distance(x, y[1:], distance="squared_euclidean"), torch.tensor([[0.8]], dtype=F64)
    )
    torch.testing.assert_close(pairwise_distance(x, y[1:], distance="cosine"), torch.tensor([[0.6]], dtype=F64))


@pytest.mark.parametrize("normalize_embeddings", [True, False])
def test_pairwise_distance_matches_differences(normalize_embeddings):
    """The Gram form against |a - b| computed from the differences, value and gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    for other in (None, y):
        got = pairwise_distance(x, other, normalize_embeddings=normalize_embeddings)
        a, b = (torch.nn.functional.normalize(t, dim=1) if normalize_embeddings else t
                for t in (x, x if other is None else other))
        want = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
        torch.testing.assert_close(got, want)
        weights = torch.rand(got.shape, generator=g, dtype=F64)
        inputs = (x,) if other is None else (x, y)
        for got_grad, want_grad in zip(torch.autograd.grad((got * weights).sum(), inputs),
                                       torch.autograd.grad((want * weights).sum(), inputs)):
            torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize_embeddings", [True, False])
def test_pairwise_distance_gradient_finite_at_identical_points(distance, normalize_embeddings):
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], dtype=F64, requires_grad=True)
    pairwise_distance(x, distance=distance, normalize_embeddings=normalize_embeddings).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pairwise_distance_bad_distance():
    with pytest.raises(ValueError, match="distance"):
        pairwise_distance(SQUARE, distance="l1")


@pytest.mark.parametrize(
    "margin, type_of_triplets, expected",
    [
        (0.2, "all", T_ZERO),  # t <= 0.2: only t = 0
        (0.2, "hard", T_ZERO),  # t <= 0
        (0.2, "semihard", []),  # 0 < t <= 0.2: none
        (0.2, "easy", T_POS),  # t > 0.2
        (1.0, "all", ALL8),
        (1.0, "hard", T_ZERO),
        (1.0, "semihard", T_POS),  # 0 < 0.586 <= 1
        (1.0, "easy", []),
    ],
)
def test_mine_threshold_types_on_square(margin, type_of_triplets, expected):
    got = mine_triplets(SQUARE, LABELS, margin=margin, type_of_triplets=type_of_triplets)
    assert triplets(got) == sorted(expected)
    assert all(t.dtype == torch.int64 for t in got)


@pytest.mark.parametrize(
    "margin, type_of_triplets, expected",
    # Cosine: s_ap = 0; t = s_ap - s_an is 0 (adjacent negative, s = 0) or 1 (opposite, s = -1).
    [(0.2, "all", T_ZERO), (0.2, "hard", T_ZERO), (0.2, "easy", T_POS), (1.0, "semihard", T_POS), (1.0, "all", ALL8)],
)
def test_mine_threshold_types_cosine(margin, type_of_triplets, expected):
    got = mine_triplets(SQUARE, LABELS, margin=margin, type_of_triplets=type_of_triplets, distance="cosine")
    assert triplets(got) == sorted(expected)


@pytest.mark.parametrize("distance", DISTANCES)
def test_mine_batch_hard_and_facenet_on_square(distance):
    # batch_hard, labels (0, 0, 1, 1): one positive each; nearest negative is the adjacent one.
    assert triplets(mine_triplets(SQUARE, LABELS, type_of_triplets="batch_hard", distance=distance)) == T_ZERO
    # facenet: the negative farther than the positive (sqrt(2)) is the opposite one.
    assert triplets(mine_triplets(SQUARE, LABELS, type_of_triplets="facenet", distance=distance)) == T_POS


@pytest.mark.parametrize("distance", DISTANCES)
def test_mine_batch_hard_ties_and_anchor_without_positive(distance):
    # labels (0, 1, 1, 1): anchor 0 has no positive and is dropped.
    # anchor 1 (0,1): positives 2 (sqrt 2), 3 (2) -> farthest 3; negative 0 -> (1, 3, 0)
    # anchor 2 (-1,0): positives 1, 3 both at sqrt(2): tie -> smallest index 1 -> (2, 1, 0)
    # anchor 3 (0,-1): positives 1 (2), 2 (sqrt 2) -> 1 -> (3, 1, 0)
    labels = torch.tensor([0, 1, 1, 1])
    got = mine_triplets(SQUARE, labels, type_of_triplets="batch_hard", distance=distance)
    assert triplets(got) == [(1, 3, 0), (2, 1, 0), (3, 1, 0)]
    # The threshold types never use anchor 0 either.
    assert 0 not in mine_triplets(SQUARE, labels, margin=5.0, distance=distance)[0].tolist()


@pytest.mark.parametrize("distance", DISTANCES)
def test_mine_facenet_fallback_and_ties(distance):
    # labels (0, 1, 0, 1): positives are opposite (d = 2), every negative adjacent (sqrt 2):
    # no negative is farther, so each pair falls back to the farthest negative, a tie of two
    # broken towards the smaller index.
    labels = torch.tensor([0, 1, 0, 1])
    got = mine_triplets(SQUARE, labels, type_of_triplets="facenet", distance=distance)
    assert triplets(got) == [(0, 2, 1), (1, 3, 0), (2, 0, 1), (3, 1, 0)]


@pytest.mark.parametrize("type_of_triplets", TYPES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_single_identity_gives_no_triplets_and_zero_loss(type_of_triplets, distance):
    x = SQUARE.clone().requires_grad_(True)
    labels = torch.zeros(4, dtype=torch.long)
    a, p, n = mine_triplets(x, labels, type_of_triplets=type_of_triplets, distance=distance)
    assert a.numel() == p.numel() == n.numel() == 0 and a.dtype == torch.int64
    for reduction in ("mean_nonzero", "mean", "sum"):
        x.grad = None
        loss = triplet_margin_loss(x, labels, mining=type_of_triplets, distance=distance, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
    none = triplet_margin_loss(x, labels, mining=type_of_triplets, distance=distance, reduction="none")
    assert none.shape == (0,)


def test_loss_hand_values_all_triplets():
    # margin 1, all 8 triplets mined: violation d_ap - d_an + 1 = 1 (t = 0) or sqrt(2) - 1 (t = 0.586).
    # mean_nonzero = (4 + 4 (sqrt(2) - 1)) / 8 = sqrt(2)/2.
    loss = triplet_margin_loss(SQUARE, LABELS, margin=1.0)
    torch.testing.assert_close(loss, torch.tensor(SQRT2 / 2, dtype=F64))
    per_triplet = triplet_margin_loss(SQUARE, LABELS, margin=1.0, reduction="none")
    expected = [1.0 if t in T_ZERO else SQRT2 - 1 for t in ALL8]
    torch.testing.assert_close(per_triplet, torch.tensor(expected, dtype=F64))


def test_loss_reductions_hand_values():
    # All 8 triplets given, margin 0.3: t = 0 -> 0.3, t = 0.586 -> relu(0.3 - 0.586) = 0.
    # mean_nonzero 0.3, mean 1.2 / 8 = 0.15, sum 1.2.
    idx = tuple(torch.tensor(c) for c in zip(*ALL8))
    kw = dict(margin=0.3, indices_tuple=idx)
    torch.testing.assert_close(triplet_margin_loss(SQUARE, LABELS, **kw), torch.tensor(0.3, dtype=F64))
    mean = triplet_margin_loss(SQUARE, LABELS, reduction="mean", **kw)
    torch.testing.assert_close(mean, torch.tensor(0.15, dtype=F64))
    total = triplet_margin_loss(SQUARE, LABELS, reduction="sum", **kw)
    torch.testing.assert_close(total, torch.tensor(1.2, dtype=F64))


def test_loss_cosine_hand_value():
    # margin 0.2, mined "all": the 4 t = 0 triplets, violation s_an - s_ap + 0.2 = 0 - 0 + 0.2.
    loss = triplet_margin_loss(SQUARE, LABELS, margin=0.2, distance="cosine")
    torch.testing.assert_close(loss, torch.tensor(0.2, dtype=F64))


def test_loss_squared_euclidean_hand_value():
    # margin 3: d_ap = 2, d_an = 2 or 4: violations 3 and 1; mean_nonzero = (4*3 + 4*1)/8 = 2.
    loss = triplet_margin_loss(SQUARE, LABELS, margin=3.0, distance="squared_euclidean")
    torch.testing.assert_close(loss, torch.tensor(2.0, dtype=F64))


def test_loss_swap_hand_values():
    idx = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    # Euclidean (0, 1, 2), margin 1: d_ap = sqrt(2), d_an = 2, d_pn = d(1, 2) = sqrt(2).
    # no swap: sqrt(2) - 2 + 1; swap: min(2, sqrt(2)) -> sqrt(2) - sqrt(2) + 1 = 1.
    no_swap = triplet_margin_loss(SQUARE, LABELS, margin=1.0, indices_tuple=idx)
    swap = triplet_margin_loss(SQUARE, LABELS, margin=1.0, indices_tuple=idx, swap=True)
    torch.testing.assert_close(no_swap, torch.tensor(SQRT2 - 1, dtype=F64))
    torch.testing.assert_close(swap, torch.tensor(1.0, dtype=F64))
    # Cosine, margin 1.5: s_ap = 0, s_an = -1, s_pn = 0. no swap: -1 - 0 + 1.5 = 0.5;
    # swap: max(-1, 0) - 0 + 1.5 = 1.5.
    kw = dict(margin=1.5, indices_tuple=idx, distance="cosine")
    torch.testing.assert_close(triplet_margin_loss(SQUARE, LABELS, **kw), torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(triplet_margin_loss(SQUARE, LABELS, swap=True, **kw), torch.tensor(1.5, dtype=F64))


def test_loss_smooth_hand_values():
    # margin 0: (0, 1, 3) violation 0 -> softplus(0) = log 2; (0, 1, 2): softplus(sqrt(2) - 2).
    idx = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([3, 2]))
    got = triplet_margin_loss(SQUARE, LABELS, margin=0.0, smooth_loss=True, indices_tuple=idx, reduction="none")
    torch.testing.assert_close(got, torch.tensor([math.log(2), math.log1p(math.exp(SQRT2 - 2))], dtype=F64))


def test_ref_emb_path_hand_values():
    # Query (1, 0) label 0 against the square with labels (0, 1, 1, 0): a = p = 0 is allowed
    # (different sets). Positives: ref 0 (d = 0), ref 3 (sqrt 2); negatives: ref 1 (sqrt 2), ref 2 (2).
    # t = d_an - d_ap: (0,0,1) sqrt(2), (0,0,2) 2, (0,3,1) 0, (0,3,2) 2 - sqrt(2) = 0.586.
    query = torch.tensor([[1.0, 0.0]], dtype=F64)
    qlabels = torch.tensor([0])
    rlabels = torch.tensor([0, 1, 1, 0])
    kw = dict(ref_emb=SQUARE, ref_labels=rlabels)
    assert triplets(mine_triplets(query, qlabels, margin=0.5, **kw)) == [(0, 3, 1)]
    assert triplets(mine_triplets(query, qlabels, margin=0.5, type_of_triplets="easy", **kw)) == [
        (0, 0, 1), (0, 0, 2), (0, 3, 2),
    ]
    # batch_hard: farthest positive 3, nearest negative 1. facenet: pair (0,0) d_ap = 0 -> nearest
    # farther negative 1; pair (0,3) d_ap = sqrt(2) -> 2.
    assert triplets(mine_triplets(query, qlabels, type_of_triplets="batch_hard", **kw)) == [(0, 3, 1)]
    assert triplets(mine_triplets(query, qlabels, type_of_triplets="facenet", **kw)) == [(0, 0, 1), (0, 3, 2)]
    # Loss, margin 0.5, "all": (0, 3, 1) violation sqrt(2) - sqrt(2) + 0.5 = 0.5.
    torch.testing.assert_close(triplet_margin_loss(query, qlabels, margin=0.5, **kw), torch.tensor(0.5, dtype=F64))
    # Swap uses the reference-to-reference distance d(ref 3, ref 2) = sqrt(2) < d_an = 2:
    # (0, 3, 2), margin 1: no swap sqrt(2) - 2 + 1, swap sqrt(2) - sqrt(2) + 1 = 1.
    idx = (torch.tensor([0]), torch.tensor([3]), torch.tensor([2]))
    torch.testing.assert_close(
        triplet_margin_loss(query, qlabels, margin=1.0, indices_tuple=idx, **kw), torch.tensor(SQRT2 - 1, dtype=F64)
    )
    torch.testing.assert_close(
        triplet_margin_loss(query, qlabels, margin=1.0, indices_tuple=idx, swap=True, **kw),
        torch.tensor(1.0, dtype=F64),
    )


def test_hand_gradient():
    # (0, 1, 2), margin 1: L = |x0 - x1| - |x0 - x2| + 1 on the normalized square, so
    # dL/dx0 (before normalization) = tangential part of (x0 - x1)/sqrt(2) - (x0 - x2)/2
    # = (1, -1)/sqrt(2) - (1, 0) -> remove the radial (x0) component: (0, -1/sqrt(2)).
    x = SQUARE.clone().requires_grad_(True)
    idx = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    triplet_margin_loss(x, LABELS, margin=1.0, indices_tuple=idx).backward()
    torch.testing.assert_close(x.grad[0], torch.tensor([0.0, -1 / SQRT2], dtype=F64))


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_embeddings_finite_gradient(distance):
    # x0 == x1 (same identity, d_ap = 0) and x2 == x3 (negatives, d_pn = 0 for swap).
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-1.0, 0.5], [-1.0, 0.5]], dtype=F64, requires_grad=True)
    for swap in (False, True):
        x.grad = None
        loss = triplet_margin_loss(x, torch.tensor([0, 0, 1, 1]), margin=0.5, distance=distance, swap=swap,
                                   reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("swap, smooth", [(False, False), (True, False), (False, True)])
def test_gradcheck(distance, swap, smooth):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, dtype=F64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0])
    # Fix the triplets so a finite-difference step cannot change the mined set.
    idx = mine_triplets(x.detach(), labels, margin=5.0, distance=distance)
    fn = lambda x: triplet_margin_loss(  # noqa: E731
        x, labels, margin=0.3, distance=distance, swap=swap, smooth_loss=smooth, indices_tuple=idx, reduction="sum"
    )
    assert torch.autograd.gradcheck(fn, (x,))


def _brute_force(emb, labels, ref, ref_labels, self_ref, type_of_triplets, distance, margin, normalize):
    """Plain-Python triple loop over the definitions in mine_triplets' docstring."""

    def prep(rows):
        rows = rows.tolist()
        if normalize:
            rows = [[c / math.sqrt(sum(v * v for v in r)) for c in r] for r in rows]
        return rows

    q, r = prep(emb), prep(ref)
    ql, rl = labels.tolist(), ref_labels.tolist()

    def far(i, j):  # larger = farther, for every distance
        if distance == "cosine":
            return -sum(a * b for a, b in zip(q[i], r[j]))
        sq = sum((a - b) ** 2 for a, b in zip(q[i], r[j]))
        return sq if distance == "squared_euclidean" else math.sqrt(sq)

    pos = lambda a: [p for p in range(len(r)) if rl[p] == ql[a] and not (self_ref and p == a)]  # noqa: E731
    neg = lambda a: [n for n in range(len(r)) if rl[n] != ql[a]]  # noqa: E731
    out = []
    for a in range(len(q)):
        if type_of_triplets == "batch_hard":
            if pos(a) and neg(a):
                p = max(pos(a), key=lambda j: (far(a, j), -j))
                n = min(neg(a), key=lambda j: (far(a, j), j))
                out.append((a, p, n))
            continue
        for p in pos(a):
            if type_of_triplets == "facenet":
                farther = [n for n in neg(a) if far(a, n) > far(a, p)]
                if farther:
                    out.append((a, p, min(farther, key=lambda j: (far(a, j), j))))
                elif neg(a):
                    out.append((a, p, max(neg(a), key=lambda j: (far(a, j), -j))))
                continue
            for n in neg(a):
                t = far(a, n) - far(a, p)
                keep = {
                    "all": t <= margin,
                    "hard": t <= margin and t <= 0,
                    "semihard": 0 < t <= margin,
                    "easy": t > margin,
                }[type_of_triplets]
                if keep:
                    out.append((a, p, n))
    return out


@pytest.mark.parametrize("type_of_triplets", TYPES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("use_ref", [False, True])
def test_mining_matches_brute_force(type_of_triplets, distance, use_ref):
    g = torch.Generator().manual_seed(7)
    for trial, (margin, normalize) in enumerate(itertools.product([-0.1, 0.1, 0.5], [True, False])):
        emb = torch.randn(9, 3, dtype=F64, generator=g)
        labels = torch.randint(0, 3, (9,), generator=g)
        if use_ref:
            ref, ref_labels = torch.randn(6, 3, dtype=F64, generator=g), torch.randint(0, 3, (6,), generator=g)
            kw = dict(ref_emb=ref, ref_labels=ref_labels)
        else:
            ref, ref_labels, kw = emb, labels, {}
        got = mine_triplets(
            emb, labels, margin=margin, type_of_triplets=type_of_triplets, distance=distance,
            normalize_embeddings=normalize, **kw,
        )
        want = _brute_force(emb, labels, ref, ref_labels, not use_ref, type_of_triplets, distance, margin, normalize)
        assert triplets(got) == want, (trial, margin, normalize)
        if type_of_triplets == "all":
            assert len(want) > 0  # the random data does exercise the comparison


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="type_of_triplets"):
        mine_triplets(SQUARE, LABELS, type_of_triplets="semi-hard")
    with pytest.raises(ValueError, match="distance"):
        mine_triplets(SQUARE, LABELS, distance="l1")
    with pytest.raises(ValueError, match="ref_labels"):
        mine_triplets(SQUARE, LABELS, ref_emb=SQUARE)
    with pytest.raises(ValueError, match="ref_labels"):
        triplet_margin_loss(SQUARE, LABELS, ref_labels=LABELS)
    with pytest.raises(ValueError, match="mining"):
        triplet_margin_loss(SQUARE, LABELS, mining="hardest")
    with pytest.raises(ValueError, match="distance"):
        triplet_margin_loss(SQUARE, LABELS, distance="manhattan")
    with pytest.raises(ValueError, match="reduction"):
        triplet_margin_loss(SQUARE, LABELS, reduction="avg")
    with pytest.raises(ValueError, match="indices_tuple"):
        triplet_margin_loss(SQUARE, LABELS, indices_tuple=(torch.tensor([0]), torch.tensor([1])))



def test_a_nan_row_makes_the_reduced_loss_nan_as_the_kernels_do():
    """The oracle follows the policy of the kernel it judges: NaN triplets are never mined,
    but a finite loss whose gradients are NaN would hide the bad embedding."""
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 0] = float("nan")
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for reduction in ("mean_nonzero", "mean", "sum"):
        assert triplet_margin_loss(x, y, reduction=reduction).isnan()
    losses = triplet_margin_loss(x, y, reduction="none")  # per triplet: NaN only where row 1 is
    assert losses.isnan().any() and not losses.isnan().all()
