"""Property-based fuzzing of the public entry points against the README's "Errors and NaN"
policy. Each case draws shapes, dtypes, strides, label ranges, NaN/inf placements and
option values, works out which arguments are invalid, and asserts one of:

- some argument is invalid: a ValueError or TypeError whose message names one of them,
  and every stateful buffer (CenterLoss.centers, SphereFaceLoss.iteration) is bitwise
  unchanged;
- all are valid: the result equals the reference twin, NaN exactly in the rows whose
  embeddings are not finite.

The CI profile ("ci", derandomized) draws 40 cases per entry point; `pytest --fuzz`
loads the long profile (tests/conftest.py). Each entry point runs on conftest's devices,
the emulated CUDA kernels ("simt") included.
"""

import copy
import math

import pytest
import torch

import facekernels
import facekernels.eval
from facekernels import reference
from facekernels.distributed import DistributedLossWrapper, PartialFC

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install '.[test]')")
from hypothesis import given, strategies as st  # noqa: E402

FLOATS = [torch.float64, torch.float32]
NUMBERS = [math.nan, math.inf, -1.0, 0.0, 0.3, 16.0]


@st.composite
def embeddings(draw, max_rows=5, min_rows=0):
    """(tensor, finite_rows): rows x cols of a drawn dtype, maybe transposed (strided),
    with NaN or inf planted in some entries."""
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOATS + [torch.bfloat16, torch.int64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x = x.t().contiguous().t()  # same values, column-major strides
    for _ in range(draw(st.integers(0, 2)) if n * d else 0):
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    finite = x.isfinite().all(1)
    return x.to(dtype), finite


def labels(draw, n, low, high):
    dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.float32]))
    values = [draw(st.integers(low, high)) for _ in range(n)]
    return torch.tensor(values, dtype=torch.int64).to(dtype)


def flag(name, condition):
    """{name} when the condition holds: the argument is invalid."""
    return {name} if condition else set()


def embedding_problems(x):
    if not x.is_floating_point():
        return {"embeddings"}
    return {"embeddings"} if 0 in x.shape else set()


def assert_policy(call, invalid, on_result, state=lambda: None):
    """Runs call(); with invalid arguments expects an error naming one of them and an
    unchanged state, otherwise hands the result to on_result."""
    before = state()
    if invalid:
        with pytest.raises((ValueError, TypeError)) as error:
            call()
        assert any(name in str(error.value) for name in invalid), (invalid, str(error.value))
        after = state()
        assert before is None or all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                                     for a, b in zip(before, after))
    else:
        on_result(call())


def assert_nan_rows(loss, finite, want):
    """NaN exactly in the non-finite rows; elsewhere equal to the reference `want`."""
    assert torch.equal(loss.isnan().cpu(), ~finite)
    torch.testing.assert_close(loss[finite].double().cpu(), want[finite].double().cpu(),
                               rtol=1e-6 if loss.dtype == torch.float64 else 2e-2,
                               atol=1e-6 if loss.dtype == torch.float64 else 2e-2)


@given(data=st.data())
def test_margin_softmax_heads(device, data):
    draw = data.draw
    x, finite = draw(embeddings())
    n, d = x.shape
    c = draw(st.integers(1, 6))
    y = labels(draw, n, -1, c)
    options = dict(scale=draw(st.sampled_from(NUMBERS)), m2=draw(st.sampled_from(NUMBERS)),
                   chunk_size=draw(st.sampled_from([None, 0, 2, 2**63, True])),
                   reduction=draw(st.sampled_from(["none", "mean", "avg"])))
    weight = torch.randn(c, max(d, 1), dtype=torch.float64).to(x.dtype if x.is_floating_point() else torch.float64)
    invalid = embedding_problems(x)
    if d == 0 or n == 0:
        invalid.add("embeddings")
    if y.dtype != torch.int64 or (n and (int(y.min()) < 0 or int(y.max()) >= c)):
        invalid.add("labels")
    invalid |= flag("scale", not (math.isfinite(options["scale"]) and options["scale"] >= 0))
    invalid |= flag("m2", not math.isfinite(options["m2"]))
    invalid |= flag("chunk_size", options["chunk_size"] not in (None, 2))
    invalid |= flag("reduction", options["reduction"] == "avg")
    if "embeddings" in invalid and d == 0:
        weight = weight[:, :0]
    x, y, weight = x.to(device), y.to(device), weight.to(device)

    def check(loss):
        if options["reduction"] == "none":
            want = reference.margin_softmax_loss(x.double(), weight.double(), y, scale=options["scale"],
                                                 m2=options["m2"], reduction="none")
            assert_nan_rows(loss, finite, want)
        else:
            assert loss.isnan() == (not bool(finite.all()))

    assert_policy(lambda: facekernels.margin_softmax_loss(x, weight, y, **options), invalid, check)


