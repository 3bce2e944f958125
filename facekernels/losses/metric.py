"""Metric losses with pytorch-metric-learning's contract: the triplet margin loss and the
double-margin contrastive loss."""

from torch import nn

from facekernels.metric_options import ReadsDistance, check_no_stats, resolve_reducer
from facekernels.ops.checks import check_choice, check_number
from facekernels.ops.contrastive import contrastive_pair_losses, double_margin_contrastive_loss
from facekernels.ops.triplet import (
    MINING,
    check_triplets_per_anchor,
    triplet_margin_loss,
    triplet_margin_terms,
)


class _MetricLoss(ReadsDistance, nn.Module):
    """pytorch-metric-learning's loss arguments: distance and reducer as our strings or
    PML's objects (facekernels.metric_options), and an embedding regularizer added with its
    weight, as PML's EmbeddingRegularizerMixin does."""

    def __init__(self, distance, reducer, embedding_regularizer, embedding_reg_weight,
                 collect_stats, normalize_embeddings):
        super().__init__()
        owner = type(self).__name__
        self._set_distance(owner, distance, normalize_embeddings)
        self._reduction, self._as_loss_dict = resolve_reducer(owner, reducer)
        self.embedding_reg_weight = check_number(owner, "embedding_reg_weight", embedding_reg_weight)
        check_no_stats(owner, collect_stats)
        self.reducer = self._reduction if reducer is None else reducer
        if embedding_regularizer is not None and not callable(embedding_regularizer):
            raise TypeError(f"{owner}: embedding_regularizer must be None or a callable regularizer "
                            f"(embeddings -> loss), got {embedding_regularizer!r}")
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
        self.margin = check_number("TripletMarginLoss", "margin", margin)
        self.swap, self.smooth_loss = bool(swap), bool(smooth_loss)
        self.triplets_per_anchor, self.mining = triplets_per_anchor, mining

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                *, ref_starts_with_batch=False):
        self._read_distance()
        kw = dict(margin=self.margin, mining=self.mining, distance=self._distance, swap=self.swap,
                  smooth_loss=self.smooth_loss, triplets_per_anchor=self.triplets_per_anchor,
                  normalize_embeddings=self.normalize_embeddings, indices_tuple=indices_tuple,
                  ref_emb=ref_emb, ref_labels=ref_labels, ref_starts_with_batch=ref_starts_with_batch)
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
        self.pos_margin = check_number("ContrastiveLoss", "pos_margin", pos_margin)
        self.neg_margin = check_number("ContrastiveLoss", "neg_margin", neg_margin)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                *, ref_starts_with_batch=False):
        self._read_distance()
        kw = dict(pos_margin=self.pos_margin, neg_margin=self.neg_margin, distance=self._distance,
                  normalize_embeddings=self.normalize_embeddings, indices_tuple=indices_tuple,
                  ref_emb=ref_emb, ref_labels=ref_labels, ref_starts_with_batch=ref_starts_with_batch)
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
