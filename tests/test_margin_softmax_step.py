"""margin_softmax_forward_backward, the one-op step: the forward and the gradients of
grad_scale * sum_i loss_i from blocks of rows that each see every class. Against the
forward and backward ops on the same inputs, every margin kind and option, every dtype;
blocks of any size; the emulated CUDA step; and the losses' autograd around it (which
hands the gradients out only when the incoming gradient is theirs times a constant)."""

import pytest
import torch

import facekernels
import simt
from facekernels.ops import margin_softmax as ms
from margin_cases import (CASES, DTYPES, NAMES, N, C, arguments, bound,
                          forward_then_backward, inputs)
from test_margin_softmax import make_batch

ops = torch.ops.facekernels
# The step differs from the two ops only where its backward takes the forward's
# exponentials, exp(l - max) / sum for exp(l - max - log sum): a few roundings apart; in
# the order of some sums; and in its log of the sum (std::log per row, not ATen's vector
# log): within margin_cases.bound, as the vector epilogue against the scalar math.


def two_ops(options, x, w, y, g, grad_scale):
    """Forward, then backward with d/d log_sum = grad_scale, d/d target_logit = -grad_scale,
    every class in one chunk: the GEMMs of the step's one block."""

    def incoming(acc):
        grads = torch.full((N,), grad_scale, dtype=acc)
        return grads, -grads

    return forward_then_backward(options, x, w, y, g, incoming, chunk_size=C)


def step(options, x, w, y, g, grad_scale, block_rows=N):
    weight, head, extra, labels_in_range = arguments(options, x, w, y, g)
    return ops.margin_softmax_forward_backward(
        x, weight, y, *head[:-1], block_rows, labels_in_range=labels_in_range, grad_scale=grad_scale,
        margins_grad=True, **extra)


def normwise_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max()
            / expected.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_the_step_equals_forward_then_backward(case, dtype):
    options = CASES[case]
    one = step(options, *inputs(options, dtype, seed=1), grad_scale=0.25)
    both = two_ops(options, *inputs(options, dtype, seed=1), grad_scale=0.25)
    assert len(one) == len(both) == len(NAMES)
    for name, a, b in zip(NAMES, one, both):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name in ("row_max", "target_logit", "best_cosine", "predicted"):
            assert torch.equal(a, b), name  # the same forward epilogue on the same z
            continue
        if a.numel() == 0:
            continue
        assert normwise_error(a, b) <= bound(a.dtype), name
    assert one[NAMES.index("grad_weight")].abs().sum() > 0


@pytest.mark.parametrize("case", ["arcface", "sub_centers", "rows", "per_row_margins", "curricularface",
                                  "unnormalized_embeddings"])
def test_blocks_of_any_size_give_the_one_block_result(case):
    """Each row's outputs come from its own block's GEMM: blocks only reorder the weight
    gradient's sums (and a GEMM of other rows may round z otherwise, which the targets at a
    cosine of 1 would amplify: none here)."""
    options = CASES[case]
    whole = step(options, *inputs(options, torch.float64, seed=2, special_targets=False), grad_scale=1.0)
    for block_rows in (1, 5, 16, N - 1, 10 * N):
        blocks = step(options, *inputs(options, torch.float64, seed=2, special_targets=False),
                      grad_scale=1.0, block_rows=block_rows)
        for name, a, b in zip(NAMES, blocks, whole):
            assert a.shape == b.shape, name
            if a.numel():
                assert normwise_error(a, b) <= 1e-13, (name, block_rows)


@pytest.mark.skipif(not simt.enabled, reason="needs the SIMT emulation (FACEKERNELS_SIMT=0)")
@pytest.mark.parametrize("case", ["arcface", "sub_centers", "rows", "per_row_margins", "curricularface",
                                  "sphereface"])
