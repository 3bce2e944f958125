"""Reference triplet mining and triplet margin loss, with pytorch-metric-learning's
TripletMarginMiner / TripletMarginLoss semantics (default AvgNonZeroReducer)."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_DISTANCES = ("euclidean", "squared_euclidean", "cosine")
_TRIPLET_TYPES = ("all", "hard", "semihard", "easy", "batch_hard", "facenet")
_TRIPLET_REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


def _check_choice(op: str, name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {allowed}, got {value!r}")


def pairwise_distance(
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
) -> torch.Tensor:
    r"""All-pairs distance matrix [N, M] between the rows of x [N, D] and y [M, D]
    (``y = x`` when None), rows first L2-normalized when ``normalize_embeddings``.

    ``"euclidean"``: ``|a - b|``; ``"squared_euclidean"``: ``|a - b|^2``;
    ``"cosine"``: the similarity ``<a, b>`` (larger means closer). The Euclidean
    gradient is 0, not NaN, for identical points.

    Distances take the Gram form ``|a|^2 + |b|^2 - 2 <a, b>``, except where it cancels:
    below half of ``|a|^2 + |b|^2`` (a cosine above 1/2 for unit vectors) the squared
    distance is recomputed as ``sum_k (a_k - b_k)^2``, accumulated in float32 at least, so
    that close points keep a relative error of a few ulps (the Gram form's absolute error,
    a few eps (|a|^2 + |b|^2), would swamp a distance of 1e-4). The result is clamped at
    0 and exactly 0 on the diagonal when y is None. Losses averaged over their terms > 0
    jump when a term crosses 0, so a fused loss agrees with this oracle to fp32 rounding
    only if both see the same rounded distances: the rule above is the kernel's.

    The metric of Schroff, Kalenichenko, Philbin 2015, "FaceNet: A Unified Embedding for
    Face Recognition and Clustering".
    """
    _check_choice("pairwise_distance", "distance", distance, _DISTANCES)
    self_ref = y is None
    if normalize_embeddings:
        x, y = _unit_rows(x), (None if self_ref else _unit_rows(y))
        y = x if self_ref else y
    elif self_ref:
        y = x
    gram = x @ y.t()
    if distance == "cosine":
        return gram
    norms = (x * x).sum(1, keepdim=True) + (y * y).sum(1)
    squared = norms - 2.0 * gram
    rows, cols = torch.nonzero(squared < 0.5 * norms, as_tuple=True)
    acc = torch.promote_types(x.dtype, torch.float32)
    exact = (x[rows].to(acc) - y[cols].to(acc)).square().sum(1).to(squared.dtype)
    # Values only: the gradient stays the Gram form's, equal in exact arithmetic.
    picked = squared[rows, cols]
    squared = squared.index_put((rows, cols), exact.detach() + (picked - picked.detach()))
    squared = squared.clamp_min(0.0)
    if self_ref:
        squared = squared * (1 - torch.eye(*squared.shape, dtype=squared.dtype, device=squared.device))
    if distance == "squared_euclidean":
        return squared
    # sqrt's derivative is infinite at 0; feed it 1 there and drop the branch, so the
    # gradient for identical points is 0 rather than NaN.
    # A NaN distance stays NaN (squared * 0).
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), squared * 0)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (F.normalize); a finite row whose norm overflows the
    dtype is divided by its largest entry first, since direction does not depend on scale."""
    largest = x.abs().amax(1, keepdim=True)
    too_long = torch.linalg.vector_norm(x, dim=1, keepdim=True).isinf() & largest.isfinite()
    return F.normalize(x / torch.where(too_long, largest, torch.ones_like(largest)), p=2.0, dim=1)


def _dissimilarity(mat: torch.Tensor, distance: str) -> torch.Tensor:
    """Orient a distance matrix so that larger always means farther (negate similarities)."""
    return -mat if distance == "cosine" else mat


