"""triplet: pairwise distances from one GEMM, triplet mining and the triplet margin loss
in O(N^2) memory (facekernels::triplet_margin_forward / triplet_mine)."""

import torch
import torch.nn.functional as F

from facekernels.ops.checks import check_choice, check_embeddings, check_labels

MINING = {"all": 0, "hard": 1, "semihard": 2, "easy": 3, "batch_hard": 4, "facenet": 5}
DISTANCES = ("euclidean", "squared_euclidean", "cosine")
REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


def resolve_reference(op, embeddings, labels, ref_emb, ref_labels):
    """(ref_emb, ref_labels, self_ref): the reference set, the batch itself by default."""
    check_embeddings(op, embeddings)
    if labels is not None:
        check_labels(op, labels, embeddings)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError(f"{op}: ref_labels given without ref_emb")
        return embeddings, labels, True
    if ref_labels is None:
        raise ValueError(f"{op}: ref_labels is required when ref_emb is given")
    check_embeddings(op, ref_emb, "ref_emb")
    check_labels(op, ref_labels, ref_emb, "ref_labels")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"{op}: ref_emb must have {embeddings.shape[1]} columns like the embeddings, "
            f"got shape {tuple(ref_emb.shape)}"
        )
    return ref_emb, ref_labels, False


def pairwise_distance(x, ref=None, distance="euclidean", normalize_embeddings=True):
    """All-pairs [N, M] between the rows of x and ref (x itself when None), from one GEMM:
    |a|^2 + |b|^2 - 2 a.b clamped at 0, exactly 0 on the diagonal of x against itself,
    with a square root whose gradient is 0 (not NaN) at distance 0. "cosine" returns the
    similarity a.b (larger = closer)."""
    check_choice("pairwise_distance", "distance", distance, DISTANCES)
    self_ref = ref is None
    if normalize_embeddings:
        x = F.normalize(x, dim=1)
        ref = x if self_ref else F.normalize(ref, dim=1)
    elif self_ref:
        ref = x
    inner = x @ ref.t()
    if distance == "cosine":
        return inner
    squared = (x * x).sum(1, keepdim=True) + (ref * ref).sum(1) - 2.0 * inner
    squared = squared.clamp_min(0.0)
    if self_ref:
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        squared = squared.masked_fill(eye, 0.0)
    if distance == "squared_euclidean":
        return squared
    positive = squared > 0
    return torch.where(positive, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(), 0.0)


def dissimilarity(x, ref, distance, normalize_embeddings):
    """pairwise_distance oriented so that larger always means farther."""
    d = pairwise_distance(x, ref, distance, normalize_embeddings)
    return -d if distance == "cosine" else d


@torch.library.register_fake("facekernels::triplet_margin_forward")
def _(dist, labels, ref_labels, margin, mining, self_ref, smooth):
    count = dist.new_empty((), dtype=torch.int64)
    return dist.new_empty(()), count, torch.empty_like(count), dist.new_empty(dist.shape)


@torch.library.register_fake("facekernels::triplet_mine")
def _(dist, labels, ref_labels, margin, mining, self_ref):
    size = torch.library.get_ctx().new_dynamic_size()
    return tuple(labels.new_empty((size,)) for _ in range(3))


def _setup_context(ctx, inputs, output):
    _, active, count, grad_dist = output
    ctx.save_for_backward(grad_dist)
    ctx.mark_non_differentiable(active, count, grad_dist)


def _backward(ctx, grad_loss, grad_active, grad_count, grad_grad_dist):
    (grad_dist,) = ctx.saved_tensors
    return grad_dist * grad_loss, None, None, None, None, None, None


torch.library.register_autograd(
    "facekernels::triplet_margin_forward", _backward, setup_context=_setup_context
)


