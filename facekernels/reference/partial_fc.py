"""insightface's PartialFC_V2 forward (recognition/arcface_torch/partial_fc_v2.py with its
CombinedMarginLoss, losses.py), transcribed with dense logits: the oracle for
facekernels.distributed.PartialFC. sample_rate 1 (every class of the shard)."""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class GatherRows(torch.autograd.Function):
    """all_gather; backward: this rank's rows of the summed gradient, times the world size."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        world = dist.get_world_size(ctx.group)
        return grad.chunk(world)[dist.get_rank(ctx.group)] * world, None


class DistributedCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of logits split by classes across ranks (labels -1: another
    rank's class); the target probability is clamped at 1e-30, as insightface does."""

    @staticmethod
    def forward(ctx, logits, labels, group):
        top = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        probs = (logits - top).exp()
        total = probs.sum(dim=1, keepdim=True)
        dist.all_reduce(total, group=group)
        probs = probs / total
        here = labels != -1
        target = torch.zeros(len(labels), 1, dtype=logits.dtype, device=logits.device)
        target[here] = probs[here].gather(1, labels[here, None])
        dist.all_reduce(target, group=group)
        ctx.save_for_backward(probs, labels)
        return -target.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad):
        probs, labels = ctx.saved_tensors
        here = labels != -1
        grad_logits = probs.clone()
        grad_logits[here.nonzero().squeeze(1), labels[here]] -= 1
        return grad_logits * grad / len(labels), None, None


def combined_margin(cos, labels, s, m1, m2, m3, threshold):
    """insightface's CombinedMarginLoss: with threshold > 0 the non-target cosines above it
    are zeroed (the mask without a gradient); ArcFace (m1 = 1, m3 = 0) adds m2 to the
    target angle without a gradient through the margin and without a fallback past pi;
    otherwise m3 > 0 subtracts m3 (m2 is then ignored); anything else is refused."""
    here = (labels != -1).nonzero().squeeze(1)
    logits = cos.clone()
    if threshold > 0:
        with torch.no_grad():
            dirty = logits > threshold
            dirty[here, labels[here]] = False
        logits = logits * (~dirty)
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            angle = logits[here, labels[here]].arccos()
            shift = torch.cos(angle + m2) - logits[here, labels[here]]
        logits = logits.index_put((here, labels[here]), logits[here, labels[here]] + shift)
    elif m3 > 0:
        logits = logits.index_put((here, labels[here]), logits[here, labels[here]] - m3)
    else:
        raise ValueError("insightface's CombinedMarginLoss supports ArcFace (m1=1, m3=0) or m3 > 0")
    return logits * s


def partial_fc_v2_loss(
    local_embeddings: torch.Tensor,
    local_labels: torch.Tensor,
    weight: torch.Tensor,
    class_start: int,
    *,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    interclass_filtering_threshold: float = 0.0,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    r"""The loss of PartialFC_V2 on this rank's shard ``weight`` = classes
    ``[class_start, class_start + len(weight))``: embeddings and labels are all-gathered,
    ``logits = clamp(<x/|x|, w/|w|>, -1, 1)`` of the global batch against the shard, the
    combined margin on the target, and the cross entropy finished across ranks (the mean
    over the global batch). The local embeddings' gradient carries the world-size factor of
    insightface's AllGather.

    An, Zhu, Xiao, Deng et al. 2022, "Killing Two Birds with One Stone: Efficient and
    Robust Training of Face Recognition CNNs by Partial FC"; Deng et al. 2019, "ArcFace".
    """
    embeddings = GatherRows.apply(local_embeddings, group)
    parts = [torch.empty_like(local_labels) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local_labels.contiguous(), group=group)
    labels = torch.cat(parts) - class_start
    labels = torch.where((labels >= 0) & (labels < weight.shape[0]), labels, -1)
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    logits = combined_margin(cos, labels, s, m1, m2, m3, interclass_filtering_threshold)
    return DistributedCrossEntropy.apply(logits, labels, group)


class _Rows(torch.autograd.Function):
    """Every rank's rows (counts may differ), concatenated; backward: this rank's rows of
    the gradient, times `factor` (every rank computes the same loss from the result)."""

    @staticmethod
    def forward(ctx, x, counts, factor, group):
        rank = dist.get_rank(group)
        ctx.start, ctx.count, ctx.factor = sum(counts[:rank]), counts[rank], factor
        padded = x.new_zeros(max(counts), *x.shape[1:])
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.count] * ctx.factor, None, None, None


def global_view(local_embeddings, local_labels, weight, *, num_classes, sub_centers=1, group=None):
    """The whole job on every rank: (global batch, its labels, the [num_classes * K, D]
    weight) from each rank's batch and class shard (insightface's split: the first
    num_classes % world ranks hold one class more). A single-process loss of these, the same
    on every rank, then has PartialFC's gradients: world_size times the global mean loss's
    for the local embeddings (as insightface's AllGather), the exact one for the shard."""
    world = dist.get_world_size(group)
    base, extra = divmod(num_classes, world)
    shards = [(base + int(r < extra)) * sub_centers for r in range(world)]
    embeddings = _Rows.apply(local_embeddings, [len(local_embeddings)] * world, world, group)
    labels = [torch.empty_like(local_labels) for _ in range(world)]
    dist.all_gather(labels, local_labels.contiguous(), group=group)
    return embeddings, torch.cat(labels), _Rows.apply(weight, shards, 1, group)
