"""triplet: pairwise distances from one GEMM (refined where the Gram form cancels),
triplet mining and the triplet margin loss in O(N^2) memory
(facekernels::pairwise_distance / triplet_margin_forward / triplet_mine)."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from facekernels.ops.checks import check_choice, check_device, check_embeddings, check_number, check_one_device

# None: no mining, every valid triplet (pytorch-metric-learning's loss without a miner).
MINING = {"all": 0, "hard": 1, "semihard": 2, "easy": 3, "batch_hard": 4, "facenet": 5, None: 6}
TRIPLET_TYPES = tuple(name for name in MINING if name is not None)
DISTANCES = ("euclidean", "squared_euclidean", "cosine")
REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


def metric_labels(op, name, labels, embeddings):
    """Labels of any integer dtype, as int64 on the embeddings' device (PML moves them too)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"{op}: {name} must have shape [{embeddings.shape[0]}] to match the "
                         f"{'ref_emb' if name == 'ref_labels' else 'embeddings'}, got {tuple(labels.shape)}")
    if labels.device.type == "meta" and embeddings.device.type != "meta":
        raise ValueError(f"{op}: {name} is on meta (no values to move) but the embeddings are on "
                         f"{embeddings.device}")
    return labels.to(device=embeddings.device, dtype=torch.int64)


def resolve_reference(op, embeddings, labels, ref_emb, ref_labels, ref_starts_with_batch=False,
                      indices_given=False):
    """(labels, ref_emb, ref_labels, self_ref): labels as int64 (or None), and the reference
    set, the batch itself by default. self_ref: reference row i is embedding row i, for the
    first N rows (the batch itself, or ref_starts_with_batch: a memory whose first N rows
    hold this batch, as CrossBatchMemory passes it). ref_labels may be left out when the
    indices are given (as PML allows)."""
    check_embeddings(op, embeddings, allow_empty=True)
    if labels is not None:
        labels = metric_labels(op, "labels", labels, embeddings)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError(f"{op}: ref_labels given without ref_emb")
        return labels, embeddings, labels, True
    if ref_labels is None and not indices_given:
        raise ValueError(f"{op}: ref_labels is required when ref_emb is given without indices_tuple")
    check_embeddings(op, ref_emb, "ref_emb", allow_empty=True)
    if ref_emb.dtype != embeddings.dtype:
        raise TypeError(f"{op}: ref_emb must have the embeddings' dtype {embeddings.dtype}, "
                        f"got {ref_emb.dtype}")
    check_device(op, "ref_emb", ref_emb, embeddings)
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"{op}: ref_emb must have {embeddings.shape[1]} columns like the embeddings, "
            f"got shape {tuple(ref_emb.shape)}"
        )
    if ref_starts_with_batch and ref_emb.shape[0] < embeddings.shape[0]:
        raise ValueError(f"{op}: ref_starts_with_batch needs ref_emb to hold the batch's "
                         f"{embeddings.shape[0]} rows first, got {ref_emb.shape[0]} rows")
    if ref_labels is not None:
        ref_labels = metric_labels(op, "ref_labels", ref_labels, ref_emb)
    return labels, ref_emb, ref_labels, bool(ref_starts_with_batch)


