"""Hand-worked checks of the reference margin softmax losses (ArcFace, CosFace, combined
margin, SphereFace) on 2-D points with two classes."""

import math

import pytest
import torch

from facekernels.reference import (
    arcface_loss,
    cosface_loss,
    margin_logits,
    margin_softmax_loss,
    sphereface_lambda,
    sphereface_logits,
    sphereface_loss,
    sphereface_psi,
)

F64 = torch.float64
SQRT3 = math.sqrt(3.0)
# Class 0 points along (1, 0), class 1 along (0, 1). The norms (2 and 5) must not matter:
# weights are always normalized.
W = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=F64)
# A unit feature at 60 degrees: cos to class 0 = 1/2 (theta = pi/3), cos to class 1 = sqrt(3)/2.
X60 = torch.tensor([[0.5, SQRT3 / 2]], dtype=F64)
LABEL0 = torch.tensor([0])


def test_arcface_hand_logits_and_loss():
    # ArcFace m = pi/6, s = 2: target 2 cos(pi/3 + pi/6) = 2 cos(pi/2) = 0; other 2 * sqrt(3)/2.
    # CE with label 0: -0 + log(e^0 + e^sqrt(3)) = log(1 + e^sqrt(3)) = 1.8949526891...
    logits = margin_logits(X60, W, LABEL0, scale=2.0, m2=math.pi / 6)
    torch.testing.assert_close(logits, torch.tensor([[0.0, SQRT3]], dtype=F64))
    loss = arcface_loss(X60, W, LABEL0, margin=math.pi / 6, scale=2.0)
    torch.testing.assert_close(loss, torch.tensor(1.8949526891012602, dtype=F64))


def test_cosface_hand_logits_and_loss():
    # CosFace m = 0.5, s = 2: target 2 (1/2 - 0.5) = 0; other sqrt(3): same loss as above.
    logits = margin_logits(X60, W, LABEL0, scale=2.0, m3=0.5)
    torch.testing.assert_close(logits, torch.tensor([[0.0, SQRT3]], dtype=F64))
    loss = cosface_loss(X60, W, LABEL0, margin=0.5, scale=2.0)
    torch.testing.assert_close(loss, torch.tensor(1.8949526891012602, dtype=F64))


def test_multiplicative_margin_hand_logits():
    # m1 = 1.5: target cos(1.5 * pi/3) = cos(pi/2) = 0.
    logits = margin_logits(X60, W, LABEL0, scale=2.0, m1=1.5)
    torch.testing.assert_close(logits, torch.tensor([[0.0, SQRT3]], dtype=F64))


def test_zero_margin_is_normalized_softmax():
    # No margin: logits are s * cos = 3 * (1/2, sqrt(3)/2).
    logits = margin_logits(X60, W, LABEL0, scale=3.0)
    torch.testing.assert_close(logits, torch.tensor([[1.5, 1.5 * SQRT3]], dtype=F64))


def test_arcface_monotone_fallback_past_pi():
    # x = (-1, 0), class 0: cos = -1, theta = pi, theta + m > pi, so the ArcFace target is
    # cos - m sin(m) = -1 - (pi/6)(1/2) = -1 - pi/12 = -1.2617993877...; class 1: cos = 0.
    x = torch.tensor([[-1.0, 0.0]], dtype=F64)
    logits = margin_logits(x, W, LABEL0, scale=1.0, m2=math.pi / 6)
    torch.testing.assert_close(logits, torch.tensor([[-1.2617993877991494, 0.0]], dtype=F64))
    # The fallback is ArcFace's only: with m3 = 0.1 the combined margin keeps
    # cos(pi + pi/6) - 0.1 = -sqrt(3)/2 - 0.1 = -0.9660254037...
    logits = margin_logits(x, W, LABEL0, scale=1.0, m2=math.pi / 6, m3=0.1)
    torch.testing.assert_close(logits, torch.tensor([[-0.9660254037844386, 0.0]], dtype=F64))


