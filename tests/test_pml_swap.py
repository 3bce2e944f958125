"""Drop-in check: pytorch-metric-learning's own unit-test logic, run against facekernels.

PML's test files are not installed with the package, so this module is an independent
harness (our code) that reproduces the assertions of these PML test files:

* tests/miners/test_triplet_margin_miner.py: test_triplet_margin_miner, test_empty_output
* tests/losses/test_triplet_margin_loss.py (newest version: random 5x32 normalized
  embeddings, a shared helper and a with-ref test; tests/losses/utils.py supplies the
  with-ref data): test_triplet_margin_loss, test_triplet_margin_loss_with_ref,
  test_with_no_valid_triplets, test_backward
* tests/losses/test_contrastive_loss.py: test_contrastive_loss, test_with_no_valid_pairs,
  test_backward. Only the opening of the newest version could be read (it runs on
  TEST_DEVICE instead of a hard-coded "cuda", and imports WITH_COLLECT_STATS for a check
  whose attributes could not be read, so that check is not reproduced); the test bodies
  follow commit 72d7496, whose points come from the old, unit-length angle_to_coord, i.e.
  normalized=True here.

The two test_backward functions are named test_triplet_backward and
test_contrastive_backward here.

Every test runs twice, parametrized over `impl`:

* "pml": nothing is patched; PML checks its own classes. This control proves the harness.
* "facekernels": pytorch_metric_learning.miners.TripletMarginMiner,
  pytorch_metric_learning.losses.TripletMarginLoss and
  pytorch_metric_learning.losses.ContrastiveLoss are replaced by facekernels.TripletMiner,
  facekernels.TripletMarginLoss and facekernels.ContrastiveLoss. The test bodies build the
  classes through those PML namespaces with the arguments PML's tests use, including PML's
  own LpDistance / CosineSimilarity / MeanReducer objects.

How this differs from running PML's files:

* PML's tests draw their data unseeded. Here every test that draws random data is run for
  the fixed seeds 0..49, with torch.manual_seed(seed) just before the draws, made in the
  same order and the same way as PML's test makes them. The tests on fixed points (no
  valid triplets / pairs, backward, the contrastive values) draw nothing and run once per
  dtype and device.
* The dtypes of PML's CI (TEST_DTYPES=float32,float64) are parametrized instead of looped
  over; the devices are conftest's (CUDA where available). As in PML, labels stay
  CPU LongTensors when the embeddings are on the device.
* The brute-force triplet list of the miner test is built with tensor indexing instead of
  0-d tensor loops; the distance differences are the same elementwise subtractions in the
  test's dtype, compared with the same thresholds, and mined triplets are compared as the
  same sets.
* Where a draw has no violating triplet, PML's expected AvgNonZeroReducer value is 0 / 0
  and PML's own class fails its test; here the expected value is then 0, the reducer's.
* testing_utils.is_not_none_if_condition(..., WITH_COLLECT_STATS) is reproduced for
  WITH_COLLECT_STATS=False, PML's default: the stat attributes must be absent or None.
  The collect_stats=True recording is optional in PML and is left out here.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip(
    "pytorch_metric_learning",
    reason="pytorch-metric-learning is not installed (pip install 'facekernels[test]'); "
    "the PML drop-in tests need it",
)
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance  # noqa: E402
from pytorch_metric_learning.reducers import MeanReducer  # noqa: E402
from pytorch_metric_learning.utils import common_functions as c_f  # noqa: E402

import facekernels  # noqa: E402

# PML name -> facekernels name, set on the PML module object.
SWAPS = [
    (pml_miners, "TripletMarginMiner", "TripletMiner"),
    (pml_losses, "TripletMarginLoss", "TripletMarginLoss"),
    (pml_losses, "ContrastiveLoss", "ContrastiveLoss"),
]
SEED_BASE = int(os.environ.get("FACEKERNELS_SEED_BASE", "0"))
SEEDS = pytest.mark.parametrize("seed", range(SEED_BASE, SEED_BASE + 50), ids=lambda s: f"seed{s}")
RTOL = {torch.float16: 1e-2}  # PML's rtol; 1e-5 for every other dtype


@pytest.fixture(params=["pml", "facekernels"])
def impl(request, monkeypatch):
    monkeypatch.setattr(c_f, "COLLECT_STATS", False)  # WITH_COLLECT_STATS=False
    if request.param == "facekernels":
        for module, pml_name, our_name in SWAPS:
            monkeypatch.setattr(module, pml_name, getattr(facekernels, our_name))
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


def points_on_arc(angles, dtype, device, normalized=False):
    """2-D embeddings at `angles` degrees, as PML's testing_utils.angle_to_coord makes them
    ((2 cos, sin / 2) unless normalized), a leaf with requires_grad, then moved to device."""
    rad = np.radians(np.asarray(list(angles), dtype=np.float64))
    scale = (1.0, 1.0) if normalized else (2.0, 0.5)
    coords = [(scale[0] * np.cos(r), scale[1] * np.sin(r)) for r in rad]
    return torch.tensor(coords, requires_grad=True, dtype=dtype).to(device)


def mined_set(indices):
    a, p, n = indices
    return set(zip(a.tolist(), p.tolist(), n.tolist()))


# --- tests/miners/test_triplet_margin_miner.py -------------------------------------------

MINER_STATS = ["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"]


def brute_force_triplets(distance, embeddings, labels):
    """Every (anchor, positive, negative) of the batch and its margin: d_an - d_ap, or
    s_ap - s_an for a similarity, from the full matrix in the embeddings' dtype."""
    lab = labels.tolist()
    n = len(lab)
    triplets = [
        (i, j, k)
        for i in range(n)
        for j in range(n)
        if j != i and lab[j] == lab[i]
        for k in range(n)
        if k not in (i, j) and lab[k] != lab[j]
    ]
    with torch.no_grad():
        mat = distance(embeddings)
        i, j, k = (torch.tensor(t, dtype=torch.long) for t in zip(*triplets))
        ap, an = mat[i, j], mat[i, k]
        diff = ap - an if distance.is_inverted else an - ap
    return triplets, diff.cpu()


