"""The adaptive heads (CurricularFace, AdaFace, MagFace, sub-center ArcFace, ElasticFace) on
the fused op against their reference twins: loss, gradients and running state over three
training steps; the op's new inputs (per-row margins and their gradients, negative
modulation, sub-centers) by gradcheck and opcheck; torch.compile; half precision; bad input
that must leave every buffer as it was."""

import copy
import math
import subprocess
import sys

import pytest
import torch

import facekernels
from facekernels import reference
from facekernels.ops.margin_softmax import ADAFACE, COMBINED, EASY, fused_margin_loss
from conftest import assert_argmax, assert_close, assert_no_worse_than_reference

F64 = torch.float64
SCALE = 16.0
CHUNK = 5  # classes per chunk: every test crosses chunk boundaries


def make_batch(n, dim, num_classes, device, dtype=F64, seed=0, norms=(5.0, 60.0)):
    """Raw embeddings with norms spread over `norms` (AdaFace and MagFace read them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True) * torch.empty(n, 1, dtype=F64).uniform_(*norms, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[0], labels[-1] = 0, num_classes - 1
    return x.to(device, dtype), labels.to(device)


class Curricular:
    def module(self, c, d):
        return facekernels.CurricularFaceLoss(c, d, scale=SCALE, chunk_size=CHUNK)

    def state(self, m):
        return {"t": m.t.clone()}

    def reference(self, x, w, y, state, reduction):
        loss, t = reference.curricularface_loss(x, w, y, state["t"], scale=SCALE, reduction=reduction)
        return loss, {"t": t}


class Ada:
    def module(self, c, d):
        # t_alpha 0.5 moves the statistics fast, so the margins really vary by row.
        return facekernels.AdaFaceLoss(c, d, scale=SCALE, t_alpha=0.5, chunk_size=CHUNK)

    def state(self, m):
        return {"batch_mean": m.batch_mean.clone(), "batch_std": m.batch_std.clone()}

    def reference(self, x, w, y, state, reduction):
        loss, mean, std = reference.adaface_loss(x, w, y, state["batch_mean"], state["batch_std"],
                                                 scale=SCALE, t_alpha=0.5, reduction=reduction)
        return loss, {"batch_mean": mean, "batch_std": std}


class Mag:
    def __init__(self, easy_margin):
        self.easy_margin = easy_margin

    def module(self, c, d):
        return facekernels.MagFaceLoss(c, d, scale=SCALE, easy_margin=self.easy_margin, chunk_size=CHUNK)

    def state(self, m):
        return {}

    def reference(self, x, w, y, state, reduction):
        return reference.magface_loss(x, w, y, scale=SCALE, easy_margin=self.easy_margin,
                                      reduction=reduction), {}


class SubCenter:
    def module(self, c, d):
        return facekernels.SubCenterArcFaceLoss(c, d, k=3, scale=SCALE, chunk_size=CHUNK)

    def state(self, m):
        return {}

    def reference(self, x, w, y, state, reduction):
        return reference.subcenter_arcface_loss(x, w, y, k=3, scale=SCALE, reduction=reduction), {}


class Elastic:
    """The module and the reference draw the same margins from generators seeded alike."""

    def __init__(self, kind, plus):
        self.kind, self.plus = kind, plus

    def module(self, c, d):
        self.draws = torch.Generator().manual_seed(7)
        return facekernels.ElasticFaceLoss(c, d, std=0.05, scale=SCALE, kind=self.kind, plus=self.plus,
                                           generator=torch.Generator().manual_seed(7), chunk_size=CHUNK)

    def state(self, m):
        self.margin = m.margin
        return {}

    def reference(self, x, w, y, state, reduction):
        margins = torch.empty(len(y), dtype=x.dtype).normal_(self.margin, 0.05, generator=self.draws)
        return reference.elasticface_loss(x, w, y, margins.to(x.device), kind=self.kind, plus=self.plus,
                                          scale=SCALE, reduction=reduction), {}


HEADS = {
    "curricularface": Curricular(),
    "adaface": Ada(),
    "magface": Mag(easy_margin=True),
    "magface_arc_fallback": Mag(easy_margin=False),
    "subcenter": SubCenter(),
    "elasticface_arc": Elastic("arc", plus=False),
    "elasticface_cos": Elastic("cos", plus=False),
    "elasticface_arc_plus": Elastic("arc", plus=True),
    "elasticface_cos_plus": Elastic("cos", plus=True),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(HEADS))
def test_three_training_steps_match_the_reference(device, name, reduction):
    """fp64 to 1e-10: loss, both gradients and the running state after each step."""
    spec = HEADS[name]
    module = spec.module(23, 8).to(device, F64)
    module.reduction = reduction
    state = spec.state(module)
    for step in range(3):
        x, y = make_batch(17, 8, 23, device, seed=step)
        x.requires_grad_()
        loss = module(x, y)
        grads = torch.autograd.grad(loss.sum(), [x, module.weight])
        expected, state = spec.reference(x, module.weight, y, state, reduction)
        expected_grads = torch.autograd.grad(expected.sum(), [x, module.weight])
        assert_close(loss, expected)
        for got, want in zip(grads, expected_grads):
            assert_close(got, want)
        for buffer, value in state.items():
            assert_close(getattr(module, buffer), value.reshape(1))


def test_the_cases_that_make_each_head_differ_are_reached():
    """The parity batches exercise what is new: hard negatives, clipped AdaFace angles,
    MagFace's easy branch, winning sub-centers other than the first."""
    x, y = make_batch(17, 8, 23, "cpu")
    w = torch.randn(69, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w[:23]).t()
    target = cos.gather(1, y[:, None])
    assert (cos > torch.cos(torch.acos(target) + 0.5)).sum() > 17  # hard negatives besides targets
    assert (target <= 0).any() and (target > 0).any()  # both easy-margin branches
    winners = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).t()).view(17, 23, 3).argmax(2)
    assert set(winners.flatten().tolist()) == {0, 1, 2}


