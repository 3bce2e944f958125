"""Running state (CurricularFace's t, AdaFace's norm statistics) written only once the op
that validates the batch has run: under torch.compile a graph may otherwise write a
buffer before the op raises on a bad label, and a rejected call would move the state."""

import torch


@torch.library.custom_op("facekernels::assign_after", mutates_args=("buffer",))
def assign_after(buffer: torch.Tensor, value: torch.Tensor, after: torch.Tensor) -> None:
    """buffer <- value, ordered after `after` (an output of the validating op) by a data
    dependency that no compiler may reorder or drop."""
    with torch.no_grad():
        buffer.copy_(value)


@assign_after.register_fake
def _(buffer, value, after):
    return None
