"""CrossBatchMemory (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning") with
pytorch-metric-learning's contract: a queue of the last memory_size embeddings (detached)
and labels serves as the reference set of a metric loss, so each batch meets many more
negatives than it holds."""

import torch
from torch import nn

from facekernels.losses.metric import ContrastiveLoss, TripletMarginLoss
from facekernels.ops.checks import check_embeddings, check_positive_int
from facekernels.ops.triplet import metric_labels, to_pairs, to_triplets


class CrossBatchMemory(nn.Module):
    """pytorch-metric-learning's CrossBatchMemory: ``loss = memory(embeddings, labels,
    indices_tuple=None, enqueue_mask=None)``.

    Each call first enqueues this batch (or, with enqueue_mask, only its masked rows, whose
    loss is then not computed: the other rows are the anchors) into the ring buffers
    ``embedding_memory`` [memory_size, embedding_size] and ``label_memory``, then returns
    ``loss(anchors, labels, pairs, memory, memory_labels)`` over the filled part of the
    memory. The pairs: the miner's (``miner(anchors, labels, memory, memory_labels)``) or
    every pair, without an anchor's positive pair with its own copy in the memory, plus a
    given indices_tuple (converted to the miner's form, as PML does).

    Fused: with facekernels' TripletMarginLoss (triplets_per_anchor="all") or
    ContrastiveLoss, no miner and no indices_tuple, the loss runs through its ref_emb path
    against the memory in O(N x M) memory, where PML's TripletMarginLoss builds the
    N x M x M triplet masks. Any other loss with PML's call contract (PML's own included)
    gets PML's algorithm.

    Args:
        loss: a metric loss, called as loss(embeddings, labels, indices_tuple, ref_emb,
            ref_labels).
        embedding_size: the embeddings' width.
        memory_size: how many past embeddings are kept (1024).
        miner: optional, called as miner(embeddings, labels, ref_emb, ref_labels).
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None):
        super().__init__()
        owner = "CrossBatchMemory"
        if not callable(loss):
            raise TypeError(f"{owner}: loss must be a metric loss, got {type(loss).__name__}")
        if miner is not None and not callable(miner):
            raise TypeError(f"{owner}: miner must be None or a miner, got {type(miner).__name__}")
        self.loss, self.miner = loss, miner
        self.embedding_size = check_positive_int(owner, "embedding_size", embedding_size)
        self.memory_size = check_positive_int(owner, "memory_size", memory_size)
        self.reset_queue()

    def reset_queue(self):
        """Empties the memory."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.int64))
        self.has_been_filled = False
        self.queue_idx = 0

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        owner = "CrossBatchMemory"
        check_embeddings(owner, embeddings, allow_empty=True)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"{owner}: embeddings must have {self.embedding_size} columns "
                             f"(embedding_size), got shape {tuple(embeddings.shape)}")
        labels = metric_labels(owner, "labels", labels, embeddings)
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError(f"{owner}: indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None:
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool \
                    or enqueue_mask.shape != labels.shape:
                raise ValueError(f"{owner}: enqueue_mask must be a bool tensor of shape "
                                 f"({len(labels)},), got {getattr(enqueue_mask, 'dtype', type(enqueue_mask).__name__)} "
                                 f"{tuple(getattr(enqueue_mask, 'shape', ()))}")
            enqueue_mask = enqueue_mask.to(embeddings.device)
            queued, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            if len(embeddings) > self.memory_size:
                raise ValueError(f"{owner}: a batch of {len(embeddings)} rows does not fit a memory "
                                 f"of {self.memory_size} (memory_size)")
            queued, queued_labels = embeddings, labels
        # The memory follows the embeddings' device and dtype, as PML's.
        self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
        self.label_memory = self.label_memory.to(embeddings.device)
        self.add_to_memory(queued, queued_labels, len(queued))
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        memory, memory_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        remove_self = enqueue_mask is None  # else the anchors are not in the memory
        if not self._fused(indices_tuple):
            pairs = self.create_indices_tuple(embeddings, labels, memory, memory_labels,
                                              indices_tuple, remove_self)
            return self.loss(embeddings, labels, pairs, memory, memory_labels)
        if not remove_self:
            return self.loss(embeddings, labels, None, memory, memory_labels)
        # The batch's own slots first, so that reference row i is anchor i's copy.
        rest = torch.ones(filled, dtype=torch.bool, device=memory.device)
        rest[self.curr_batch_idx] = False
        order = torch.cat([self.curr_batch_idx, rest.nonzero().squeeze(1)])
        return self.loss(embeddings, labels, None, memory[order], memory_labels[order],
                         ref_starts_with_batch=True)

    def add_to_memory(self, embeddings, labels, batch_size):
        """Writes the rows (detached) at the queue's head, their slots in curr_batch_idx."""
        self.curr_batch_idx = torch.arange(self.queue_idx, self.queue_idx + batch_size,
                                           device=self.embedding_memory.device) % self.memory_size
        with torch.no_grad():
            self.embedding_memory[self.curr_batch_idx] = embeddings.detach()
            self.label_memory[self.curr_batch_idx] = labels.detach()
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + batch_size) % self.memory_size
        self.has_been_filled = self.has_been_filled or (batch_size > 0 and self.queue_idx <= previous)

    def _fused(self, indices_tuple):
        loss = self.loss
        if self.miner is not None or indices_tuple is not None:
            return False
        if isinstance(loss, TripletMarginLoss):
            return loss.triplets_per_anchor == "all" and loss._reduction != "none" and not loss._as_loss_dict
        return isinstance(loss, ContrastiveLoss) and loss._reduction != "none" and not loss._as_loss_dict

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple,
                             do_remove_self_comparisons):
        """PML's indices: the miner's or every pair, less (with do_remove_self_comparisons)
        each anchor's positive pair with its own slot, plus input_indices_tuple in the
        same form."""
        if self.miner is not None:
            pairs = self.miner(embeddings, labels, E_mem, L_mem)
        else:
            same = labels[:, None] == L_mem[None, :]
            pairs = (*torch.where(same), *torch.where(~same))
        if do_remove_self_comparisons:
            a, p = pairs[:2]
            keep = p != self.curr_batch_idx[a]
            pairs = (a[keep], p[keep], pairs[2][keep]) if len(pairs) == 3 else (a[keep], p[keep], *pairs[2:])
        if input_indices_tuple is None:
            return pairs
        convert = to_triplets if len(pairs) == 3 else to_pairs
        given = convert(tuple(t.to(pairs[0].device) for t in input_indices_tuple))
        return tuple(torch.cat([mine, theirs]) for mine, theirs in zip(pairs, given))

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"


__all__ = ["CrossBatchMemory"]