def _op_loss(kind, hard):
    def loss(x, w, m2, m3):
        n = len(x)
        extra = {}
        if hard:
            extra = {"hard_threshold": torch.linspace(-0.5, 0.5, n, dtype=F64),
                     "hard_t": torch.full((n,), 0.3, dtype=F64)}
        return fused_margin_loss(
            x, w, LABELS, kind=kind, scale=4.0, m1=1.0, m2=0.0, m3=0.0, sphere_lambda=0.0,
            gradient="exact", normalize_embeddings=True, normalize_weight=True, chunk_size=3,
            reduction="sum", return_predictions=False, row_m2=m2, row_m3=m3, **extra)
    return loss


LABELS = torch.tensor([0, 3, 6, 2, 5])


@pytest.mark.parametrize("kind, hard", [(COMBINED, False), (COMBINED, True), (ADAFACE, False), (EASY, False)])
def test_gradcheck_with_per_row_margins(kind, hard):
    """d loss / d x, W, m2 and m3 per row, including CurricularFace's modulated negatives."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, dtype=F64, generator=g).requires_grad_()
    w = torch.randn(7, 4, dtype=F64, generator=g).requires_grad_()
    m2 = torch.tensor([0.5, -0.3, 0.2, 0.7, 0.1], dtype=F64, requires_grad=True)
    m3 = torch.tensor([0.1, 0.2, -0.1, 0.0, 0.3], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_op_loss(kind, hard), (x, w, m2, m3))


def test_margin_gradient_at_zero_angular_margin():
    """A per-row m2 of exactly 0 takes the CosFace path, which must still give d/dm2."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, dtype=F64, generator=g)
    w = torch.randn(7, 4, dtype=F64, generator=g)
    m2 = torch.zeros(5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: _op_loss(COMBINED, False)(x, w, m, None), (m2,))


