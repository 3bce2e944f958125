"""facekernels' TripletMiner, TripletMarginLoss and ContrastiveLoss against
pytorch-metric-learning itself: constructor contract, PML's distance and reducer objects,
edge cases (empty batch, one identity, narrow integer labels, index-tuple conversions) and
bad input. PML's own test files, swapped, are in test_pml_swap.py."""

import inspect
import subprocess
import sys

import pytest
import torch

import facekernels
from conftest import assert_close

pml = pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is not installed")
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers  # noqa: E402

PAIRS = [(facekernels.TripletMiner, miners.TripletMarginMiner),
         (facekernels.TripletMarginLoss, losses.TripletMarginLoss),
         (facekernels.ContrastiveLoss, losses.ContrastiveLoss)]


def batch(n=24, identities=5, dtype=torch.float64, seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, torch.randint(0, identities, (n,), generator=g)


def value_and_grad(loss_fn, x, *args, **kwargs):
    x = x.detach().requires_grad_()
    loss = loss_fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if grad is None else grad


def assert_same_loss(ours, theirs, *args, **kwargs):
    x, *rest = args
    for a, b in zip(value_and_grad(ours, x, *rest, **kwargs), value_and_grad(theirs, x, *rest, **kwargs)):
        assert_close(a, b)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_pml_arguments_keep_their_positions_and_defaults(ours, theirs):
    # PML's own parameters, then the **kwargs of its base classes (distance, reducer, ...).
    mine = inspect.signature(ours.__init__).parameters
    for name, parameter in inspect.signature(theirs.__init__).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD or name == "self":
            continue
        assert list(mine).index(name) == list(inspect.signature(theirs.__init__).parameters).index(name)
        assert mine[name].default == parameter.default, name
    for name in ("distance", "reducer", "embedding_regularizer", "embedding_reg_weight", "collect_stats"):
        if ours is not facekernels.TripletMiner or name in ("distance", "collect_stats"):
            assert name in mine


@pytest.mark.parametrize("distance", [
    distances.LpDistance(), distances.LpDistance(power=2), distances.LpDistance(normalize_embeddings=False),
    distances.CosineSimilarity(), distances.DotProductSimilarity(),
    distances.DotProductSimilarity(normalize_embeddings=False),
])
@pytest.mark.parametrize("reducer", [None, reducers.AvgNonZeroReducer(), reducers.MeanReducer(), reducers.SumReducer()])
def test_pml_distance_and_reducer_objects(distance, reducer):
    x, labels = batch()
    kw = {} if reducer is None else {"reducer": reducer}
    assert_same_loss(facekernels.TripletMarginLoss(0.1, distance=distance, **kw),
                     losses.TripletMarginLoss(0.1, distance=distance, **kw), x, labels)
    assert_same_loss(facekernels.ContrastiveLoss(0.1, 0.7, distance=distance, **kw),
                     losses.ContrastiveLoss(0.1, 0.7, distance=distance, **kw), x, labels)
    for kind in ("all", "hard", "semihard", "easy"):
        ours = facekernels.TripletMiner(0.1, kind, distance=distance)(x, labels)
        theirs = miners.TripletMarginMiner(0.1, kind, distance=distance)(x, labels)
        assert {*zip(*(t.tolist() for t in ours))} == {*zip(*(t.tolist() for t in theirs))}


@pytest.mark.parametrize("options", [dict(swap=True), dict(smooth_loss=True), dict(swap=True, smooth_loss=True)])
def test_swap_and_smooth_loss_as_pml(options):
    x, labels = batch()
    assert_same_loss(facekernels.TripletMarginLoss(0.3, **options), losses.TripletMarginLoss(0.3, **options), x, labels)


def test_do_nothing_reducer_returns_pml_loss_dicts():
    x, labels = batch(12, 3)
    for ours, theirs in ((facekernels.TripletMarginLoss, losses.TripletMarginLoss),
                         (facekernels.ContrastiveLoss, losses.ContrastiveLoss)):
        got = ours(reducer=reducers.DoNothingReducer())(x, labels)
        want = theirs(reducer=reducers.DoNothingReducer())(x, labels)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key]["reduction_type"] == want[key]["reduction_type"]
            order = lambda d: sorted(zip(*(i.tolist() for i in d["indices"])))  # noqa: E731
            assert order(got[key]) == order(want[key])
            rows = lambda d: torch.stack(list(d["indices"])).t().tolist()  # noqa: E731
            by_index = dict(zip(map(tuple, rows(got[key])), got[key]["losses"].tolist()))
            for index, value in zip(map(tuple, rows(want[key])), want[key]["losses"].tolist()):
                assert by_index[index] == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_embedding_regularizer_is_added_as_pml_does():
    x, labels = batch()
    kw = dict(embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    assert_same_loss(facekernels.TripletMarginLoss(0.1, **kw), losses.TripletMarginLoss(0.1, **kw), x, labels)
    assert_same_loss(facekernels.ContrastiveLoss(**kw), losses.ContrastiveLoss(**kw), x, labels)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels(dtype):
    x, labels = batch()
    for ours, theirs in ((facekernels.TripletMarginLoss(), losses.TripletMarginLoss()),
                         (facekernels.ContrastiveLoss(), losses.ContrastiveLoss())):
        assert_same_loss(ours, theirs, x, labels.to(dtype))
    ours = facekernels.TripletMiner()(x, labels.to(dtype))
    assert all(t.dtype == torch.int64 for t in ours)
    assert all(torch.equal(a, b) for a, b in zip(ours, facekernels.TripletMiner()(x, labels)))


def test_empty_batch_and_one_identity_as_pml():
    empty = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    no_labels = torch.zeros(0, dtype=torch.int64)
    assert all(t.numel() == 0 and t.dtype == torch.int64 for t in facekernels.TripletMiner()(empty, no_labels))
    one = torch.zeros(6, dtype=torch.int64)
    x, _ = batch(6)
    for ours, theirs in ((facekernels.TripletMarginLoss(), losses.TripletMarginLoss()),
                         (facekernels.ContrastiveLoss(), losses.ContrastiveLoss())):
        loss = ours(empty, no_labels)
        assert loss == theirs(empty, no_labels) == 0
        loss.backward()  # still in the graph, as PML's sum(embeddings * 0)
        assert_same_loss(ours, theirs, x, one)


def test_index_tuples_are_converted_as_pml_does():
    x, labels = batch()
    pairs = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x, labels)
    triplets = miners.TripletMarginMiner(0.3)(x, labels)
    assert_same_loss(facekernels.TripletMarginLoss(0.1), losses.TripletMarginLoss(0.1), x, labels, pairs)
    assert_same_loss(facekernels.ContrastiveLoss(), losses.ContrastiveLoss(), x, labels, triplets)
    assert_same_loss(facekernels.ContrastiveLoss(), losses.ContrastiveLoss(), x, None, pairs)


