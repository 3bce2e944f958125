"""Metric losses and miners past one process: pytorch-metric-learning's DistributedLossWrapper
and DistributedMinerWrapper on torch.distributed, for facekernels' TripletMarginLoss,
ContrastiveLoss and TripletMiner (PML's own losses and miners work too).

Every rank's embeddings and labels are all-gathered in PML's order: this rank's rows first,
keeping their autograd graph, then the other ranks' rows in rank order, detached. Indices
into the local batch therefore stay valid in the gathered one.

Errors are collective: when any rank's input is bad, or the wrapped loss or miner raises on
any rank, every rank raises (its own error where it arose, naming the failing ranks
elsewhere) and no rank is left waiting in a collective.

The loss wrapper also takes a CrossBatchMemory (ours or PML's; not with efficient=True or
ref_emb, as PML): the memory then sees the gathered batch, enqueue_mask gathered alike.

Deliberate differences from PML:
- torch.distributed not initialized: RuntimeError (PML's loss wrapper warns and returns the
  local loss, a silent change of the objective; its miner wrapper fails inside torch).
- Local batch sizes may differ across ranks (the all-gather is padded); PML needs equal sizes.
- Labels may have any integer dtype and are gathered as int64; the ranks must agree on
  giving them or not (labels=None with an indices_tuple, as PML's loss wrapper allows).
- An optional process_group (PML always uses the world).

As PML, efficient=True with a ref_emb of your own drops the positive pair (anchor i,
reference row i) although reference row i is another sample than anchor i (PML treats the
references as if they were the batch); our wrappers do the same, so that results agree.
"""

import torch
import torch.distributed as dist
from torch import nn

from facekernels.distributed.group import world_size

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _all_gather_ints(values, group):
    """Every rank's list of ints (one length on all ranks) as a [world, len] CPU tensor."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")
    row = torch.tensor(values, dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows).cpu()


def _collectively(owner, group, fn, *args):
    """fn(*args) on every rank; when it raises on any rank, it raises on every rank."""
    try:
        result, error = fn(*args), None
    except Exception as caught:  # re-raised below, after the other ranks have heard of it
        result, error = None, caught
    failed = _all_gather_ints([error is not None], group)[:, 0].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{owner}: rank(s) {failed} raised (see the error there)")
    return result


def _describe(x):
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_pair(owner, emb_name, emb, labels_name, labels):
    """This rank's complaint about an (embeddings, labels) pair, or None: a TypeError for a
    wrong type, a ValueError for a wrong shape."""
    if not isinstance(emb, torch.Tensor) or emb.dtype not in _FLOATS:
        return TypeError(f"{owner}: {emb_name} must be a float16/bfloat16/float32/float64 [N, D] "
                         f"tensor, got {_describe(emb)}")
    if emb.dim() != 2:
        return ValueError(f"{owner}: {emb_name} must be a [N, D] tensor, got {_describe(emb)}")
    if labels is None:  # with an indices_tuple (the wrapped loss needs one then)
        return None
    expected = f"an integer tensor of shape ({emb.shape[0]},), one label per row of {emb_name}"
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        return TypeError(f"{owner}: {labels_name} must be {expected}, got {_describe(labels)}")
    if labels.shape != (emb.shape[0],):
        return ValueError(f"{owner}: {labels_name} must be {expected}, got {_describe(labels)}")
    return None


def _check(owner, embeddings, labels, ref_emb, ref_labels):
    """This rank's complaint about its input, or None."""
    problem = _check_pair(owner, "embeddings", embeddings, "labels", labels)
    if problem or (ref_emb is None and ref_labels is None):
        return problem
    if ref_emb is None:
        return ValueError(f"{owner}: ref_labels given without ref_emb")
    problem = _check_pair(owner, "ref_emb", ref_emb, "ref_labels", ref_labels)
    if problem is None and (ref_emb.dtype, ref_emb.shape[1], ref_emb.device) != \
            (embeddings.dtype, embeddings.shape[1], embeddings.device):
        problem = ValueError(f"{owner}: ref_emb must have the embeddings' dtype, width and device "
                             f"({embeddings.dtype}, {embeddings.shape[1]}, {embeddings.device}), "
                             f"got ({ref_emb.dtype}, {ref_emb.shape[1]}, {ref_emb.device})")
    return problem