@given(data=st.data())
def test_center_loss_leaves_centers_alone_when_it_refuses(device, data):
    draw = data.draw
    x, finite = draw(embeddings())
    n, d = x.shape
    c = draw(st.integers(1, 5))
    criterion = facekernels.CenterLoss(c, draw(st.sampled_from([max(d, 1), d + 1])),
                                       alpha=0.5).to(device)
    if x.is_floating_point():
        criterion = criterion.to(draw(st.sampled_from([x.dtype, torch.float64])))
    criterion.centers.normal_()
    y = labels(draw, n, -1, c)
    invalid = embedding_problems(x)
    if n == 0:
        invalid.add("embeddings")
    if x.is_floating_point() and (criterion.centers.shape[1] != d or criterion.centers.dtype != x.dtype):
        invalid.add("centers")
    if y.dtype != torch.int64 or (n and (int(y.min()) < 0 or int(y.max()) >= c)):
        invalid.add("labels")
    if not invalid and not bool(finite.all()):
        invalid.add("non-finite")  # the update would poison a center: refused
    x, y = x.to(device), y.to(device)
    centers_before = criterion.centers.clone()

    def check(loss):
        want = reference.center_loss(x.double(), y, centers_before.double())
        torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)
        moved = reference.center_loss_update(centers_before.double(), x.double(), y)
        torch.testing.assert_close(criterion.centers.double(), moved, rtol=2e-2, atol=2e-2)

    assert_policy(lambda: criterion(x, y), invalid, check, state=lambda: (criterion.centers.clone(),))


@given(data=st.data())
def test_sphereface_iteration_moves_only_on_success(device, data):
    draw = data.draw
    x, finite = draw(embeddings(min_rows=1))
    n, d = x.shape
    head = facekernels.SphereFaceLoss(4, max(d, 1), margin=draw(st.integers(1, 4))).to(device)
    if x.is_floating_point():
        head = head.to(x.dtype)
    y = labels(draw, n, -1, 4)
    invalid = embedding_problems(x)
    if y.dtype != torch.int64 or int(y.min()) < 0 or int(y.max()) >= 4:
        invalid.add("labels")
    lam = head.current_lambda()
    x, y = x.to(device), y.to(device)

    def check(loss):
        want = reference.sphereface_loss(x.double(), head.weight.double(), y, margin=head.margin,
                                         lambda_=lam, scale=head.scale, reduction="none").mean()
        assert loss.isnan() == (not bool(finite.all()))
        if finite.all():
            torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)
        assert head.iteration == 1

    assert_policy(lambda: head(x, y), invalid, check, state=lambda: (head.iteration,))


