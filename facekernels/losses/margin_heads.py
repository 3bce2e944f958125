"""Margin-softmax heads: a classifier weight [C, D] and the fused margin softmax over it
(SphereFace, CosFace, ArcFace, the combined margin, L2-softmax, softmax, DeepID2)."""

import torch
import torch.nn.functional as F
from torch import nn

from facekernels.ops.checks import check_embeddings, check_number, check_sizes
from facekernels.ops.contrastive import verification_loss
from facekernels.ops.margin_softmax import (
    COMBINED,
    SPHERE,
    check_chunk_size,
    check_modes,
    fused_margin_loss,
)


class _MarginSoftmaxHead(nn.Module):
    """A classifier weight [C, D] (one row per identity, N(0, 0.01) as insightface) and the
    fused margin-softmax cross entropy over it. Subclasses fix the margin."""

    kind = COMBINED
    normalize_embeddings = True
    normalize_weight = True
    scale_name = "scale"  # the argument's name in the subclass's constructor

    def __init__(self, num_classes, embedding_size, scale, gradient, reduction, chunk_size,
                 sub_centers=1):
        super().__init__()
        owner = type(self).__name__
        check_sizes(owner, num_classes, embedding_size)
        check_modes(reduction, gradient, owner)
        check_chunk_size(owner, chunk_size)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = check_number(owner, self.scale_name, scale, 0.0)
        self.gradient = gradient
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.sub_centers = sub_centers  # weight rows per class, class-major
        self.weight = nn.Parameter(
            torch.empty(num_classes * self.sub_centers, embedding_size).normal_(0.0, 0.01))

    def margins(self):
        """(m1, m2, m3, sphere_lambda) of the target logit."""
        return 1.0, 0.0, 0.0, 0.0

    def forward(self, embeddings, labels, return_predictions=False):
        """The loss (and, with return_predictions, each row's argmax class of the
        margin-free logits, for the training accuracy)."""
        return self.loss(embeddings, labels, self.weight, return_predictions)

    def loss(self, embeddings, labels, weight, return_predictions=False):
        """This head's loss over a given classifier weight (forward passes .weight)."""
        return self.fused_loss(embeddings, labels, weight, return_predictions)

    def fused_loss(self, embeddings, labels, weight, return_predictions, **batch_options):
        """The fused op with this head's options and the batch's (per-row margins...)."""
        m1, m2, m3, sphere_lambda = self.margins()
        return fused_margin_loss(
            embeddings, weight, labels, kind=self.kind, scale=self.scale, m1=m1, m2=m2,
            m3=m3, sphere_lambda=sphere_lambda, gradient=self.gradient,
            normalize_embeddings=self.normalize_embeddings,
            normalize_weight=self.normalize_weight, reduction=self.reduction,
            chunk_size=self.chunk_size, return_predictions=return_predictions,
            sub_centers=self.sub_centers, **batch_options,
        )

    def check_embeddings(self, owner, embeddings):
        """Embeddings [N, embedding_size] on the weight's device, for this head's methods."""
        check_embeddings(owner, embeddings)
        if embeddings.shape[1] != self.embedding_size or embeddings.device != self.weight.device:
            raise ValueError(f"{owner}: embeddings must have {self.embedding_size} columns on "
                             f"{self.weight.device}, got shape {tuple(embeddings.shape)} on "
                             f"{embeddings.device}")

    @torch.no_grad()
    def get_logits(self, embeddings):
        """Margin-free logits [N, C] for inference (this one does build N x C)."""
        self.check_embeddings(f"{type(self).__name__}.get_logits", embeddings)
        x = F.normalize(embeddings, dim=1) if self.normalize_embeddings else embeddings
        w = F.normalize(self.weight, dim=1) if self.normalize_weight else self.weight
        logits = self.scale * F.linear(x.to(w.dtype), w)
        return logits.view(len(x), self.num_classes, self.sub_centers).amax(2)

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
        self.m1 = check_number(type(self).__name__, "m1", m1, 0.0)
        self.m2 = check_number(type(self).__name__, "m2", m2)
        self.m3 = check_number(type(self).__name__, "m3", m3)

    def margins(self):
        return self.m1, self.m2, self.m3, 0.0


