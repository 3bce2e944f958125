"""Past one process, over torch.distributed: the class-sharded margin softmax (PartialFC)
and pytorch-metric-learning's cross-rank wrappers for the metric losses and miners."""

from facekernels.distributed.metric import DistributedLossWrapper, DistributedMinerWrapper
from facekernels.distributed.partial_fc import PartialFC, gather_weight, load_full_weight

__all__ = ["DistributedLossWrapper", "DistributedMinerWrapper", "PartialFC", "gather_weight",
           "load_full_weight"]