# name -> (module, reference over (the state dict before the call, x, w, y)); the
# scale is small so that fp32 rows compare at the fuzz tolerance.
ADAPTIVE_HEADS = {
    "curricularface": (lambda c, d: facekernels.CurricularFaceLoss(c, d, scale=4.0),
                       lambda m, x, w, y: reference.curricularface_loss(
                           x, w, y, m["t"], scale=4.0, reduction="none")[0]),
    "adaface": (lambda c, d: facekernels.AdaFaceLoss(c, d, scale=4.0, t_alpha=0.5),
                lambda m, x, w, y: reference.adaface_loss(
                    x, w, y, m["batch_mean"], m["batch_std"], scale=4.0, t_alpha=0.5, reduction="none")[0]),
    "magface": (lambda c, d: facekernels.MagFaceLoss(c, d, scale=4.0),
                lambda m, x, w, y: reference.magface_loss(x, w, y, scale=4.0, reduction="none")),
    "subcenter": (lambda c, d: facekernels.SubCenterArcFaceLoss(c, d, k=2, scale=4.0),
                  lambda m, x, w, y: reference.subcenter_arcface_loss(x, w, y, k=2, scale=4.0, reduction="none")),
    "elasticface": (lambda c, d: facekernels.ElasticFaceLoss(c, d, scale=4.0).eval(),  # fixed margins
                    lambda m, x, w, y: reference.elasticface_loss(
                        x, w, y, torch.full((len(y),), 0.5, dtype=x.dtype, device=x.device),
                        scale=4.0, reduction="none")),
}


@given(data=st.data())
def test_adaptive_heads(device, data):
    """Bad input leaves the running buffers bitwise unchanged; otherwise NaN exactly in the
    non-finite rows, and the other rows as the reference on the finite rows alone (the
    running statistics ignore a NaN row)."""
    draw = data.draw
    name = draw(st.sampled_from(list(ADAPTIVE_HEADS)))
    make, oracle = ADAPTIVE_HEADS[name]
    x, finite = draw(embeddings())
    n, d = x.shape
    c = draw(st.integers(1, 5))
    head = make(c, max(d, 1)).to(device, torch.float64)
    head.reduction = "none"
    y = labels(draw, n, -1, c)
    invalid = embedding_problems(x)
    if n == 0:
        invalid.add("embeddings")
    if y.dtype != torch.int64 or (n and (int(y.min()) < 0 or int(y.max()) >= c)):
        invalid.add("labels")
    if name == "adaface" and n == 1:
        invalid.add("2 rows")
    x, y = x.to(device), y.to(device)
    before = {key: value.clone() for key, value in head.state_dict().items()}

    def check(loss):
        assert torch.equal(loss.isnan().cpu(), ~finite)
        rows = finite.to(device)
        if name == "adaface" and int(rows.sum()) < 2:
            return  # no batch std from one row: the buffers stay as they were
        want = oracle(before, x[rows].double(), head.weight.double(), y[rows])
        torch.testing.assert_close(loss[rows].double(), want, rtol=2e-2, atol=2e-2)

    assert_policy(lambda: head(x, y), invalid, check,
                  state=lambda: tuple(value.clone() for value in head.state_dict().values()))


@given(data=st.data())
def test_metric_losses_and_miner(device, data):
    draw = data.draw
    x, finite = draw(embeddings(max_rows=6))
    n, d = x.shape
    y = torch.tensor([draw(st.integers(0, 2)) for _ in range(n)], dtype=torch.int64)
    y = y.to(draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32])))
    margin = draw(st.sampled_from([math.nan, math.inf, -0.1, 0.0, 0.2]))
    distance = draw(st.sampled_from(["euclidean", "squared_euclidean", "cosine", "manhattan"]))
    reducer = draw(st.sampled_from(["mean_nonzero", "mean", "sum", "avg"]))
    invalid = embedding_problems(x) - ({"embeddings"} if x.is_floating_point() and d > 0 else set())
    invalid |= flag("labels", y.is_floating_point())
    invalid |= flag("margin", not math.isfinite(margin))
    invalid |= flag("distance", distance == "manhattan")
    invalid |= flag("reducer", reducer == "avg")
    x, y = x.to(device), y.to(device)

    def loss_check(loss):
        if not bool(finite.all()):
            assert loss.isnan()
            return
        want = reference.triplet_margin_loss(x.double(), y.long(), margin=margin, distance=distance,
                                             reduction=reducer)
        torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)

    assert_policy(lambda: facekernels.TripletMarginLoss(margin, distance=distance, reducer=reducer)(x, y),
                  invalid, loss_check)
    contrastive_invalid = (invalid - {"margin"}) | flag("neg_margin", not math.isfinite(margin))

    def contrastive_check(loss):
        if not bool(finite.all()):
            assert loss.isnan()
            return
        want = reference.double_margin_contrastive_loss(x.double(), y.long(), neg_margin=margin,
                                                        distance=distance, reduction=reducer)
        torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)

    assert_policy(lambda: facekernels.ContrastiveLoss(neg_margin=margin, distance=distance, reducer=reducer)(x, y),
                  contrastive_invalid, contrastive_check)
    miner_invalid = invalid - {"reducer"}

    def miner_check(triplets):
        want = reference.mine_triplets(x.double(), y.long(), margin=margin, distance=distance) if n else triplets
        got = {t for t in zip(*(i.tolist() for i in triplets))}
        assert got == {t for t in zip(*(i.tolist() for i in want))} or x.dtype != torch.float64

    assert_policy(lambda: facekernels.TripletMiner(margin, distance=distance)(x, y), miner_invalid, miner_check)