def test_the_emulated_cuda_step_is_its_forward_then_backward(simt_library, case):
    """On a GPU the step runs the two epilogues one after the other on each block: the
    outputs of the two ops, bit for bit."""
    options = CASES[case]
    with simt.routed(simt.seed_for(f"step-{case}")):
        one = step(options, *inputs(options, torch.float32, seed=3), grad_scale=0.5)
        both = two_ops(options, *inputs(options, torch.float32, seed=3), grad_scale=0.5)
    for name, a, b in zip(NAMES, one, both):
        assert torch.equal(a, b), name


def test_block_rows_must_be_positive():
    x, w, y = make_batch(4, 8, 10, "cpu")
    with pytest.raises(ValueError, match="block_rows must be positive"):
        ops.margin_softmax_forward_backward(x, w, y, 64.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 0)


def test_opcheck():
    x, w, y = make_batch(6, 8, 10, "cpu", torch.float64)
    m2 = torch.rand(6, dtype=torch.float64)
    torch.library.opcheck(
        ops.margin_softmax_forward_backward,
        (x, w, y, 16.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 4),
        dict(row_m2=m2, grad_scale=0.5, margins_grad=True, embeddings_grad=False),
    )


# The losses' autograd.


def block_rows_as(monkeypatch, rows):
    """The step with blocks of `rows`, or (0) the forward and backward ops, for every loss."""
    monkeypatch.setattr(ms, "_block_rows", lambda *args: rows)


def backward_ops_called(monkeypatch):
    calls = []
    original = ms._backward
    monkeypatch.setattr(ms, "_backward", lambda *args: calls.append(1) or original(*args))
    return calls


def gradients(loss_fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    loss = loss_fn(*tensors)
    return loss.detach(), torch.autograd.grad(loss, tensors)


def arcface(reduction="mean"):
    return lambda x, w: facekernels.margin_softmax_loss(x, w, LABELS, m2=0.5, scale=16.0,
                                                        reduction=reduction)


X, W, LABELS = make_batch(12, 8, 40, "cpu", torch.float64)
ROW_WEIGHTS = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)

# name -> (loss of (x, w), whether the step's gradients serve it as they are, scaled, or not)
LOSSES = {
    "mean": (arcface("mean"), "as they are"),
    "sum": (arcface("sum"), "as they are"),
    "none, summed": (lambda x, w: arcface("none")(x, w).sum(), "as they are"),
    "mean, scaled": (lambda x, w: 3.0 * arcface("mean")(x, w), "scaled"),
    "none, averaged": (lambda x, w: arcface("none")(x, w).mean(), "scaled"),
    "none, weighted": (lambda x, w: arcface("none")(x, w) @ ROW_WEIGHTS, "recomputed"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_losses_gradients_whichever_way_they_come(monkeypatch, name):
    loss_fn, way = LOSSES[name]
    block_rows_as(monkeypatch, 0)
    expected_loss, expected = gradients(loss_fn, (X, W))
    block_rows_as(monkeypatch, 5)
    calls = backward_ops_called(monkeypatch)
    loss, grads = gradients(loss_fn, (X, W))
    assert len(calls) == (way == "recomputed")
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=0)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_graph_kept_for_a_second_backward_recomputes(monkeypatch):
    block_rows_as(monkeypatch, 5)
    calls = backward_ops_called(monkeypatch)
    x, w = X.clone().requires_grad_(), W.clone().requires_grad_()
    loss = arcface()(x, w)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w))
    assert len(calls) == 1  # the precomputed gradients are handed out once
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wanted", ["embeddings", "weight"])
def test_only_the_wanted_gradient(monkeypatch, wanted):
    block_rows_as(monkeypatch, 5)
    x, w = X.clone().requires_grad_(wanted == "embeddings"), W.clone().requires_grad_(wanted == "weight")
    arcface()(x, w).backward()
    block_rows_as(monkeypatch, 0)
    x0, w0 = X.clone().requires_grad_(wanted == "embeddings"), W.clone().requires_grad_(wanted == "weight")
    arcface()(x0, w0).backward()
    for t, t0 in ((x, x0), (w, w0)):
        assert (t.grad is None) == (t0.grad is None)
        if t.grad is not None:
            torch.testing.assert_close(t.grad, t0.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("head", ["AdaFace", "MagFace", "CurricularFace", "SubCenterArcFace"])
def test_the_adaptive_heads_take_the_step(monkeypatch, head):
    """Their per-row margins (AdaFace, MagFace) get their gradients from the step too."""
    torch.manual_seed(0)
    module = getattr(facekernels, head + "Loss")(40, 8).double()
    x = (torch.randn(12, 8, dtype=torch.float64) * 3).requires_grad_()
    results = []
    for rows in (5, 0):
        block_rows_as(monkeypatch, rows)
        trial = module.__class__(40, 8).double()
        trial.load_state_dict(module.state_dict())
        x.grad = None
        loss = trial(x, LABELS)
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), trial.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_under_autocast_the_step_keeps_an_fp32_weight_gradient(monkeypatch):
    x, w = X.float(), W.float()
    results = []
    for rows in (5, 0):
        block_rows_as(monkeypatch, rows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(gradients(arcface(), (x, w)))
    (loss, grads), (loss0, grads0) = results
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0)
    for a, b in zip(grads, grads0):  # bf16 GEMMs over other blocks of rows
        assert normwise_error(a, b) <= torch.finfo(torch.bfloat16).eps