def mine_triplets(embeddings, labels, *, margin=0.2, type_of_triplets="all",
                  distance="euclidean", normalize_embeddings=True, ref_emb=None, ref_labels=None):
    """Triplets (a, p, n) as int64 tensors on the embeddings' device, in lexicographic
    order, with pytorch-metric-learning's TripletMarginMiner semantics (t = d_an - d_ap,
    s_ap - s_an for cosine): "all" t <= margin, "hard" t <= 0, "semihard" 0 < t <= margin,
    "easy" t > margin; plus "batch_hard" (per anchor the farthest positive and the nearest
    negative) and "facenet" (per positive pair the nearest negative farther than the
    positive, else the farthest negative). a indexes embeddings, p and n the reference set
    (ref_emb, or embeddings itself with a != p)."""
    op = "TripletMiner"
    check_choice(op, "type_of_triplets", type_of_triplets, MINING)
    check_choice(op, "distance", distance, DISTANCES)
    ref, columns, self_ref = resolve_reference(op, embeddings, labels, ref_emb, ref_labels)
    if labels is None:
        raise ValueError(f"{op}: labels are required")
    with torch.no_grad():
        dist = dissimilarity(embeddings, None if self_ref else ref, distance, normalize_embeddings)
        return torch.ops.facekernels.triplet_mine(
            dist, labels, columns, float(margin), MINING[type_of_triplets], self_ref
        )


def _indexed_loss(dist, indices_tuple, swap_dist, margin, smooth, reduction):
    """The loss over given triplets: O(T) memory, for indices from any miner."""
    a, p, n = indices_tuple
    d_ap, d_an = dist[a, p], dist[a, n]
    if swap_dist is not None:
        d_an = torch.minimum(d_an, swap_dist[p, n])
    violation = d_ap - d_an + margin
    losses = F.softplus(violation) if smooth else F.relu(violation)
    if reduction == "none":
        return losses
    if reduction == "mean_nonzero":
        return losses.sum() / (losses > 0).sum().clamp_min(1)
    if reduction == "mean":
        return losses.sum() / max(losses.numel(), 1)
    return losses.sum()


def triplet_margin_loss(embeddings, labels=None, *, margin=0.2, mining="all",
                        distance="euclidean", reduction="mean_nonzero", swap=False,
                        smooth=False, normalize_embeddings=True, indices_tuple=None,
                        ref_emb=None, ref_labels=None):
    """Triplet margin loss (Schroff et al. 2015) with pytorch-metric-learning's semantics:
    per triplet relu(d_ap - d_an + margin) (softplus when smooth; for cosine,
    s_an - s_ap + margin; swap replaces d_an by min(d_an, d_pn)), reduced by
    "mean_nonzero" (mean over the terms > 0, 0 if none), "mean", "sum" or "none".

    Without indices_tuple the triplets are mined with `mining` and the same margin and the
    loss is evaluated in one fused pass over the pairwise distances: no triplet list, no
    N^3 temporary. With indices_tuple (from any miner, PML's included), or with swap or
    reduction="none", the loss is gathered over the given or mined triplets (memory O(T)).
    """
    op = "TripletMarginLoss"
    check_choice(op, "mining", mining, MINING)
    check_choice(op, "distance", distance, DISTANCES)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    ref, columns, self_ref = resolve_reference(op, embeddings, labels, ref_emb, ref_labels)
    dist = dissimilarity(embeddings, None if self_ref else ref, distance, normalize_embeddings)
    if indices_tuple is not None or swap or reduction == "none":
        if indices_tuple is None:
            indices_tuple = mine_triplets(
                embeddings, labels, margin=margin, type_of_triplets=mining, distance=distance,
                normalize_embeddings=normalize_embeddings, ref_emb=ref_emb, ref_labels=ref_labels,
            )
        if len(indices_tuple) != 3:
            raise ValueError(f"{op}: indices_tuple must be (anchors, positives, negatives)")
        swap_dist = None
        if swap:  # p and n both index the reference set
            swap_dist = dist if self_ref else dissimilarity(ref, None, distance, normalize_embeddings)
        return _indexed_loss(dist, indices_tuple, swap_dist, margin, smooth, reduction)
    if labels is None:
        raise ValueError(f"{op}: labels are required when indices_tuple is not given")
    loss_sum, active, count, _ = torch.ops.facekernels.triplet_margin_forward(
        dist, labels, columns, float(margin), MINING[mining], self_ref, bool(smooth)
    )
    if reduction == "mean_nonzero":
        return loss_sum / active.clamp_min(1)
    if reduction == "mean":
        return loss_sum / count.clamp_min(1)
    return loss_sum
