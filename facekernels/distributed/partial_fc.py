"""PartialFC: the class-sharded margin softmax of insightface's PartialFC_V2 (An et al. 2022,
"Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs
by Partial FC") on torch.distributed, with the fused op on each rank's shard: no
global_batch x local_classes logits, and sampled classes read through an index."""

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facekernels.distributed import margins
from facekernels.distributed.group import world_size
from facekernels.losses.adaptive_heads import target_cosines
from facekernels.losses.margin_heads import _MarginSoftmaxHead
from facekernels.ops.checks import check_choice, check_number
from facekernels.ops.margin_softmax import accumulate_dtype, margin_softmax_rows
from facekernels.ops.running import assign_after


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


class DistCrossEntropy(nn.Module):
    """insightface's DistCrossEntropy: the mean cross entropy of logits [global_batch,
    classes of this shard] (labels [global_batch] or [global_batch, 1], -1 for another
    shard's class), finished across ranks. PartialFC runs a margin_loss that is not fused
    through it. Unlike insightface's, the target probability is not clamped at 1e-30."""

    def __init__(self, process_group=None):
        super().__init__()
        self.group = process_group

    def forward(self, logits, labels):
        labels = labels.reshape(-1)
        if logits.shape[1] == 0:  # a shard that sampled none of its classes
            row_max = logits.new_full(labels.shape, -math.inf)
            target = logits.new_zeros(labels.shape)
        else:
            row_max = logits.detach().amax(1)
            target = torch.where(labels >= 0, logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0)
        log_sum = torch.logsumexp(logits - row_max[:, None], 1)
        return _ShardedSoftmax.apply(row_max, log_sum, target, self.group)