@given(data=st.data())
def test_ring_loss_and_pair_contrastive(data):
    draw = data.draw
    x, finite = draw(embeddings())
    invalid = embedding_problems(x)
    if x.shape[0] == 0:
        invalid.add("embeddings")
    ring = facekernels.RingLoss(loss_weight=0.5)

    def ring_check(loss):  # elementwise: IEEE arithmetic, NaN in -> NaN out, inf -> inf
        want = reference.ring_loss(x.double(), ring.radius.double(), 0.5)
        torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2, equal_nan=True)

    assert_policy(lambda: ring(x), invalid, ring_check)
    y = torch.tensor([draw(st.integers(-1, 2)) for _ in range(x.shape[0])])
    margin = draw(st.sampled_from([math.nan, 1.0]))
    pair_invalid = {"emb1" if name == "embeddings" else name for name in invalid}
    pair_invalid |= flag("y", bool(((y < 0) | (y > 1)).any())) | flag("margin", math.isnan(margin))
    other = x.flip(0) if x.is_floating_point() else x

    def pair_check(loss):
        want = reference.pairwise_contrastive_loss(x.double(), other.double(), y, margin=margin)
        torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2, equal_nan=True)

    assert_policy(lambda: facekernels.contrastive_loss(x, other, y, margin=margin), pair_invalid, pair_check)


@given(data=st.data())
def test_verification_metrics(data):
    draw = data.draw
    n = draw(st.integers(0, 12))
    scores = torch.tensor([draw(st.sampled_from([-0.5, 0.1, 0.7, 0.9, math.nan, math.inf]))
                           for _ in range(n)], dtype=torch.float64)
    same = torch.tensor([draw(st.booleans()) for _ in range(n)], dtype=torch.bool)
    folds = draw(st.sampled_from([2, 3, math.nan, 2.5, 1, True]))
    invalid = flag("scores", n == 0 or not bool(scores.isfinite().all()))
    one_class = flag("same", n > 0 and (bool(same.all()) or not bool(same.any())))  # EER needs both
    fold_invalid = flag("folds", not (type(folds) is int and 2 <= folds <= max(n, 1) and folds <= n))

    def truth(threshold):  # accuracy at a threshold, from the definition
        return float(((scores >= threshold) == same).double().mean())

    def check_eer(eer):
        assert 0.0 <= eer <= 1.0

    assert_policy(lambda: facekernels.eval.equal_error_rate(scores, same), invalid | one_class, check_eer)
    assert_policy(lambda: facekernels.eval.best_threshold(scores, same), invalid,
                  lambda best: truth(best[0]) == pytest.approx(best[1]))
    assert_policy(lambda: facekernels.eval.kfold_accuracy(scores, same, folds=folds),
                  invalid | fold_invalid, lambda result: None)


