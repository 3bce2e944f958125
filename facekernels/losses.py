"""Loss modules to drop into training code."""

import torch
import torch.nn.functional as F
from torch import nn

from facekernels.ops.center_loss import center_loss
from facekernels.metric_options import check_no_stats, resolve_distance, resolve_reducer
from facekernels.ops.contrastive import (
    contrastive_pair_losses,
    double_margin_contrastive_loss,
    verification_loss,
)
from facekernels.ops.margin_softmax import check_chunk_size, check_modes, fused_margin_loss
from facekernels.ops.checks import check_choice, check_embeddings, check_number
from facekernels.ops.triplet import (
    MINING,
    check_margin,
    check_triplets_per_anchor,
    triplet_margin_loss,
    triplet_margin_terms,
)

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
    scale_name = "scale"  # the argument's name in the subclass's constructor

    def __init__(self, num_classes, embedding_size, scale, gradient, reduction, chunk_size):
        super().__init__()
        owner = type(self).__name__
        _check_sizes(owner, num_classes, embedding_size)
        check_modes(reduction, gradient)
        check_chunk_size(owner, chunk_size)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = check_number(owner, self.scale_name, scale, 0.0)
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
        owner = f"{type(self).__name__}.get_logits"
        check_embeddings(owner, embeddings)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"{owner}: embeddings must have {self.embedding_size} columns, got "
                             f"shape {tuple(embeddings.shape)}")
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

    kind = 1
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


class _MetricLoss(nn.Module):
    """pytorch-metric-learning's loss arguments: distance and reducer as our strings or
    PML's objects (facekernels.metric_options), and an embedding regularizer added with its
    weight, as PML's EmbeddingRegularizerMixin does."""

    def __init__(self, distance, reducer, embedding_regularizer, embedding_reg_weight,
                 collect_stats, normalize_embeddings):
        super().__init__()
        owner = type(self).__name__
        self._distance, self.normalize_embeddings = resolve_distance(owner, distance, normalize_embeddings)
        self._reduction, self._as_loss_dict = resolve_reducer(owner, reducer)
        self.embedding_reg_weight = check_number(owner, "embedding_reg_weight", embedding_reg_weight)
        check_no_stats(owner, collect_stats)
        self.distance = self._distance if distance is None else distance
        self.reducer = self._reduction if reducer is None else reducer
        self.embedding_regularizer = embedding_regularizer

    def _regularized(self, loss, embeddings):
        """The reduced loss, or PML's loss dict under DoNothingReducer, plus the regularizer."""
        if self.embedding_regularizer is None:
            return loss
        term = self.embedding_regularizer(embeddings) * self.embedding_reg_weight
        if self._as_loss_dict:
            return {**loss, "embedding_reg_loss": {"losses": term, "indices": None,
                                                   "reduction_type": "already_reduced"}}
        return loss + term


class TripletMarginLoss(_MetricLoss):
    """FaceNet's triplet loss (Schroff et al. 2015), a drop-in for pytorch-metric-learning's
    TripletMarginLoss: relu(d_ap - d_an + margin) per triplet (softplus when smooth_loss;
    swap: d_an becomes min(d_an, d_pn)), reduced by ``reducer`` ("mean_nonzero" =
    AvgNonZeroReducer, the default; "mean", "sum", "none", or PML's reducer objects).

    Without indices_tuple the loss covers every valid triplet, as PML's does without a
    miner (``triplets_per_anchor=k``: k drawn per anchor), in one fused pass with no
    triplet list; ``mining="all" | "hard" | "semihard" | "easy" | "batch_hard" |
    "facenet"`` (our extension) mines with the same margin inside that pass. See
    facekernels.ops.triplet.triplet_margin_loss and the README's differences from PML.

    ``loss = criterion(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``
    """

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all",
                 distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 collect_stats=False, *, mining=None, normalize_embeddings=None):
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight,
                         collect_stats, normalize_embeddings)
        check_choice("TripletMarginLoss", "mining", mining, MINING)
        check_triplets_per_anchor("TripletMarginLoss", triplets_per_anchor)
        if triplets_per_anchor != "all" and mining is not None:
            raise ValueError("TripletMarginLoss: triplets_per_anchor draws triplets, mining "
                             "selects them; give one of the two")
        self.margin = check_margin("TripletMarginLoss", "margin", margin)
        self.swap, self.smooth_loss = bool(swap), bool(smooth_loss)
        self.triplets_per_anchor, self.mining = triplets_per_anchor, mining

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        kw = dict(margin=self.margin, mining=self.mining, distance=self._distance, swap=self.swap,
                  smooth_loss=self.smooth_loss, triplets_per_anchor=self.triplets_per_anchor,
                  normalize_embeddings=self.normalize_embeddings, indices_tuple=indices_tuple,
                  ref_emb=ref_emb, ref_labels=ref_labels)
        if self._as_loss_dict:
            terms, triplets, _ = triplet_margin_terms(embeddings, labels, **kw)
            loss = {"loss": {"losses": terms, "indices": triplets, "reduction_type": "triplet"}}
        else:
            loss = triplet_margin_loss(embeddings, labels, reduction=self._reduction, **kw)
        return self._regularized(loss, embeddings)

    def extra_repr(self):
        return (f"margin={self.margin}, swap={self.swap}, smooth_loss={self.smooth_loss}, "
                f"distance={self._distance!r}, reducer={self._reduction!r}, mining={self.mining!r}")