def test_unnormalized_embeddings_scale_rows_by_norm():
    # x = (1, sqrt(3)), |x| = 2, CosFace m = 0.5, s = 1: target 2 (1/2 - 0.5) = 0,
    # other 2 * sqrt(3)/2 = sqrt(3); with normalized features it would be (0, sqrt(3)/2).
    x = 2 * X60
    logits = margin_logits(x, W, LABEL0, scale=1.0, m3=0.5, normalize_embeddings=False)
    torch.testing.assert_close(logits, torch.tensor([[0.0, SQRT3]], dtype=F64))
    logits = margin_logits(x, W, LABEL0, scale=1.0, m3=0.5)
    torch.testing.assert_close(logits, torch.tensor([[0.0, SQRT3 / 2]], dtype=F64))


def test_reductions():
    # Row 0: X60 label 0 (loss log(1 + e^sqrt(3)) as above). Row 1: (0, 1) label 1 with CosFace
    # m = 0.5, s = 2: logits (0, 2 (1 - 0.5)) = (0, 1): -1 + log(1 + e) = log(1 + e^-1) = 0.3132616875...
    x = torch.cat([X60, torch.tensor([[0.0, 1.0]], dtype=F64)])
    labels = torch.tensor([0, 1])
    per_row = margin_softmax_loss(x, W, labels, scale=2.0, m3=0.5, reduction="none")
    torch.testing.assert_close(per_row, torch.tensor([1.8949526891012602, 0.31326168751822286], dtype=F64))
    torch.testing.assert_close(
        margin_softmax_loss(x, W, labels, scale=2.0, m3=0.5, reduction="sum"),
        torch.tensor(2.2082143766194830, dtype=F64),
    )
    torch.testing.assert_close(
        margin_softmax_loss(x, W, labels, scale=2.0, m3=0.5), torch.tensor(1.1041071883097415, dtype=F64)
    )


def _target_logit_grad(fn, **kw):
    x = X60.clone().requires_grad_(True)
    logits = fn(x, W, LABEL0, **kw)
    logits[0, 0].backward()
    return logits.detach(), x.grad


def test_gradient_modes_arcface_hand_derivatives():
    # x on the unit circle at angle phi = pi/3 from w0. d cos/dx = w0 - cos * x = (3/4, -sqrt(3)/4).
    # exact: d cos(theta + m)/d cos = sin(theta + m)/sin(theta) = 1/(sqrt(3)/2) = 2/sqrt(3),
    #   so the gradient is 2/sqrt(3) * (3/4, -sqrt(3)/4) = (sqrt(3)/2, -1/2).
    # detached: d target/d cos = 1, the gradient is (3/4, -sqrt(3)/4).
    kw = dict(scale=1.0, m2=math.pi / 6)
    exact_logits, exact_grad = _target_logit_grad(margin_logits, gradient="exact", **kw)
    detached_logits, detached_grad = _target_logit_grad(margin_logits, gradient="detached", **kw)
    torch.testing.assert_close(exact_logits, detached_logits)
    torch.testing.assert_close(exact_grad, torch.tensor([[SQRT3 / 2, -0.5]], dtype=F64))
    torch.testing.assert_close(detached_grad, torch.tensor([[0.75, -SQRT3 / 4]], dtype=F64))


def test_cosface_gradient_modes_coincide():
    # CosFace's target cos - m has d/d cos = 1 in both modes.
    _, exact_grad = _target_logit_grad(margin_logits, gradient="exact", scale=1.0, m3=0.3)
    _, detached_grad = _target_logit_grad(margin_logits, gradient="detached", scale=1.0, m3=0.3)
    torch.testing.assert_close(exact_grad, detached_grad)
    torch.testing.assert_close(exact_grad, torch.tensor([[0.75, -SQRT3 / 4]], dtype=F64))


