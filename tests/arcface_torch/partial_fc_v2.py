"""insightface's PartialFC_V2 module: sampling with torch's global generator, dense
global_batch x sampled logits, the margin callable, the distributed cross entropy (the
target probability clamped at 1e-30)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facekernels.reference.partial_fc import DistributedCrossEntropy, GatherRows


class PartialFC_V2(torch.nn.Module):  # noqa: N801 (insightface's name)
    _version = 2

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super().__init__()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.embedding_size, self.sample_rate, self.fp16 = embedding_size, sample_rate, fp16
        base, extra = divmod(num_classes, self.world_size)
        self.num_local = base + int(self.rank < extra)
        self.class_start = base * self.rank + min(self.rank, extra)
        self.num_sample = int(sample_rate * self.num_local)
        self.last_batch_size = 0
        self.is_updated = self.init_weight_update = True
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.margin_softmax = margin_loss

    def sample(self, labels, index_positive):
        with torch.no_grad():
            positive = torch.unique(labels[index_positive], sorted=True)
            if self.num_sample - positive.size(0) >= 0:
                priority = torch.rand(size=[self.num_local])
                priority[positive] = 2.0
                index = torch.topk(priority, k=self.num_sample)[1].sort()[0]
            else:
                index = positive
            self.weight_index = index
            labels[index_positive] = torch.searchsorted(index, labels[index_positive])
        return self.weight[self.weight_index]

    def forward(self, local_embeddings, local_labels):
        local_labels.squeeze_()
        local_labels = local_labels.long()
        if self.last_batch_size == 0:
            self.last_batch_size = local_embeddings.size(0)
        assert self.last_batch_size == local_embeddings.size(0)
        embeddings = GatherRows.apply(local_embeddings, None)
        parts = [torch.empty_like(local_labels) for _ in range(self.world_size)]
        dist.all_gather(parts, local_labels)
        labels = torch.cat(parts).view(-1, 1)
        index_positive = (self.class_start <= labels) & (labels < self.class_start + self.num_local)
        labels[~index_positive] = -1
        labels[index_positive] -= self.class_start
        weight = self.sample(labels, index_positive) if self.sample_rate < 1 else self.weight
        logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
        logits = self.margin_softmax(logits, labels)
        return DistributedCrossEntropy.apply(logits, labels.view(-1), None)
