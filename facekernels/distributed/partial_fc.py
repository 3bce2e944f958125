"""PartialFC: the class-sharded margin softmax of insightface's PartialFC_V2 (An et al. 2022,
"Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs
by Partial FC") on torch.distributed, with the fused op on each rank's shard: no
global_batch x local_classes logits, and sampled classes read through an index."""

import math

import torch
import torch.distributed as dist
from torch import nn

from facekernels.distributed.group import world_size
from facekernels.ops.checks import check_choice, check_number
from facekernels.ops.margin_softmax import margin_softmax_rows


def _margins(margin_loss):
    """(s, m1, m2, m3, interclass_filtering_threshold) of facekernels' CombinedMarginLoss /
    ArcFaceLoss / CosFaceLoss (no filtering), or of any object with s, m1, m2, m3 and
    optionally interclass_filtering_threshold (insightface's CombinedMarginLoss)."""
    if hasattr(margin_loss, "margins") and hasattr(margin_loss, "scale"):
        m1, m2, m3, sphere_lambda = margin_loss.margins()
        if getattr(margin_loss, "kind", 0) != 0 or sphere_lambda:
            raise ValueError(f"PartialFC: margin_loss {type(margin_loss).__name__} is not a combined margin")
        s = margin_loss.scale
    elif all(hasattr(margin_loss, name) for name in ("s", "m1", "m2", "m3")):
        s, m1, m2, m3 = (margin_loss.s, margin_loss.m1, margin_loss.m2, margin_loss.m3)
    else:
        raise ValueError("PartialFC: margin_loss must be a facekernels margin head or have "
                         f"attributes s, m1, m2, m3, got {type(margin_loss).__name__}")
    threshold = getattr(margin_loss, "interclass_filtering_threshold", 0.0)
    return tuple(check_number("PartialFC", f"margin_loss.{name}", value, low)
                 for name, value, low in (("s", s, 0.0), ("m1", m1, 0.0), ("m2", m2, -math.inf),
                                          ("m3", m3, -math.inf),
                                          ("interclass_filtering_threshold", threshold, -math.inf)))