class ContrastiveLoss(_MetricLoss):
    """The double-margin contrastive loss, a drop-in for pytorch-metric-learning's
    ContrastiveLoss: positive pairs relu(d - pos_margin), negative pairs
    relu(neg_margin - d) (similarities: relu(pos_margin - s), relu(s - neg_margin)), each
    part reduced by ``reducer`` (default: mean over its terms > 0), the parts summed.

    ``loss = criterion(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``
    """

    def __init__(self, pos_margin=0, neg_margin=1, distance=None, reducer=None,
                 embedding_regularizer=None, embedding_reg_weight=1, collect_stats=False, *,
                 normalize_embeddings=None):
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight,
                         collect_stats, normalize_embeddings)
        self.pos_margin = check_margin("ContrastiveLoss", "pos_margin", pos_margin)
        self.neg_margin = check_margin("ContrastiveLoss", "neg_margin", neg_margin)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        kw = dict(pos_margin=self.pos_margin, neg_margin=self.neg_margin, distance=self._distance,
                  normalize_embeddings=self.normalize_embeddings, indices_tuple=indices_tuple,
                  ref_emb=ref_emb, ref_labels=ref_labels)
        if self._as_loss_dict:
            pos, neg, (a1, p, a2, n), _ = contrastive_pair_losses(embeddings, labels, **kw)
            loss = {"pos_loss": {"losses": pos, "indices": (a1, p), "reduction_type": "pos_pair"},
                    "neg_loss": {"losses": neg, "indices": (a2, n), "reduction_type": "neg_pair"}}
        else:
            loss = double_margin_contrastive_loss(embeddings, labels, reduction=self._reduction, **kw)
        return self._regularized(loss, embeddings)

    def extra_repr(self):
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"distance={self._distance!r}, reducer={self._reduction!r}")


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


class RingLoss(nn.Module):
    """Ring loss (Zheng et al. 2018): loss_weight / (2N) * sum_i (|x_i| - R)^2 with the
    radius R learned, added to a softmax loss to pull feature norms to one ring.
    Elementwise, so plain PyTorch: there is nothing to fuse."""

    def __init__(self, loss_weight=0.01, radius=1.0):
        super().__init__()
        self.loss_weight = check_number("RingLoss", "loss_weight", loss_weight, 0.0)
        self.radius = nn.Parameter(torch.tensor(check_number("RingLoss", "radius", radius)))

    def forward(self, embeddings):
        return ring_loss(embeddings, self.radius, self.loss_weight)


def ring_loss(embeddings, radius, loss_weight=0.01):
    """RingLoss's functional form: loss_weight / (2N) * sum_i (|x_i| - radius)^2."""
    check_embeddings("RingLoss", embeddings)
    norms = torch.linalg.vector_norm(embeddings, dim=1)
    return loss_weight / (2 * embeddings.shape[0]) * (norms - radius).square().sum()