class PartialFC(nn.Module):
    """insightface's PartialFC_V2 with the fused margin softmax: ``loss = head(local_embeddings,
    local_labels)``, the mean over the global batch, the same value on every rank.

    Rank r keeps classes [class_start, class_start + num_local) of ``num_classes`` (the
    first ``num_classes % world`` ranks one more), as ``.weight`` [num_local * K, D] (K
    sub-centers per class, class-major; K = 1 but for SubCenterArcFaceLoss). Embeddings
    and labels ([B] or [B, 1]) are all-gathered; each rank runs the fused op on its shard
    (never a global_batch x num_local logit matrix) and the softmax is finished with
    all-reduces of per-row statistics. With ``sample_rate < 1`` a rank keeps the positive
    classes of the global batch plus random negatives, ``num_sample = int(sample_rate *
    num_local)`` in all (only the positives when they are more), drawn as insightface draws
    them; the op reads them through ``weight_index`` and the other rows get a zero gradient.

    Args:
        margin_loss: read at every forward, as insightface reads it.
            - facekernels' ArcFaceLoss, CosFaceLoss, CombinedMarginLoss, CurricularFaceLoss,
              AdaFaceLoss, MagFaceLoss, SubCenterArcFaceLoss, ElasticFaceLoss: fused, with
              the same result as the head on the global batch (its weight is not used; the
              running buffers t / batch_mean / batch_std are this module's, identical on
              every rank and in its state dict).
            - insightface's CombinedMarginLoss, ArcFace, CosFace: fused, with insightface's
              semantics (the combined margin shifts the angle without a gradient; with m3 > 0
              it is CosFace; interclass_filtering_threshold > 0 gives a non-target class
              whose cosine exceeds it logit 0).
            - any other callable ``margin_loss(logits, labels)``: insightface's algorithm
              on dense [global_batch, sampled] logits (a one-time warning says so).
        embedding_size, num_classes, sample_rate, fp16: as PartialFC_V2 (fp16: the GEMMs
            under float16 autocast).
        process_group: the group to shard over (default: the world).
        gradient: None (the margin object's own), or "detached" / "exact" for a combined
            margin.
        generator: a torch.Generator for the negative sampling (default: torch's global one).

    The local embeddings' gradient is world_size times the gradient of the global mean
    loss, like insightface's: DDP's averaging over ranks then restores the exact gradient.
    """

    _version = 2  # insightface's PartialFC_V2

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, *,
                 process_group=None, gradient=None, generator=None):
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
        if gradient is not None:
            check_choice("PartialFC", "gradient", gradient, ("detached", "exact"))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"PartialFC: generator must be a torch.Generator or None, got {generator!r}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.fp16, self.gradient, self.generator = bool(fp16), gradient, generator
        self.num_local, self.class_start = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.last_batch_size = 0
        self._warned = False  # of the dense path, once
        self.is_updated = self.init_weight_update = True  # insightface's flags, unused by V2
        self.dist_cross_entropy = DistCrossEntropy(process_group)
        self.margin_softmax = margin_loss
        self.sub_centers = margins.read(margin_loss, gradient).sub_centers if self._fused else 1
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local * self.sub_centers, embedding_size)))
        self.register_state_dict_post_hook(_save_class_range)

    def __setattr__(self, name, value):
        if name == "margin_softmax":
            self.__dict__["_fused"] = margins.fused(value)
            if isinstance(value, _MarginSoftmaxHead):
                # Only its options are read: its own [C, D] weight must stay out of this
                # module's parameters and state dict. Its running buffers become ours.
                self._modules.pop(name, None)
                self.__dict__[name] = value
                for buffer in getattr(value, "running", ()):
                    if buffer not in self._buffers:
                        self.register_buffer(buffer, getattr(value, buffer).detach().clone())
                return
            self.__dict__.pop(name, None)
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Another rank's shard of the same size must not overwrite this one (an insightface
        # checkpoint has no class range: its weight's shape is checked as usual).
        saved = local_metadata.get("classes")
        if saved is not None and tuple(saved) != (self.class_start, self.num_local, self.num_classes):
            start, count, total = saved
            raise ValueError(
                f"PartialFC: this checkpoint holds classes [{start}, {start + count}) of {total}, "
                f"this rank classes [{self.class_start}, {self.class_start + self.num_local}) of "
                f"{self.num_classes}: save with gather_weight and restore with load_full_weight "
                "to change the world size")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _check(self, embeddings, labels):
        """This rank's complaint about its input, or None."""
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point() \
                or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            return (f"PartialFC: local_embeddings must be a float [B, {self.embedding_size}] tensor, got "
                    f"{getattr(embeddings, 'dtype', type(embeddings).__name__)} {tuple(getattr(embeddings, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool \
                or labels.numel() != embeddings.shape[0] or labels.dim() > 2:
            return (f"PartialFC: local_labels must be {embeddings.shape[0]} integer labels, [B] or "
                    f"[B, 1], got {getattr(labels, 'dtype', type(labels).__name__)} "
                    f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            return (f"PartialFC: local_labels must lie in [0, {self.num_classes}), got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]")
        return None

    def _agree(self, embeddings, labels):
        """Raises the same error on every rank when any rank's input is bad, or the local
        batch sizes or dtypes differ; no rank is left waiting in a later collective."""
        problem = self._check(embeddings, labels)
        rows = embeddings.shape[0] if problem is None else 0
        dtype = _DTYPES.index(embeddings.dtype) if problem is None and embeddings.dtype in _DTYPES else -1
        votes = torch.tensor([float(problem is not None), rows, -rows, dtype, -dtype],
                             dtype=torch.float64, device=self.weight.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group)
        if votes[0]:
            raise ValueError(problem or "PartialFC: the input of another rank was rejected (see its error)")
        if votes[1] != -votes[2]:
            raise ValueError(f"PartialFC: the local batch sizes differ across ranks "
                             f"({int(-votes[2])} to {int(votes[1])}); every rank must pass the same size")
        if votes[3] != -votes[4]:
            raise ValueError(f"PartialFC: local_embeddings have different dtypes across ranks "
                             f"({_DTYPES[int(-votes[4])]} and {_DTYPES[int(votes[3])]}); every rank "
                             "must pass the same dtype")

    def sample(self, labels, index_positive):
        """insightface's PartialFC_V2.sample: sets weight_index to the sampled classes,
        rewrites labels[index_positive] in place to index them, returns weight[weight_index]."""
        with torch.no_grad():
            rows, remapped = self._sample(torch.where(index_positive, labels, -1).reshape(-1))
            labels[index_positive] = remapped.view_as(labels)[index_positive]
        return self.weight[rows]

    def _sample(self, labels):
        """(rows, labels remapped to them): the positive classes and, when they leave room,
        random ones, as insightface draws them (a rand over the shard even when the positives
        fill the sample, so that the generator's stream stays the same)."""
        positive = torch.unique(labels[labels >= 0])
        if self.num_sample >= positive.numel():
            priority = torch.rand(self.num_local, generator=self.generator).to(self.weight.device)
            priority[positive] = 2.0
            rows = priority.topk(self.num_sample).indices.sort().values
        else:
            rows = positive
        self.weight_index = rows
        remapped = torch.where(labels >= 0, torch.searchsorted(rows, labels.clamp_min(0)), labels)
        return rows, remapped

    def forward(self, local_embeddings, local_labels):
        return self.loss(local_embeddings, local_labels, self.weight)

    def loss(self, local_embeddings, local_labels, weight):
        """This head's loss over a given weight shard (forward passes .weight)."""
        margin_loss = self.margin_softmax
        plan = margins.read(margin_loss, self.gradient) if self._fused else None
        if plan is not None and plan.sub_centers != self.sub_centers:
            raise ValueError(f"PartialFC: margin_loss has {plan.sub_centers} sub-centers per class, "
                             f"the weight {self.sub_centers}")
        self._agree(local_embeddings, local_labels)
        self.last_batch_size = local_embeddings.shape[0]
        embeddings = _AllGather.apply(local_embeddings, self.group)
        labels = local_labels.reshape(-1).to(self.weight.device, torch.int64)
        gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(gathered, labels, group=self.group)
        labels = torch.cat(gathered) - self.class_start
        shard_labels = torch.where((labels >= 0) & (labels < self.num_local), labels, -1)
        rows, labels = (None, shard_labels) if self.sample_rate >= 1 else self._sample(shard_labels)
        if plan is None:
            return self._dense_loss(margin_loss, embeddings, weight, rows, labels)
        options, updates, penalty = {}, {}, None
        if plan.head is not None:
            running = {name: getattr(self, name) for name in plan.head.running}
            options, updates = plan.head.batch_options(
                embeddings, lambda: self._target_cosines(embeddings, weight, shard_labels),
                running, self.training)
            penalty = options.pop("penalty", None)
            if plan.head.random_margins:  # every rank uses rank 0's draw
                for value in options.values():
                    dist.broadcast(value, dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        with torch.autocast(self.weight.device.type, dtype=torch.float16, enabled=self.fp16):
            row_max, log_sum, target, _ = margin_softmax_rows(
                embeddings, weight, labels, kind=plan.kind, scale=plan.scale, m1=plan.m1,
                m2=plan.m2, m3=plan.m3, sphere_lambda=0.0, gradient=plan.gradient,
                normalize_embeddings=True, normalize_weight=True, chunk_size=None,
                labels_in_range=False, rows=rows, sub_centers=plan.sub_centers,
                interclass_filtering_threshold=plan.interclass_filtering_threshold, **options)
        loss = _ShardedSoftmax.apply(row_max, log_sum, target, self.group)
        if penalty is not None:  # the same on every rank: its gradient is counted on rank 0 only
            loss = loss + (penalty if self.rank == 0 else penalty.detach()).mean()
        if updates:
            assign_after([getattr(self, name) for name in updates],
                         [value.detach() for value in updates.values()], loss.detach())
        return loss

    @torch.no_grad()
    def _target_cosines(self, embeddings, weight, labels):
        """Every row's cos(x_i, w_{y_i}) on every rank: the shard holding y_i computes it,
        one all-reduce of [global_batch] numbers shares it."""
        here = labels >= 0
        cosines = torch.zeros(len(labels), dtype=accumulate_dtype(embeddings.dtype), device=embeddings.device)
        cosines[here] = target_cosines(embeddings[here], weight, labels[here])
        dist.all_reduce(cosines, group=self.group)
        return cosines

    def _dense_loss(self, margin_loss, embeddings, weight, rows, labels):
        """insightface's forward for a margin_loss that is not fused: the clamped cosine
        logits [global_batch, sampled classes], the callable, the distributed cross entropy."""
        if not self._warned:
            warnings.warn(f"PartialFC: margin_loss {type(margin_loss).__name__} is not fused: it runs "
                          "on dense [global_batch, classes] logits, as in insightface")
            self._warned = True
        sampled = weight if rows is None else weight[rows]
        with torch.autocast(self.weight.device.type, dtype=torch.float16, enabled=self.fp16):
            logits = F.linear(F.normalize(embeddings), F.normalize(sampled))
        logits = logits.float().clamp(-1, 1) if self.fp16 else logits.clamp(-1, 1)
        labels = labels.view(-1, 1)
        return self.dist_cross_entropy(margin_loss(logits, labels), labels)

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, margin_loss={type(self.margin_softmax).__name__}")


# The local embeddings' dtypes, numbered for the collective agreement.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _save_class_range(module, state_dict, prefix, local_metadata):
    """Records the shard's class range in the state dict's metadata (not a key: the keys are
    insightface's, so checkpoints load both ways with strict loading)."""
    local_metadata["classes"] = (module.class_start, module.num_local, module.num_classes)


def shard_range(num_classes, world_size, rank):
    """(num_local, class_start) of a rank: as insightface, the first num_classes % world
    ranks hold one class more."""
    base, extra = divmod(num_classes, world_size)
    return base + int(rank < extra), base * rank + min(rank, extra)


def gather_weight(head):
    """The full [num_classes * K, D] weight on rank 0 (None on the others), for a checkpoint
    that any world size can resume with load_full_weight."""
    k = head.sub_centers
    largest = shard_range(head.num_classes, head.world_size, 0)[0] * k
    padded = torch.zeros(largest, head.embedding_size, dtype=head.weight.dtype, device=head.weight.device)
    padded[:len(head.weight)] = head.weight.detach()
    parts = [torch.empty_like(padded) for _ in range(head.world_size)]
    dist.all_gather(parts, padded, group=head.group)
    if head.rank != 0:
        return None
    sizes = [shard_range(head.num_classes, head.world_size, r)[0] * k for r in range(head.world_size)]
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def load_full_weight(head, weight):
    """Copies this rank's classes out of a full [num_classes * K, D] weight (from
    gather_weight, saved at any world size) into head.weight."""
    k = head.sub_centers
    if not isinstance(weight, torch.Tensor) or weight.shape != (head.num_classes * k, head.embedding_size):
        raise ValueError(f"load_full_weight: weight must have shape [{head.num_classes * k}, "
                         f"{head.embedding_size}], got {tuple(getattr(weight, 'shape', ()))}")
    head.weight.copy_(weight[head.class_start * k:(head.class_start + head.num_local) * k])