def check_indices(op, indices_tuple, rows, columns):
    """indices_tuple (a, p, n) or (a1, p, a2, n) as int64 on the device of the distances:
    anchors index `rows` rows, the others `columns` columns; pairs have equal lengths."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(f"{op}: indices_tuple must be (anchors, positives, negatives) or "
                         f"(anchors1, positives, anchors2, negatives), got {type(indices_tuple).__name__}"
                         f" of length {len(indices_tuple) if hasattr(indices_tuple, '__len__') else '?'}")
    names = ("anchors", "positives", "negatives") if len(indices_tuple) == 3 else \
        ("anchors1", "positives", "anchors2", "negatives")
    checked = []
    for name, index in zip(names, indices_tuple):
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() \
                or index.dtype == torch.bool:
            raise TypeError(f"{op}: indices_tuple's {name} must be an integer tensor, got "
                            f"{getattr(index, 'dtype', type(index).__name__)}")
        if index.dim() != 1:
            raise ValueError(f"{op}: indices_tuple's {name} must be 1-D, got shape {tuple(index.shape)}")
        bound = rows.shape[0] if name.startswith("anchors") else columns.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
            raise ValueError(f"{op}: indices_tuple's {name} must lie in [0, {bound}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        checked.append(index.to(device=rows.device, dtype=torch.int64))
    lengths = [len(index) for index in checked]
    if (len(checked) == 3 and len(set(lengths)) != 1) or \
            (len(checked) == 4 and (lengths[0] != lengths[1] or lengths[2] != lengths[3])):
        raise ValueError(f"{op}: indices_tuple's {' / '.join(names)} must pair up, got lengths {lengths}")
    return tuple(checked)


def to_triplets(indices_tuple):
    """PML's conversion of pairs (a1, p, a2, n) to triplets: every positive pair with every
    negative pair of the same anchor."""
    if len(indices_tuple) == 3:
        return indices_tuple
    a1, p, a2, n = indices_tuple
    i, j = torch.where(a1[:, None] == a2[None, :])
    return a1[i], p[i], n[j]


def to_pairs(indices_tuple):
    """PML's conversion of triplets (a, p, n) to pairs (a, p, a, n)."""
    if len(indices_tuple) == 4:
        return indices_tuple
    a, p, n = indices_tuple
    return a, p, a, n


@torch.library.register_fake("facekernels::pairwise_distance")
def _(x, ref, self_ref, squared):
    check_one_device("pairwise_distance", x=x, ref=ref)
    return x.new_empty((x.shape[0], ref.shape[0]))


@torch.library.register_fake("facekernels::pairwise_distance_backward")
def _(grad, dist, x, ref, squared, x_grad=True, ref_grad=True):
    check_one_device("pairwise_distance", grad=grad, dist=dist, x=x, ref=ref)
    return tuple(t.new_empty(t.shape if wanted else (0, t.shape[1]))
                 for t, wanted in ((x, x_grad), (ref, ref_grad)))


def _distance_setup_context(ctx, inputs, output):
    x, ref, _, squared = inputs
    ctx.save_for_backward(output, x, ref)
    ctx.squared = squared


def _distance_backward(ctx, grad):
    dist, x, ref = ctx.saved_tensors
    x_grad, ref_grad = ctx.needs_input_grad[:2]
    grad_x, grad_ref = torch.ops.facekernels.pairwise_distance_backward(
        grad, dist, x, ref, ctx.squared, x_grad, ref_grad)
    return grad_x if x_grad else None, grad_ref if ref_grad else None, None, None


torch.library.register_autograd("facekernels::pairwise_distance", _distance_backward,
                                setup_context=_distance_setup_context)


def normalize_rows(x):
    """F.normalize(x, dim=1), except that a finite row whose norm overflows the dtype (fp32:
    from 1.8e19) is first divided by its largest entry rather than becoming zero."""
    # Detached: normalize(x / p) does not depend on p, so its gradient through p is 0.
    peak = x.detach().abs().amax(1, keepdim=True)
    overflow = torch.linalg.vector_norm(x, dim=1, keepdim=True).isinf() & peak.isfinite()
    return F.normalize(x / torch.where(overflow, peak, 1.0), dim=1)  # x / 1 is x, bit for bit


