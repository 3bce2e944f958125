import math

import pytest
import torch

import facekernels
from facekernels import reference
from facekernels.ops import margin_softmax as margin_softmax_module
from facekernels.ops.margin_softmax import COMBINED, margin_softmax_rows
from conftest import assert_argmax, assert_close, assert_no_worse_than_reference


def make_batch(n, dim, num_classes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[0], labels[-1] = 0, num_classes - 1  # the first and the last class
    return x.to(device, dtype), weight.to(device, dtype), labels.to(device)


# name -> (facekernels call, reference call); both take (x, w, y, **options).
def combined(m1, m2, m3, scale=64.0):
    def fused(x, w, y, **kw):
        return facekernels.margin_softmax_loss(x, w, y, scale=scale, m1=m1, m2=m2, m3=m3, **kw)

    def oracle(x, w, y, **kw):
        return reference.margin_softmax_loss(x, w, y, scale=scale, m1=m1, m2=m2, m3=m3, **kw)

    return fused, oracle


def sphere(margin, lambda_):
    def fused(x, w, y, **kw):
        return facekernels.sphereface_loss(x, w, y, margin=margin, lambda_=lambda_, **kw)

    def oracle(x, w, y, **kw):
        return reference.sphereface_loss(x, w, y, margin=margin, lambda_=lambda_, **kw)

    return fused, oracle


MARGINS = {
    "arcface": combined(1.0, 0.5, 0.0),
    "cosface": combined(1.0, 0.0, 0.35),
    "combined": combined(1.2, 0.3, 0.1),
    "softmax_on_sphere": combined(1.0, 0.0, 0.0, scale=30.0),
    "sphereface": sphere(4, 5.0),
    "sphereface_m2": sphere(2, 0.0),
}


def run(fn, x, w, y, grad_seed=1, **kw):
    """Loss and the gradients of a random weighting of it (so 'none' is covered)."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, y, **kw)
    g = torch.Generator().manual_seed(grad_seed)
    weights = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype)
    gx, gw = torch.autograd.grad((loss * weights).sum(), (x, w))
    return loss, gx, gw


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("gradient", ["exact", "detached"])
@pytest.mark.parametrize("normalize_embeddings", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, margin, gradient, normalize_embeddings, reduction, dtype):
    fused, oracle = MARGINS[margin]
    x, w, y = make_batch(37, 24, 300, device, torch.float64)  # 300 classes: 128 + 128 + 44
    options = dict(gradient=gradient, normalize_embeddings=normalize_embeddings, reduction=reduction)
    truth = run(oracle, x, w, y, **options)
    got = run(fused, x.to(dtype), w.to(dtype), y, chunk_size=128, **options)
    if dtype == torch.float64:
        for a, t in zip(got, truth):
            assert_close(a, t)
    else:
        # With s = 64 the logits amplify fp32 rounding; the fair bar is the reference's own
        # fp32 error against the fp64 truth.
        ref = run(oracle, x.to(dtype), w.to(dtype), y, **options)
        for a, r, t in zip(got, ref, truth):
            assert_no_worse_than_reference(a, r, t)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunk_size_does_not_change_the_result(device, chunk_size):
    x, w, y = make_batch(19, 16, 50, device, torch.float64)
    got = run(MARGINS["arcface"][0], x, w, y, chunk_size=chunk_size)
    expected = run(MARGINS["arcface"][1], x, w, y)
    for a, b in zip(got, expected):
        assert_close(a, b)


@pytest.mark.parametrize("module, oracle", [
    (lambda: facekernels.SoftmaxLoss(40, 12), lambda x, w, y: reference.softmax_cross_entropy(x, w, y)),
    (lambda: facekernels.L2SoftmaxLoss(40, 12, alpha=16.0),
     lambda x, w, y: reference.l2_softmax_loss(x, w, y, alpha=16.0)),
    (lambda: facekernels.ArcFaceLoss(40, 12, margin=0.5),
     lambda x, w, y: reference.arcface_loss(x, w, y, margin=0.5)),
    (lambda: facekernels.CosFaceLoss(40, 12, margin=0.35),
     lambda x, w, y: reference.cosface_loss(x, w, y, margin=0.35)),
    (lambda: facekernels.CombinedMarginLoss(40, 12, m1=1.0, m2=0.3, m3=0.2),
     lambda x, w, y: reference.margin_softmax_loss(x, w, y, m2=0.3, m3=0.2)),
], ids=["softmax", "l2softmax", "arcface", "cosface", "combined"])
def test_modules_match_reference(device, module, oracle):
    head = module().to(device, torch.float64)
    with torch.no_grad():
        head.weight.normal_()
    x, _, y = make_batch(33, 12, 40, device, torch.float64)
    x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = head.weight.detach().clone().requires_grad_()
    expected = oracle(x_ref, w_ref, y)
    expected.backward()
    assert_close(loss, expected)
    assert_close(x.grad, x_ref.grad)
    assert_close(head.weight.grad, w_ref.grad)
    # get_logits: the margin-free logits whose softmax CE is the zero-margin loss.
    logits = head.get_logits(x.detach())
    assert logits.shape == (33, 40)
    assert_argmax(head(x.detach(), y, return_predictions=True)[1], logits)


def test_sphereface_module_anneals_lambda():
    head = facekernels.SphereFaceLoss(10, 8, margin=4, lambda_base=1000.0, lambda_gamma=0.12,
                                      lambda_power=1.0, lambda_min=5.0).double()
    x, _, y = make_batch(6, 8, 10, "cpu", torch.float64)
    assert head.current_lambda() == 1000.0
    head(x, y)
    assert head.iteration == 1 and head.current_lambda() == pytest.approx(1000.0 / 1.12)
    head.eval()
    loss = head(x, y)
    assert head.iteration == 1  # evaluation does not advance the schedule
    expected = reference.sphereface_loss(x, head.weight, y, margin=4, lambda_=1000.0 / 1.12)
    assert_close(loss, expected)
    head.iteration = 10**6
    assert head.current_lambda() == 5.0
    restored = facekernels.SphereFaceLoss(10, 8)
    restored.load_state_dict(head.state_dict())
    assert restored.iteration == 10**6


def test_gradcheck_fp64():
    x, w, y = make_batch(5, 4, 6, "cpu", torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    for margin in ("arcface", "combined", "sphereface"):
        fused = MARGINS[margin][0]
        assert torch.autograd.gradcheck(
            lambda x, w: fused(x, w, y, chunk_size=4, reduction="none"), (x, w)
        )
    assert torch.autograd.gradcheck(
        lambda x, w: facekernels.margin_softmax_loss(
            x, w, y, m2=0.4, normalize_embeddings=False, scale=2.0, chunk_size=5), (x, w)
    )


def test_theta_near_zero_and_near_pi(device):
    # Rows exactly on (or opposite to) their class: cos = +-1 where the arccos derivative
    # is unbounded. Row 1 also sits past pi - m2, where ArcFace's fallback applies.
    w = torch.eye(3, 4, dtype=torch.float64, device=device)
    x = torch.tensor([[2.0, 0, 0, 0], [-1.0, 1e-9, 0, 0], [0, -1.0, 0.01, 0], [0, 0, 1.0, 1e-7]],
                     dtype=torch.float64, device=device)
    y = torch.tensor([0, 0, 1, 2], device=device)
    for margin in MARGINS:
        for gradient in ("exact", "detached"):
            got = run(MARGINS[margin][0], x, w, y, gradient=gradient, reduction="none")
            expected = run(MARGINS[margin][1], x, w, y, gradient=gradient, reduction="none")
            for a, b in zip(got, expected):
                assert torch.isfinite(a).all()
                assert_close(a, b)


def test_hand_worked_arcface(device):
    # Two classes along the axes, one row at 60 degrees from class 0, s = 1, m = 30 degrees:
    # target logit cos(90 deg) = 0, other logit cos(30 deg) = sqrt(3)/2, so the loss is
    # log(1 + e^{sqrt(3)/2}) and the predicted class (margin-free) is class 1.
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    x = torch.tensor([[0.5, math.sqrt(3) / 2]], dtype=torch.float64, device=device)
    y = torch.tensor([0], device=device)
    loss, predicted = facekernels.margin_softmax_loss(
        x, w, y, scale=1.0, m2=math.pi / 6, return_predictions=True
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(math.sqrt(3) / 2)), rel=1e-12)
    assert predicted.tolist() == [1]


def test_predictions_are_the_argmax_of_the_cosines(device):
    x, w, y = make_batch(50, 16, 333, device)
    _, predicted = facekernels.margin_softmax_loss(x, w, y, chunk_size=100, return_predictions=True)
    cosines = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).t()
    assert_argmax(predicted, cosines)


def test_class_shards_combine_to_the_whole(device):
    """The forward serves a class-sharded caller: per-shard log-sum-exp, labels of other
    shards give no target logit, and merging shards reproduces the single-weight loss."""
    x, w, y = make_batch(20, 8, 90, device, torch.float64)
    op = torch.ops.facekernels.margin_softmax_forward
    args = (64.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 16)
    lse_parts, target_parts = [], []
    for start in (0, 40):
        shard = w[start:start + 50] if start == 40 else w[:40]
        row_max, log_sum, target = op(x, shard, y - start, *args, labels_in_range=False)[:3]
        lse_parts.append(row_max + log_sum)
        target_parts.append(target)
    loss = torch.logsumexp(torch.stack(lse_parts), 0) - sum(target_parts)
    expected = reference.margin_softmax_loss(x, w, y, m2=0.5, reduction="none")
    assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"labels must be int64 with values in \[0, 40\)"):
        op(x, w[:40], y, *args)  # a whole weight: labels are checked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_no_worse_than_reference(device, dtype):
    x, w, y = make_batch(64, 32, 500, device, torch.float64)
    fused, oracle = MARGINS["arcface"]
    truth = run(oracle, x, w, y, reduction="none")
    got = run(fused, x.to(dtype), w.to(dtype), y, reduction="none")
    ref = run(oracle, x.to(dtype), w.to(dtype), y, reduction="none")
    assert got[0].dtype == torch.float32  # the loss accumulates in fp32
    for a, b, t in zip(got, ref, truth):
        assert_no_worse_than_reference(a, b, t)


def test_autocast_runs_bf16_gemms_and_keeps_fp32_gradients(device):
    head = facekernels.ArcFaceLoss(200, 32).to(device)
    x, _, y = make_batch(16, 32, 200, device)
    x.requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = head(x, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    x_ref = x.detach().clone().requires_grad_()
    w_ref = head.weight.detach().clone().requires_grad_()
    truth = reference.arcface_loss(x_ref.double(), w_ref.double(), y)
    truth.backward()
    assert abs(loss.item() - truth.item()) < 0.05 * abs(truth.item())
    cos = torch.nn.functional.cosine_similarity
    assert cos(head.weight.grad.flatten(), w_ref.grad.flatten().float(), dim=0) > 0.99
    assert cos(x.grad.flatten(), x_ref.grad.flatten().float(), dim=0) > 0.99


def test_bitwise_deterministic(device):
    x, w, y = make_batch(128, 64, 3000, device)
    first = run(MARGINS["arcface"][0], x, w, y, chunk_size=512)
    for _ in range(2):
        again = run(MARGINS["arcface"][0], x, w, y, chunk_size=512)
        for a, b in zip(again, first):
            assert torch.equal(a, b)


def test_nan_embeddings_do_not_give_a_finite_loss(device):
    x, w, y = make_batch(8, 6, 20, device)
    x[3, 2] = float("nan")
    losses = facekernels.margin_softmax_loss(x, w, y, reduction="none")
    assert torch.isnan(losses[3])
    assert not torch.isfinite(facekernels.margin_softmax_loss(x, w, y))
    x[3, 2] = float("inf")
    assert not torch.isfinite(facekernels.margin_softmax_loss(x, w, y))


def test_opcheck(device):
    x, w, y = make_batch(9, 8, 21, device)
    options = (64.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 8)
    torch.library.opcheck(
        torch.ops.facekernels.margin_softmax_forward.default,
        (x.requires_grad_(), w.requires_grad_(), y, *options),
    )
    row_max, log_sum = torch.rand(9, device=device) + 3, torch.rand(9, device=device)
    for embeddings_grad, weight_grad in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.facekernels.margin_softmax_backward.default,
            (torch.rand(9, device=device), -torch.rand(9, device=device), x.detach(), w.detach(),
             y, row_max, log_sum, *options, embeddings_grad, weight_grad),
        )


# (classes, chunk_size, extra op arguments): one chunk; several, the last one short; K
# sub-centers; sampled rows (their last chunk counts rows, not the weight's rows); none.
LAST_CHUNK_CASES = {
    "one_chunk": (21, 32, {}),
    "last_chunk_short": (21, 8, {}),
    "sub_centers": (24, 3, dict(sub_centers=3)),
    "rows": (30, 4, dict(rows=torch.tensor([1, 4, 5, 9, 13, 20, 21, 29]))),
    "no_rows": (30, 4, dict(rows=torch.zeros(0, dtype=torch.long))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LAST_CHUNK_CASES))
def test_the_forwards_last_chunk_spares_the_backward_a_gemm(device, case, dtype):
    # The backward fed the forward's last z equals the backward that runs that GEMM again,
    # bit for bit (the same GEMM on the same operands), and leaves the saved z as it was.
    num_classes, chunk_size, extra = LAST_CHUNK_CASES[case]
    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    k = extra.get("sub_centers", 1)
    classes = len(extra["rows"]) if "rows" in extra else num_classes // k
    x, w, y = make_batch(9, 8, num_classes, device, dtype)
    y = torch.remainder(y, max(classes, 1))
    options = (16.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, chunk_size)
    ops = torch.ops.facekernels
    row_max, log_sum, *_, last = ops.margin_softmax_forward(
        x, w, y, *options, labels_in_range="rows" not in extra, **extra)
    last_classes = classes - (classes - 1) // chunk_size * chunk_size if classes else 0
    assert last.dtype == x.dtype and last.shape == (9, last_classes * k)
    kept = last.clone()
    grads = [torch.rand(9, device=device, dtype=log_sum.dtype) for _ in range(2)]
    backward = [
        ops.margin_softmax_backward(*grads, x, w, y, row_max, log_sum, *options, last_logits=z, **extra)
        for z in (last, None)
    ]
    for saved, recomputed in zip(*backward):
        assert torch.equal(saved, recomputed)
    assert torch.equal(last, kept)
    if classes:  # and the backward does read it: another z, other gradients
        other = ops.margin_softmax_backward(*grads, x, w, y, row_max, log_sum, *options,
                                            last_logits=torch.zeros_like(last), **extra)
        assert not torch.equal(other[0], backward[1][0])


@pytest.mark.parametrize("chunk_size, kept", [(30, True), (8, False)])
def test_autograd_keeps_the_logits_of_a_single_chunk_only(device, chunk_size, kept, monkeypatch):
    # One chunk: the backward gets the forward's z and runs no logits GEMM. Several: it
    # recomputes them all, and nothing N x chunk is held between forward and backward.
    # (The forward and backward ops, as a GPU runs them: not the CPU's one-op step.)
    monkeypatch.setattr(margin_softmax_module, "_block_rows", lambda *args: 0)
    from torch.utils._python_dispatch import TorchDispatchMode
    backward_op = torch.ops.facekernels.margin_softmax_backward.default
    position = [a.name for a in backward_op._schema.arguments].index("last_logits")
    passed = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is backward_op:
                passed.append(len(args) > position and args[position] is not None)
            return func(*args, **(kwargs or {}))

    x, w, y = make_batch(10, 8, 30, device)
    x.requires_grad_(), w.requires_grad_()
    with Record():
        facekernels.margin_softmax_loss(x, w, y, m2=0.5, chunk_size=chunk_size).backward()
    assert passed == [kept]


def test_a_second_backward_through_the_same_graph_gives_the_same_gradients(device):
    x, w, y = make_batch(10, 8, 30, device)
    x.requires_grad_(), w.requires_grad_()
    loss = facekernels.margin_softmax_loss(x, w, y, m2=0.5, chunk_size=8)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("last, message", [
    (lambda z: z[:, :-1], r"last_logits must be the forward's, Float of shape \[9, 5\]"),
    (lambda z: z.double(), "last_logits must be the forward's"),
    (lambda z: z[:-1], "last_logits must be the forward's"),
])
def test_a_foreign_last_chunk_is_an_error(last, message):
    x, w, y = make_batch(9, 8, 21, "cpu")
    options = (16.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 8)
    ops = torch.ops.facekernels
    row_max, log_sum, *_, z = ops.margin_softmax_forward(x, w, y, *options)
    with pytest.raises(ValueError, match=message):
        ops.margin_softmax_backward(torch.rand(9), torch.rand(9), x, w, y, row_max, log_sum, *options,
                                    last_logits=last(z))


def test_a_frozen_input_still_gets_the_other_gradient(device):
    x, w, y = make_batch(10, 8, 30, device, torch.float64)
    both_x, both_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    facekernels.margin_softmax_loss(both_x, both_w, y, m2=0.5).backward()
    x_only = x.clone().requires_grad_()
    facekernels.margin_softmax_loss(x_only, w, y, m2=0.5).backward()
    w_only = w.clone().requires_grad_()
    facekernels.margin_softmax_loss(x, w_only, y, m2=0.5).backward()
    assert torch.equal(x_only.grad, both_x.grad)
    assert torch.equal(w_only.grad, both_w.grad)


def test_a_direct_call_of_the_op_differentiates_as_the_losses_do(device):
    """The losses reach the op through their own autograd.Function; a direct call through
    the wrapper of register_autograd, which gets the arguments with trailing defaults
    dropped. One setup_context and one backward: the same gradients, per-row margins too."""
    x, w, y = make_batch(10, 8, 30, device, torch.float64)
    m2 = torch.rand(10, dtype=torch.float64, device=device)
    options = dict(kind=COMBINED, scale=16.0, m1=1.0, m2=0.0, m3=0.0, sphere_lambda=0.0,
                   gradient="exact", normalize_embeddings=True, normalize_weight=True,
                   chunk_size=8)
    gradients = []
    for direct in (False, True):
        inputs = [t.detach().clone().requires_grad_() for t in (x, w, m2)]
        if direct:
            outputs = torch.ops.facekernels.margin_softmax_forward(
                inputs[0], inputs[1], y, 16.0, 1.0, 0.0, 0.0, 0.0, COMBINED, True, True, True, 8,
                row_m2=inputs[2])
        else:
            outputs = margin_softmax_rows(inputs[0], inputs[1], y, row_m2=inputs[2], **options)
        row_max, log_sum, target = outputs[:3]
        loss = (log_sum + row_max - target) @ torch.linspace(0.5, 1.5, 10, dtype=torch.float64, device=device)
        gradients.append(torch.autograd.grad(loss, inputs))
    for via_loss, direct in zip(*gradients):
        assert torch.equal(via_loss, direct)
    assert gradients[0][2].abs().sum() > 0  # the margins' gradient flows on both paths


def test_a_backward_buffer_grown_in_inference_mode_serves_later_calls():
    """The CPU backward keeps its buffer per thread between calls. When a call in inference
    mode is the one that allocates it, later calls outside that mode must still write to it."""
    op = torch.ops.facekernels.margin_softmax_backward
    for dtype, n, classes in ((torch.float32, 2, 3), (torch.float64, 64, 49152)):
        # The fp32 call first: the fp64 one after it allocates the buffer anew (25 MB).
        x, w, y = make_batch(n, 4, classes, "cpu", dtype)
        options = (16.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, classes)
        row_max, log_sum = torch.ops.facekernels.margin_softmax_forward(x, w, y, *options)[:2]
        grads = (torch.ones(n, dtype=dtype), -torch.ones(n, dtype=dtype))
        with torch.inference_mode():
            inferred = op(*grads, x, w, y, row_max, log_sum, *options)
    ordinary = op(*grads, x, w, y, row_max, log_sum, *options)
    for a, b in zip(inferred, ordinary):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    head = facekernels.ArcFaceLoss(100, 16, chunk_size=32).to(device)
    compiled = torch.compile(head, fullgraph=True)
    x, _, y = make_batch(12, 16, 100, device)
    for step in range(2):
        xe, xc = (x + step).requires_grad_(), (x + step).requires_grad_()
        eager_loss = head(xe, y)
        (eager_w,) = torch.autograd.grad(eager_loss, [head.weight], retain_graph=True)
        eager_loss.backward()
        compiled_loss = compiled(xc, y)
        (compiled_w,) = torch.autograd.grad(compiled_loss, [head.weight], retain_graph=True)
        compiled_loss.backward()
        assert_close(compiled_loss, eager_loss)
        assert_close(xc.grad, xe.grad)
        assert_close(compiled_w, eager_w)


def test_two_compiled_heads_in_one_process(device):
    """A second head with another margin made dynamo see the margin as a symbolic float,
    which the margin check could not trace ("torch.* op returned non-Tensor"). So did
    AdaFace after CurricularFace."""
    torch._dynamo.reset()
    x, _, y = make_batch(12, 16, 30, device)
    heads = [facekernels.ArcFaceLoss(30, 16, margin=0.5), facekernels.ArcFaceLoss(30, 16, margin=0.3),
             facekernels.CurricularFaceLoss(30, 16), facekernels.AdaFaceLoss(30, 16)]
    for head in heads:
        head.to(device).eval()  # eval: the adaptive heads' running state stays put
        assert_close(torch.compile(head, fullgraph=True)(x, y), head(x, y))
    torch._dynamo.reset()


def test_compiled_bad_label_raises_as_in_eager(device):
    # The range check lives in the op's C++ forward, so a compiled graph runs it too.
    torch._dynamo.reset()
    x, w, y = make_batch(6, 8, 10, device)
    compiled = torch.compile(facekernels.margin_softmax_loss, fullgraph=True)
    assert torch.isfinite(compiled(x, w, y))
    y[2] = 10
    with pytest.raises(ValueError, match=r"labels must be int64 with values in \[0, 10\), got max 10"):
        compiled(x, w, y)


def test_meta_inputs_infer_shapes():
    x, w, y = (t.to("meta") for t in make_batch(6, 8, 10, "cpu"))
    loss, predicted = facekernels.margin_softmax_loss(x, w, y, reduction="none", return_predictions=True)
    assert loss.shape == (6,) and predicted.shape == (6,) and loss.device.type == "meta"


def test_huge_fp32_norms_are_normalized_not_zeroed(device):
    # |x| >= 1.8e19 overflows an fp32 sum of squares; the loss is scale-free when normalized.
    x, w, y = make_batch(6, 8, 10, device, torch.float32)
    huge = facekernels.margin_softmax_loss(x * 1e20, w, y, reduction="none")
    assert_close(huge, facekernels.margin_softmax_loss(x, w, y, reduction="none"))
    # The weight's rows too, in every chunk, and the target cosines of the adaptive heads.
    scale = torch.where(torch.arange(10, device=device) % 3 == 0, 1e20, 1.0)[:, None]
    for loss in (lambda w: facekernels.margin_softmax_loss(x, w, y, reduction="none", chunk_size=4),
                 lambda w: facekernels.CurricularFaceLoss(10, 8, scale=16.0, reduction="none").to(device).loss(x, y, w)):
        assert_close(loss(w * scale), loss(w))


@pytest.mark.parametrize("factor", [1e6, 1e-6])
def test_fp16_weight_rows_outside_half_range_are_normalized_first(device, factor):
    # The GEMM runs in the embeddings' fp16: weight rows of 1e6 (inf in half) or 1e-6
    # (subnormal) must be normalized before the cast, so the loss and the embeddings'
    # gradient are those of the unscaled weight, and the weight's gradient scales by 1/factor.
    x, w, y = make_batch(6, 8, 10, device, torch.float32)
    want = run(lambda x, w, y: facekernels.margin_softmax_loss(x.half(), w, y, scale=16.0, m2=0.5), x, w, y)
    got = run(lambda x, w, y: facekernels.margin_softmax_loss(x.half(), w, y, scale=16.0, m2=0.5), x, w * factor, y)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2] * factor, want[2], rtol=2e-2, atol=2e-3)


BAD_INPUTS = [
    ("label >= C", lambda x, w, y: (x, w, y.index_fill(0, torch.tensor([2], device=y.device), 21)),
     ValueError, r"labels must be int64 with values in \[0, 21\), got max 21"),
    ("label < 0", lambda x, w, y: (x, w, y.index_fill(0, torch.tensor([2], device=y.device), -3)),
     ValueError, r"values in \[0, 21\), got min -3"),
    ("D mismatch", lambda x, w, y: (x, w[:, :-1], y), ValueError, r"weight must have shape \[num_classes, 8\]"),
    ("1-D weight", lambda x, w, y: (x, w[0], y), ValueError, "weight must have shape"),
    ("3-D embeddings", lambda x, w, y: (x[None], w, y), ValueError, "embeddings must be 2-D"),
    ("int embeddings", lambda x, w, y: (x.long(), w, y), TypeError, "embeddings must be a floating-point"),
    ("int32 labels", lambda x, w, y: (x, w, y.int()), TypeError, "labels must be int64"),
    ("labels too long", lambda x, w, y: (x, w, torch.cat([y, y[:1]])), ValueError, r"labels must have shape \[9\]"),
    ("empty batch", lambda x, w, y: (x[:0], w, y[:0]), ValueError, "at least one row"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_clear_error(device, case):
    _, mutate, error, message = case
    x, w, y = mutate(*make_batch(9, 8, 21, device))
    with pytest.raises(error, match=message):
        facekernels.margin_softmax_loss(x, w, y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(gradient="straight"), "gradient must be one of"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(scale=-1.0), "scale must be a finite number"),
    (dict(scale=float("inf")), "scale must be a finite number"),
    (dict(m2=float("nan")), "m2 must be a finite number"),
])
def test_bad_options_are_errors(kwargs, message):
    x, w, y = make_batch(4, 3, 5, "cpu")
    with pytest.raises(ValueError, match=message):
        facekernels.margin_softmax_loss(x, w, y, **kwargs)


def test_op_checks_its_inputs_too():
    x, w, y = make_batch(4, 3, 5, "cpu")
    with pytest.raises(ValueError, match="margin_softmax_loss: weight must have shape"):
        torch.ops.facekernels.margin_softmax_forward(
            x, w[:, :2], y, 64.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 8
        )
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        torch.ops.facekernels.margin_softmax_forward(
            x, w, y, 64.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 0
        )


def sampled_rows_call(x, w, y, rows, **kw):
    from facekernels.ops.margin_softmax import margin_softmax_rows
    options = dict(kind=0, scale=16.0, m1=1.0, m2=0.5, m3=0.0, sphere_lambda=0.0, gradient="exact",
                   normalize_embeddings=True, normalize_weight=True, chunk_size=4)
    options.update(kw)
    row_max, log_sum, target, predicted = margin_softmax_rows(x, w, y, rows=rows, **options)
    return log_sum + (row_max - target), predicted


def test_rows_read_a_subset_of_the_weight_without_a_copy(device):
    # PartialFC's sampled classes: the op on (weight, rows) equals the op on weight[rows];
    # the weight gradient is that gradient scattered to rows, zero elsewhere.
    x, w, _ = make_batch(10, 8, 30, device, torch.float64)
    rows = torch.tensor([1, 4, 5, 9, 13, 20, 21, 29], device=device)
    y = torch.tensor([0, 7, 3, 3, 1, 6, 2, 5, 4, 0], device=device)
    x.requires_grad_(), w.requires_grad_()
    loss, predicted = sampled_rows_call(x, w, y, rows)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w))
    sub = w.detach()[rows].requires_grad_()
    x2 = x.detach().requires_grad_()
    want, want_predicted = sampled_rows_call(x2, sub, y, None)
    wx, wsub = torch.autograd.grad(want.sum(), (x2, sub))
    assert_close(loss, want)
    assert torch.equal(predicted, want_predicted)
    assert_close(gx, wx)
    assert_close(gw[rows], wsub)
    untouched = torch.ones(30, dtype=torch.bool, device=device)
    untouched[rows] = False
    assert torch.equal(gw[untouched], torch.zeros_like(gw[untouched]))
    expected = reference.margin_softmax_loss(x.detach(), w.detach()[rows], y, scale=16.0, m2=0.5, reduction="none")
    assert_close(loss.detach(), expected)


def test_rows_select_classes_of_sub_centers(device):
    # PartialFC with sub-center ArcFace: rows name classes, each read with its K rows.
    k, classes = 3, 10
    x, w, _ = make_batch(7, 8, classes * k, device, torch.float64)
    rows = torch.tensor([0, 2, 3, 7, 9], device=device)
    y = torch.tensor([0, 4, 1, 1, 3, 2, 4], device=device)
    w.requires_grad_()
    loss, predicted = sampled_rows_call(x, w, y, rows, sub_centers=k, chunk_size=2)
    (gw,) = torch.autograd.grad(loss.sum(), w)
    seen = (rows[:, None] * k + torch.arange(k, device=device)).flatten()
    sub = w.detach()[seen].requires_grad_()
    want, want_predicted = sampled_rows_call(x, sub, y, None, sub_centers=k, chunk_size=2)
    (wsub,) = torch.autograd.grad(want.sum(), sub)
    assert_close(loss, want)
    assert torch.equal(predicted, want_predicted)
    assert_close(gw[seen], wsub)
    unseen = torch.ones(classes * k, dtype=torch.bool, device=device)
    unseen[seen] = False
    assert torch.equal(gw[unseen], torch.zeros_like(gw[unseen]))


def test_no_rows_is_a_shard_without_classes(device):
    # A PartialFC rank that samples none of its classes adds nothing to any row's softmax.
    from facekernels.ops.margin_softmax import margin_softmax_rows
    x, w, _ = make_batch(5, 8, 6, device, torch.float64)
    x.requires_grad_(), w.requires_grad_()
    row_max, log_sum, target, predicted = margin_softmax_rows(
        x, w, torch.full((5,), -1, device=device), kind=0, scale=16.0, m1=1.0, m2=0.5, m3=0.0,
        sphere_lambda=0.0, gradient="exact", normalize_embeddings=True, normalize_weight=True,
        chunk_size=4, labels_in_range=False, rows=torch.zeros(0, dtype=torch.long, device=device))
    assert torch.all(row_max == -math.inf) and torch.all(log_sum == -math.inf)
    assert torch.equal(target, torch.zeros_like(target))
    assert torch.equal(predicted, torch.full_like(predicted, -1))
    gx, gw = torch.autograd.grad((log_sum, target), (x, w), (torch.ones_like(log_sum),) * 2)
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("rows, message", [
    (torch.tensor([3, 1]), "rows must be strictly increasing"),
    (torch.tensor([1, 1]), "rows must be strictly increasing"),
    (torch.tensor([0, 30]), r"rows must lie in \[0, 30\)"),
    (torch.tensor([-1, 2]), r"rows must lie in \[0, 30\)"),
    (torch.tensor([1.0, 2.0]), "rows must be int64"),
])
def test_bad_rows_are_errors(rows, message):
    x, w, _ = make_batch(4, 8, 30, "cpu")
    with pytest.raises((ValueError, TypeError), match=message):
        sampled_rows_call(x, w, torch.zeros(4, dtype=torch.long), rows)


def test_rows_opcheck(device):
    x, w, y = make_batch(9, 8, 5, device)
    rows = torch.tensor([0, 3, 4, 7, 11], device=device)
    w = torch.cat([w, w, w])  # 15 rows, 5 of them seen
    options = (64.0, 1.0, 0.5, 0.0, 0.0, 0, True, True, True, 2)
    torch.library.opcheck(
        torch.ops.facekernels.margin_softmax_forward.default,
        (x.requires_grad_(), w.requires_grad_(), y, *options, True, rows),
    )