def test_sub_centers_and_interclass_filtering_together(device):
    x, y = make_batch(9, 6, 8, device)
    w = torch.randn(24, 6, dtype=F64, device=device, requires_grad=True)
    options = dict(kind=COMBINED, scale=8.0, m1=1.0, m2=0.3, m3=0.0, sphere_lambda=0.0,
                   gradient="exact", normalize_embeddings=True, normalize_weight=True,
                   reduction="sum", return_predictions=True, interclass_filtering_threshold=0.2)
    loss, predicted = fused_margin_loss(x, w, y, chunk_size=3, sub_centers=3, **options)
    # The same as a K=1 head on each class's winning sub-center.
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w.detach()).t()
    best = cos.view(9, 8, 3).argmax(2)
    rows = [w[c * 3 + best[i, c]] for i in range(9) for c in range(8)]
    for i in range(9):
        wi = torch.stack(rows[i * 8:(i + 1) * 8])
        row_loss = fused_margin_loss(x[i:i + 1], wi, y[i:i + 1], chunk_size=3, **options)[0]
        loss = loss - row_loss
    assert abs(loss.item()) < 1e-10
    assert_argmax(predicted, cos.view(9, 8, 3).amax(2))


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_sub_centers_of_sampled_classes_in_a_strided_weight(device, dtype):
    """Sub-centers with sampled classes (`rows`) of a weight whose rows are strided (a column
    slice): the op equals itself on the gathered contiguous rows, forward and backward, over
    chunks with a short last one (bf16: the backward's GEMMs in bf16, not accumulated)."""
    x, y = make_batch(9, 6, 5, device)
    wide = torch.randn(8 * 3, 10, dtype=F64, device=device).to(dtype).requires_grad_()
    rows = torch.tensor([1, 2, 5, 6, 7], device=device)
    options = dict(kind=COMBINED, scale=8.0, m1=1.0, m2=0.3, m3=0.0, sphere_lambda=0.0,
                   gradient="exact", normalize_embeddings=True, normalize_weight=True,
                   reduction="none", return_predictions=True, chunk_size=2, sub_centers=3)
    results = []
    for sampled in (True, False):
        xi = x.to(dtype).requires_grad_()
        w = wide[:, 2:8]
        if sampled:
            loss, predicted = fused_margin_loss(xi, w, y, rows=rows, **options)
        else:
            gathered = w.reshape(8, 3, 6)[rows].reshape(15, 6).contiguous()
            loss, predicted = fused_margin_loss(xi, gathered, y, **options)
        results.append((loss, predicted, *torch.autograd.grad(loss.sum(), (xi, wide))))
    (loss, predicted, gx, gw), (loss_ref, predicted_ref, gx_ref, gw_ref) = results
    assert torch.equal(predicted, predicted_ref)
    assert_close(loss, loss_ref)
    # The same products in either layout: bf16 gradients agree to the last bit or two.
    for got, want in ((gx, gx_ref), (gw, gw_ref)):
        if dtype == F64:
            assert_close(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)
    assert gw.view(8, 3, 10)[[0, 3, 4]].abs().sum() == 0  # classes not sampled
    assert gw[:, [0, 1, 8, 9]].abs().sum() == 0  # columns outside the slice


def test_opcheck_new_arguments(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g).to(device).requires_grad_()
    w = torch.randn(12, 5, generator=g).to(device).requires_grad_()
    y = torch.tensor([0, 3, 1, 2, 3, 0], device=device)
    m2 = torch.rand(6, generator=g).to(device).requires_grad_()
    m3 = torch.rand(6, generator=g).to(device).requires_grad_()
    hard, hard_t = torch.zeros(6, device=device), torch.full((6,), 0.2, device=device)
    options = (16.0, 1.0, 0.5, 0.0, 0.0, COMBINED, True, True, True, 2)
    for kind, sub_centers in ((COMBINED, 3), (ADAFACE, 1), (EASY, 2)):
        options = (16.0, 1.0, 0.5, 0.0, 0.0, kind, True, True, True, 2)
        torch.library.opcheck(
            torch.ops.facekernels.margin_softmax_forward.default,
            (x, w, y, *options), dict(row_m2=m2, row_m3=m3, sub_centers=sub_centers,
                                      hard_threshold=hard, hard_t=hard_t))
    row_max, log_sum = torch.rand(6, device=device) + 3, torch.rand(6, device=device)
    torch.library.opcheck(
        torch.ops.facekernels.margin_softmax_backward.default,
        (torch.rand(6, device=device), -torch.rand(6, device=device), x.detach(), w.detach(), y,
         row_max, log_sum, *options),
        dict(row_m2=m2.detach(), row_m3=m3.detach(), sub_centers=3, margins_grad=True))


