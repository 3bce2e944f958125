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
    normalize_embeddings: bool = True,
    indices_tuple: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    r"""Double-margin contrastive loss (pytorch-metric-learning's ContrastiveLoss).

    Over all ordered pairs i != j of the batch (or the pairs ``(a1, p, a2, n)`` of
    ``indices_tuple``): positive pairs (same label) give ``relu(d - pos_margin)``, negative
    pairs ``relu(neg_margin - d)``; for ``distance="cosine"`` (a similarity s) positives
    give ``relu(pos_margin - s)`` and negatives ``relu(s - neg_margin)``. Each part is the
    mean over its terms > 0 (0 if none); the loss is their sum.

    Hadsell, Chopra, LeCun 2006, "Dimensionality Reduction by Learning an Invariant
    Mapping" (the single-margin origin); the positive margin follows e.g. Wu, Manmatha,
    Smola, Krähenbühl 2017, "Sampling Matters in Deep Embedding Learning".
    """
    op = "double_margin_contrastive_loss"
    _check_choice(op, "distance", distance, _DISTANCES)
    if indices_tuple is None:
        if labels is None:
            raise ValueError(f"{op}: labels are required when indices_tuple is not given")
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        a1, p = torch.nonzero(same & ~eye, as_tuple=True)
        a2, n = torch.nonzero(~same, as_tuple=True)
    elif len(indices_tuple) != 4:
        raise ValueError(f"{op}: indices_tuple must be (a1, p, a2, n), got {len(indices_tuple)} tensors")
    else:
        a1, p, a2, n = indices_tuple

    mat = pairwise_distance(embeddings, None, distance, normalize_embeddings)
    pos, neg = mat[a1, p], mat[a2, n]
    if distance == "cosine":
        pos_losses, neg_losses = F.relu(pos_margin - pos), F.relu(neg - neg_margin)
    else:
        pos_losses, neg_losses = F.relu(pos - pos_margin), F.relu(neg_margin - neg)
    return _mean_nonzero(pos_losses) + _mean_nonzero(neg_losses)
