"""Loss modules to drop into training code, one file per family."""

from facekernels.losses.center_ring import CenterLoss, RingLoss, ring_loss
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
    "ArcFaceLoss",
    "CenterLoss",
    "CombinedMarginLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "JointIdentificationVerificationLoss",
    "L2SoftmaxLoss",
    "RingLoss",
    "SoftmaxLoss",
    "SphereFaceLoss",
    "TripletMarginLoss",
    "ring_loss",
]
