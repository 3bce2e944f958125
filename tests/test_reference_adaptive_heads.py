"""Hand-worked checks of the reference adaptive-margin heads (CurricularFace, AdaFace, MagFace,
sub-center ArcFace, ElasticFace): reductions to ArcFace/CosFace, running-state updates,
the dominant-center step, ElasticFace+'s margin assignment, and gradchecks (CPU, fp64)."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from facekernels.reference import (
    adaface_loss,
    arcface_loss,
    cosface_loss,
    curricularface_loss,
    elasticface_loss,
    elasticface_margins,
    magface_loss,
    subcenter_arcface_loss,
    subcenter_dominant,
)

F64 = torch.float64
SQRT3 = math.sqrt(3.0)
# Class 0 along (1, 0), class 1 along (0, 1) (norms must not matter).
W = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=F64)
# A unit feature at 60 degrees: cos to class 0 = 1/2, to class 1 = sqrt(3)/2.
X60 = torch.tensor([[0.5, SQRT3 / 2]], dtype=F64)
LABEL0 = torch.tensor([0])


def unit(degrees, norm=1.0):
    r = math.radians(degrees)
    return [norm * math.cos(r), norm * math.sin(r)]


def ce(logits, label):
    """-log softmax(logits)[label] for a plain list of floats."""
    top = max(logits)
    return top + math.log(sum(math.exp(v - top) for v in logits)) - logits[label]


def random_batch(n=6, classes=5, dim=4, seed=0, norm_range=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    if norm_range is not None:
        lo, hi = norm_range
        x = F.normalize(x, dim=1) * torch.linspace(lo, hi, n, dtype=F64)[:, None]
    w = torch.randn(classes, dim, generator=g, dtype=F64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, w, labels


def orthogonal_batch(n=6, classes=4, dim=6, seed=0):
    """Orthonormal class weights and features near their own class: every target angle is
    small and every negative cosine is small."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    w = q[:classes]
    labels = torch.arange(n) % classes
    x = 3.0 * w[labels] + 0.1 * torch.randn(n, dim, generator=g, dtype=F64)
    return x, w, labels


# ----------------------------------------------------------------------------- CurricularFace


def test_curricularface_hand_example_uses_updated_t():
    # m = pi/6, s = 2, label 0: target cos(pi/3 + pi/6) = 0. Class 1 (cos sqrt(3)/2 > 0) is
    # hard. t is updated first: 0.01 * 1/2 + 0.99 * 0 = 0.005, then used:
    # negative = c (0.005 + c) with c = sqrt(3)/2.
    t = torch.zeros(1, dtype=F64)
    loss, new_t = curricularface_loss(X60, W, LABEL0, t, margin=math.pi / 6, scale=2.0)
    c = SQRT3 / 2
    torch.testing.assert_close(new_t, torch.tensor([0.005], dtype=F64))
    assert new_t.shape == t.shape and not new_t.requires_grad
    torch.testing.assert_close(loss, torch.tensor(ce([0.0, 2.0 * c * (0.005 + c)], 0), dtype=F64))
    assert t.item() == 0.0  # the input state is not modified in place


def test_curricularface_hard_mask_compares_with_raw_cos_theta_plus_m():
    # x = (-1, 0), label 0: cos = -1, theta = pi, so the fallback target is used:
    # -1 - m sin(m) = -1.2618 (m = pi/6), while the raw cos(theta + m) = -cos(m) = -0.8660.
    # Class 1 has cos -0.9 (between the two): official rule (raw formula) -> not hard.
    # Class 2 has cos 0 > -0.866 -> hard: 0 * (t + 0) = 0 (so pick cos 0.2 instead).
    m, s = math.pi / 6, 2.0
    w = torch.tensor([[1.0, 0.0], [0.9, math.sqrt(1 - 0.81)], [-0.2, math.sqrt(1 - 0.04)]], dtype=F64)
    x = torch.tensor([[-1.0, 0.0]], dtype=F64)
    t = torch.tensor([0.4], dtype=F64)
    loss, new_t = curricularface_loss(x, w, LABEL0, t, margin=m, scale=s)
    t1 = 0.01 * -1.0 + 0.99 * 0.4
    torch.testing.assert_close(new_t, torch.tensor([t1], dtype=F64))
    target = -1.0 - m * math.sin(m)
    expected = ce([s * target, s * -0.9, s * 0.2 * (t1 + 0.2)], 0)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))
    # (Comparing with the final target logit instead would have modulated class 1.)
    wrong = ce([s * target, s * -0.9 * (t1 - 0.9), s * 0.2 * (t1 + 0.2)], 0)
    assert abs(loss.item() - wrong) > 1e-3


