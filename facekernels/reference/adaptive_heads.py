"""Reference adaptive-margin heads: CurricularFace, AdaFace, MagFace, sub-center ArcFace and
ElasticFace, transcribed from each paper's official code.

Conventions shared by every function here:

- ``embeddings`` [N, D] are raw features (normalized inside with ``F.normalize``),
  ``weight`` [C, D] holds one row per class (the official repositories keep a [D, C] kernel
  normalized on dim 0; ours is its transpose, normalized on dim 1), ``labels`` are int64 [N].
- The loss is cross-entropy over ``scale * logits``, reduced by ``reduction``
  ("mean" | "sum" | "none").
- Wherever the official code differentiates ``arccos`` (or ``sqrt(1 - c^2)``) directly, whose
  derivative is unbounded at ``|c| = 1``, we write ``cos(theta + m)`` as
  ``cos(arccos(c) + m)`` with the guarded arccos of :mod:`.margin_softmax` (``sin theta``
  floored at 1e-6 in the derivative). Values are the official ones; the derivative is
  ``sin(theta + m) / max(sin theta, 1e-6)``, finite everywhere (the official one is
  inf/NaN at ``|c| = 1``).
- Running statistics (CurricularFace's ``t``, AdaFace's norm mean/std) are passed in and the
  updated values returned: they are updated without gradient *before* they are used, as the
  official heads do.
"""

import math

import torch
import torch.nn.functional as F

from .margin_softmax import _REDUCTIONS, _check_choice, _clamp_cosines, _guarded_arccos

_ELASTIC_KINDS = ("arc", "cos")


def _unit_cosines(embeddings, weight):
    """``<x_i/|x_i|, w_j/|w_j|>`` [N, C], not yet clamped (each head clamps its own way)."""
    return F.normalize(embeddings, p=2.0, dim=1) @ F.normalize(weight, p=2.0, dim=1).t()


def _target_column(cos, labels):
    return cos.gather(1, labels[:, None]).squeeze(1)


def _put_target(cos, labels, target):
    """``cos`` with column ``labels[i]`` of row ``i`` replaced by ``target[i]``."""
    one_hot = F.one_hot(labels, cos.shape[1]).to(torch.bool)
    return torch.where(one_hot, target[:, None], cos)


def _reduce(per_row, reduction):
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def _as_tensor_like(value, like):
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- CurricularFace


def curricularface_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    t,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    reduction: str = "mean",
):
    r"""CurricularFace loss. Returns ``(loss, new_t)``.

    ``cos`` clamped to [-1, 1], ``c_i = cos_{i, y_i}``, ``theta_i = arccos(c_i)``:

    1. running ``t`` (the value *before* this step, e.g. the ``zeros(1)`` buffer) is updated
       first, without gradient: ``t <- 0.01 * mean_i(c_i) + 0.99 * t``;
    2. target: ``cos(theta_i + m)`` if ``c_i > cos(pi - m)``, else ``c_i - m sin(m)``
       (the official ``threshold`` / ``mm = sin(pi - m) m`` fallback);
    3. hard negatives are ``j`` with ``cos_ij > cos(theta_i + m)``, compared with the *raw*
       ``cos(theta_i + m)``, not with the final (possibly fallback) target logit; each
       becomes ``cos_ij (t + cos_ij)`` with the updated ``t`` held constant (no gradient
       through ``t``). Other negatives stay ``cos_ij``.

    Logits are ``scale`` times the above. ``new_t`` has ``t``'s shape and carries no grad.

    Huang, Wang, Tai, Liu, Shen, Li, Li, Huang 2020, "CurricularFace: Adaptive Curriculum
    Learning Loss for Deep Face Recognition" (official: HuangYG123/CurricularFace,
    head/metrics.py, class CurricularFace).
    """
    _check_choice("curricularface_loss", "reduction", reduction, _REDUCTIONS)
    cos = _clamp_cosines(_unit_cosines(embeddings, weight))
    cos_t = _target_column(cos, labels)
    with torch.no_grad():
        new_t = 0.01 * cos_t.mean() + 0.99 * _as_tensor_like(t, cos)
    cos_theta_m = torch.cos(_guarded_arccos(cos_t) + margin)
    threshold = math.cos(math.pi - margin)
    mm = math.sin(math.pi - margin) * margin
    target = torch.where(cos_t > threshold, cos_theta_m, cos_t - mm)
    hard = cos > cos_theta_m.detach()[:, None]
    t_row = new_t.reshape(-1)[0]
    modulated = torch.where(hard, cos * (t_row + cos), cos)
    logits = scale * _put_target(modulated, labels, target)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _reduce(loss, reduction), new_t