@SEEDS
def test_triplet_margin_miner(impl, seed, dtype, device):
    torch.manual_seed(seed)
    for distance in [LpDistance(), CosineSimilarity()]:
        embeddings = points_on_arc(range(16), dtype, device)
        labels = torch.randint(low=0, high=2, size=(16,))
        triplets, diff = brute_force_triplets(distance, embeddings, labels)
        for margin_int in range(-1, 11):
            margin = float(margin_int) * 0.05
            easy = diff > margin
            in_all = ~easy
            masks = {
                "all": in_all,
                "hard": in_all & (diff <= 0),
                "semihard": in_all & (diff > 0),
                "easy": easy,
            }
            for type_of_triplets, mask in masks.items():
                miner = pml_miners.TripletMarginMiner(
                    margin, type_of_triplets=type_of_triplets, distance=distance
                )
                expected = {t for t, keep in zip(triplets, mask.tolist()) if keep}
                assert mined_set(miner(embeddings, labels)) == expected, (
                    f"{type(distance).__name__} margin={margin} type={type_of_triplets}"
                )
                for name in MINER_STATS:
                    assert getattr(miner, name, None) is None, name


@SEEDS
def test_empty_output(impl, seed, dtype, device):
    miner = pml_miners.TripletMarginMiner(0.5, type_of_triplets="all")
    torch.manual_seed(seed)
    batch_size = 32
    embeddings = torch.randn(batch_size, 64).type(dtype).to(device)
    labels = torch.arange(batch_size)
    a, p, n = miner(embeddings, labels)
    assert len(a) == 0
    assert len(p) == 0
    assert len(n) == 0


# --- tests/losses/test_triplet_margin_loss.py (+ tests/losses/utils.py) -------------------

# PML's expected triplet lists for labels (0, 0, 1, 1, 2), and for labels (0, 0, 1, 1)
# against reference labels (0, 1, 2).
TRIPLETS = [(0, 1, 2), (0, 1, 3), (0, 1, 4), (1, 0, 2), (1, 0, 3), (1, 0, 4),
            (2, 3, 0), (2, 3, 1), (2, 3, 4), (3, 2, 0), (3, 2, 1), (3, 2, 4)]
TRIPLETS_WITH_REF = [(0, 0, 1), (0, 0, 2), (1, 0, 1), (1, 0, 2),
                     (2, 1, 0), (2, 1, 2), (3, 1, 0), (3, 1, 2)]


