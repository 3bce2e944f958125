"""Pair losses on the pairwise-distance machinery of ops/triplet.py: O(N^2) memory."""

import torch
import torch.nn.functional as F

from facekernels.ops.checks import check_choice, check_device, check_embeddings, check_number
from facekernels.ops.triplet import (
    DISTANCES,
    REDUCTIONS,
    check_indices,
    nan_if_any,
    pairwise_distance,
    reduce_terms,
    resolve_reference,
    to_pairs,
)


def contrastive_loss(emb1, emb2, y, margin=1.0):
    """Hadsell, Chopra and LeCun's (2006) contrastive loss over given pairs: the mean of
    1/2 (1 - y) D^2 + 1/2 y max(0, margin - D)^2, D = |emb1 - emb2|, y = 1 for a
    dissimilar pair and 0 for a similar one."""
    op = "contrastive_loss"
    check_embeddings(op, emb1, "emb1")
    check_embeddings(op, emb2, "emb2")
    if emb1.shape != emb2.shape or emb1.dtype != emb2.dtype:
        raise ValueError(f"{op}: emb1 and emb2 must have one shape and dtype, got "
                         f"{tuple(emb1.shape)} {emb1.dtype} and {tuple(emb2.shape)} {emb2.dtype}")
    check_device(op, "emb2", emb2, emb1)
    if not isinstance(y, torch.Tensor) or y.shape != (emb1.shape[0],):
        raise ValueError(f"{op}: y must be a tensor of shape [{emb1.shape[0]}], got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    check_device(op, "y", y, emb1)
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"{op}: y must hold 0 (similar pair) or 1 (dissimilar pair) only")
    margin = check_number(op, "margin", margin)
    y = y.to(emb1.dtype)
    d = torch.linalg.vector_norm(emb1 - emb2, dim=1)  # its gradient is 0 at d = 0
    return (0.5 * (1 - y) * d.square() + 0.5 * y * F.relu(margin - d).square()).mean()


def contrastive_pair_losses(embeddings, labels=None, *, pos_margin=0.0, neg_margin=1.0,
                            distance="euclidean", normalize_embeddings=True, indices_tuple=None,
                            ref_emb=None, ref_labels=None, ref_starts_with_batch=False):
    """(pos_losses, neg_losses, (a1, p, a2, n), dist): pytorch-metric-learning's
    ContrastiveLoss terms over the given pairs (triplets (a, p, n) become (a, p, a, n), as
    PML converts them; duplicates count as often as they are given), else over every pair
    of the batch with the reference set (no positive (i, i) when that is the batch itself or
    starts with it: ref_starts_with_batch, as in triplet_margin_loss)."""
    op = "ContrastiveLoss"
    check_choice(op, "distance", distance, DISTANCES)
    pos_margin = check_number(op, "pos_margin", pos_margin)
    neg_margin = check_number(op, "neg_margin", neg_margin)
    if labels is None and indices_tuple is None:
        raise ValueError(f"{op}: labels are required when indices_tuple is not given")
    labels, ref, ref_labels, self_ref = resolve_reference(op, embeddings, labels, ref_emb, ref_labels,
                                                          ref_starts_with_batch, indices_tuple is not None)
    if indices_tuple is not None:
        a1, p, a2, n = to_pairs(check_indices(op, indices_tuple, embeddings, ref))
    else:
        same = labels[:, None] == ref_labels[None, :]
        positive = same.clone()
        if self_ref:
            positive.fill_diagonal_(False)
        a1, p = torch.nonzero(positive, as_tuple=True)
        a2, n = torch.nonzero(~same, as_tuple=True)
    d = pairwise_distance(embeddings, None if ref is embeddings else ref, distance, normalize_embeddings)
    pos, neg = d[a1, p], d[a2, n]
    if distance == "cosine":
        pos_losses, neg_losses = F.relu(pos_margin - pos), F.relu(neg - neg_margin)
    else:
        pos_losses, neg_losses = F.relu(pos - pos_margin), F.relu(neg_margin - neg)
    return pos_losses, neg_losses, (a1, p, a2, n), d


def double_margin_contrastive_loss(embeddings, labels=None, *, pos_margin=0.0, neg_margin=1.0,
                                   distance="euclidean", reduction="mean_nonzero",
                                   normalize_embeddings=True, indices_tuple=None, ref_emb=None,
                                   ref_labels=None, ref_starts_with_batch=False):
    """pytorch-metric-learning's ContrastiveLoss: positive pairs give relu(d - pos_margin)
    and negative pairs relu(neg_margin - d) (for "cosine", a similarity s:
    relu(pos_margin - s) and relu(s - neg_margin)); each part is reduced by "mean_nonzero"
    (over its terms > 0), "mean" or "sum", and the parts are summed; "none" returns the two
    parts' terms. Pairs as in contrastive_pair_losses. Any NaN distance makes a reduced
    loss NaN; an empty batch gives 0, still in the graph."""
    check_choice("ContrastiveLoss", "reduction", reduction, REDUCTIONS)
    pos_losses, neg_losses, _, d = contrastive_pair_losses(
        embeddings, labels, pos_margin=pos_margin, neg_margin=neg_margin, distance=distance,
        normalize_embeddings=normalize_embeddings, indices_tuple=indices_tuple, ref_emb=ref_emb,
        ref_labels=ref_labels, ref_starts_with_batch=ref_starts_with_batch,
    )
    if reduction == "none":
        return pos_losses, neg_losses
    loss = reduce_terms(pos_losses, reduction) + reduce_terms(neg_losses, reduction)
    return nan_if_any(loss, d)


def verification_loss(embeddings, labels, margin=1.0):
    """DeepID2's verification signal over the unordered pairs i < j of the batch: 1/2 d^2
    for one identity, 1/2 max(0, margin - d)^2 for two, averaged; d on raw features."""
    d = pairwise_distance(embeddings, None, "euclidean", normalize_embeddings=False)
    n = embeddings.shape[0]
    pairs = torch.ones(n, n, dtype=torch.bool, device=d.device).triu(1)
    same = labels[:, None] == labels[None, :]
    terms = torch.where(same, 0.5 * d.square(), 0.5 * F.relu(margin - d).square())
    return (terms * pairs).sum() / max(n * (n - 1) // 2, 1)
