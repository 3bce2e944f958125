"""Loss modules to drop into training code."""

import torch
import torch.nn.functional as F
from torch import nn

from facekernels.ops.center_loss import center_loss
from facekernels.ops.contrastive import double_margin_contrastive_loss, verification_loss
from facekernels.ops.margin_softmax import check_modes, fused_margin_loss
from facekernels.ops.checks import check_choice, check_number
from facekernels.ops.triplet import DISTANCES, MINING, REDUCTIONS, triplet_margin_loss

_CENTER_UPDATES = ("paper", "gradient")


def _check_sizes(owner, num_classes, embedding_size):
    for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): ``mean_i 1/2 |x_i - c_{y_i}|^2`` over the batch.

    Args:
        num_classes: number of identities C.
        embedding_size: embedding width D.
        alpha: center learning rate of the paper's update rule, in [0, 1].
        update: ``"paper"`` (default): ``.centers`` is a buffer moved by Wen et al.'s rule
            in training mode, right after the loss is formed with the current centers (only
            the classes present in the batch move; eval mode leaves them alone).
            ``"gradient"``: ``.centers`` is an ``nn.Parameter`` that receives the exact
            gradient, for your optimizer to step.
        deterministic: ask for bitwise-reproducible results. The fused kernels group rows
            by label and use no floating-point atomics, so both settings currently run the
            same reproducible path.

    ``.centers`` is [C, D], zero-initialized, in the module's dtype: cast the module and
    the embeddings to the same dtype (``.to(torch.bfloat16)``, say).

    Example::

        center_loss = facekernels.CenterLoss(num_classes=1000, embedding_size=128)
        loss = ce(logits, labels) + 0.01 * center_loss(embeddings, labels)
    """

    def __init__(self, num_classes, embedding_size, alpha=0.5, update="paper", deterministic=True):
        super().__init__()
        if update not in _CENTER_UPDATES:
            raise ValueError(f"CenterLoss: update must be one of {_CENTER_UPDATES}, got {update!r}")
        _check_sizes("CenterLoss", num_classes, embedding_size)
        check_number("CenterLoss", "alpha", alpha, 0.0, 1.0)
        if not isinstance(deterministic, bool):
            raise ValueError(f"CenterLoss: deterministic must be a bool, got {deterministic!r}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.alpha = float(alpha)
        self.update = update
        self.deterministic = deterministic
        centers = torch.zeros(num_classes, embedding_size)
        if update == "paper":
            self.register_buffer("centers", centers)
        else:
            self.centers = nn.Parameter(centers)

    def forward(self, embeddings, labels):
        return center_loss(
            embeddings,
            labels,
            self.centers,
            alpha=self.alpha,
            update_centers=self.update == "paper" and self.training,
        )

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"alpha={self.alpha}, update={self.update!r}"
        )


class _MarginSoftmaxHead(nn.Module):
    """A classifier weight [C, D] (one row per identity, N(0, 0.01) as insightface) and the
    fused margin-softmax cross entropy over it. Subclasses fix the margin."""

    kind = 0  # combined margin; SphereFaceLoss sets 1
    normalize_embeddings = True
    normalize_weight = True

    def __init__(self, num_classes, embedding_size, scale, gradient, reduction, chunk_size):
        super().__init__()
        _check_sizes(type(self).__name__, num_classes, embedding_size)
        check_modes(reduction, gradient)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.gradient = gradient
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))

    def margins(self):
        """(m1, m2, m3, sphere_lambda) of the target logit."""
        return 1.0, 0.0, 0.0, 0.0

    def forward(self, embeddings, labels, return_predictions=False):
        """The loss (and, with return_predictions, each row's argmax class of the
        margin-free logits, for the training accuracy)."""
        return self.loss(embeddings, labels, self.weight, return_predictions)

    def loss(self, embeddings, labels, weight, return_predictions=False):
        """This head's loss over a given classifier weight (forward passes .weight)."""
        m1, m2, m3, sphere_lambda = self.margins()
        return fused_margin_loss(
            embeddings, weight, labels, kind=self.kind, scale=self.scale, m1=m1, m2=m2,
            m3=m3, sphere_lambda=sphere_lambda, gradient=self.gradient,
            normalize_embeddings=self.normalize_embeddings,
            normalize_weight=self.normalize_weight, reduction=self.reduction,
            chunk_size=self.chunk_size, return_predictions=return_predictions,
        )

    @torch.no_grad()
    def get_logits(self, embeddings):
        """Margin-free logits [N, C] for inference (this one does build N x C)."""
        x = F.normalize(embeddings, dim=1) if self.normalize_embeddings else embeddings
        w = F.normalize(self.weight, dim=1) if self.normalize_weight else self.weight
        return self.scale * F.linear(x.to(w.dtype), w)

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"scale={self.scale}, margins={self.margins()}, gradient={self.gradient!r}"
        )