def pairwise_distance(x, ref=None, distance="euclidean", normalize_embeddings=True):
    """All-pairs [N, M] between the rows of x and ref (x itself when None), from one GEMM
    (facekernels::pairwise_distance): |a|^2 + |b|^2 - 2 a.b, recomputed from differences
    where it cancels (below half of |a|^2 + |b|^2, a cosine above 1/2 for unit vectors), so
    that every distance keeps a relative error of a few ulps; clamped at 0, exactly 0 on the
    diagonal of x against itself (NaN for a NaN row), with a square root whose gradient is
    0 (not NaN) at distance 0. The reference's distances, bit for bit. A NaN row gives NaN
    distances. "cosine" returns the similarity a.b (larger = closer)."""
    check_choice("pairwise_distance", "distance", distance, DISTANCES)
    check_embeddings("pairwise_distance", x, "x", allow_empty=True)
    if ref is not None:
        check_embeddings("pairwise_distance", ref, "ref", allow_empty=True)
        if ref.dtype != x.dtype or ref.shape[1] != x.shape[1]:
            raise ValueError(f"pairwise_distance: ref must have x's dtype and width, got "
                             f"{ref.dtype} {tuple(ref.shape)} and {x.dtype} {tuple(x.shape)}")
        check_device("pairwise_distance", "ref", ref, x)
    self_ref = ref is None
    if normalize_embeddings:
        x = normalize_rows(x)
        ref = x if self_ref else normalize_rows(ref)
    elif self_ref:
        ref = x
    if distance == "cosine":
        return x @ ref.t()
    return torch.ops.facekernels.pairwise_distance(x, ref, self_ref, distance == "squared_euclidean")


def dissimilarity(x, ref, distance, normalize_embeddings):
    """pairwise_distance oriented so that larger always means farther."""
    d = pairwise_distance(x, ref, distance, normalize_embeddings)
    return -d if distance == "cosine" else d


def nan_if_any(loss, dist):
    """NaN when any distance is NaN: a finite loss whose gradients are NaN in every row
    (what dropping NaN triplets gives) would hide the bad embedding."""
    if dist.numel() == 0:
        return loss
    # amax propagates NaN, in one vectorized pass (isnan().any() takes two, 13x slower).
    return torch.where(dist.detach().amax().isnan(), torch.full_like(loss, math.nan), loss)


@torch.library.register_fake("facekernels::triplet_margin_forward")
def _(dist, labels, ref_labels, margin, mining, self_ref, smooth):
    check_one_device("triplet_margin_loss", dist=dist, labels=labels, ref_labels=ref_labels)
    count = dist.new_empty((), dtype=torch.int64)
    return dist.new_empty(()), count, torch.empty_like(count), dist.new_empty(dist.shape)


@torch.library.register_fake("facekernels::triplet_mine")
def _(dist, labels, ref_labels, margin, mining, self_ref):
    check_one_device("triplet_mine", dist=dist, labels=labels, ref_labels=ref_labels)
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


def _empty_triplets(like):
    empty = torch.empty(0, dtype=torch.int64, device=like.device)
    return empty, empty.clone(), empty.clone()


def mine_triplets(embeddings, labels, *, margin=0.2, type_of_triplets="all",
                  distance="euclidean", normalize_embeddings=True, ref_emb=None, ref_labels=None):
    """Triplets (a, p, n) as int64 tensors on the embeddings' device, in lexicographic
    order, with pytorch-metric-learning's TripletMarginMiner semantics (t = d_an - d_ap,
    s_ap - s_an for cosine): "all" t <= margin, "hard" t <= 0, "semihard" 0 < t <= margin,
    "easy" t > margin; plus "batch_hard" (per anchor the farthest positive and the nearest
    negative) and "facenet" (per positive pair the nearest negative farther than the
    positive, else the farthest negative). a indexes embeddings, p and n the reference set
    (ref_emb, or embeddings itself with a != p). A triplet with a NaN distance is never
    mined (as in PML); the loss over such a batch is NaN."""
    op = "TripletMiner"
    check_choice(op, "type_of_triplets", type_of_triplets, TRIPLET_TYPES)
    check_choice(op, "distance", distance, DISTANCES)
    margin = check_number(op, "margin", margin)
    if labels is None:
        raise ValueError(f"{op}: labels are required")
    labels, ref, columns, self_ref = resolve_reference(op, embeddings, labels, ref_emb, ref_labels)
    if embeddings.shape[0] == 0 or ref.shape[0] == 0:
        return _empty_triplets(embeddings)
    with torch.no_grad():
        dist = dissimilarity(embeddings, None if self_ref else ref, distance, normalize_embeddings)
        return torch.ops.facekernels.triplet_mine(
            dist, labels, columns, margin, MINING[type_of_triplets], self_ref
        )


