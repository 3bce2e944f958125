"""facekernels: fused C++/CUDA kernels for face-recognition losses."""

from facekernels._extension import build_info
from facekernels.version import __version__
from facekernels.ops import center_loss, margin_softmax_loss, sphereface_loss
from facekernels.losses import (
    ArcFaceLoss,
    CenterLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    L2SoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
)
from facekernels import reference

__all__ = [
    "__version__",
    "build_info",
    "center_loss",
    "margin_softmax_loss",
    "sphereface_loss",
    "ArcFaceLoss",
    "CenterLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "L2SoftmaxLoss",
    "SoftmaxLoss",
    "SphereFaceLoss",
    "reference",
]