@pytest.mark.parametrize("gradient", ["exact", "detached"])
@pytest.mark.parametrize("point", [(1.0, 0.0), (-1.0, 0.0), (3.0, 0.0)])
def test_gradient_finite_at_cos_plus_minus_one(point, gradient):
    # cos = +-1 exactly: the arccos derivative is infinite there; the reference must not NaN.
    x = torch.tensor([point], dtype=F64, requires_grad=True)
    w = W.clone().requires_grad_(True)
    for loss in (
        margin_softmax_loss(x, w, LABEL0, scale=4.0, m2=0.5, gradient=gradient),
        margin_softmax_loss(x, w, LABEL0, scale=4.0, m1=1.2, m2=0.1, m3=0.1, gradient=gradient),
        sphereface_loss(x, w, LABEL0, margin=4, lambda_=1.0, gradient=gradient),
    ):
        x.grad = w.grad = None
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_sphereface_psi_hand_values():
    # m = 4, k = floor(4 theta / pi), psi = (-1)^k cos(4 theta) - 2k:
    # theta = 0: 1; pi/8: cos(pi/2) = 0; pi/4: k = 1, -cos(pi) - 2 = -1;
    # pi/3: k = 1, -cos(4pi/3) - 2 = 1/2 - 2 = -1.5; pi/2: k = 2, cos(2pi) - 4 = -3; pi: k = 4, 1 - 8 = -7.
    theta = torch.tensor([0.0, math.pi / 8, math.pi / 4, math.pi / 3, math.pi / 2, math.pi], dtype=F64)
    torch.testing.assert_close(
        sphereface_psi(theta, 4), torch.tensor([1.0, 0.0, -1.0, -1.5, -3.0, -7.0], dtype=F64)
    )
    # m = 2: theta = pi/3: k = 0, cos(2pi/3) = -1/2; theta = 3pi/4: k = 1, -cos(3pi/2) - 2 = -2.
    theta = torch.tensor([math.pi / 3, 3 * math.pi / 4], dtype=F64)
    torch.testing.assert_close(sphereface_psi(theta, 2), torch.tensor([-0.5, -2.0], dtype=F64))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_psi_is_monotone_decreasing(m):
    theta = torch.linspace(0, math.pi, 2001, dtype=F64)
    psi = sphereface_psi(theta, m)
    assert (psi[1:] < psi[:-1]).all()
    torch.testing.assert_close(psi[-1], torch.tensor(-(2.0 * m - 1.0), dtype=F64))


def test_sphereface_lambda_schedule():
    # max(lambda_min, base (1 + gamma it)^-power)
    assert sphereface_lambda(0) == 1000.0
    assert sphereface_lambda(100) == pytest.approx(1000.0 / 13.0)  # 1 + 0.12 * 100 = 13
    assert sphereface_lambda(10000) == 5.0  # 1000 / 1201 < 5
    assert sphereface_lambda(10, power=2.0) == pytest.approx(206.61157024793386)  # 1000 / 2.2^2
    assert sphereface_lambda(10**6, lambda_min=0.0) == pytest.approx(1000.0 / 120001.0)


def test_sphereface_hand_logits_and_loss():
    # x = (1, sqrt(3)), |x| = 2, theta = pi/3, m = 4, lambda = 1: psi = -1.5,
    # target = 2 * (-1.5 + 1 * 1/2) / 2 = -1; other 2 * sqrt(3)/2 = sqrt(3).
    # CE = 1 + log(e^-1 + e^sqrt(3)) = log(1 + e^(1 + sqrt(3))) = 2.7951060490...
    x = 2 * X60
    logits = sphereface_logits(x, W, LABEL0, margin=4, lambda_=1.0)
    torch.testing.assert_close(logits, torch.tensor([[-1.0, SQRT3]], dtype=F64))
    loss = sphereface_loss(x, W, LABEL0, margin=4, lambda_=1.0)
    torch.testing.assert_close(loss, torch.tensor(2.795106049045453, dtype=F64))
    # Normalized features with scale 2 give the same logits for this |x| = 2.
    logits = sphereface_logits(X60 * 7, W, LABEL0, margin=4, lambda_=1.0, scale=2.0, normalize_embeddings=True)
    torch.testing.assert_close(logits, torch.tensor([[-1.0, SQRT3]], dtype=F64))


