"""Pair losses on the pairwise-distance machinery of ops/triplet.py: O(N^2) memory."""

import torch
import torch.nn.functional as F

from facekernels.ops.checks import check_choice
from facekernels.ops.triplet import DISTANCES, pairwise_distance, resolve_reference


def contrastive_loss(emb1, emb2, y, margin=1.0):
    """Hadsell, Chopra and LeCun's (2006) contrastive loss over given pairs: the mean of
    1/2 (1 - y) D^2 + 1/2 y max(0, margin - D)^2, D = |emb1 - emb2|, y = 1 for a
    dissimilar pair and 0 for a similar one."""
    op = "contrastive_loss"
    if emb1.dim() != 2 or emb1.shape != emb2.shape:
        raise ValueError(
            f"{op}: emb1 and emb2 must be 2-D of one shape, got {tuple(emb1.shape)} and "
            f"{tuple(emb2.shape)}"
        )
    if y.shape != (emb1.shape[0],):
        raise ValueError(f"{op}: y must have shape [{emb1.shape[0]}], got {tuple(y.shape)}")
    y = y.to(emb1.dtype)
    d = torch.linalg.vector_norm(emb1 - emb2, dim=1)  # its gradient is 0 at d = 0
    return (0.5 * (1 - y) * d.square() + 0.5 * y * F.relu(margin - d).square()).mean()


def _mean_nonzero(terms, mask):
    terms = terms * mask
    return terms.sum() / (terms > 0).sum().clamp_min(1)


def double_margin_contrastive_loss(embeddings, labels=None, *, pos_margin=0.0, neg_margin=1.0,
                                   distance="euclidean", normalize_embeddings=True,
                                   indices_tuple=None):
    """pytorch-metric-learning's ContrastiveLoss: over the ordered pairs i != j of the
    batch, positives give relu(d - pos_margin) and negatives relu(neg_margin - d) (for
    "cosine", a similarity s: relu(pos_margin - s) and relu(s - neg_margin)); each part is
    averaged over its non-zero terms and the parts are summed. indices_tuple
    (a1, p, a2, n) restricts the pairs."""
    op = "ContrastiveLoss"
    check_choice(op, "distance", distance, DISTANCES)
    resolve_reference(op, embeddings, labels, None, None)
    d = pairwise_distance(embeddings, None, distance, normalize_embeddings)
    if indices_tuple is None:
        if labels is None:
            raise ValueError(f"{op}: labels are required when indices_tuple is not given")
        same = labels[:, None] == labels[None, :]
        positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        negative = ~same
    else:
        if len(indices_tuple) != 4:
            raise ValueError(f"{op}: indices_tuple must be (anchors1, positives, anchors2, negatives)")
        a1, p, a2, n = indices_tuple
        positive = torch.zeros_like(d, dtype=torch.bool).index_put((a1, p), torch.tensor(True, device=d.device))
        negative = torch.zeros_like(d, dtype=torch.bool).index_put((a2, n), torch.tensor(True, device=d.device))
    if distance == "cosine":
        pos_terms, neg_terms = F.relu(pos_margin - d), F.relu(d - neg_margin)
    else:
        pos_terms, neg_terms = F.relu(d - pos_margin), F.relu(neg_margin - d)
    return _mean_nonzero(pos_terms, positive) + _mean_nonzero(neg_terms, negative)


def verification_loss(embeddings, labels, margin=1.0):
    """DeepID2's verification signal over the unordered pairs i < j of the batch: 1/2 d^2
    for one identity, 1/2 max(0, margin - d)^2 for two, averaged; d on raw features."""
    d = pairwise_distance(embeddings, None, "euclidean", normalize_embeddings=False)
    n = embeddings.shape[0]
    pairs = torch.ones(n, n, dtype=torch.bool, device=d.device).triu(1)
    same = labels[:, None] == labels[None, :]
    terms = torch.where(same, 0.5 * d.square(), 0.5 * F.relu(margin - d).square())
    return (terms * pairs).sum() / max(n * (n - 1) // 2, 1)
