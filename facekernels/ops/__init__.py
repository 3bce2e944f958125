"""Python wrappers of the compiled ops: checks, fake kernels and autograd."""

from facekernels.ops.center_loss import center_loss
from facekernels.ops.margin_softmax import margin_softmax_loss, sphereface_loss

__all__ = ["center_loss", "margin_softmax_loss", "sphereface_loss"]
