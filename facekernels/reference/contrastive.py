"""Reference contrastive losses: Hadsell et al.'s pairwise loss and PML's double-margin
ContrastiveLoss."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .triplet import _DISTANCES, _check_choice, _mean_nonzero, pairwise_distance


def pairwise_contrastive_loss(
    emb1: torch.Tensor,
    emb2: torch.Tensor,
    y: torch.Tensor,
    margin: float = 1.0,
) -> torch.Tensor:
    r"""Contrastive loss over given pairs (row i of emb1 with row i of emb2):
    ``mean_i [ 1/2 (1 - y_i) D_i^2 + 1/2 y_i max(0, m - D_i)^2 ]``,
    ``D_i = |emb1_i - emb2_i|_2``, ``y_i = 1`` for a dissimilar pair, 0 for a similar one.

    Hadsell, Chopra, LeCun 2006, "Dimensionality Reduction by Learning an Invariant
    Mapping".
    """
    d = torch.linalg.vector_norm(emb1 - emb2, dim=1)
    y = y.to(d.dtype)
    losses = 0.5 * (1 - y) * d**2 + 0.5 * y * F.relu(margin - d) ** 2
    return losses.mean()


def double_margin_contrastive_loss(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: str = "euclidean",
    reduction: str = "mean_nonzero",
    normalize_embeddings: bool = True,
    indices_tuple: Optional[Tuple[torch.Tensor, ...]] = None,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
):
    r"""Double-margin contrastive loss (pytorch-metric-learning's ContrastiveLoss).

    Over all ordered pairs (i, j) of the batch with the reference set (``ref_emb``, or the
    batch itself with i != j), or the pairs ``(a1, p, a2, n)`` of ``indices_tuple``
    (triplets ``(a, p, n)`` count as ``(a, p, a, n)``): positive pairs (same label) give
    ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``; for
    ``distance="cosine"`` (a similarity s) positives give ``relu(pos_margin - s)`` and
    negatives ``relu(s - neg_margin)``. ``reduction`` reduces each part: "mean_nonzero"
    (mean over its terms > 0, PML's default), "mean" or "sum" (0 for a part without
    pairs), and the loss is their sum; "none" returns the two parts' terms.

    Hadsell, Chopra, LeCun 2006, "Dimensionality Reduction by Learning an Invariant
    Mapping" (the single-margin origin); the positive margin follows e.g. Wu, Manmatha,
    Smola, Krähenbühl 2017, "Sampling Matters in Deep Embedding Learning".
    """
    op = "double_margin_contrastive_loss"
    _check_choice(op, "distance", distance, _DISTANCES)
    _check_choice(op, "reduction", reduction, ("mean_nonzero", "mean", "sum", "none"))
    self_ref = ref_emb is None
    ref, ref_labels = (embeddings, labels) if self_ref else (ref_emb, ref_labels)
    if indices_tuple is None:
        if labels is None:
            raise ValueError(f"{op}: labels are required when indices_tuple is not given")
        same = labels[:, None] == ref_labels[None, :]
        pos = same & ~torch.eye(*same.shape, dtype=torch.bool, device=same.device) if self_ref else same
        a1, p = torch.nonzero(pos, as_tuple=True)
        a2, n = torch.nonzero(~same, as_tuple=True)
    elif len(indices_tuple) == 3:
        a1, p, n = indices_tuple
        a2 = a1
    elif len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
    else:
        raise ValueError(f"{op}: indices_tuple must be (a1, p, a2, n) or (a, p, n), got {len(indices_tuple)} tensors")

    mat = pairwise_distance(embeddings, None if self_ref else ref, distance, normalize_embeddings)
    pos, neg = mat[a1, p], mat[a2, n]
    if distance == "cosine":
        pos_losses, neg_losses = F.relu(pos_margin - pos), F.relu(neg - neg_margin)
    else:
        pos_losses, neg_losses = F.relu(pos - pos_margin), F.relu(neg_margin - neg)
    if reduction == "none":
        return pos_losses, neg_losses
    if reduction == "mean_nonzero":
        return _mean_nonzero(pos_losses) + _mean_nonzero(neg_losses)
    if reduction == "sum":
        return pos_losses.sum() + neg_losses.sum()
    return sum(part.mean() if part.numel() else part.sum() for part in (pos_losses, neg_losses))