def check_triplets_per_anchor(op, value):
    if value != "all" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{op}: triplets_per_anchor must be "all" or a positive int, got {value!r}')


def sample_triplets(labels, ref_labels, self_ref, per_anchor):
    """PML's triplets_per_anchor=k: per anchor with a positive and a negative, k triplets of
    a uniformly drawn positive and negative (with replacement; torch's global generator)."""
    same = labels[:, None] == ref_labels[None, :]
    positive = same.clone()
    if self_ref:
        positive.fill_diagonal_(False)
    negative = ~same
    anchors = (positive.any(1) & negative.any(1)).nonzero().squeeze(1)
    if anchors.numel() == 0:
        return _empty_triplets(anchors)
    p = torch.multinomial(positive[anchors].float(), per_anchor, replacement=True)
    n = torch.multinomial(negative[anchors].float(), per_anchor, replacement=True)
    return anchors.repeat_interleave(per_anchor), p.flatten(), n.flatten()


def reduce_terms(losses, reduction):
    """"mean_nonzero", "mean" or "sum" of a loss's terms: 0, still in the graph, for none."""
    if reduction == "mean_nonzero":
        return losses.sum() / (losses > 0).sum().clamp_min(1)
    if reduction == "mean":
        return losses.sum() / max(losses.numel(), 1)
    return losses.sum()


class _Setup(NamedTuple):
    """A checked triplet-loss call: the batch, its reference set and the triplets (the given
    or converted list, a drawn one, or None: every valid triplet / mined in the pass)."""
    embeddings: torch.Tensor
    labels: torch.Tensor
    ref: torch.Tensor
    ref_labels: torch.Tensor
    self_ref: bool
    triplets: tuple
    margin: float
    mining: str
    distance: str
    normalize_embeddings: bool

    def dist(self):
        ref = None if self.ref is self.embeddings else self.ref
        return dissimilarity(self.embeddings, ref, self.distance, self.normalize_embeddings)

    def empty(self):
        return self.embeddings.shape[0] == 0 or self.ref.shape[0] == 0


def _setup_loss(embeddings, labels, margin, mining, distance, triplets_per_anchor,
                normalize_embeddings, indices_tuple, ref_emb, ref_labels, ref_starts_with_batch):
    op = "TripletMarginLoss"
    check_choice(op, "mining", mining, MINING)
    check_choice(op, "distance", distance, DISTANCES)
    margin = check_number(op, "margin", margin)
    check_triplets_per_anchor(op, triplets_per_anchor)
    if labels is None and indices_tuple is None:
        raise ValueError(f"{op}: labels are required when indices_tuple is not given")
    labels, ref, columns, self_ref = resolve_reference(op, embeddings, labels, ref_emb, ref_labels,
                                                       ref_starts_with_batch, indices_tuple is not None)
    if indices_tuple is not None:
        indices_tuple = to_triplets(check_indices(op, indices_tuple, embeddings, ref))
    elif triplets_per_anchor != "all" and mining is None:
        indices_tuple = sample_triplets(labels, columns, self_ref, triplets_per_anchor)
    return _Setup(embeddings, labels, ref, columns, self_ref, indices_tuple, margin, mining,
                  distance, normalize_embeddings)


def _gathered_terms(setup, swap, smooth_loss):
    """(terms, triplets, dist) over the triplet list, mined here when there is none."""
    if setup.empty():
        n, m = setup.embeddings.shape[0], setup.ref.shape[0]
        return setup.embeddings.new_zeros(0), setup.triplets or _empty_triplets(setup.embeddings), \
            setup.embeddings.new_zeros(n, m)
    dist = setup.dist()
    triplets = setup.triplets
    if triplets is None:
        triplets = torch.ops.facekernels.triplet_mine(dist.detach(), setup.labels, setup.ref_labels,
                                                      setup.margin, MINING[setup.mining], setup.self_ref)
    a, p, n = triplets
    d_ap, d_an = dist[a, p], dist[a, n]
    if swap:  # p and n both index the reference set
        swap_dist = dist if setup.ref is setup.embeddings else \
            dissimilarity(setup.ref, None, setup.distance, setup.normalize_embeddings)
        d_an = torch.minimum(d_an, swap_dist[p, n])
    violation = d_ap - d_an + setup.margin
    return (F.softplus(violation) if smooth_loss else F.relu(violation)), triplets, dist


