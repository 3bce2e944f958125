"""Python wrappers of the compiled ops: checks, fake kernels and autograd."""

from facekernels.ops.center_loss import center_loss

__all__ = ["center_loss"]
