"""facekernels' fused metric losses and miner as pytorch-metric-learning classes: they
extend PML's BaseMetricLossFunction / BaseMiner, so PML's DistributedLossWrapper,
DistributedMinerWrapper, CrossBatchMemory and MultipleLosses accept them, and call our
kernels. Needs pytorch-metric-learning (importing this module without it is an
ImportError naming it).

    from facekernels.integrations.pml import TripletMarginLoss
    loss = pytorch_metric_learning.losses.CrossBatchMemory(TripletMarginLoss(margin=0.2), 128)

Each takes its facekernels twin's arguments (PML's distance and reducer objects included)
and keeps the twin as ``.fused``, which holds the configuration; the ``distance`` and
``reducer`` attributes that PML's base classes create are PML's defaults and unused.
"""

try:
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.miners import BaseMiner
except ImportError as error:  # pragma: no cover - exercised without PML installed
    raise ImportError("facekernels.integrations.pml needs pytorch-metric-learning "
                      "(pip install pytorch-metric-learning)") from error

import facekernels


class _FusedLoss(BaseMetricLossFunction):
    """A PML loss whose forward is its facekernels twin's (the same call contract)."""

    twin = None

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.fused = self.twin(*args, **kwargs)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if ref_emb is embeddings and ref_labels is labels:  # PML's way of saying "the batch"
            ref_emb = ref_labels = None
        return self.fused(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, *args):  # PML's abstract hook; forward never calls it
        raise NotImplementedError(f"{type(self).__name__} computes its loss in forward")


class TripletMarginLoss(_FusedLoss):
    """facekernels.TripletMarginLoss as a PML loss."""

    twin = facekernels.TripletMarginLoss


class ContrastiveLoss(_FusedLoss):
    """facekernels.ContrastiveLoss as a PML loss."""

    twin = facekernels.ContrastiveLoss


class TripletMiner(BaseMiner):
    """facekernels.TripletMiner as a PML miner (PML's TripletMarginMiner's contract)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.fused = facekernels.TripletMiner(*args, **kwargs)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if ref_emb is embeddings:  # BaseMiner passes the batch itself as its reference
            ref_emb = ref_labels = None
        return self.fused(embeddings, labels, ref_emb, ref_labels)


__all__ = ["ContrastiveLoss", "TripletMarginLoss", "TripletMiner"]