def test_sphereface_gradient_modes_hand_derivatives():
    # d psi/d cos = (-1)^k m sin(m theta) / sin(theta) = -4 sin(4pi/3) / sin(pi/3) = 4 at theta = pi/3,
    # so d target/d cos = (4 + lambda)/(1 + lambda) = 2.5 for lambda = 1 (exact), 1 (detached).
    # Times d cos/dx = (3/4, -sqrt(3)/4): exact (1.875, -0.625 sqrt(3)), detached (0.75, -sqrt(3)/4).
    kw = dict(margin=4, lambda_=1.0, normalize_embeddings=True)
    exact_logits, exact_grad = _target_logit_grad(sphereface_logits, gradient="exact", **kw)
    detached_logits, detached_grad = _target_logit_grad(sphereface_logits, gradient="detached", **kw)
    torch.testing.assert_close(exact_logits, detached_logits)
    torch.testing.assert_close(exact_grad, torch.tensor([[1.875, -0.625 * SQRT3]], dtype=F64))
    torch.testing.assert_close(detached_grad, torch.tensor([[0.75, -SQRT3 / 4]], dtype=F64))


def _random_problem(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, dtype=F64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=F64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    return x, w, labels


MARGINS = [dict(m2=0.5), dict(m3=0.35), dict(m1=1.3, m2=0.2, m3=0.1), dict(m1=2.0)]


@pytest.mark.parametrize("margins", MARGINS)
@pytest.mark.parametrize("normalize_embeddings", [True, False])
def test_margin_softmax_gradcheck_exact(margins, normalize_embeddings):
    x, w, labels = _random_problem(0)
    fn = lambda x, w: margin_softmax_loss(  # noqa: E731
        x, w, labels, scale=4.0, normalize_embeddings=normalize_embeddings, **margins
    )
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("normalize_embeddings", [True, False])
def test_sphereface_gradcheck_exact(margin, normalize_embeddings):
    x, w, labels = _random_problem(1)
    fn = lambda x, w: sphereface_loss(  # noqa: E731
        x, w, labels, margin=margin, lambda_=2.0, normalize_embeddings=normalize_embeddings
    )
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize(
    "logits_fn, kw",
    [(margin_logits, m) for m in MARGINS] + [(sphereface_logits, dict(margin=4, lambda_=2.0, scale=4.0))],
)
def test_detached_gradient_is_that_of_a_constant_target_offset(logits_fn, kw):
    # "detached" = plain s*cos logits plus a constant (no-grad) shift of the target logit, so its
    # gradient is the gradient of s*cos + delta with delta frozen; that function is gradchecked too.
    x, w, labels = _random_problem(3)
    kw = dict(kw, normalize_embeddings=True)
    scale = kw.get("scale", 64.0)
    plain = lambda x, w: margin_logits(x, w, labels, scale=scale)  # noqa: E731
    delta = (logits_fn(x, w, labels, gradient="detached", **kw) - plain(x, w)).detach()
    assert delta.count_nonzero() == len(labels)  # exactly the target logits move
    frozen = lambda x, w: torch.nn.functional.cross_entropy(plain(x, w) + delta, labels)  # noqa: E731
    detached = torch.nn.functional.cross_entropy(logits_fn(x, w, labels, gradient="detached", **kw), labels)
    torch.testing.assert_close(detached, frozen(x, w))
    got = torch.autograd.grad(detached, (x, w))
    want = torch.autograd.grad(frozen(x, w), (x, w))
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(frozen, (x, w))


def test_detached_mode_matches_exact_value_on_random_data():
    x, w, labels = _random_problem(2)
    for fn, kw in ((margin_softmax_loss, dict(m2=0.5)), (sphereface_loss, dict(lambda_=3.0))):
        exact = fn(x, w, labels, gradient="exact", **kw)
        detached = fn(x, w, labels, gradient="detached", **kw)
        torch.testing.assert_close(exact, detached)
        g_exact = torch.autograd.grad(exact, x)[0]
        g_detached = torch.autograd.grad(detached, x)[0]
        assert not torch.allclose(g_exact, g_detached)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: margin_logits(X60, W, LABEL0, gradient="stop"), "gradient"),
        (lambda: margin_softmax_loss(X60, W, LABEL0, reduction="avg"), "reduction"),
        (lambda: arcface_loss(X60, W, LABEL0, gradient="stop"), "gradient"),
        (lambda: sphereface_logits(X60, W, LABEL0, gradient="stop"), "gradient"),
        (lambda: sphereface_loss(X60, W, LABEL0, reduction="avg"), "reduction"),
    ],
)
def test_bad_arguments_raise(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
