"""Past one process: class-sharded margin softmax (PartialFC) over torch.distributed."""

from facekernels.distributed.partial_fc import PartialFC, gather_weight, load_full_weight

__all__ = ["PartialFC", "gather_weight", "load_full_weight"]
