"""Reference angular/additive margin softmax losses: ArcFace, CosFace, SphereFace and the
combined margin of insightface.

All work on ``cos = <x/|x|, w/|w|>`` (clamped to [-1, 1]); only the target logit gets a
margin. Two gradient modes:

- ``"exact"``: the true derivative of the margin function of ``cos``. The arccos derivative
  ``-1/sqrt(1 - c^2)`` is unbounded at ``|c| = 1``, so it is evaluated with
  ``sqrt(1 - c^2)`` floored at 1e-6 (finite instead of inf/NaN).
- ``"detached"``: the margin shifts the value only, ``target = cos + (margin(cos) - cos).detach()``,
  so ``d target / d cos = 1`` (insightface's and OpenSphere's heads).
"""

import math

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")
_GRADIENTS = ("exact", "detached")

# Floor of sin(theta) = sqrt(1 - cos^2) in the arccos derivative.
_SIN_FLOOR = 1e-6


def _check_choice(op: str, name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {allowed}, got {value!r}")


class _GuardedArccos(torch.autograd.Function):
    """arccos whose backward floors sin(theta) so |cos| = 1 gives a finite gradient."""

    @staticmethod
    def forward(ctx, c):
        ctx.save_for_backward(c)
        return torch.acos(c)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return -grad / torch.sqrt(1 - c * c).clamp_min(_SIN_FLOOR)


def _guarded_arccos(c: torch.Tensor) -> torch.Tensor:
    return _GuardedArccos.apply(c)


class _ClampCosines(torch.autograd.Function):
    """cos clamped to [-limit, limit], its gradient zero at the bounds as beyond them, as the
    kernels' is. Tensor.clamp's gradient at the bounds changed between torch releases (2.11
    passes it there, 2.14 does not); this one saves and computes what clamp's does."""

    @staticmethod
    def forward(ctx, cos, limit):
        ctx.save_for_backward(cos)
        ctx.limit = limit
        return cos.clamp(-limit, limit)

    @staticmethod
    def backward(ctx, grad):
        (cos,) = ctx.saved_tensors
        return torch.where((cos > -ctx.limit) & (cos < ctx.limit), grad, 0.0), None


def _clamp_cosines(cos: torch.Tensor, limit: float = 1.0) -> torch.Tensor:
    return _ClampCosines.apply(cos, limit)


def _cosines(embeddings, weight, normalize_embeddings):
    """Returns (cos [N, C] clamped to [-1, 1], per-row scale factor [N, 1] before `scale`)."""
    w = F.normalize(weight, p=2.0, dim=1)
    x = F.normalize(embeddings, p=2.0, dim=1)
    cos = _clamp_cosines(x @ w.t())
    if normalize_embeddings:
        row_norm = torch.ones_like(cos[:, :1])
    else:
        # SphereFace / NormFace form: the logit is |x| |w| cos with |w| = 1.
        row_norm = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True)
    return cos, row_norm


def _replace_target(cos, cos_t, labels, target, gradient):
    """cos with column labels[i] of row i replaced by target[i] (per gradient mode)."""
    if gradient == "detached":
        target = cos_t + (target - cos_t).detach()
    one_hot = F.one_hot(labels, cos.shape[1]).to(torch.bool)
    return torch.where(one_hot, target[:, None], cos)


def margin_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    gradient: str = "exact",
    normalize_embeddings: bool = True,
) -> torch.Tensor:
    r"""Logits [N, C] of the combined-margin softmax (insightface).

    ``cos_ij = <x_i/|x_i|, w_j/|w_j|>`` clamped to [-1, 1], ``theta = arccos(cos)``.
    Non-target logits are ``s * cos_ij``; the target logit is
    ``s * (cos(m1 * theta + m2) - m3)``. ArcFace is (1, m, 0), CosFace (1, 0, m),
    multiplicative SphereFace-like (m, 0, 0). When ``m1 == 1`` and ``m3 == 0`` (ArcFace)
    and ``theta + m2 > pi``, the target continues monotonically as ``cos - m2 sin(m2)``.
    ``s = scale``, or ``scale * |x_i|`` per row when ``normalize_embeddings=False``.

    Deng, Guo, Xue, Zafeiriou 2019, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition" (section 3.3, combined margin).
    """
    _check_choice("margin_logits", "gradient", gradient, _GRADIENTS)
    cos, row_norm = _cosines(embeddings, weight, normalize_embeddings)
    cos_t = cos.gather(1, labels[:, None]).squeeze(1)
    theta = _guarded_arccos(cos_t)
    target = torch.cos(m1 * theta + m2) - m3
    if m1 == 1.0 and m3 == 0.0:
        # Past theta = pi - m2 cos(theta + m2) would rise again; continue linearly instead.
        target = torch.where(theta + m2 > math.pi, cos_t - m2 * math.sin(m2), target)
    return scale * row_norm * _replace_target(cos, cos_t, labels, target, gradient)