@pytest.mark.parametrize("name", ["curricularface", "adaface", "magface", "subcenter", "elasticface_arc_plus"])
def test_torch_compile_fullgraph(device, name):
    """Two training steps compiled equal two eager ones, running state included."""
    torch._dynamo.reset()
    spec = HEADS[name]
    eager = spec.module(23, 8).to(device)
    if name.startswith("elasticface"):
        # dynamo cannot trace a torch.Generator; with std 0 both sides draw the same margins.
        eager.generator, eager.std = None, 0.0
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(2):
        x, y = make_batch(17, 8, 23, device, torch.float32, seed=step)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager(xe, y).backward()
        loss = compiled(xc, y)
        loss.backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-6)
    for (key, got), want in zip(compiled_module.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, msg=key)
    # A rejected call leaves the running state bitwise as it was, compiled as in eager: the
    # graph must not write a buffer before the op has checked the labels.
    before = {key: value.clone() for key, value in compiled_module.state_dict().items()}
    x, y = make_batch(17, 8, 23, device, torch.float32, seed=5)
    y[3] = 23
    with pytest.raises(ValueError, match=r"labels must be int64 with values in \[0, 23\), got max 23"):
        compiled(x, y)
    for key, value in compiled_module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_rejected_elasticface_call_leaves_the_generator_alone():
    head = facekernels.ElasticFaceLoss(5, 8, generator=torch.Generator().manual_seed(3))
    state = head.generator.get_state()
    with pytest.raises(ValueError, match=r"ElasticFaceLoss: labels must be int64 with values in \[0, 5\), got max 5"):
        head(torch.randn(4, 8), torch.tensor([0, 1, 2, 5]))
    assert torch.equal(head.generator.get_state(), state)
    head(torch.randn(4, 8), torch.tensor([0, 1, 2, 4]))  # a good call draws
    assert not torch.equal(head.generator.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["curricularface", "adaface", "magface", "subcenter", "elasticface_cos"])