@pytest.mark.parametrize("t0", [0.0, 0.7, -0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_curricularface_without_hard_negatives_is_arcface(t0, reduction):
    x, w, labels = orthogonal_batch()
    loss, _ = curricularface_loss(x, w, labels, torch.tensor([t0], dtype=F64), margin=0.5,
                                  scale=16.0, reduction=reduction)
    expected = arcface_loss(x, w, labels, margin=0.5, scale=16.0, reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_curricularface_running_t_three_steps():
    t = torch.zeros(1, dtype=F64)
    expected = 0.0
    for step in range(3):
        x, w, labels = random_batch(seed=step)
        mean_cos = (F.normalize(x, dim=1) * F.normalize(w, dim=1)[labels]).sum(1).mean().item()
        expected = 0.01 * mean_cos + 0.99 * expected
        _, t = curricularface_loss(x, w, labels, t)
        torch.testing.assert_close(t, torch.tensor([expected], dtype=F64), rtol=1e-14, atol=1e-15)


def test_curricularface_gradcheck():
    x, w, labels = random_batch(seed=3)
    t_after = 0.25

    def fn(x, w):
        # t is updated from the batch without gradient. Feed the t that makes the updated
        # value t_after for these very inputs, so finite differences see the same (t held
        # constant) function that autograd differentiates.
        mean_cos = (F.normalize(x, dim=1) * F.normalize(w, dim=1)[labels]).sum(1).mean().detach()
        t_before = (t_after - 0.01 * mean_cos) / 0.99
        loss, new_t = curricularface_loss(x, w, labels, t_before.reshape(1), scale=8.0)
        return loss

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


# ----------------------------------------------------------------------------------- AdaFace


def test_adaface_official_defaults():
    params = inspect.signature(adaface_loss).parameters
    assert (params["margin"].default, params["h"].default, params["scale"].default,
            params["t_alpha"].default, params["eps"].default) == (0.4, 0.333, 64.0, 0.01, 1e-3)


def test_adaface_hand_example():
    # t_alpha = 1: the statistics become this batch's, mean 4, std (unbiased) sqrt(2).
    # With z = 1 / (sqrt2 + eps) = 0.70661:
    # Row 0: norm 3 at 60 deg, label 0: scaler -z, g_angular = +m z, g_additive = m - m z,
    #        target cos(pi/3 + m z) - (m - m z).
    # Row 1: norm 5 at 0 deg, label 0: cos clamped to 1 - eps, scaler +z, g_angular = -m z;
    #        arccos(1 - eps) - m z < eps is clipped to eps: target cos(eps) - (m + m z).
    m, h, s, eps = 0.4, 1.0, 2.0, 1e-3
    x = torch.tensor([unit(60, 3.0), unit(0, 5.0)], dtype=F64)
    labels = torch.tensor([0, 0])
    loss, mean, std = adaface_loss(x, W, labels, torch.tensor([20.0], dtype=F64),
                                   torch.tensor([100.0], dtype=F64), margin=m, h=h, scale=s,
                                   t_alpha=1.0, reduction="none")
    torch.testing.assert_close(mean, torch.tensor([4.0], dtype=F64))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(2.0)], dtype=F64))
    z = 1.0 / (math.sqrt(2.0) + eps)
    target0 = math.cos(math.pi / 3 + m * z) - (m - m * z)
    target1 = math.cos(eps) - (m + m * z)
    expected = [ce([s * target0, s * SQRT3 / 2], 0), ce([s * target1, s * 0.0], 0)]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))