def margin_softmax_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    reduction: str = "mean",
    gradient: str = "exact",
    normalize_embeddings: bool = True,
) -> torch.Tensor:
    r"""Cross-entropy over :func:`margin_logits`:
    ``loss_i = -log softmax(margin_logits)_i[y_i]``, reduced by ``reduction``
    ("mean" | "sum" | "none").

    Deng, Guo, Xue, Zafeiriou 2019, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition" (combined margin, eq. 4).
    """
    _check_choice("margin_softmax_loss", "reduction", reduction, _REDUCTIONS)
    logits = margin_logits(
        embeddings, weight, labels, scale=scale, m1=m1, m2=m2, m3=m3,
        gradient=gradient, normalize_embeddings=normalize_embeddings,
    )
    return F.cross_entropy(logits, labels, reduction=reduction)


def arcface_loss(embeddings, weight, labels, *, margin: float = 0.5, scale: float = 64.0, **kw):
    r"""ArcFace: additive angular margin, target logit ``s * cos(theta + m)`` (m in radians),
    with the monotone fallback ``cos - m sin(m)`` past ``theta + m > pi``.
    Other keyword arguments as :func:`margin_softmax_loss`.

    Deng, Guo, Xue, Zafeiriou 2019, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition".
    """
    return margin_softmax_loss(embeddings, weight, labels, scale=scale, m2=margin, **kw)


def cosface_loss(embeddings, weight, labels, *, margin: float = 0.35, scale: float = 64.0, **kw):
    r"""CosFace / large margin cosine loss: target logit ``s * (cos(theta) - m)``.
    Other keyword arguments as :func:`margin_softmax_loss`.

    Wang, Wang, Zhou, Ji, Gong, Zhou, Li, Liu 2018, "CosFace: Large Margin Cosine Loss for
    Deep Face Recognition".
    """
    return margin_softmax_loss(embeddings, weight, labels, scale=scale, m3=margin, **kw)


def sphereface_psi(theta: torch.Tensor, m: float) -> torch.Tensor:
    r"""SphereFace's monotone extension of ``cos(m theta)`` to [0, pi]:
    ``psi(theta) = (-1)^k cos(m theta) - 2k``, ``k = floor(m theta / pi)``.

    Liu, Wen, Yu, Li, Raj, Song 2017, "SphereFace: Deep Hypersphere Embedding for Face
    Recognition" (eq. 7).
    """
    k = torch.floor(m * theta / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k, k a float tensor
    return sign * torch.cos(m * theta) - 2.0 * k


def sphereface_lambda(
    iteration: int,
    base: float = 1000.0,
    gamma: float = 0.12,
    power: float = 1.0,
    lambda_min: float = 5.0,
) -> float:
    r"""SphereFace's annealed blending weight
    ``lambda = max(lambda_min, base * (1 + gamma * iteration)^(-power))``
    (large early, so training starts close to plain softmax).

    Liu, Wen, Yu, Li, Raj, Song 2017, "SphereFace: Deep Hypersphere Embedding for Face
    Recognition" (released Caffe MarginInnerProduct schedule).
    """
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


def sphereface_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 4,
    lambda_: float = 5.0,
    scale: float = 1.0,
    gradient: str = "exact",
    normalize_embeddings: bool = False,
) -> torch.Tensor:
    r"""A-Softmax logits [N, C]: weights normalized, non-target logits ``r_i * cos``,
    target ``r_i * (psi(theta) + lambda * cos) / (1 + lambda)`` with
    :func:`sphereface_psi` and ``r_i = scale * |x_i|`` (``scale`` when
    ``normalize_embeddings``). ``lambda_`` blends towards the plain cosine
    (see :func:`sphereface_lambda`).

    Liu, Wen, Yu, Li, Raj, Song 2017, "SphereFace: Deep Hypersphere Embedding for Face
    Recognition".
    """
    _check_choice("sphereface_logits", "gradient", gradient, _GRADIENTS)
    cos, row_norm = _cosines(embeddings, weight, normalize_embeddings)
    cos_t = cos.gather(1, labels[:, None]).squeeze(1)
    psi = sphereface_psi(_guarded_arccos(cos_t), margin)
    target = (psi + lambda_ * cos_t) / (1.0 + lambda_)
    return scale * row_norm * _replace_target(cos, cos_t, labels, target, gradient)


def sphereface_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 4,
    lambda_: float = 5.0,
    scale: float = 1.0,
    reduction: str = "mean",
    gradient: str = "exact",
    normalize_embeddings: bool = False,
) -> torch.Tensor:
    r"""A-Softmax loss: cross-entropy over :func:`sphereface_logits`, reduced by
    ``reduction`` ("mean" | "sum" | "none").

    Liu, Wen, Yu, Li, Raj, Song 2017, "SphereFace: Deep Hypersphere Embedding for Face
    Recognition".
    """
    _check_choice("sphereface_loss", "reduction", reduction, _REDUCTIONS)
    logits = sphereface_logits(
        embeddings, weight, labels, margin=margin, lambda_=lambda_, scale=scale,
        gradient=gradient, normalize_embeddings=normalize_embeddings,
    )
    return F.cross_entropy(logits, labels, reduction=reduction)