# --------------------------------------------------------------------------------- AdaFace


def adaface_margins(
    embeddings: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    h: float = 0.333,
    margin: float = 0.4,
    t_alpha: float = 0.01,
    training: bool = True,
):
    r"""AdaFace's per-row margins as ``AdaFaceLoss`` computes them (the op
    ``facekernels::adaface_margins``). Returns ``(row_m2, row_m3, new_mean, new_std)``, the
    margins in fp32 (fp64 for fp64 embeddings), the statistics in their buffers' dtypes.

    ``n_i = clip(|x_i|, 0.001, 100)`` over the rows whose norm is finite; the other rows join
    no statistic and get NaN margins. In training, the statistics step as in
    :func:`adaface_loss`, but from the finite rows' mean and unbiased std, and a step that
    comes out non-finite (no finite row, or one: no std) keeps the old value. Then
    ``z_i = clip(h (n_i - mean) / (std + 1e-3), -1, 1)``, ``row_m2 = -margin z_i``,
    ``row_m3 = margin + margin z_i``. Everything in fp64, without gradient.
    """
    with torch.no_grad():
        raw = torch.linalg.vector_norm(embeddings.double(), dim=1)
        finite = raw.isfinite()
        norms = raw.clamp(0.001, 100.0)
        mean_now, std_now = mean.double().reshape(()), std.double().reshape(())
        if training:
            kept = norms[finite]
            nan = torch.tensor(math.nan, dtype=torch.float64, device=norms.device)
            batch_std = kept.std() if len(kept) > 1 else nan
            steps = []
            for old, batch in ((mean_now, kept.mean()), (std_now, batch_std)):
                new = t_alpha * batch + (1.0 - t_alpha) * old
                steps.append(torch.where(new.isfinite(), new, old))
            mean_now, std_now = steps
        z = (h * (norms - mean_now) / (std_now + 1e-3)).clamp(-1.0, 1.0)
        z = torch.where(finite, z, math.nan)
        acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        return ((-margin * z).to(acc), (margin + margin * z).to(acc),
                mean_now.to(mean.dtype).reshape(mean.shape), std_now.to(std.dtype).reshape(std.shape))