def test_half_precision_is_no_worse_than_reference(device, name, dtype):
    """Loss and gradients, except sub-center's gradients: they follow the winning
    sub-center, and in bf16 / fp16 many near-ties are decided otherwise than in fp64 (by
    either implementation); the loss, a max, is continuous. fp64 and fp32 cover them."""
    torch.manual_seed(0)
    spec = HEADS[name]
    module = spec.module(200, 32).to(device, F64)
    module.reduction = "none"
    x, y = make_batch(64, 32, 200, device)
    w = module.weight.detach()

    def run(fn, x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(x, w)
        return (loss, *torch.autograd.grad(loss.sum(), [x, w]))

    state = spec.state(module)
    if name.startswith("elasticface"):
        module.eval()  # every row gets `margin`
        oracle = lambda x, w: reference.elasticface_loss(  # noqa: E731
            x, w, y, torch.full((64,), module.margin, dtype=x.dtype, device=device), kind="cos",
            scale=SCALE, reduction="none")
    else:
        oracle = lambda x, w: spec.reference(x, w, y, state, "none")[0]  # noqa: E731
    truth = run(oracle, x, w)
    # A training step, as the reference's, from the same running state.
    got = run(lambda x, w: copy.deepcopy(module).loss(x, y, w), x.to(dtype), w.to(dtype))
    ref = run(oracle, x.to(dtype), w.to(dtype))
    assert got[0].dtype == torch.float32
    compared = 1 if name == "subcenter" else 3
    for a, b, t in list(zip(got, ref, truth))[:compared]:
        assert_no_worse_than_reference(a, b, t)


@pytest.mark.parametrize("name", ["curricularface", "adaface", "magface", "subcenter"])
def test_autocast_bf16_keeps_fp32_loss_and_gradients(device, name):
    """bf16 GEMMs under autocast, fp32 master weight and margins: close to the fp64 truth."""
    torch.manual_seed(0)
    spec = HEADS[name]
    module = spec.module(200, 32).to(device)
    truth_state = spec.state(module.double())
    module.float()
    x, y = make_batch(64, 32, 200, device, torch.float32)
    x.requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = module(x, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert module.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    xd = x.detach().double().requires_grad_()
    wd = module.weight.detach().double().requires_grad_()
    truth, _ = spec.reference(xd, wd, y, {k: v.double() for k, v in truth_state.items()}, "mean")
    truth.backward()
    assert abs(loss.item() - truth.item()) < 0.02 * abs(truth.item())
    if name == "subcenter":
        return  # its gradients follow near-tied winners that bf16 decides otherwise
    cos = torch.nn.functional.cosine_similarity
    assert cos(module.weight.grad.flatten().double(), wd.grad.flatten(), dim=0) > 0.99
    assert cos(x.grad.flatten().double(), xd.grad.flatten(), dim=0) > 0.99


def test_bad_labels_leave_the_running_state_untouched(device):
    for name in ("curricularface", "adaface"):
        module = HEADS[name].module(10, 8).to(device)
        before = copy.deepcopy(module.state_dict())
        x, y = make_batch(6, 8, 10, device, torch.float32)
        y[2] = 10
        with pytest.raises(ValueError, match=r"labels must be int64 with values in \[0, 10\), got max 10"):
            module(x, y)
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", ["curricularface", "adaface"])
def test_a_nan_embedding_makes_only_its_own_loss_nan(device, name):
    """The running statistics come from the finite rows: the other rows' losses and the
    buffers are those of the batch without the NaN row."""
    module = HEADS[name].module(10, 8).to(device)
    module.reduction = "none"
    module(*make_batch(6, 8, 10, device, torch.float32))
    without = copy.deepcopy(module)
    x, y = make_batch(6, 8, 10, device, torch.float32, seed=1)
    keep = torch.arange(6, device=device) != 2
    expected = without(x[keep], y[keep])
    x[2, 3] = float("nan")
    losses = module(x, y)
    assert torch.isnan(losses[2])
    torch.testing.assert_close(losses[keep], expected)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, without.state_dict()[key], msg=key)


def test_adaface_needs_two_rows_to_train_but_not_to_evaluate():
    module = facekernels.AdaFaceLoss(10, 8)
    x, y = make_batch(1, 8, 10, "cpu", torch.float32)
    with pytest.raises(ValueError, match="AdaFaceLoss: a training batch needs at least 2 rows"):
        module(x, y)
    assert module.batch_mean.item() == 20.0 and module.batch_std.item() == 100.0
    assert torch.isfinite(module.eval()(x, y))


def test_adaface_statistics_move_only_on_what_is_defined():
    """An all-NaN training batch has no norm statistics: the buffers stay (its losses are
    NaN). One finite row has a mean but no unbiased std: only the mean moves."""
    module = facekernels.AdaFaceLoss(10, 8)
    x, y = make_batch(3, 8, 10, "cpu", torch.float32)
    for _ in range(3):
        assert module(torch.full_like(x, math.nan), y).isnan()
    assert module.batch_mean.item() == 20.0 and module.batch_std.item() == 100.0
    x[1:] = math.nan
    module(x, y)
    assert module.batch_mean.item() != 20.0 and module.batch_std.item() == 100.0


def test_state_dict_round_trip():
    for name in ("curricularface", "adaface"):
        trained = HEADS[name].module(10, 8)
        for step in range(2):
            trained(*make_batch(6, 8, 10, "cpu", torch.float32, seed=step))
        fresh = HEADS[name].module(10, 8)
        fresh.load_state_dict(trained.state_dict())
        for key, value in trained.state_dict().items():
            assert torch.equal(getattr(fresh, key), value)


@pytest.mark.parametrize("make, error, message", [
    (lambda: facekernels.CurricularFaceLoss(10, 8, margin=float("nan")), ValueError, "CurricularFaceLoss: margin"),
    (lambda: facekernels.AdaFaceLoss(10, 8, h=-1.0), ValueError, "AdaFaceLoss: h"),
    (lambda: facekernels.AdaFaceLoss(10, 8, t_alpha=2.0), ValueError, "AdaFaceLoss: t_alpha"),
    (lambda: facekernels.MagFaceLoss(10, 8, l_a=0.0), ValueError, "MagFaceLoss: l_a must be positive"),
    (lambda: facekernels.MagFaceLoss(10, 8, u_a=5.0), ValueError, "MagFaceLoss: u_a"),
    (lambda: facekernels.MagFaceLoss(10, 8, lambda_g=-1.0), ValueError, "MagFaceLoss: lambda_g"),
    (lambda: facekernels.SubCenterArcFaceLoss(10, 8, k=0), ValueError, "SubCenterArcFaceLoss: k must be a positive int"),
    (lambda: facekernels.ElasticFaceLoss(10, 8, kind="sphere"), ValueError, "ElasticFaceLoss: kind must be one of"),
    (lambda: facekernels.ElasticFaceLoss(10, 8, std=-0.1), ValueError, "ElasticFaceLoss: std"),
    (lambda: facekernels.ElasticFaceLoss(10, 8, generator=3), TypeError, "ElasticFaceLoss: generator"),
])
def test_constructors_name_the_bad_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_op_refuses_inconsistent_new_arguments():
    x, y = make_batch(4, 8, 6, "cpu", torch.float32)
    w = torch.randn(12, 8)
    options = dict(kind=COMBINED, scale=8.0, m1=1.0, m2=0.3, m3=0.0, sphere_lambda=0.0,
                   gradient="exact", normalize_embeddings=True, normalize_weight=True,
                   chunk_size=None, reduction="mean", return_predictions=False)
    with pytest.raises(ValueError, match="hard_threshold and hard_t go together"):
        fused_margin_loss(x, w, y, hard_threshold=torch.zeros(4), **options)
    with pytest.raises(ValueError, match=r"row_m2 must have shape \[4\]"):
        fused_margin_loss(x, w, y, row_m2=torch.zeros(3), **options)
    with pytest.raises(ValueError, match="sub_centers must be a positive divisor of the weight's 12 rows"):
        torch.ops.facekernels.margin_softmax_forward(x, w, y, 8.0, 1.0, 0.3, 0.0, 0.0, COMBINED,
                                                     True, True, True, 4, sub_centers=5)


@pytest.mark.parametrize("rows_per_step", [4, 65536])
def test_drop_sub_centers_matches_the_reference(device, rows_per_step):
    head = facekernels.SubCenterArcFaceLoss(7, 6, k=3, margin=0.4, scale=SCALE).to(device, F64)
    x, y = make_batch(30, 6, 7, device)
    y[y == 5] = 4  # class 5 has no samples: it keeps sub-center 0
    dominant, outliers = reference.subcenter_dominant(x, head.weight, y, k=3, threshold=60.0)
    single, dropped = head.drop_sub_centers(x, y, threshold=60.0, rows_per_step=rows_per_step)
    assert isinstance(single, facekernels.ArcFaceLoss) and single.m2 == 0.4
    assert torch.equal(single.weight.detach(), dominant)
    assert torch.equal(dropped, outliers) and 0 < len(dropped) < 30
    assert torch.equal(single.weight[5], head.weight[15])


def test_drop_sub_centers_nan_rows_neither_vote_nor_hide(device):
    """Three NaN samples of class 0 used to vote for its sub-center 0 (the argmax of a NaN
    row) and were never outliers; the two finite ones were flagged instead."""
    head = facekernels.SubCenterArcFaceLoss(2, 4, k=3).to(device, F64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4, dtype=F64, device=device)[[0, 1, 2, 3, 0, 1]])
    x = torch.tensor([[0.0, 1.0, 0.1, 0.0], [0.1, 1.0, 0.0, 0.0]] + [[math.nan] * 4] * 3
                     + [[0.0, 0.0, 0.0, 1.0]], dtype=F64, device=device)
    y = torch.tensor([0, 0, 0, 0, 0, 1], device=device)
    single, outliers = head.drop_sub_centers(x, y, threshold=30.0)
    assert torch.equal(single.weight[0], head.weight[1])  # the finite samples' sub-center
    assert outliers.tolist() == [2, 3, 4]
    dominant, expected = reference.subcenter_dominant(x, head.weight, y, k=3, threshold=30.0)
    assert torch.equal(single.weight.detach(), dominant) and torch.equal(outliers, expected)