def _all_gather_rows(tensor, sizes, group):
    """Every rank's rows (sizes[r] of them on rank r): `tensor` itself first, then the other
    ranks' rows in rank order, detached. Padded to the largest size for the all-gather."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:len(tensor)] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([tensor] + [part[:size] for r, (part, size) in enumerate(zip(parts, sizes))
                                 if r != rank])


def _gather(owner, group, embeddings, labels, ref_emb, ref_labels, enqueue_mask=None):
    """(all_emb, all_labels, all_ref_emb, all_ref_labels, all_enqueue_mask), None where not
    given, the labels int64. Checks every rank's input first: an error on every rank when
    any rank's input is bad (its own where it arose, a ValueError naming that rank
    elsewhere) or the ranks disagree on the dtype, the width or on giving labels, ref_emb,
    ref_labels or enqueue_mask."""
    problem = _check(owner, embeddings, labels, ref_emb, ref_labels)
    if problem is None and enqueue_mask is not None and (
            not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool
            or enqueue_mask.shape != (len(embeddings),)):
        problem = ValueError(f"{owner}: enqueue_mask must be a bool tensor of shape "
                             f"({len(embeddings)},), got {_describe(enqueue_mask)}")
    given = [labels is not None, ref_emb is not None, ref_labels is not None, enqueue_mask is not None]
    row = [1] + [0] * 8 if problem else \
        [0, len(embeddings), embeddings.shape[1], _FLOATS.index(embeddings.dtype), *given,
         len(ref_emb) if given[1] else 0]
    table = _all_gather_ints(row, group)
    failed = table[:, 0].nonzero().flatten().tolist()
    if problem:
        raise problem
    if failed:
        raise ValueError(f"{owner}: the input of rank(s) {failed} was rejected (see the error there)")
    for column, what, show in ((2, "embedding widths", int), (3, "embedding dtypes", _FLOATS.__getitem__),
                               (4, "labels (given or not)", bool), (5, "ref_emb (given or not)", bool),
                               (6, "ref_labels (given or not)", bool),
                               (7, "enqueue_mask (given or not)", bool)):
        if len(set(table[:, column].tolist())) > 1:
            values = [show(value) for value in table[:, column].tolist()]
            raise ValueError(f"{owner}: the ranks' {what} differ: {values} on ranks 0..{len(values) - 1}")
    sizes, ref_sizes = table[:, 1].tolist(), table[:, 8].tolist()

    def rows(tensor, sizes, dtype=None):  # on the embeddings' device; None stays None
        return None if tensor is None else \
            _all_gather_rows(tensor.to(device=embeddings.device, dtype=dtype), sizes, group)

    mask = rows(enqueue_mask, sizes, torch.int64)  # gathered as integers, as the labels
    return (rows(embeddings, sizes), rows(labels, sizes, torch.int64),
            rows(ref_emb, ref_sizes), rows(ref_labels, ref_sizes, torch.int64),
            None if mask is None else mask.bool())


def _all_pairs(labels, ref_labels):
    """PML's all pairs (a1, p, a2, n): every same-label and every different-label pair."""
    same = labels[:, None] == ref_labels[None, :]
    return (*torch.where(same), *torch.where(~same))


def _without_self(indices_tuple):
    """Drops the positive pairs (i, i) of local anchor i with reference row i (its own copy
    in the gathered batch, or PML's choice for a ref_emb): PML's remove_self_comparisons for
    this rank's rows coming first."""
    a, p = indices_tuple[:2]
    keep = a != p
    if len(indices_tuple) == 3:
        return a[keep], p[keep], indices_tuple[2][keep]
    return a[keep], p[keep], *indices_tuple[2:]