def _mean_nonzero(losses: torch.Tensor) -> torch.Tensor:
    """Mean over the terms > 0 (PML's AvgNonZeroReducer); 0, still in the graph, if none."""
    nonzero = losses > 0
    if not bool(nonzero.any()):
        return losses.sum() * 0
    return losses[nonzero].mean()


def _resolve_ref(op, embeddings, labels, ref_emb, ref_labels):
    """Returns (ref, ref_labels, self_ref): the reference set and whether it is the batch."""
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError(f"{op}: ref_labels given without ref_emb")
        return embeddings, labels, True
    if ref_labels is None:
        raise ValueError(f"{op}: ref_labels is required when ref_emb is given")
    return ref_emb, ref_labels, False


def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    type_of_triplets: str = "all",
    distance: str = "euclidean",
    normalize_embeddings: bool = True,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Triplet indices (a, p, n), int64, ordered lexicographically by (a, p, n).

    ``a`` indexes ``embeddings``; ``p`` and ``n`` index the reference set (``ref_emb``,
    or ``embeddings`` itself, in which case ``a != p``). ``labels[a] == ref_labels[p]``
    and ``labels[a] != ref_labels[n]``. With ``t = d_an - d_ap`` (``s_ap - s_an`` for the
    cosine similarity):

    - ``"all"``: ``t <= margin``; ``"hard"``: ``t <= margin`` and ``t <= 0``;
      ``"semihard"``: ``0 < t <= margin``; ``"easy"``: ``t > margin``
      (PML's TripletMarginMiner);
    - ``"batch_hard"``: per anchor the farthest positive and the nearest negative
      (Hermans, Beyer, Leibe 2017, "In Defense of the Triplet Loss for Person
      Re-Identification"); anchors lacking a positive or a negative are dropped;
    - ``"facenet"``: per positive pair the nearest negative farther than the positive
      (semi-hard), else the farthest negative (Schroff, Kalenichenko, Philbin 2015,
      "FaceNet: A Unified Embedding for Face Recognition and Clustering").

    - ``None``: every valid triplet, whatever its distances (a NaN distance excludes a
      triplet from every other type, as in PML).

    Ties go to the smallest index. ``margin`` is unused by "batch_hard", "facenet" and None.
    """
    op = "mine_triplets"
    _check_choice(op, "type_of_triplets", type_of_triplets, _TRIPLET_TYPES + (None,))
    _check_choice(op, "distance", distance, _DISTANCES)
    ref, ref_labels, self_ref = _resolve_ref(op, embeddings, labels, ref_emb, ref_labels)
    with torch.no_grad():
        dis = _dissimilarity(
            pairwise_distance(embeddings, None if self_ref else ref, distance, normalize_embeddings),
            distance,
        )
        same = labels[:, None] == ref_labels[None, :]
        pos = same & ~torch.eye(*same.shape, dtype=torch.bool, device=same.device) if self_ref else same
        neg = ~same

        if type_of_triplets == "batch_hard":
            # argmax/argmin return the first extremum, i.e. ties go to the smallest index.
            p = dis.masked_fill(~pos, float("-inf")).argmax(dim=1)
            n = dis.masked_fill(~neg, float("inf")).argmin(dim=1)
            keep = pos.any(dim=1) & neg.any(dim=1)
            a = torch.arange(dis.shape[0], device=dis.device)
            return a[keep], p[keep], n[keep]

        if type_of_triplets == "facenet":
            a, p = torch.nonzero(pos, as_tuple=True)
            d_ap = dis[a, p]
            d_an = dis[a]  # [P, M]: row k holds the anchor of pair k
            negs = neg[a]
            farther = negs & (d_an > d_ap[:, None])
            semihard = d_an.masked_fill(~farther, float("inf")).argmin(dim=1)
            farthest = d_an.masked_fill(~negs, float("-inf")).argmax(dim=1)
            n = torch.where(farther.any(dim=1), semihard, farthest)
            keep = negs.any(dim=1)
            return a[keep], p[keep], n[keep]

        valid = pos[:, :, None] & neg[:, None, :]  # [N, M, M] over (a, p, n)
        t = dis[:, None, :] - dis[:, :, None]  # t[a, p, n] = d_an - d_ap
        if type_of_triplets is None:
            cond = torch.ones_like(valid)
        elif type_of_triplets == "easy":
            cond = t > margin
        else:
            cond = t <= margin
            if type_of_triplets == "hard":
                cond &= t <= 0
            elif type_of_triplets == "semihard":
                cond &= t > 0
        # nonzero enumerates in row-major order: lexicographic in (a, p, n).
        a, p, n = torch.nonzero(valid & cond, as_tuple=True)
        return a, p, n


def triplet_margin_loss(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    margin: float = 0.05,
    mining: Optional[str] = None,
    distance: str = "euclidean",
    reduction: str = "mean_nonzero",
    swap: bool = False,
    smooth_loss: bool = False,
    normalize_embeddings: bool = True,
    indices_tuple: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Triplet margin loss over the triplets ``indices_tuple = (a, p, n)``, or over those
    mined by :func:`mine_triplets` with ``type_of_triplets=mining`` and the same margin
    (``mining=None``, the default: every valid triplet, as PML's loss without a miner).

    Per triplet ``v = d_ap - d_an + margin`` (cosine similarity: ``s_an - s_ap + margin``);
    with ``swap`` (Balntas et al. 2016) ``d_an`` becomes ``min(d_an, d_pn)``
    (cosine: ``max(s_an, s_pn)``). The term is ``relu(v)``, or ``softplus(v)`` when
    ``smooth_loss``. ``reduction``: "mean_nonzero" (mean over the terms > 0, PML's default),
    "mean", "sum" or "none". With no triplets the reduced loss is 0 with zero gradient.

    Schroff, Kalenichenko, Philbin 2015, "FaceNet: A Unified Embedding for Face
    Recognition and Clustering".
    """
    op = "triplet_margin_loss"
    _check_choice(op, "mining", mining, _TRIPLET_TYPES + (None,))
    _check_choice(op, "distance", distance, _DISTANCES)
    _check_choice(op, "reduction", reduction, _TRIPLET_REDUCTIONS)
    ref, _, self_ref = _resolve_ref(op, embeddings, labels, ref_emb, ref_labels)
    if indices_tuple is None:
        if labels is None:
            raise ValueError(f"{op}: labels are required when indices_tuple is not given")
        indices_tuple = mine_triplets(
            embeddings, labels, margin=margin, type_of_triplets=mining, distance=distance,
            normalize_embeddings=normalize_embeddings, ref_emb=ref_emb, ref_labels=ref_labels,
        )
    if len(indices_tuple) != 3:
        raise ValueError(
            f"{op}: indices_tuple must be (anchor, positive, negative), got {len(indices_tuple)} tensors"
        )
    a, p, n = indices_tuple

    dis = _dissimilarity(
        pairwise_distance(embeddings, None if self_ref else ref, distance, normalize_embeddings), distance
    )
    d_ap = dis[a, p]
    d_an = dis[a, n]
    if swap:
        # p and n both index the reference set, so d_pn is a reference-to-reference distance.
        d_pn = _dissimilarity(pairwise_distance(ref, None, distance, normalize_embeddings), distance)[p, n]
        d_an = torch.minimum(d_an, d_pn)
    violation = d_ap - d_an + margin
    losses = F.softplus(violation) if smooth_loss else F.relu(violation)

    if reduction == "none":
        return losses
    if reduction == "mean_nonzero":
        reduced = _mean_nonzero(losses)
    elif reduction == "mean" and losses.numel() > 0:
        reduced = losses.mean()
    else:
        reduced = losses.sum()  # "sum", or "mean" of no triplets: 0 rather than NaN
    # NaN triplets are never mined, but a finite loss whose gradients are NaN would hide the
    # bad embedding: any NaN distance makes the reduced loss NaN.
    return torch.where(dis.isnan().any(), torch.full_like(reduced, math.nan), reduced)