@given(data=st.data())
def test_identification_refuses_non_finite_embeddings(data):
    draw = data.draw
    gallery, gallery_finite = draw(embeddings(min_rows=1))
    probes = torch.randn(3, gallery.shape[1], dtype=torch.float64)
    if draw(st.booleans()) and gallery.shape[1]:
        probes[draw(st.integers(0, 2)), 0] = math.nan
    gallery_labels = torch.arange(gallery.shape[0])
    probe_labels = torch.zeros(3, dtype=torch.int64)
    invalid = flag("gallery_emb", not gallery.is_floating_point() or gallery.shape[1] == 0
                   or not bool(gallery_finite.all()))
    invalid |= flag("probe_emb", not bool(probes.isfinite().all()))

    def check(accuracy):
        best = torch.nn.functional.normalize(probes, dim=1) @ \
            torch.nn.functional.normalize(gallery.double(), dim=1).t()
        assert accuracy == pytest.approx(float((gallery_labels[best.argmax(1)] == probe_labels).double().mean()))

    assert_policy(lambda: facekernels.eval.rank1_accuracy(gallery, gallery_labels, probes, probe_labels),
                  invalid, check)
    gallery_store = facekernels.eval.Gallery()
    enroll_invalid = {"embeddings" for name in invalid if name == "gallery_emb"}  # enroll's name
    assert_policy(lambda: gallery_store.enroll(gallery, gallery_labels), enroll_invalid,
                  lambda _: None, state=lambda: (len(gallery_store),))


@given(data=st.data())
def test_op_arguments_on_mixed_devices_and_dtypes(data):
    """Every op with some tensor arguments on meta among CPU ones, or one argument of
    another dtype: an error naming a moved argument (never uninitialized memory), or, for
    a dtype the op accepts, a result of the right shapes."""
    from test_devices import OPS
    draw = data.draw
    op = draw(st.sampled_from(sorted(OPS)))
    tensors, options = OPS[op]
    names = list(tensors)
    moved = draw(st.sets(st.sampled_from(names), max_size=len(names) - 1))
    retyped = draw(st.sampled_from([None] + names))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                  torch.int32, torch.int64, torch.bool]))
    args = {name: t.to("meta") if name in moved else t for name, t in tensors.items()}
    if retyped is not None:
        args[retyped] = args[retyped].to(dtype)
    call = lambda: getattr(torch.ops.facekernels, op)(**args, **options)  # noqa: E731
    if moved:
        with pytest.raises(ValueError, match="meta") as error:
            call()
        assert any(name in str(error.value) for name in moved), str(error.value)
        return
    try:
        out = call()
    except (ValueError, TypeError) as error:
        assert retyped in str(error), (retyped, dtype, str(error))
        return
    outputs = () if out is None else out if isinstance(out, (tuple, list)) else (out,)  # None: in place
    assert all(t.device.type == "cpu" for t in outputs)


# Compiled once each (fixed shapes: no recompilation), several in one process, as a program
# training two models would: (compiled module, its eager twin kept in lockstep).
COMPILED_HEADS = {
    "arcface_0.5": lambda: facekernels.ArcFaceLoss(5, 8, margin=0.5, scale=16.0, reduction="none"),
    "arcface_0.3": lambda: facekernels.ArcFaceLoss(5, 8, margin=0.3, scale=16.0, reduction="none"),
    "curricularface": lambda: facekernels.CurricularFaceLoss(5, 8, scale=16.0, reduction="none"),
    "adaface": lambda: facekernels.AdaFaceLoss(5, 8, scale=16.0, reduction="none"),
}
_compiled = {}


@given(data=st.data())
def test_compiled_heads_refuse_without_moving_state(data):
    """A compiled head's call: bad labels raise as in eager and leave the running buffers
    bitwise unchanged; good ones (NaN rows included) equal the eager twin, buffers too."""
    draw = data.draw
    name = draw(st.sampled_from(sorted(COMPILED_HEADS)))
    if name not in _compiled:
        eager = COMPILED_HEADS[name]()
        module = copy.deepcopy(eager)
        _compiled[name] = (module, torch.compile(module, fullgraph=True), eager)
    module, compiled, eager = _compiled[name]
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    for _ in range(draw(st.integers(0, 2))):
        x[draw(st.integers(0, 5)), draw(st.integers(0, 7))] = draw(st.sampled_from([math.nan, math.inf]))
    y = torch.tensor([draw(st.integers(-1, 5)) for _ in range(6)])
    invalid = flag("labels", bool(((y < 0) | (y > 4)).any()))

    def check(loss):
        want = eager(x, y)
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4, equal_nan=True)
        for (key, got), expected in zip(module.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=key)

    assert_policy(lambda: compiled(x, y), invalid, check,
                  state=lambda: tuple(value.clone() for value in module.state_dict().values()))