def check_triplet_margin_losses(embeddings, labels, triplets, dtype, ref_emb=None, ref_labels=None):
    """PML's helper(): five configurations against per-triplet reference sums."""
    margin = 0.2
    loss_funcs = [
        pml_losses.TripletMarginLoss(margin=margin),
        pml_losses.TripletMarginLoss(margin=margin, reducer=MeanReducer()),
        pml_losses.TripletMarginLoss(margin=margin, distance=CosineSimilarity()),
        pml_losses.TripletMarginLoss(margin=margin, reducer=MeanReducer(), distance=CosineSimilarity()),
        pml_losses.TripletMarginLoss(margin=margin, smooth_loss=True),
    ]
    lossA, lossB, lossC, lossD, lossE = [
        f(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels) for f in loss_funcs
    ]

    others = embeddings if ref_emb is None else ref_emb
    l2 = cos = smooth = 0
    l2_nonzero = cos_nonzero = 0
    with torch.no_grad():
        for a, p, n in triplets:
            anchor, positive, negative = embeddings[a], others[p], others[n]
            d_ap = torch.sqrt(torch.sum((anchor - positive) ** 2))
            d_an = torch.sqrt(torch.sum((anchor - negative) ** 2))
            l2_term = torch.relu(d_ap - d_an + margin)
            cos_term = torch.relu(torch.sum(anchor * negative) - torch.sum(anchor * positive) + margin)
            smooth = smooth + torch.nn.functional.softplus(d_ap - d_an + margin)
            l2_nonzero += int(l2_term > 0)
            cos_nonzero += int(cos_term > 0)
            l2 = l2 + l2_term
            cos = cos + cos_term

    rtol = RTOL.get(dtype, 1e-5)
    # PML's test divides by the number of non-zero terms even when it is 0 (a draw with no
    # violating triplet, about 1 in 250), and then fails for PML's own class; the reducer's
    # value there is 0.
    assert torch.isclose(lossA, l2 / max(l2_nonzero, 1), rtol=rtol), "L2, AvgNonZeroReducer"
    assert torch.isclose(lossB, l2 / len(triplets), rtol=rtol), "L2, MeanReducer"
    assert torch.isclose(lossC, cos / max(cos_nonzero, 1), rtol=rtol), "cosine, AvgNonZeroReducer"
    assert torch.isclose(lossD, cos / len(triplets), rtol=rtol), "cosine, MeanReducer"
    assert torch.isclose(lossE, smooth / len(triplets), rtol=rtol), "smooth_loss"


@SEEDS
def test_triplet_margin_loss(impl, seed, dtype, device):
    torch.manual_seed(seed)
    embeddings = torch.randn(5, 32, requires_grad=True, dtype=dtype).to(device)
    embeddings = torch.nn.functional.normalize(embeddings)
    labels = torch.LongTensor([0, 0, 1, 1, 2])
    check_triplet_margin_losses(embeddings, labels, TRIPLETS, dtype)


@SEEDS
def test_triplet_margin_loss_with_ref(impl, seed, dtype, device):
    torch.manual_seed(seed)
    embeddings = torch.randn(4, 32, requires_grad=True, device=device, dtype=dtype)
    embeddings = torch.nn.functional.normalize(embeddings)
    labels = torch.LongTensor([0, 0, 1, 1])
    ref_emb = torch.randn(3, 32, requires_grad=True, device=device, dtype=dtype)
    ref_emb = torch.nn.functional.normalize(ref_emb)
    ref_labels = torch.LongTensor([0, 1, 2])
    check_triplet_margin_losses(embeddings, labels, TRIPLETS_WITH_REF, dtype, ref_emb, ref_labels)


def test_with_no_valid_triplets(impl, dtype, device):
    loss_funcA = pml_losses.TripletMarginLoss(margin=0.2)
    loss_funcB = pml_losses.TripletMarginLoss(margin=0.2, reducer=MeanReducer())
    embeddings = points_on_arc([0, 20, 40, 60, 80], dtype, device)
    labels = torch.LongTensor([0, 1, 2, 3, 4])
    assert loss_funcA(embeddings, labels) == 0
    assert loss_funcB(embeddings, labels) == 0