class CombinedMarginLoss(_MarginSoftmaxHead):
    """insightface's combined margin: target logit s (cos(m1 theta + m2) - m3) (m2 in
    radians), with ArcFace's monotone fallback when m1 == 1 and m3 == 0. See
    facekernels.margin_softmax_loss for the arguments."""

    def __init__(self, num_classes, embedding_size, m1=1.0, m2=0.5, m3=0.0, scale=64.0,
                 gradient="exact", reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, scale, gradient, reduction, chunk_size)
        self.m1, self.m2, self.m3 = m1, m2, m3

    def margins(self):
        return self.m1, self.m2, self.m3, 0.0


class ArcFaceLoss(CombinedMarginLoss):
    """ArcFace (Deng et al. 2019): target logit s cos(theta + margin). The margin is in
    RADIANS (0.5 rad = 28.6 degrees); pytorch-metric-learning's ArcFaceLoss takes degrees."""

    def __init__(self, num_classes, embedding_size, margin=0.5, scale=64.0, gradient="exact",
                 reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, 1.0, margin, 0.0, scale, gradient,
                         reduction, chunk_size)


class CosFaceLoss(CombinedMarginLoss):
    """CosFace (Wang et al. 2018): target logit s (cos theta - margin)."""

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64.0, gradient="exact",
                 reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, 1.0, 0.0, margin, scale, gradient,
                         reduction, chunk_size)


class SphereFaceLoss(_MarginSoftmaxHead):
    """SphereFace / A-Softmax (Liu et al. 2017): target logit
    |x| scale (psi(theta) + lambda cos theta) / (1 + lambda), psi the monotone extension of
    cos(margin theta), with lambda = max(lambda_min, lambda_base (1 + lambda_gamma
    iteration)^(-lambda_power)) annealed over training: `iteration` advances once per
    forward in training mode and is saved in the state dict. (Under torch.compile each new
    lambda re-specializes the graph until lambda reaches lambda_min.)"""

    kind = 1
    normalize_embeddings = False

    def __init__(self, num_classes, embedding_size, margin=4, scale=1.0, lambda_base=1000.0,
                 lambda_gamma=0.12, lambda_power=1.0, lambda_min=5.0, gradient="exact",
                 reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, scale, gradient, reduction, chunk_size)
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 1:
            raise ValueError(f"SphereFaceLoss: margin must be a positive int, got {margin!r}")
        self.margin = margin
        self.lambda_base, self.lambda_gamma = lambda_base, lambda_gamma
        self.lambda_power, self.lambda_min = lambda_power, lambda_min
        self.iteration = 0

    def current_lambda(self):
        annealed = self.lambda_base * (1.0 + self.lambda_gamma * self.iteration) ** (-self.lambda_power)
        return max(self.lambda_min, annealed)

    def margins(self):
        return float(self.margin), 0.0, 0.0, self.current_lambda()

    def forward(self, embeddings, labels, return_predictions=False):
        result = super().forward(embeddings, labels, return_predictions)
        if self.training:
            self.iteration += 1
        return result

    def get_extra_state(self):
        return {"iteration": self.iteration}

    def set_extra_state(self, state):
        self.iteration = state["iteration"]


class L2SoftmaxLoss(_MarginSoftmaxHead):
    """L2-constrained softmax (Ranjan et al. 2017): embeddings rescaled to norm alpha, then a
    plain linear classifier (weight not normalized, no bias) and cross entropy."""

    normalize_weight = False

    def __init__(self, num_classes, embedding_size, alpha=16.0, reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, alpha, "exact", reduction, chunk_size)