class DistributedLossWrapper(nn.Module):
    """pytorch-metric-learning's DistributedLossWrapper: a metric loss over the embeddings of
    every rank. ``loss = wrapper(embeddings, labels=None, indices_tuple=None, ref_emb=None,
    ref_labels=None, enqueue_mask=None)`` with this rank's embeddings and labels.

    - efficient=False: the wrapped loss of the whole gathered batch (this rank's rows first,
      so indices_tuple may index the local batch, or the gathered one as
      DistributedMinerWrapper(efficient=False) returns); the same value on every rank.
    - efficient=True: this rank's rows as anchors against every gathered row as reference
      (the loss's ref_emb / ref_labels path); without indices_tuple, every pair but each
      anchor i with reference row i. indices_tuple: anchors index the local batch, the rest
      the gathered one, as DistributedMinerWrapper(efficient=True) returns.
    - a CrossBatchMemory (facekernels' or PML's; efficient=False, no ref_emb): the memory
      gets the gathered batch and the gathered enqueue_mask.

    ref_emb / ref_labels, if given, are gathered likewise and replace the gathered batch as
    the reference set. labels may be None with an indices_tuple. As PML, the result is
    world_size times the wrapped loss: the gradient reaches only this rank's rows (the
    others' arrive detached), and DDP's averaging over ranks then gives the gradient of the
    loss. With one rank, the wrapped loss as it is.

    Args:
        loss: facekernels' TripletMarginLoss, ContrastiveLoss or CrossBatchMemory, or any
            loss with PML's call contract ``loss(embeddings, labels, indices_tuple, ref_emb,
            ref_labels)`` that returns a tensor (PML's own, and PML's CrossBatchMemory).
        efficient: see above.
        process_group: the group to gather over (default: the world).
    """

    def __init__(self, loss, efficient=False, *, process_group=None):
        super().__init__()
        if not callable(loss):
            raise TypeError("DistributedLossWrapper: loss must be a metric loss called as "
                            "loss(embeddings, labels, indices_tuple, ref_emb, ref_labels) or a "
                            f"CrossBatchMemory, got {type(loss).__name__}")
        self.memory = type(loss).__name__ == "CrossBatchMemory"
        if self.memory and efficient:
            raise ValueError("DistributedLossWrapper: efficient=True does not apply to a "
                             "CrossBatchMemory (as in PML)")
        self.loss, self.efficient, self.process_group = loss, bool(efficient), process_group

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                enqueue_mask=None):
        owner, group = "DistributedLossWrapper", self.process_group
        world = world_size(owner, group)
        if self.memory and (ref_emb is not None or ref_labels is not None):
            raise ValueError(f"{owner}: a CrossBatchMemory takes no ref_emb / ref_labels (as in PML)")
        if not self.memory and enqueue_mask is not None:
            raise ValueError(f"{owner}: enqueue_mask applies to a CrossBatchMemory only")
        if world == 1:
            if self.memory:
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        gathered = _gather(owner, group, embeddings, labels, ref_emb, ref_labels, enqueue_mask)
        return _collectively(owner, group, self._loss, embeddings, indices_tuple, *gathered) * world

    def _loss(self, embeddings, indices_tuple, all_emb, all_labels, all_ref, all_ref_labels, all_mask):
        if self.memory:
            loss = self.loss(all_emb, all_labels, indices_tuple, all_mask)
        elif not self.efficient:
            loss = self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels)
        else:
            labels = None if all_labels is None else all_labels[:len(embeddings)]
            ref = all_emb if all_ref is None else all_ref
            ref_labels = all_labels if all_ref is None else all_ref_labels
            if indices_tuple is None and labels is not None:
                indices_tuple = _without_self(_all_pairs(labels, ref_labels))
            loss = self.loss(embeddings, labels, indices_tuple, ref, ref_labels)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"DistributedLossWrapper: the wrapped loss returned a "
                            f"{type(loss).__name__}, not a tensor (a loss dict, as under "
                            "DoNothingReducer, is not supported)")
        return loss

    def extra_repr(self):
        return f"efficient={self.efficient}"


class DistributedMinerWrapper(nn.Module):
    """pytorch-metric-learning's DistributedMinerWrapper: a miner over the embeddings of every
    rank. ``indices_tuple = wrapper(embeddings, labels, ref_emb=None, ref_labels=None)``.

    - efficient=False: the wrapped miner on the whole gathered batch (this rank's rows
      first); indices into it, for DistributedLossWrapper(efficient=False).
    - efficient=True: this rank's rows as anchors against every gathered row as reference,
      without the positive pairs of anchor i with reference row i (as PML); anchors index
      the local batch, the rest the gathered one, for DistributedLossWrapper(efficient=True).

    ref_emb / ref_labels, if given, are gathered likewise and replace the gathered batch as
    the reference set. With one rank, the wrapped miner as it is.

    Args:
        miner: facekernels' TripletMiner, or any miner with PML's call contract
            ``miner(embeddings, labels, ref_emb, ref_labels)``.
        efficient: see above.
        process_group: the group to gather over (default: the world).
    """

    def __init__(self, miner, efficient=False, *, process_group=None):
        super().__init__()
        if not callable(miner):
            raise TypeError("DistributedMinerWrapper: miner must be called as "
                            f"miner(embeddings, labels, ref_emb, ref_labels), got {type(miner).__name__}")
        self.miner, self.efficient, self.process_group = miner, bool(efficient), process_group

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        owner, group = "DistributedMinerWrapper", self.process_group
        if world_size(owner, group) == 1:
            return self.miner(embeddings, labels, ref_emb, ref_labels)
        if labels is None:
            raise TypeError(f"{owner}: labels must be an integer tensor, got NoneType")
        gathered = _gather(owner, group, embeddings, labels, ref_emb, ref_labels)[:4]
        return _collectively(owner, group, self._mine, embeddings, *gathered)

    def _mine(self, embeddings, all_emb, all_labels, all_ref, all_ref_labels):
        if not self.efficient:
            return self.miner(all_emb, all_labels, all_ref, all_ref_labels)
        labels = all_labels[:len(embeddings)]
        ref, ref_labels = (all_emb, all_labels) if all_ref is None else (all_ref, all_ref_labels)
        return _without_self(self.miner(embeddings, labels, ref, ref_labels))

    def extra_repr(self):
        return f"efficient={self.efficient}"