def test_reference_set_as_pml():
    x, labels = batch(12, 3)
    ref, ref_labels = batch(9, 3, seed=1)
    for ours, theirs in ((facekernels.TripletMarginLoss(0.2), losses.TripletMarginLoss(0.2)),
                         (facekernels.ContrastiveLoss(0.1, 0.9), losses.ContrastiveLoss(0.1, 0.9))):
        assert_same_loss(ours, theirs, x, labels, ref_emb=ref.detach(), ref_labels=ref_labels)


def test_triplets_per_anchor_draws_valid_triplets():
    x, labels = batch(30, 4)
    terms = facekernels.triplet_margin_loss(x, labels, triplets_per_anchor=3, reduction="none")
    anchors = sum(1 for i in range(30) if (labels == labels[i]).sum() > 1 and (labels != labels[i]).any())
    assert terms.shape == (3 * anchors,)
    dicts = facekernels.TripletMarginLoss(triplets_per_anchor=3, reducer=reducers.DoNothingReducer())(x, labels)
    a, p, n = dicts["loss"]["indices"]
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()


def test_unsupported_pml_objects_are_refused():
    class Custom(distances.LpDistance):
        pass

    for distance in (distances.LpDistance(p=1), distances.LpDistance(power=3), distances.SNRDistance(), Custom()):
        with pytest.raises(ValueError, match="distance .* has no fused equivalent"):
            facekernels.TripletMarginLoss(distance=distance)
        with pytest.raises(ValueError, match="distance"):
            facekernels.TripletMiner(distance=distance)
    for reducer in (reducers.ThresholdReducer(low=0.1), reducers.ClassWeightedReducer(torch.ones(3))):
        with pytest.raises(ValueError, match="reducer .* has no fused equivalent"):
            facekernels.ContrastiveLoss(reducer=reducer)
    with pytest.raises(ValueError, match="collect_stats"):
        facekernels.TripletMiner(collect_stats=True)
    with pytest.raises(ValueError, match="normalize_embeddings=False contradicts"):
        facekernels.TripletMarginLoss(distance=distances.LpDistance(), normalize_embeddings=False)