class SoftmaxLoss(_MarginSoftmaxHead):
    """Plain softmax cross entropy over a linear classifier x W^T (no bias), fused so the
    N x C logits are never stored."""

    normalize_embeddings = False
    normalize_weight = False

    def __init__(self, num_classes, embedding_size, reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, 1.0, "exact", reduction, chunk_size)


class TripletMarginLoss(nn.Module):
    """FaceNet's triplet loss (Schroff et al. 2015) with pytorch-metric-learning's
    semantics; without indices_tuple the triplets are mined (``mining``, same margin) and
    the loss evaluated in one fused pass with no triplet list. See
    facekernels.ops.triplet.triplet_margin_loss.

    ``loss = criterion(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``
    """

    def __init__(self, margin=0.2, mining="all", distance="euclidean", reduction="mean_nonzero",
                 swap=False, smooth=False, normalize_embeddings=True):
        super().__init__()
        check_choice("TripletMarginLoss", "mining", mining, MINING)
        check_choice("TripletMarginLoss", "distance", distance, DISTANCES)
        check_choice("TripletMarginLoss", "reduction", reduction, REDUCTIONS)
        self.margin, self.mining, self.distance = margin, mining, distance
        self.reduction, self.swap, self.smooth = reduction, swap, smooth
        self.normalize_embeddings = normalize_embeddings

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return triplet_margin_loss(
            embeddings, labels, margin=self.margin, mining=self.mining, distance=self.distance,
            reduction=self.reduction, swap=self.swap, smooth=self.smooth,
            normalize_embeddings=self.normalize_embeddings, indices_tuple=indices_tuple,
            ref_emb=ref_emb, ref_labels=ref_labels,
        )


class ContrastiveLoss(nn.Module):
    """The double-margin contrastive loss, equal to pytorch-metric-learning's
    ContrastiveLoss: positives relu(d - pos_margin), negatives relu(neg_margin - d), each
    averaged over its non-zero terms, summed. ``loss = criterion(embeddings, labels)``."""

    def __init__(self, pos_margin=0.0, neg_margin=1.0, distance="euclidean",
                 normalize_embeddings=True):
        super().__init__()
        check_choice("ContrastiveLoss", "distance", distance, DISTANCES)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.distance, self.normalize_embeddings = distance, normalize_embeddings

    def forward(self, embeddings, labels=None, indices_tuple=None):
        return double_margin_contrastive_loss(
            embeddings, labels, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
            distance=self.distance, normalize_embeddings=self.normalize_embeddings,
            indices_tuple=indices_tuple,
        )


class JointIdentificationVerificationLoss(SoftmaxLoss):
    """DeepID2 (Sun et al. 2014): softmax cross entropy on a linear classifier (``.weight``
    [C, D], no bias, fused) plus verification_weight times the verification loss over the
    batch's pairs: 1/2 d^2 for one identity, 1/2 max(0, margin - d)^2 for two."""

    def __init__(self, num_classes, embedding_size, margin=1.0, verification_weight=0.05,
                 chunk_size=None):
        super().__init__(num_classes, embedding_size, chunk_size=chunk_size)
        self.margin = margin
        self.verification_weight = verification_weight

    def loss(self, embeddings, labels, weight, return_predictions=False):
        identification = super().loss(embeddings, labels, weight, return_predictions)
        verification = self.verification_weight * verification_loss(embeddings, labels, self.margin)
        if return_predictions:
            return identification[0] + verification, identification[1]
        return identification + verification


class RingLoss(nn.Module):
    """Ring loss (Zheng et al. 2018): loss_weight / (2N) * sum_i (|x_i| - R)^2 with the
    radius R learned, added to a softmax loss to pull feature norms to one ring.
    Elementwise, so plain PyTorch: there is nothing to fuse."""

    def __init__(self, loss_weight=0.01, radius=1.0):
        super().__init__()
        self.loss_weight = loss_weight
        self.radius = nn.Parameter(torch.tensor(float(radius)))

    def forward(self, embeddings):
        return ring_loss(embeddings, self.radius, self.loss_weight)


def ring_loss(embeddings, radius, loss_weight=0.01):
    """RingLoss's functional form: loss_weight / (2N) * sum_i (|x_i| - radius)^2."""
    norms = torch.linalg.vector_norm(embeddings, dim=1)
    return loss_weight / (2 * embeddings.shape[0]) * (norms - radius).square().sum()
