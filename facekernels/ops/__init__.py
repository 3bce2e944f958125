"""Python wrappers of the compiled ops: checks, fake kernels and autograd."""

from facekernels.ops.adaface_margins import adaface_margins
from facekernels.ops.center_loss import center_loss
from facekernels.ops.contrastive import contrastive_loss, double_margin_contrastive_loss
from facekernels.ops.margin_softmax import margin_softmax_loss, sphereface_loss
from facekernels.ops.triplet import mine_triplets, pairwise_distance, triplet_margin_loss

__all__ = [
    "adaface_margins",
    "center_loss",
    "contrastive_loss",
    "double_margin_contrastive_loss",
    "margin_softmax_loss",
    "mine_triplets",
    "pairwise_distance",
    "sphereface_loss",
    "triplet_margin_loss",
]