@pytest.mark.parametrize("rows_per_step", [0, -1, 1.5, True])
def test_drop_sub_centers_rows_per_step_must_be_a_positive_int(rows_per_step):
    head = facekernels.SubCenterArcFaceLoss(2, 4, k=3)
    with pytest.raises(ValueError, match="drop_sub_centers: rows_per_step must be a positive int"):
        head.drop_sub_centers(torch.randn(3, 4), torch.tensor([0, 1, 0]), rows_per_step=rows_per_step)


def test_sub_center_logits_and_predictions_are_per_class():
    head = facekernels.SubCenterArcFaceLoss(9, 6, k=3)
    x, y = make_batch(12, 6, 9, "cpu", torch.float32)
    _, predicted = head(x, y, return_predictions=True)
    logits = head.get_logits(x)
    assert logits.shape == (12, 9)
    assert_argmax(predicted, logits)


def test_magface_margin_gradient_reaches_the_norm():
    """Only the margin and g depend on |x|: their radial gradient is what the op returns
    for d loss / d m, chained through m(a) (the reference agrees in the parity test)."""
    head = facekernels.MagFaceLoss(10, 8, lambda_g=0.0, easy_margin=False).double()
    x, y = make_batch(6, 8, 10, "cpu", norms=(15.0, 100.0))  # inside [l_a, u_a]
    x.requires_grad_()
    head(x, y).backward()
    radial = (x.grad * torch.nn.functional.normalize(x.detach())).sum(1)
    assert (radial.abs() > 1e-8).all()  # scale-free CE alone would give exactly 0
    frozen = facekernels.MagFaceLoss(10, 8, lambda_g=0.0, l_m=0.5, u_m=0.5, easy_margin=False).double()
    frozen.load_state_dict(head.state_dict())
    x2 = x.detach().clone().requires_grad_()
    frozen(x2, y).backward()
    assert (x2.grad * torch.nn.functional.normalize(x.detach())).sum(1).abs().max() < 1e-12