class _AllGather(torch.autograd.Function):
    """Every rank's rows, concatenated. Backward: the sum over ranks of the gradient of this
    rank's rows, times the world size, as insightface's AllGather: DDP then averages the
    backbone's gradients, which gives the gradient of the global batch's mean loss."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world)[rank] * world, None


class _ShardedSoftmax(torch.autograd.Function):
    """The cross entropy of the whole softmax from every shard's per-row statistics:
    loss_i = log sum_r exp(max_r + log_sum_r) - sum_r target_r, mean over rows. The forward
    all-reduces O(rows) numbers; the backward needs no communication (each shard's share of
    a row's softmax mass is known locally)."""

    @staticmethod
    def forward(ctx, row_max, log_sum, target, group):
        top = row_max.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        mass = torch.exp(row_max - top + log_sum)  # this shard's sum of exp(logit - top)
        total = mass.clone()
        dist.all_reduce(total, group=group)
        target_sum = target.clone()
        dist.all_reduce(target_sum, group=group)  # one shard holds each row's target
        ctx.save_for_backward(mass / total)
        return (torch.log(total) + top - target_sum).mean()

    @staticmethod
    def backward(ctx, grad):
        (share,) = ctx.saved_tensors
        scale = grad / share.numel()
        return None, share * scale, -scale.expand_as(share), None


class PartialFC(nn.Module):
    """insightface's PartialFC_V2 with the fused margin softmax: ``loss = head(local_embeddings,
    local_labels)``, the mean over the global batch, the same value on every rank.

    Rank r keeps classes [class_start, class_start + num_local) of ``num_classes`` (the
    first ``num_classes % world`` ranks one more), as ``.weight`` [num_local, D]. Embeddings
    and labels are all-gathered; each rank runs the fused op on its shard (never a
    global_batch x num_local logit matrix) and the softmax is finished with all-reduces of
    per-row statistics. With ``sample_rate < 1`` a rank keeps the positive classes of the
    global batch plus random negatives, ``int(sample_rate * num_local)`` in all (more if
    the positives alone are more), sorted; the op reads them through an index and the
    other rows get a zero gradient.

    Args:
        margin_loss: facekernels' ArcFaceLoss / CosFaceLoss / CombinedMarginLoss (its scale
            and margins; its weight is not used), or any object with ``s, m1, m2, m3``
            (insightface's CombinedMarginLoss; its interclass_filtering_threshold > 0 gives a
            non-target class whose cosine exceeds it logit 0 and no gradient, as there).
            Target logit s (cos(m1 theta + m2) - m3).
        embedding_size, num_classes, sample_rate, fp16: as PartialFC_V2 (fp16: the GEMMs
            under float16 autocast).
        process_group: the group to shard over (default: the world).
        gradient: "detached" (insightface's: the margin shifts the value only) or "exact".
        generator: a torch.Generator for the negative sampling (default: torch's global one).

    The local embeddings' gradient is world_size times the gradient of the global mean
    loss, like insightface's: DDP's averaging over ranks then restores the exact gradient.
    """

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, *,
                 process_group=None, gradient="detached", generator=None):
        super().__init__()
        self.world_size = world_size("PartialFC", process_group)
        self.group, self.rank = process_group, dist.get_rank(process_group)
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PartialFC: {name} must be a positive int, got {value!r}")
        if num_classes < self.world_size:
            raise ValueError(f"PartialFC: num_classes ({num_classes}) must be at least the world "
                             f"size ({self.world_size}): every rank holds a shard")
        self.sample_rate = check_number("PartialFC", "sample_rate", sample_rate, 0.0, 1.0)
        check_choice("PartialFC", "gradient", gradient, ("detached", "exact"))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"PartialFC: generator must be a torch.Generator or None, got {generator!r}")
        self.scale, self.m1, self.m2, self.m3, self.interclass_filtering_threshold = _margins(margin_loss)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.fp16, self.gradient, self.generator = bool(fp16), gradient, generator
        self.num_local, self.class_start = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = int(self.sample_rate * self.num_local)
        if self.num_sample < 1:
            raise ValueError(f"PartialFC: sample_rate={sample_rate} keeps no class of the "
                             f"{self.num_local} on rank {self.rank}")
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))

    def get_extra_state(self):
        return {"num_classes": self.num_classes, "class_start": self.class_start,
                "num_local": self.num_local}

    def set_extra_state(self, state):
        if (state["class_start"], state["num_local"]) != (self.class_start, self.num_local):
            raise ValueError(
                f"PartialFC: this checkpoint holds classes [{state['class_start']}, "
                f"{state['class_start'] + state['num_local']}), this rank classes "
                f"[{self.class_start}, {self.class_start + self.num_local}): save with "
                "gather_weight and restore with load_full_weight to change the world size")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The class range first: another rank's shard must not overwrite this weight.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check(self, embeddings, labels):
        """This rank's complaint about its input, or None."""
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point() \
                or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            return (f"PartialFC: local_embeddings must be a float [B, {self.embedding_size}] tensor, got "
                    f"{getattr(embeddings, 'dtype', type(embeddings).__name__)} {tuple(getattr(embeddings, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool \
                or labels.numel() != embeddings.shape[0]:
            return f"PartialFC: local_labels must be {embeddings.shape[0]} integer labels"
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            return (f"PartialFC: local_labels must lie in [0, {self.num_classes}), got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]")
        return None

    def _agree(self, embeddings, labels):
        """Raises the same error on every rank when any rank's input is bad or the local
        batch sizes differ; no rank is left waiting in a later collective."""
        problem = self._check(embeddings, labels)
        rows = embeddings.shape[0] if problem is None else 0
        device = self.weight.device
        votes = torch.tensor([float(problem is not None), rows, -rows], dtype=torch.float64, device=device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group)
        if votes[0]:
            raise ValueError(problem or "PartialFC: the input of another rank was rejected (see its error)")
        if votes[1] != -votes[2]:
            raise ValueError(f"PartialFC: the local batch sizes differ across ranks "
                             f"({int(-votes[2])} to {int(votes[1])}); every rank must pass the same size")

    def _sample(self, labels):
        """(rows, labels remapped to them): the positive classes first, then random ones."""
        positive = torch.unique(labels[labels >= 0])
        if self.num_sample <= positive.numel():
            rows = positive
        else:
            priority = torch.rand(self.num_local, generator=self.generator).to(self.weight.device)
            priority[positive] = 2.0
            rows = priority.topk(self.num_sample).indices.sort().values
        remapped = torch.where(labels >= 0, torch.searchsorted(rows, labels.clamp_min(0)), labels)
        return rows, remapped

    def forward(self, local_embeddings, local_labels):
        return self.loss(local_embeddings, local_labels, self.weight)

    def loss(self, local_embeddings, local_labels, weight):
        """This head's loss over a given weight shard (forward passes .weight)."""
        self._agree(local_embeddings, local_labels)
        embeddings = _AllGather.apply(local_embeddings, self.group)
        labels = local_labels.reshape(-1).to(self.weight.device, torch.int64)
        gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(gathered, labels, group=self.group)
        labels = torch.cat(gathered) - self.class_start
        labels = torch.where((labels >= 0) & (labels < self.num_local), labels, -1)  # other shards
        rows = None
        if self.sample_rate < 1:  # weight_index: the sampled rows, as insightface names them
            rows, labels = self._sample(labels)
            self.weight_index = rows
        with torch.autocast(self.weight.device.type, dtype=torch.float16, enabled=self.fp16):
            row_max, log_sum, target, _ = margin_softmax_rows(
                embeddings, weight, labels, kind=0, scale=self.scale, m1=self.m1, m2=self.m2,
                m3=self.m3, sphere_lambda=0.0, gradient=self.gradient, normalize_embeddings=True,
                normalize_weight=True, chunk_size=None, labels_in_range=False, rows=rows,
                interclass_filtering_threshold=self.interclass_filtering_threshold)
        return _ShardedSoftmax.apply(row_max, log_sum, target, self.group)

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, margins=(s={self.scale}, m1={self.m1}, "
                f"m2={self.m2}, m3={self.m3}), gradient={self.gradient!r}")


def shard_range(num_classes, world_size, rank):
    """(num_local, class_start) of a rank: as insightface, the first num_classes % world
    ranks hold one class more."""
    base, extra = divmod(num_classes, world_size)
    return base + int(rank < extra), base * rank + min(rank, extra)


def gather_weight(head):
    """The full [num_classes, D] weight on rank 0 (None on the others), for a checkpoint that
    any world size can resume with load_full_weight."""
    largest = shard_range(head.num_classes, head.world_size, 0)[0]
    padded = torch.zeros(largest, head.embedding_size, dtype=head.weight.dtype, device=head.weight.device)
    padded[:head.num_local] = head.weight.detach()
    parts = [torch.empty_like(padded) for _ in range(head.world_size)]
    dist.all_gather(parts, padded, group=head.group)
    if head.rank != 0:
        return None
    sizes = [shard_range(head.num_classes, head.world_size, r)[0] for r in range(head.world_size)]
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def load_full_weight(head, weight):
    """Copies this rank's classes out of a full [num_classes, D] weight (from gather_weight,
    saved at any world size) into head.weight."""
    if not isinstance(weight, torch.Tensor) or weight.shape != (head.num_classes, head.embedding_size):
        raise ValueError(f"load_full_weight: weight must have shape [{head.num_classes}, "
                         f"{head.embedding_size}], got {tuple(getattr(weight, 'shape', ()))}")
    head.weight.copy_(weight[head.class_start:head.class_start + head.num_local])