@pytest.mark.parametrize("make, match", [
    (lambda: facekernels.TripletMarginLoss(margin=float("nan")), "margin must be a finite number"),
    (lambda: facekernels.TripletMiner(margin=float("inf")), "margin must be a finite number"),
    (lambda: facekernels.ContrastiveLoss(neg_margin=float("nan")), "neg_margin must be a finite number"),
    (lambda: facekernels.TripletMarginLoss(triplets_per_anchor=0), "triplets_per_anchor"),
    (lambda: facekernels.TripletMarginLoss(triplets_per_anchor=2, mining="all"), "triplets_per_anchor"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


I = torch.tensor


@pytest.mark.parametrize("indices, error, match", [
    ((I([0, 1]), I([1, 0]), I([24, 2])), ValueError, r"negatives must lie in \[0, 24\)"),
    ((I([-1, 1]), I([1, 0]), I([2, 2])), ValueError, r"anchors must lie in \[0, 24\)"),
    ((I([0, 1]), I([1]), I([2, 2])), ValueError, "must pair up"),
    ((I([0.0]), I([1]), I([2])), TypeError, "anchors must be an integer tensor"),
    ((I([0]), I([1])), ValueError, "indices_tuple must be"),
    ((I([0]), I([1]), I([0, 1]), I([2])), ValueError, "must pair up"),
])
def test_bad_indices_tuple(indices, error, match):
    x, labels = batch()
    for criterion in (facekernels.TripletMarginLoss(), facekernels.ContrastiveLoss()):
        with pytest.raises(error, match=match):
            criterion(x, labels, indices)


def test_bad_reference_set():
    x, labels = batch(12)
    ref, ref_labels = batch(9, seed=1)
    cases = [(dict(ref_emb=ref.float(), ref_labels=ref_labels), TypeError, "ref_emb must have the embeddings' dtype"),
             (dict(ref_emb=ref[:, :4], ref_labels=ref_labels), ValueError, "ref_emb must have 8 columns"),
             (dict(ref_emb=ref, ref_labels=ref_labels[:3]), ValueError, r"ref_labels must have shape \[9\]"),
             (dict(ref_emb=ref, ref_labels=ref_labels.float()), TypeError, "ref_labels must be an integer tensor"),
             (dict(ref_emb=ref.to("meta"), ref_labels=ref_labels), ValueError, "ref_emb is on meta")]
    for kwargs, error, match in cases:
        for call in (facekernels.TripletMarginLoss(), facekernels.ContrastiveLoss(), facekernels.TripletMiner()):
            with pytest.raises(error, match=match):
                call(x, labels, **kwargs) if isinstance(call, facekernels.TripletMiner) else \
                    call(x, labels, None, **kwargs)


def test_facekernels_does_not_import_pml():
    code = "import sys, facekernels; sys.exit('pytorch_metric_learning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_distance_changed_after_construction_is_read_at_every_call_as_pml():
    """PML reads its distance object at every forward: a p or power changed later counts."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    for ours, theirs, calls in (
        (facekernels.TripletMarginLoss, losses.TripletMarginLoss, lambda f: f(x, y)),
        (facekernels.ContrastiveLoss, losses.ContrastiveLoss, lambda f: f(x, y)),
        (facekernels.TripletMiner, miners.TripletMarginMiner, lambda f: torch.stack(f(x, y))),
    ):
        mine, pmls = distances.LpDistance(p=2, power=1), distances.LpDistance(p=2, power=1)
        f, h = ours(distance=mine), theirs(distance=pmls)
        before = calls(f)
        mine.power = pmls.power = 2
        after = calls(f)
        assert_close(after.float(), calls(h).float(), torch.float32)
        assert not torch.equal(before, after)