def adaface_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    batch_mean,
    batch_std,
    *,
    margin: float = 0.4,
    h: float = 0.333,
    scale: float = 64.0,
    t_alpha: float = 0.01,
    eps: float = 1e-3,
    reduction: str = "mean",
):
    r"""AdaFace loss. Returns ``(loss, new_mean, new_std)``.

    ``n_i = clip(|x_i|, 0.001, 100)`` (raw embedding norms, detached). First, without
    gradient, the running statistics are updated (official buffers start at
    ``batch_mean = 20``, ``batch_std = 100``)::

        mean <- t_alpha * mean_i(n_i) + (1 - t_alpha) * mean
        std  <- t_alpha * std_i(n_i)  + (1 - t_alpha) * std     # torch.std: unbiased (N - 1)

    (so a batch of one row makes ``std`` NaN, as in the official head). Then, with the
    *updated* statistics, ``z_i = clip(h (n_i - mean) / (std + eps), -1, 1)``,
    ``g_angular_i = -m z_i``, ``g_additive_i = m + m z_i``. All cosines are clamped to
    ``[-1 + eps, 1 - eps]``; non-target logits are those cosines (the official
    ``cos(clip(arccos(c), eps, pi - eps))`` round trip is the identity there); the target is
    ``cos(clip(theta_i + g_angular_i, eps, pi - eps)) - g_additive_i`` with
    ``theta_i = arccos(c_i)``. Logits are ``scale`` times these. Only the direction of
    ``x_i`` receives gradient (the norm enters detached).

    Kim, Jain, Liu 2022, "AdaFace: Quality Adaptive Margin for Face Recognition"
    (official: mk-minchul/AdaFace, head.py, class AdaFace).
    """
    _check_choice("adaface_loss", "reduction", reduction, _REDUCTIONS)
    cos = _clamp_cosines(_unit_cosines(embeddings, weight), 1.0 - eps)
    norms = torch.linalg.vector_norm(embeddings, dim=1)
    safe_norms = norms.clamp(0.001, 100.0).detach()
    with torch.no_grad():
        new_mean = t_alpha * safe_norms.mean() + (1.0 - t_alpha) * _as_tensor_like(batch_mean, cos)
        new_std = t_alpha * safe_norms.std() + (1.0 - t_alpha) * _as_tensor_like(batch_std, cos)
    mean_row = new_mean.reshape(-1)[0]
    std_row = new_std.reshape(-1)[0]
    z = (h * (safe_norms - mean_row) / (std_row + eps)).clamp(-1.0, 1.0)
    g_angular = -margin * z
    g_additive = margin + margin * z
    cos_t = _target_column(cos, labels)
    theta_m = (_guarded_arccos(cos_t) + g_angular).clamp(eps, math.pi - eps)
    target = torch.cos(theta_m) - g_additive
    logits = scale * _put_target(cos, labels, target)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _reduce(loss, reduction), new_mean, new_std


# --------------------------------------------------------------------------------- MagFace