class ArcFaceLoss(CombinedMarginLoss):
    """ArcFace (Deng et al. 2019): target logit s cos(theta + margin). The margin is in
    RADIANS (0.5 rad = 28.6 degrees); pytorch-metric-learning's ArcFaceLoss takes degrees."""

    def __init__(self, num_classes, embedding_size, margin=0.5, scale=64.0, gradient="exact",
                 reduction="mean", chunk_size=None):
        check_number("ArcFaceLoss", "margin", margin)  # named as the caller wrote it
        super().__init__(num_classes, embedding_size, 1.0, margin, 0.0, scale, gradient,
                         reduction, chunk_size)


class CosFaceLoss(CombinedMarginLoss):
    """CosFace (Wang et al. 2018): target logit s (cos theta - margin)."""

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64.0, gradient="exact",
                 reduction="mean", chunk_size=None):
        check_number("CosFaceLoss", "margin", margin)  # named as the caller wrote it
        super().__init__(num_classes, embedding_size, 1.0, 0.0, margin, scale, gradient,
                         reduction, chunk_size)


class SphereFaceLoss(_MarginSoftmaxHead):
    """SphereFace / A-Softmax (Liu et al. 2017): target logit
    |x| scale (psi(theta) + lambda cos theta) / (1 + lambda), psi the monotone extension of
    cos(margin theta), with lambda = max(lambda_min, lambda_base (1 + lambda_gamma
    iteration)^(-lambda_power)) annealed over training: `iteration` advances once per
    forward in training mode and is saved in the state dict. (Under torch.compile each new
    lambda re-specializes the graph until lambda reaches lambda_min.)"""

    kind = SPHERE
    normalize_embeddings = False

    def __init__(self, num_classes, embedding_size, margin=4, scale=1.0, lambda_base=1000.0,
                 lambda_gamma=0.12, lambda_power=1.0, lambda_min=5.0, gradient="exact",
                 reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, scale, gradient, reduction, chunk_size)
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 1:
            raise ValueError(f"SphereFaceLoss: margin must be a positive int, got {margin!r}")
        self.margin = margin
        self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min = (
            check_number("SphereFaceLoss", name, value, 0.0)
            for name, value in (("lambda_base", lambda_base), ("lambda_gamma", lambda_gamma),
                                ("lambda_power", lambda_power), ("lambda_min", lambda_min)))
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
    scale_name = "alpha"

    def __init__(self, num_classes, embedding_size, alpha=16.0, reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, alpha, "exact", reduction, chunk_size)


class SoftmaxLoss(_MarginSoftmaxHead):
    """Plain softmax cross entropy over a linear classifier x W^T (no bias), fused so the
    N x C logits are never stored."""

    normalize_embeddings = False
    normalize_weight = False

    def __init__(self, num_classes, embedding_size, reduction="mean", chunk_size=None):
        super().__init__(num_classes, embedding_size, 1.0, "exact", reduction, chunk_size)


class JointIdentificationVerificationLoss(SoftmaxLoss):
    """DeepID2 (Sun et al. 2014): softmax cross entropy on a linear classifier (``.weight``
    [C, D], no bias, fused) plus verification_weight times the verification loss over the
    batch's pairs: 1/2 d^2 for one identity, 1/2 max(0, margin - d)^2 for two."""

    def __init__(self, num_classes, embedding_size, margin=1.0, verification_weight=0.05,
                 chunk_size=None):
        super().__init__(num_classes, embedding_size, chunk_size=chunk_size)
        owner = "JointIdentificationVerificationLoss"
        self.margin = check_number(owner, "margin", margin)
        self.verification_weight = check_number(owner, "verification_weight", verification_weight, 0.0)

    def loss(self, embeddings, labels, weight, return_predictions=False):
        identification = super().loss(embeddings, labels, weight, return_predictions)
        verification = self.verification_weight * verification_loss(embeddings, labels, self.margin)
        if return_predictions:
            return identification[0] + verification, identification[1]
        return identification + verification