def test_adaface_h_zero_is_clamped_cosface():
    # h = 0: z = 0, g_angular = 0, g_additive = m: target cos(clip(theta, eps, pi - eps)) - m,
    # i.e. CosFace on cosines clamped to [-1 + eps, 1 - eps] (inside the clamp here).
    x, w, labels = random_batch(seed=1)
    for reduction in ("mean", "none"):
        loss, mean, std = adaface_loss(x, w, labels, 20.0, 100.0, h=0.0, scale=16.0,
                                       reduction=reduction)
        expected = cosface_loss(x, w, labels, margin=0.4, scale=16.0, reduction=reduction)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    norms = x.norm(dim=1)
    torch.testing.assert_close(mean, 0.01 * norms.mean() + 0.99 * 20.0)
    torch.testing.assert_close(std, 0.01 * norms.std() + 0.99 * 100.0)


def test_adaface_running_stats_three_steps_clip_norms():
    # Official buffers start at mean 20, std 100; EMA 0.01 of the batch's mean and unbiased
    # std of the norms clipped to [0.001, 100].
    batches = [[2.0, 4.0, 150.0], [10.0, 30.0, 50.0, 70.0], [1e-5, 8.0]]
    mean, std = torch.tensor([20.0], dtype=F64), torch.tensor([100.0], dtype=F64)
    em, es = 20.0, 100.0
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, dtype=F64)
    for norms in batches:
        x = F.normalize(torch.randn(len(norms), 5, generator=g, dtype=F64), dim=1)
        x = x * torch.tensor(norms, dtype=F64)[:, None]
        labels = torch.randint(0, 3, (len(norms),), generator=g)
        clipped = [min(max(v, 0.001), 100.0) for v in norms]
        bm = sum(clipped) / len(clipped)
        bs = math.sqrt(sum((v - bm) ** 2 for v in clipped) / (len(clipped) - 1))
        em, es = 0.01 * bm + 0.99 * em, 0.01 * bs + 0.99 * es
        _, mean, std = adaface_loss(x, w, labels, mean, std)
        torch.testing.assert_close(mean, torch.tensor([em], dtype=F64), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(std, torch.tensor([es], dtype=F64), rtol=1e-13, atol=1e-13)
        assert not mean.requires_grad and not std.requires_grad


def test_adaface_norm_gets_no_gradient():
    # The norm enters detached: the gradient is orthogonal to each embedding.
    x, w, labels = random_batch(seed=2, norm_range=(5.0, 40.0))
    x.requires_grad_()
    loss, _, _ = adaface_loss(x, w, labels, 20.0, 100.0)
    (grad,) = torch.autograd.grad(loss, x)
    radial = (grad * x).sum(1)
    torch.testing.assert_close(radial, torch.zeros_like(radial), atol=1e-12, rtol=0)
    assert grad.abs().max() > 1e-3


def test_adaface_gradcheck():
    x, w, labels = random_batch(seed=4)
    norms = torch.linspace(3.0, 60.0, x.shape[0], dtype=F64)

    def fn(direction, w):
        # Fixed norms: the (detached) norms and batch statistics do not move under finite
        # differences, as they do not under autograd.
        x = F.normalize(direction, dim=1) * norms[:, None]
        return adaface_loss(x, w, labels, 20.0, 100.0, h=1.0, scale=8.0)[0]

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


# ----------------------------------------------------------------------------------- MagFace


def test_magface_official_defaults():
    params = inspect.signature(magface_loss).parameters
    assert {k: params[k].default for k in ("scale", "l_a", "u_a", "l_m", "u_m", "lambda_g", "easy_margin")} == dict(
        scale=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True)


def test_magface_hand_value_and_norm_gradient():
    # |x| = a = 60 at 60 degrees, label 0: m(a) = 0.35 / 100 * 50 + 0.45 = 0.625.
    # Target cos(pi/3 + 0.625) (cos > 0, easy margin), other sqrt(3)/2; s = 2.
    # loss = CE + 35 (a / 110^2 + 1 / a). Radial derivative (the cosines do not depend on a):
    # dL/da = -s (1 - p0) sin(pi/3 + m) (-k) ... = s (1 - p0) sin(pi/3 + m) k + 35 (1/110^2 - 1/a^2)
    # with k = 0.35 / 100 and p0 the softmax probability of the target.
    a, s, k = 60.0, 2.0, 0.35 / 100
    m = k * (a - 10.0) + 0.45
    target = math.cos(math.pi / 3 + m)
    x = torch.tensor([unit(60, a)], dtype=F64, requires_grad=True)
    loss = magface_loss(x, W, LABEL0, scale=s)
    g = a / 110.0**2 + 1.0 / a
    torch.testing.assert_close(loss, torch.tensor(ce([s * target, s * SQRT3 / 2], 0) + 35.0 * g, dtype=F64))
    (grad,) = torch.autograd.grad(loss, x)
    p0 = 1.0 / (1.0 + math.exp(s * SQRT3 / 2 - s * target))
    d_da = s * (1 - p0) * math.sin(math.pi / 3 + m) * k + 35.0 * (1 / 110.0**2 - 1 / a**2)
    radial = (grad * x.detach()).sum().item() / a
    assert abs(radial - d_da) < 1e-12 and abs(d_da) > 1e-4
    # Without the regularizer the norm still gets gradient, through the margin m(a).
    (grad,) = torch.autograd.grad(magface_loss(x, W, LABEL0, scale=s, lambda_g=0.0), x)
    margin_only = s * (1 - p0) * math.sin(math.pi / 3 + m) * k
    assert abs((grad * x.detach()).sum().item() / a - margin_only) < 1e-12 and margin_only > 1e-3


def test_magface_margin_rules():
    # cos_t = -1/2 (120 degrees), |x| = 10 -> m = 0.45.
    x = torch.tensor([unit(120, 10.0)], dtype=F64)
    s, m = 2.0, 0.45
    g = 35.0 * (10.0 / 110.0**2 + 1.0 / 10.0)
    other = s * math.cos(math.radians(30))
    # easy margin: cos <= 0 keeps the plain cosine.
    easy = magface_loss(x, W, LABEL0, scale=s)
    torch.testing.assert_close(easy, torch.tensor(ce([s * -0.5, other], 0) + g, dtype=F64))
    # otherwise cos(theta + m) since -1/2 > cos(pi - m) = -0.9004.
    hard = magface_loss(x, W, LABEL0, scale=s, easy_margin=False)
    target = math.cos(2 * math.pi / 3 + m)
    torch.testing.assert_close(hard, torch.tensor(ce([s * target, other], 0) + g, dtype=F64))
    # past theta + m > pi: cos - sin(pi - m) m.
    x = torch.tensor([unit(175, 10.0)], dtype=F64)
    c = math.cos(math.radians(175))
    fallback = magface_loss(x, W, LABEL0, scale=s, easy_margin=False)
    expected = ce([s * (c - math.sin(math.pi - m) * m), s * math.sin(math.radians(175))], 0) + g
    torch.testing.assert_close(fallback, torch.tensor(expected, dtype=F64))


def test_magface_norm_clamped_outside_range():
    # |x| beyond u_a (or below l_a): the clamped norm is constant, no radial gradient.
    for a in (150.0, 5.0):
        x = torch.tensor([unit(60, a)], dtype=F64, requires_grad=True)
        (grad,) = torch.autograd.grad(magface_loss(x, W, LABEL0, scale=2.0), x)
        assert abs((grad * x.detach()).sum().item()) < 1e-12


def test_magface_reductions():
    x, w, labels = random_batch(seed=5, norm_range=(12.0, 100.0))
    rows = magface_loss(x, w, labels, reduction="none")
    torch.testing.assert_close(magface_loss(x, w, labels), rows.mean())
    torch.testing.assert_close(magface_loss(x, w, labels, reduction="sum"), rows.sum())


@pytest.mark.parametrize("easy_margin", [True, False])
def test_magface_gradcheck(easy_margin):
    x, w, labels = random_batch(seed=6, norm_range=(15.0, 95.0))
    fn = lambda x, w: magface_loss(x, w, labels, scale=8.0, easy_margin=easy_margin)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


# ------------------------------------------------------------------------ sub-center ArcFace


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_subcenter_k1_is_arcface(reduction):
    x, w, labels = random_batch(seed=7)
    torch.testing.assert_close(
        subcenter_arcface_loss(x, w, labels, k=1, reduction=reduction),
        arcface_loss(x, w, labels, margin=0.5, reduction=reduction), rtol=1e-12, atol=1e-12)


def test_subcenter_class_cosine_is_max_over_subcenters():
    # K = 2, class-major rows. Class 0: (1, 0) [cos 1/2] and (0, -1) [cos -sqrt3/2];
    # class 1: (-1, 0) [cos -1/2] and (0, 1) [cos sqrt3/2]. Class cosines (1/2, sqrt3/2):
    # the ArcFace hand example, m = pi/6, s = 2 -> log(1 + e^sqrt3).
    w = torch.tensor([[1.0, 0.0], [0.0, -3.0], [-2.0, 0.0], [0.0, 1.0]], dtype=F64)
    loss = subcenter_arcface_loss(X60, w, LABEL0, k=2, margin=math.pi / 6, scale=2.0)
    torch.testing.assert_close(loss, torch.tensor(1.8949526891012602, dtype=F64))


def test_subcenter_rejects_rows_not_multiple_of_k():
    with pytest.raises(ValueError, match="subcenter_arcface_loss: weight must have C \\* k rows"):
        subcenter_arcface_loss(X60, W, LABEL0, k=3)


def test_subcenter_gradcheck():
    x, w, labels = random_batch(seed=8)
    w = torch.randn(5 * 3, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    fn = lambda x, w: subcenter_arcface_loss(x, w, labels, k=3, scale=8.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


def dominant_example():
    # K = 3 sub-centers per class, 2-D, angles in degrees; rows are class-major.
    centers = [[0, 120, 240],   # class 0
               [90, 180, 270],  # class 1
               [45, 135, 315],  # class 2: no samples -> keeps sub-center 0
               [0, 100, 200]]   # class 3: one vote each for sub-centers 1 and 2 -> tie -> 1
    norms = [1.0, 2.0, 3.0]
    w = torch.tensor([unit(a, norms[j]) for row in centers for j, a in enumerate(row)], dtype=F64)
    samples = [(0, 10), (1, 95), (0, 20), (3, 110), (1, 175), (0, -15), (0, 115), (1, 185),
               (3, 190)]
    x = torch.tensor([unit(a, 1.0 + i) for i, (_, a) in enumerate(samples)], dtype=F64)
    labels = torch.tensor([c for c, _ in samples])
    return x, w, labels


def test_subcenter_dominant_constructed_example():
    x, w, labels = dominant_example()
    dominant, outliers = subcenter_dominant(x, w, labels, k=3, threshold=75.0)
    # Class 0: votes (3, 1, 0) -> center 0 (0 deg); the 115-degree sample (row 6) is an outlier.
    # Class 1: 95 -> 90 (idx 0); 175, 185 -> 180 (idx 1): dominant 1 (180 deg); row 1 (95 deg)
    # is 85 degrees away: outlier. Class 3: 110 -> 100 (idx 1), 190 -> 200 (idx 2): tie -> 1
    # (100 deg); row 8 (190 deg) is 90 degrees away: outlier.
    torch.testing.assert_close(dominant, w.view(4, 3, 2)[torch.arange(4), torch.tensor([0, 1, 0, 1])])
    assert outliers.dtype == torch.int64
    assert outliers.tolist() == [1, 6, 8]
    # A looser threshold keeps them all (the farthest is 115 degrees); a tighter one also drops
    # the rows 20 and 15 degrees from class 0's center (rows 2 and 5), not the ones 10 or 5
    # degrees away.
    assert subcenter_dominant(x, w, labels, k=3, threshold=120.0)[1].tolist() == []
    assert subcenter_dominant(x, w, labels, k=3, threshold=12.0)[1].tolist() == [1, 2, 5, 6, 8]


def test_subcenter_dominant_matches_pml_get_outliers():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, w, labels = dominant_example()
    pml = losses.SubCenterArcFaceLoss(num_classes=4, embedding_size=2, sub_centers=3).to(F64)
    pml.W.data = w.t().clone()
    theirs, their_dominant = pml.get_outliers(x, labels, threshold=75)
    dominant, outliers = subcenter_dominant(x, w, labels, k=3, threshold=75.0)
    # PML lists outliers class by class; ours are in sample order. PML leaves the columns of
    # classes without samples uninitialized (class 2 here).
    assert sorted(theirs.tolist()) == outliers.tolist()
    for c in (0, 1, 3):
        torch.testing.assert_close(their_dominant[:, c], dominant[c])


# ------------------------------------------------------------------------------- ElasticFace


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_elasticface_constant_margins_are_arcface_and_cosface(reduction):
    x, w, labels = orthogonal_batch()  # theta + m < pi everywhere: no ArcFace fallback
    m = torch.full((x.shape[0],), 0.5, dtype=F64)
    torch.testing.assert_close(elasticface_loss(x, w, labels, m, kind="arc", reduction=reduction),
                               arcface_loss(x, w, labels, margin=0.5, reduction=reduction),
                               rtol=1e-12, atol=1e-12)
    x, w, labels = random_batch(seed=10)
    m = torch.full((x.shape[0],), 0.35, dtype=F64)
    torch.testing.assert_close(elasticface_loss(x, w, labels, m, kind="cos", reduction=reduction),
                               cosface_loss(x, w, labels, margin=0.35, reduction=reduction),
                               rtol=1e-12, atol=1e-12)


def test_elasticface_arc_continues_past_pi_as_arcface():
    # 170 degrees from class 0, m = 0.5: theta + m > pi, the target continues as
    # cos - m sin m (the official head keeps cos(theta + m), which rises again).
    x = torch.tensor([unit(170)], dtype=F64)
    theta, s = math.radians(170), 2.0
    loss = elasticface_loss(x, W, LABEL0, torch.tensor([0.5], dtype=F64), scale=s)
    expected = ce([s * (math.cos(theta) - 0.5 * math.sin(0.5)), s * math.sin(theta)], 0)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(loss, arcface_loss(x, W, LABEL0, margin=0.5, scale=s))


def test_elasticface_per_row_margins():
    x, w, labels = random_batch(seed=11)
    m = torch.tensor([0.3, 0.45, 0.5, 0.55, 0.6, 0.7], dtype=F64)
    rows = elasticface_loss(x, w, labels, m, kind="cos", reduction="none")
    for i in range(x.shape[0]):
        one = cosface_loss(x[i:i + 1], w, labels[i:i + 1], margin=m[i].item())
        torch.testing.assert_close(rows[i], one)


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_plus_assignment_is_the_official_gather(kind):
    # Rows 0..2 on classes 0..2 (orthonormal) at angles 50, 10, 30 degrees to their class:
    # cosines descending -> order = [1, 2, 0]. Sorted margins (0.3, 0.4, 0.5).
    # Official: row i gets sorted[order[i]] -> rows get (0.4, 0.5, 0.3).
    # (The rank rule "k-th largest cosine gets the k-th smallest margin" would give
    # (0.5, 0.3, 0.4): the official code is not that.)
    w = torch.eye(3, dtype=F64)
    angles = [50, 10, 30]
    x = torch.zeros(3, 3, dtype=F64)
    for i, a in enumerate(angles):
        x[i, i] = math.cos(math.radians(a))
        x[i, (i + 1) % 3] = math.sin(math.radians(a))
    labels = torch.arange(3)
    drawn = torch.tensor([0.5, 0.3, 0.4], dtype=F64)
    cos_t = torch.tensor([math.cos(math.radians(a)) for a in angles], dtype=F64)
    torch.testing.assert_close(elasticface_margins(drawn, cos_t), torch.tensor([0.4, 0.5, 0.3], dtype=F64))
    plus = elasticface_loss(x, w, labels, drawn, kind=kind, plus=True, reduction="none")
    assigned = elasticface_loss(x, w, labels, torch.tensor([0.4, 0.5, 0.3], dtype=F64), kind=kind,
                                reduction="none")
    torch.testing.assert_close(plus, assigned)
    rank = elasticface_loss(x, w, labels, torch.tensor([0.5, 0.3, 0.4], dtype=F64), kind=kind,
                            reduction="none")
    assert (plus - rank).abs().max() > 1e-3


def test_elasticface_plus_when_order_is_an_involution():
    # cosines increasing with the row: order reverses the rows (its own inverse), so the
    # official gather and the rank rule agree: the largest cosine gets the smallest margin.
    cos_t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    drawn = torch.tensor([0.52, 0.47, 0.55, 0.49], dtype=F64)
    torch.testing.assert_close(elasticface_margins(drawn, cos_t),
                               torch.tensor([0.55, 0.52, 0.49, 0.47], dtype=F64))


def test_elasticface_rejects_unknown_kind():
    with pytest.raises(ValueError, match="elasticface_loss: kind must be one of"):
        elasticface_loss(X60, W, LABEL0, torch.tensor([0.5], dtype=F64), kind="sphere")


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("plus", [False, True])
def test_elasticface_gradcheck(kind, plus):
    x, w, labels = random_batch(seed=12)
    m = 0.5 + 0.05 * torch.randn(x.shape[0], generator=torch.Generator().manual_seed(13), dtype=F64)
    fn = lambda x, w: elasticface_loss(x, w, labels, m, kind=kind, plus=plus, scale=8.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


# ------------------------------------------------------------------------------------ shared


@pytest.mark.parametrize("name", ["curricularface", "adaface", "magface", "subcenter", "elastic"])
def test_guarded_arccos_keeps_gradients_finite_at_cos_one(name):
    # A feature exactly on its class center (cos = 1): the official sqrt(1 - c^2) / acos
    # derivative is infinite there; ours stays finite.
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=F64, requires_grad=True)
    w = W.clone().requires_grad_()
    labels = torch.tensor([0, 1])
    if name == "curricularface":
        loss = curricularface_loss(x, w, labels, torch.zeros(1, dtype=F64))[0]
    elif name == "adaface":
        loss = adaface_loss(x, w, labels, 20.0, 100.0)[0]
    elif name == "magface":
        loss = magface_loss(x * 10, w, labels, easy_margin=False)
    elif name == "subcenter":
        loss = subcenter_arcface_loss(x, w, labels, k=1)
    else:
        loss = elasticface_loss(x, w, labels, torch.tensor([0.5, 0.5], dtype=F64))
    grads = torch.autograd.grad(loss, (x, w))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fn", [
    lambda x, w, y, r: curricularface_loss(x, w, y, torch.zeros(1, dtype=F64), reduction=r)[0],
    lambda x, w, y, r: adaface_loss(x, w, y, 20.0, 100.0, reduction=r)[0],
    lambda x, w, y, r: magface_loss(x, w, y, reduction=r),
    lambda x, w, y, r: subcenter_arcface_loss(x, w, y, k=1, reduction=r),
    lambda x, w, y, r: elasticface_loss(x, w, y, torch.full((6,), 0.5, dtype=F64), reduction=r),
])
def test_reductions_agree(fn):
    x, w, labels = random_batch(seed=14, norm_range=(12.0, 90.0))
    rows = fn(x, w, labels, "none")
    assert rows.shape == (6,)
    torch.testing.assert_close(fn(x, w, labels, "mean"), rows.mean())
    torch.testing.assert_close(fn(x, w, labels, "sum"), rows.sum())
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(x, w, labels, "max")