def test_elasticface_margins_are_drawn_in_training_and_fixed_in_eval():
    head = facekernels.ElasticFaceLoss(10, 8, std=0.1)
    x, y = make_batch(6, 8, 10, "cpu", torch.float32)
    assert head(x, y).item() != head(x, y).item()
    head.eval()
    fixed = facekernels.ArcFaceLoss(10, 8, margin=0.5, scale=64.0)
    fixed.load_state_dict(head.state_dict())
    torch.testing.assert_close(head(x, y), fixed(x, y))
    assert math.isclose(facekernels.ElasticFaceLoss(10, 8, kind="cos").margin, 0.35)


def test_eager_steps_write_running_buffers_without_torch_dynamo():
    """In eager mode the heads write their running buffers directly, not through the
    custom op that orders the write in a compiled graph (why: facekernels/ops/running.py)."""
    script = (
        "import sys, torch, facekernels\n"
        "for head in (facekernels.AdaFaceLoss(11, 6), facekernels.CurricularFaceLoss(11, 6)):\n"
        "    before = [b.clone() for b in head.buffers()]\n"
        "    x = (20 * torch.randn(8, 6)).requires_grad_()\n"
        "    head(x, torch.arange(8)).backward()\n"
        "    assert any(not torch.equal(a, b) for a, b in zip(before, head.buffers()))\n"
        "assert 'torch._dynamo' not in sys.modules, 'an eager step imported torch._dynamo'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