def magface_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    l_a: float = 10.0,
    u_a: float = 110.0,
    l_m: float = 0.45,
    u_m: float = 0.8,
    lambda_g: float = 35.0,
    easy_margin: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""MagFace loss: ``mean_i CE_i + lambda_g * mean_i g(a_i)`` (as the official trainer adds
    ``loss_id + lambda_g * loss_g``); ``reduction="none"`` gives ``CE_i + lambda_g g(a_i)``.

    ``a_i = clamp(|x_i|, l_a, u_a)`` (gradient flows through it inside the range),
    margin ``m_i = (u_m - l_m) / (u_a - l_a) * (a_i - l_a) + l_m`` (also differentiated),
    regularizer ``g(a) = a / u_a^2 + 1 / a``. ``cos`` clamped to [-1, 1]; the target is
    ``cos(theta_i + m_i)`` where ``c_i > 0`` and ``c_i`` otherwise (``easy_margin=True``,
    the official default: ``MagLinear(..., easy_margin=True)`` and the builder does not
    override it), or ``cos(theta_i + m_i)`` where ``c_i > cos(pi - m_i)`` and
    ``c_i - sin(pi - m_i) m_i`` otherwise (``easy_margin=False``). Non-targets are ``cos``;
    logits are ``scale`` times these.

    Meng, Zhao, Huang, Zhou 2021, "MagFace: A Universal Representation for Face Recognition
    and Quality Assessment" (official: IrvingMeng/MagFace, models/magface.py MagLinear /
    MagLoss, run/trainer.py).
    """
    _check_choice("magface_loss", "reduction", reduction, _REDUCTIONS)
    cos = _clamp_cosines(_unit_cosines(embeddings, weight))
    x_norm = torch.linalg.vector_norm(embeddings, dim=1).clamp(l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_t = _target_column(cos, labels)
    cos_theta_m = torch.cos(_guarded_arccos(cos_t) + m)
    if easy_margin:
        target = torch.where(cos_t > 0, cos_theta_m, cos_t)
    else:
        threshold = torch.cos(math.pi - m)
        mm = torch.sin(math.pi - m) * m
        target = torch.where(cos_t > threshold, cos_theta_m, cos_t - mm)
    logits = scale * _put_target(cos, labels, target)
    ce = F.cross_entropy(logits, labels, reduction="none")
    g = x_norm / u_a**2 + 1.0 / x_norm
    return _reduce(ce + lambda_g * g, reduction)


# ---------------------------------------------------------------------- sub-center ArcFace


def _check_subcenters(op, weight, k):
    if k < 1 or weight.shape[0] % k != 0:
        raise ValueError(
            f"{op}: weight must have C * k rows (k = {k}), got {weight.shape[0]} rows"
        )
    return weight.shape[0] // k


def subcenter_arcface_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = 3,
    margin: float = 0.5,
    scale: float = 64.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Sub-center ArcFace loss.

    ``weight`` is [C * k, D], class-major: row ``c * k + j`` is sub-center ``j`` of class
    ``c`` (insightface's ``reshape(fc7, (-1, C, K))``, PML's ``view(-1, C, K)``). The class
    cosine is ``max_j cos(x, w_{c,j})`` (cosines clamped to [-1, 1]; on ties the gradient
    goes to the first maximal sub-center); then ArcFace on the class cosines with the same
    target rule as :func:`.margin_softmax.arcface_loss`: ``cos(theta + m)``, continued as
    ``cos - m sin(m)`` past ``theta + m > pi``. Logits are ``scale`` times these.

    Deng, Guo, Liu, Gong, Zafeiriou 2020, "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces" (official: deepinsight/insightface,
    recognition/SubCenter-ArcFace/train_parall.py).
    """
    _check_choice("subcenter_arcface_loss", "reduction", reduction, _REDUCTIONS)
    classes = _check_subcenters("subcenter_arcface_loss", weight, k)
    cos_all = _clamp_cosines(_unit_cosines(embeddings, weight))
    cos = cos_all.view(cos_all.shape[0], classes, k).max(dim=2).values
    cos_t = _target_column(cos, labels)
    theta = _guarded_arccos(cos_t)
    target = torch.where(theta + margin > math.pi, cos_t - margin * math.sin(margin),
                         torch.cos(theta + margin))
    logits = scale * _put_target(cos, labels, target)
    return F.cross_entropy(logits, labels, reduction=reduction)


def subcenter_dominant(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = 3,
    threshold: float = 75.0,
):
    r"""The dominant-center step of sub-center ArcFace. Returns
    ``(dominant_weight [C, D], outlier_indices int64 [M])``, both without gradient.

    Per class ``c`` (``weight`` laid out as in :func:`subcenter_arcface_loss`), each of its
    samples votes for its nearest sub-center (largest cosine; ties: lowest index); the
    dominant sub-center is the one with the most votes (ties: lowest index; a class with no
    samples keeps sub-center 0). ``dominant_weight[c]`` is that row of ``weight`` as given
    (not normalized). Outliers are the samples whose angle to their class's dominant
    sub-center exceeds ``threshold`` degrees, i.e. ``cos < cos(threshold)``, returned in
    ascending sample order. A sample with a non-finite embedding has no angle: it does not
    vote and is an outlier.

    Deng, Guo, Liu, Gong, Zafeiriou 2020, "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces" (official: deepinsight/insightface,
    recognition/SubCenter-ArcFace/drop.py; pytorch-metric-learning
    SubCenterArcFaceLoss.get_outliers).
    """
    classes = _check_subcenters("subcenter_dominant", weight, k)
    n, d = embeddings.shape
    with torch.no_grad():
        cos = _unit_cosines(embeddings, weight).view(n, classes, k)
        rows = torch.arange(n, device=labels.device)
        own = cos[rows, labels]  # [N, k]: cosines to the sub-centers of the row's own class
        nearest = own.argmax(dim=1)
        voter = embeddings.isfinite().all(dim=1)
        votes = torch.zeros(classes, k, dtype=torch.int64, device=labels.device)
        votes.index_put_((labels[voter], nearest[voter]), torch.ones_like(labels[voter]), accumulate=True)
        dominant = votes.argmax(dim=1)  # all-zero votes (no samples) -> 0
        dominant_weight = weight.detach().view(classes, k, d)[
            torch.arange(classes, device=labels.device), dominant]
        to_dominant = own[rows, dominant[labels]]
        outliers = torch.nonzero(~voter | (to_dominant < math.cos(math.radians(threshold)))).flatten()
    return dominant_weight, outliers