def triplet_margin_terms(embeddings, labels=None, *, margin=0.05, mining=None,
                         distance="euclidean", swap=False, smooth_loss=False,
                         triplets_per_anchor="all", normalize_embeddings=True, indices_tuple=None,
                         ref_emb=None, ref_labels=None, ref_starts_with_batch=False):
    """(terms, (a, p, n), dist): each triplet's loss, the triplets (as in
    triplet_margin_loss) and the distance matrix they were read from, gathered over the
    list (memory O(T))."""
    setup = _setup_loss(embeddings, labels, margin, mining, distance, triplets_per_anchor,
                        normalize_embeddings, indices_tuple, ref_emb, ref_labels, ref_starts_with_batch)
    return _gathered_terms(setup, swap, smooth_loss)


def triplet_margin_loss(embeddings, labels=None, *, margin=0.05, mining=None,
                        distance="euclidean", reduction="mean_nonzero", swap=False,
                        smooth_loss=False, triplets_per_anchor="all", normalize_embeddings=True,
                        indices_tuple=None, ref_emb=None, ref_labels=None, ref_starts_with_batch=False):
    """Triplet margin loss (Schroff et al. 2015) with pytorch-metric-learning's semantics:
    per triplet relu(d_ap - d_an + margin) (softplus when smooth_loss; for cosine,
    s_an - s_ap + margin; swap replaces d_an by min(d_an, d_pn), d_pn between reference
    rows), reduced by "mean_nonzero" (mean over the terms > 0, 0 if none), "mean", "sum" or
    "none" (the per-triplet terms).

    The triplets: indices_tuple (from any miner, PML's included; pairs (a1, p, a2, n) are
    converted as PML does), else every valid triplet (mining=None, PML's loss without a
    miner; triplets_per_anchor=k draws k per anchor instead), else those mined with
    `mining` and the same margin. Every valid triplet or a mined set is evaluated in one
    fused pass over the pairwise distances: no triplet list, no N^3 temporary; a given or
    drawn list, swap, or reduction="none" gathers over the list (memory O(T)). Any NaN
    distance makes a reduced loss NaN. An empty batch gives 0, still in the graph.
    ref_starts_with_batch: ref_emb's first N rows are the embeddings themselves (a memory
    holding this batch, as CrossBatchMemory's): the positive (i, i) is not a triplet.
    """
    check_choice("TripletMarginLoss", "reduction", reduction, REDUCTIONS)
    setup = _setup_loss(embeddings, labels, margin, mining, distance, triplets_per_anchor,
                        normalize_embeddings, indices_tuple, ref_emb, ref_labels, ref_starts_with_batch)
    if setup.triplets is not None or swap or reduction == "none":
        terms, _, dist = _gathered_terms(setup, swap, smooth_loss)
        if reduction == "none":
            return terms
        return nan_if_any(reduce_terms(terms, reduction) + (embeddings * 0).sum(), dist)
    if setup.empty():
        return (embeddings * 0).sum()
    dist = setup.dist()
    loss_sum, active, count, _ = torch.ops.facekernels.triplet_margin_forward(
        dist, setup.labels, setup.ref_labels, setup.margin, MINING[mining], setup.self_ref,
        bool(smooth_loss)
    )
    if reduction == "mean_nonzero":
        loss = loss_sum / active.clamp_min(1)
    elif reduction == "mean":
        loss = loss_sum / count.clamp_min(1)
    else:
        loss = loss_sum
    return nan_if_any(loss, dist)