def test_triplet_backward(impl, dtype, device):
    margin = 0.2
    for loss_func in [
        pml_losses.TripletMarginLoss(margin=margin),
        pml_losses.TripletMarginLoss(margin=margin, reducer=MeanReducer()),
        pml_losses.TripletMarginLoss(smooth_loss=True),
    ]:
        embeddings = points_on_arc([0, 20, 40, 60, 80], dtype, device)
        labels = torch.LongTensor([0, 0, 1, 1, 2])
        loss_func(embeddings, labels).backward()


# --- tests/losses/test_contrastive_loss.py ------------------------------------------------

CONTRASTIVE_LABELS = [0, 0, 1, 1, 2]
PAIRS = [(a, b) for a in range(5) for b in range(5) if a != b]
POS_PAIRS = [(a, b) for a, b in PAIRS if CONTRASTIVE_LABELS[a] == CONTRASTIVE_LABELS[b]]
NEG_PAIRS = [(a, b) for a, b in PAIRS if CONTRASTIVE_LABELS[a] != CONTRASTIVE_LABELS[b]]


def expected_contrastive_losses(embeddings):
    """PML's reference values of loss_func A (LpDistance(power=2), margins 0.25 / 1.5),
    B (CosineSimilarity, margins 1.5 / 0.6), then C and D (the same with MeanReducer): the
    positive and the negative terms are each reduced (A, B: over the non-zero terms only)
    and the two parts added."""
    pos_l2, pos_cos, neg_l2, neg_cos = [], [], [], []
    with torch.no_grad():
        for a, b in POS_PAIRS:
            x, y = embeddings[a], embeddings[b]
            pos_l2.append(torch.relu(torch.sum((x - y) ** 2) - 0.25))
            pos_cos.append(torch.relu(1.5 - torch.matmul(x, y)))
        for a, b in NEG_PAIRS:
            x, y = embeddings[a], embeddings[b]
            neg_l2.append(torch.relu(1.5 - torch.sum((x - y) ** 2)))
            neg_cos.append(torch.relu(torch.matmul(x, y) - 0.6))

    def reduce(terms, nonzero_only):
        total = sum(terms[1:], terms[0])
        count = sum(int(t > 0) for t in terms) if nonzero_only else len(terms)
        return total / count if count > 0 else total

    return [
        reduce(pos, nonzero_only) + reduce(neg, nonzero_only)
        for nonzero_only in (True, False)
        for pos, neg in [(pos_l2, neg_l2), (pos_cos, neg_cos)]
    ]


def test_contrastive_loss(impl, dtype, device):
    loss_funcs = [
        pml_losses.ContrastiveLoss(pos_margin=0.25, neg_margin=1.5, distance=LpDistance(power=2)),
        pml_losses.ContrastiveLoss(pos_margin=1.5, neg_margin=0.6, distance=CosineSimilarity()),
        pml_losses.ContrastiveLoss(
            pos_margin=0.25, neg_margin=1.5, distance=LpDistance(power=2), reducer=MeanReducer()
        ),
        pml_losses.ContrastiveLoss(
            pos_margin=1.5, neg_margin=0.6, distance=CosineSimilarity(), reducer=MeanReducer()
        ),
    ]
    embeddings = points_on_arc([0, 20, 40, 60, 80], dtype, device, normalized=True)
    labels = torch.LongTensor(CONTRASTIVE_LABELS)
    losses = [f(embeddings, labels) for f in loss_funcs]
    rtol = RTOL.get(dtype, 1e-5)
    for name, loss, expected in zip("ABCD", losses, expected_contrastive_losses(embeddings)):
        assert torch.isclose(loss, expected, rtol=rtol), f"loss_func{name}: {loss} vs {expected}"


def test_with_no_valid_pairs(impl, dtype, device):
    loss_funcA = pml_losses.ContrastiveLoss()
    loss_funcB = pml_losses.ContrastiveLoss(distance=CosineSimilarity())
    embeddings = points_on_arc([0], dtype, device, normalized=True)
    labels = torch.LongTensor([0])
    assert loss_funcA(embeddings, labels) == 0
    assert loss_funcB(embeddings, labels) == 0


def test_contrastive_backward(impl, dtype, device):
    for loss_func in [
        pml_losses.ContrastiveLoss(),
        pml_losses.ContrastiveLoss(distance=CosineSimilarity()),
    ]:
        embeddings = points_on_arc([0], dtype, device, normalized=True)
        labels = torch.LongTensor([0])
        loss_func(embeddings, labels).backward()