# ----------------------------------------------------------------------------- ElasticFace


def elasticface_margins(margins: torch.Tensor, cos_t: torch.Tensor) -> torch.Tensor:
    r"""ElasticFace+'s per-row margins, exactly as the official code assigns them.

    With ``order = argsort(cos_t, descending)`` (ties: lower row first) and ``sorted`` the
    margins in ascending order, row ``i`` gets ``sorted[order[i]]`` (the official
    ``margin[idicate_cosie]``). Note: this applies the cosine ordering as a gather, not its
    inverse; "the row with the k-th largest cosine gets the k-th smallest margin" would be
    ``sorted[argsort(order)]`` instead, and differs unless ``order`` is an involution.
    Computed without gradient.

    Boutros, Damer, Kirchbuchner, Kuijper 2022, "ElasticFace: Elastic Margin Loss for Deep
    Face Recognition" (official: fdbtrs/ElasticFace, utils/losses.py, ``plus=True``).
    """
    with torch.no_grad():
        order = torch.argsort(cos_t.detach(), descending=True, stable=True)
        return torch.sort(margins.detach().reshape(-1), stable=True).values[order]


def elasticface_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margins: torch.Tensor,
    *,
    kind: str = "arc",
    scale: float = 64.0,
    plus: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""ElasticFace loss with per-row margins ``margins`` [N] drawn by the caller
    (officially ``torch.normal(m, std, (N, 1))``).

    ``cos`` clamped to [-1, 1], ``theta_i = arccos(c_i)``. ``kind="arc"``: target
    ``cos(theta_i + m_i)``, continued as ``c_i - m_i sin(m_i)`` past ``theta + m > pi`` as
    our ArcFace (the official head has no fallback: there its target rises again);
    ``kind="cos"``: target ``c_i - m_i``. Non-targets
    are ``cos``; logits are ``scale`` times these. ``plus=True`` (ElasticFace+) first
    reassigns the margins by the detached target cosines with :func:`elasticface_margins`.

    Boutros, Damer, Kirchbuchner, Kuijper 2022, "ElasticFace: Elastic Margin Loss for Deep
    Face Recognition" (official: fdbtrs/ElasticFace, utils/losses.py, ElasticArcFace /
    ElasticCosFace).
    """
    _check_choice("elasticface_loss", "reduction", reduction, _REDUCTIONS)
    _check_choice("elasticface_loss", "kind", kind, _ELASTIC_KINDS)
    cos = _clamp_cosines(_unit_cosines(embeddings, weight))
    cos_t = _target_column(cos, labels)
    m = margins.reshape(-1)
    if plus:
        m = elasticface_margins(m, cos_t)
    if kind == "arc":
        theta = _guarded_arccos(cos_t)
        target = torch.where(theta + m > math.pi, cos_t - m * torch.sin(m), torch.cos(theta + m))
    else:
        target = cos_t - m
    logits = scale * _put_target(cos, labels, target)
    return F.cross_entropy(logits, labels, reduction=reduction)
