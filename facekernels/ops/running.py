"""Running state (CurricularFace's t, AdaFace's norm statistics) written only once the op
that validates the batch has run: under torch.compile a graph may otherwise write a
buffer before the op raises on a bad label, and a rejected call would move the state.

In eager mode the calls run in program order, so the buffers are written directly: the
custom op's first call imports torch._dynamo (about 1 s), and torch._dynamo imported while
a gloo process group is up keeps the group's threads alive past destroy_process_group
(PyTorch's doing), where at exit one of them may free a finished collective's tensors as
Python finalizes: SIGABRT, "terminate called without an active exception"."""

import torch


def _assign(buffers, values):
    with torch.no_grad():
        for buffer, value in zip(buffers, values, strict=True):
            buffer.copy_(value)


@torch.library.custom_op("facekernels::assign_after", mutates_args=("buffers",))
def _assign_after_op(buffers: list[torch.Tensor], values: list[torch.Tensor],
                     after: torch.Tensor) -> None:
    _assign(buffers, values)


@_assign_after_op.register_fake
def _(buffers, values, after):
    return None


def assign_after(buffers, values, after):
    """buffers[i] <- values[i], ordered after `after` (an output of the validating op): in
    a compiled graph by a data dependency that no compiler may reorder or drop. One call
    for all of a head's buffers: each call of a Python custom op costs about 20 us."""
    if torch.compiler.is_compiling():
        _assign_after_op(buffers, values, after)
    else:
        _assign(buffers, values)
