"""Loss modules to drop into training code, one file per family."""

from facekernels.losses.adaptive_heads import (
    AdaFaceLoss,
    CurricularFaceLoss,
    ElasticFaceLoss,
    MagFaceLoss,
    SubCenterArcFaceLoss,
)
from facekernels.losses.center_ring import CenterLoss, RingLoss, ring_loss
from facekernels.losses.cross_batch_memory import CrossBatchMemory
from facekernels.losses.margin_heads import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    JointIdentificationVerificationLoss,
    L2SoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
)
from facekernels.losses.metric import ContrastiveLoss, TripletMarginLoss

__all__ = [
    "AdaFaceLoss",
    "ArcFaceLoss",
    "CenterLoss",
    "CombinedMarginLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CrossBatchMemory",
    "CurricularFaceLoss",
    "ElasticFaceLoss",
    "JointIdentificationVerificationLoss",
    "L2SoftmaxLoss",
    "MagFaceLoss",
    "RingLoss",
    "SoftmaxLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "TripletMarginLoss",
    "ring_loss",
]