def test_block_rows():
    """Blocks of equal rows whose logits fit the budget (16 MiB; or up to D rows, no more
    numbers than the weight rows seen, within 256 MiB; a given chunk's N x chunk), only on a
    CPU, and only as many rows as pay for the GEMMs."""
    x = torch.empty(256, 4)  # D = 4: the 16 MiB alone
    assert ms._block_rows(x, 20_000, None) == 128  # 2 blocks of 16 MiB at most
    assert ms._block_rows(x, 1_000, None) == 256
    assert ms._block_rows(x, 50_000, None) == 0  # 83 rows: too thin
    assert ms._block_rows(x, 100_000, None) == 0
    assert ms._block_rows(x, 20_000, 10_000) == 128  # N x chunk = 2.56 M logits: 128 rows
    assert ms._block_rows(x, 20_000, 2_000) == 0  # N x chunk = 512 K logits: 25 rows
    assert ms._block_rows(x[:10], 1_000_000, None) == 0
    assert ms._block_rows(x[:3], 1_000_000, None) == 3  # 4 rows fit, and a block holds all 3
    assert ms._block_rows(x, 0, None) == 0
    assert ms._block_rows(torch.empty(256, 128), 100_000, None) == 128  # 51 MB, as the weight
    assert ms._block_rows(torch.empty(256, 512), 200_000, None) == 256  # 205 MB
    assert ms._block_rows(torch.empty(256, 512), 400_000, None) == 128  # 167 rows in 256 MiB
    assert ms._block_rows(torch.empty(256, 512), 1_000_000, None) == 0  # 64 rows in 256 MiB
    assert ms._block_rows(torch.empty(300, 512), 20_000, None) == 300  # max(209, 512) rows
    assert ms._block_rows(torch.empty(256, 64), 100_000, None) == 0  # 64 rows: too thin
    assert ms._block_rows(torch.empty(256, 512), 100_000, 1_000) == 0  # the chunk bounds it
    assert ms._block_rows(x.to("meta"), 1_000, None) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_incoming_gradient_read_as_a_multiple_of_the_steps(dtype):
    """A mean's gradient 1/N arrives rounded to the dtype, as the step's grad_scale was: the
    gradients then go out as they are (ratio 1), with no pass to rescale them."""
    mean = torch.full((12,), 1 / 12, dtype=dtype)
    assert ms._ratio_to(1 / 12, mean, -mean) == 1
    assert ms._ratio_to(1 / 12, 3 * mean, -3 * mean) == pytest.approx(3.0, rel=1e-6)
    assert ms._ratio_to(1.0, mean, -mean) == pytest.approx(1 / 12, rel=1e-6)
    uneven = mean.clone()
    uneven[5] *= 2
    assert ms._ratio_to(1 / 12, uneven, -uneven) is None
    assert ms._ratio_to(1 / 12, mean, -uneven) is None
    assert ms._ratio_to(1 / 12, mean, None) is None