def _distributed_cases(rank, world, max_examples):
    """PartialFC and DistributedLossWrapper on a gloo group: every rank runs the same
    derandomized examples (the same draws), each rank corrupting its own input as drawn.
    Bad input on any rank: an error on every rank, PartialFC's weight and buffers bitwise
    unchanged. Otherwise PartialFC's loss equals the head on the global batch in one process
    (NaN iff a row is not finite), and the wrapper's the loss of the gathered batch."""
    from hypothesis import HealthCheck, settings
    from test_distributed import full_weight

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def case(data):
        draw = data.draw
        head_name = draw(st.sampled_from(["arcface", "curricularface", "adaface", "subcenter"]))
        make = {"arcface": lambda: facekernels.ArcFaceLoss(1, 4, scale=16.0),
                "curricularface": lambda: facekernels.CurricularFaceLoss(1, 4, scale=16.0),
                "adaface": lambda: facekernels.AdaFaceLoss(1, 4, scale=16.0),
                "subcenter": lambda: facekernels.SubCenterArcFaceLoss(1, 4, k=2, scale=16.0)}[head_name]
        classes = draw(st.integers(world, 7))
        head = PartialFC(make(), 4, classes, sample_rate=draw(st.sampled_from([1.0, 0.5]))).double()
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        x = torch.randn(world * 3, 4, generator=g, dtype=torch.float64) * 10
        y = torch.randint(0, classes, (world * 3,), generator=g)
        if draw(st.booleans()):
            x[draw(st.integers(0, world * 3 - 1)), 0] = math.nan  # valid: its own row is NaN
        bad_rank = draw(st.sampled_from([None, *range(world)]))
        problem = draw(st.sampled_from(["label", "float labels", "width", "dtype", "rows"]))
        mine, labels = x[rank * 3:(rank + 1) * 3], y[rank * 3:(rank + 1) * 3]
        if rank == bad_rank:
            mine, labels = {"label": (mine, labels.index_fill(0, torch.tensor([1]), classes)),
                            "float labels": (mine, labels.double()),
                            "width": (torch.cat([mine, mine[:, :1]], 1), labels),
                            "dtype": (mine.float(), labels),
                            "rows": (mine[:2], labels[:2])}[problem]
        before = [t.clone() for t in head.state_dict().values()]
        if bad_rank is not None:
            with pytest.raises((ValueError, TypeError)):
                head(mine, labels)
            assert all(torch.equal(a, b) for a, b in zip(before, head.state_dict().values()))
        else:
            loss = head(mine, labels)
            single = make().double()
            weight = full_weight(head)
            if head.sample_rate < 1:
                return  # sampled classes: test_distributed compares those
            want = single.loss(x, y, weight)
            assert bool(loss.isnan()) == bool(x.isnan().any())
            torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-9, equal_nan=True)
        # The wrapper takes any integer label and unequal local batch sizes.
        wrapper = DistributedLossWrapper(facekernels.TripletMarginLoss(margin=0.2))
        if bad_rank is not None and problem in ("float labels", "width", "dtype"):
            with pytest.raises((ValueError, TypeError)):
                wrapper(mine, labels)
        elif bad_rank is None and not x.isnan().any():
            want = facekernels.TripletMarginLoss(margin=0.2)(x, y)
            torch.testing.assert_close(wrapper(mine, labels) / world, want, rtol=1e-9, atol=1e-9)

    case()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_partial_fc_and_wrappers_over_gloo(tmp_path):
    from hypothesis import settings
    from test_distributed import run
    run(2, _distributed_cases, settings().max_examples, tmp_path=tmp_path, timeout=1800)
