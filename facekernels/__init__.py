"""facekernels: fused C++/CUDA kernels for face-recognition losses."""

from facekernels._extension import build_info
from facekernels.version import __version__
from facekernels.ops import (
    center_loss,
    contrastive_loss,
    margin_softmax_loss,
    mine_triplets,
    pairwise_distance,
    sphereface_loss,
    triplet_margin_loss,
)
from facekernels.losses import (
    AdaFaceLoss,
    ArcFaceLoss,
    CenterLoss,
    CombinedMarginLoss,
    ContrastiveLoss,
    CrossBatchMemory,
    CosFaceLoss,
    CurricularFaceLoss,
    ElasticFaceLoss,
    JointIdentificationVerificationLoss,
    L2SoftmaxLoss,
    MagFaceLoss,
    RingLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    TripletMarginLoss,
)
from facekernels.miners import TripletMiner
from facekernels import reference

__all__ = [
    "__version__",
    "build_info",
    "center_loss",
    "contrastive_loss",
    "margin_softmax_loss",
    "mine_triplets",
    "pairwise_distance",
    "sphereface_loss",
    "triplet_margin_loss",
    "AdaFaceLoss",
    "ArcFaceLoss",
    "CenterLoss",
    "CombinedMarginLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "CosFaceLoss",
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
    "TripletMiner",
    "reference",
]
