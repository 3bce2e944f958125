"""center_loss: Wen et al. 2016's center loss as one fused pass (facekernels::center_loss_*)."""

import torch

from facekernels.ops.checks import check_embeddings, check_labels, check_number, check_one_device, check_rows

_OP = "center_loss"


def _check(embeddings, labels, centers, alpha):
    """Shape/dtype checks that need no data, shared by eager calls and the fake kernel.
    The C++ kernels repeat them and also check the label values."""
    check_embeddings(_OP, embeddings)
    check_rows(_OP, "centers", centers, embeddings)
    check_labels(_OP, labels, embeddings)
    if centers.dtype != embeddings.dtype:
        raise TypeError(
            f"{_OP}: centers and embeddings must share a dtype, got {centers.dtype} and "
            f"{embeddings.dtype} (cast the embeddings, e.g. embeddings.float())"
        )
    check_number(_OP, "alpha", alpha, 0.0, 1.0)


@torch.library.register_fake("facekernels::center_loss_forward")
def _(embeddings, labels, centers, alpha, compute_update):
    check_one_device(_OP, embeddings=embeddings, labels=labels, centers=centers)
    _check(embeddings, labels, centers, alpha)
    updated_rows = embeddings.shape[0] if compute_update else 0
    return (
        embeddings.new_empty(()),
        torch.empty_like(embeddings, memory_format=torch.contiguous_format),
        embeddings.new_empty((updated_rows, embeddings.shape[1])),
    )


@torch.library.register_fake("facekernels::center_loss_backward")
def _(grad_loss, diff, labels, num_classes, centers_grad):
    check_one_device(_OP, diff=diff, grad_loss=grad_loss, labels=labels)
    return (
        torch.empty_like(diff, memory_format=torch.contiguous_format),
        diff.new_empty((num_classes if centers_grad else 0, diff.shape[1])),
    )


@torch.library.register_fake("facekernels::center_loss_update_")
def _(centers, labels, updated_centers):
    check_one_device("center_loss_update_", centers=centers, labels=labels,
                     updated_centers=updated_centers)


def _setup_context(ctx, inputs, output):
    _, labels, centers, _, _ = inputs
    _, diff, updated = output
    ctx.save_for_backward(diff, labels)
    ctx.num_classes = centers.shape[0]
    ctx.mark_non_differentiable(diff, updated)
    ctx.set_materialize_grads(False)  # no [N, D] zeros for the outputs nobody differentiates


def _backward(ctx, grad_loss, grad_diff, grad_updated):
    if grad_loss is None:  # only the loss is differentiable (grads are not materialized)
        return None, None, None, None, None
    diff, labels = ctx.saved_tensors
    centers_grad = ctx.needs_input_grad[2]
    grad_embeddings, grad_centers = torch.ops.facekernels.center_loss_backward(
        grad_loss, diff, labels, ctx.num_classes, centers_grad
    )
    return (
        grad_embeddings if ctx.needs_input_grad[0] else None,
        None,
        grad_centers if centers_grad else None,
        None,
        None,
    )


torch.library.register_autograd(
    "facekernels::center_loss_forward", _backward, setup_context=_setup_context
)


class _CenterLoss(torch.autograd.Function):
    """The same autograd for our own calls: grad mode is off inside a Function, so the op
    skips the wrapper that register_autograd builds, which refills the schema's defaults on
    each grad-mode call (see ops.margin_softmax._MarginSoftmax; 30 us of a 0.3 ms step)."""

    @staticmethod
    def forward(ctx, *inputs):  # not split: a separate setup_context costs an inspect.signature
        output = torch.ops.facekernels.center_loss_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def center_loss(embeddings, labels, centers, *, alpha=0.5, update_centers=False):
    """Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep
    Face Recognition"): ``mean_i 1/2 |x_i - c_{y_i}|^2``, so ``dL/dx_i = (x_i - c_{y_i}) / N``.

    One fused pass per device computes the loss, the gradient direction for ``embeddings``
    and, with ``update_centers=True``, Wen et al.'s center update

        delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),   c_j <- c_j - alpha * delta_j

    applied in place to ``centers`` after the loss is formed with the current centers. Only
    the rows of classes present in the batch are written, and nothing is written unless
    every check passed. No N x C matrix and no C x D temporary is built.

    Args:
        embeddings: [N, D] float tensor (fp32, fp64, bf16, fp16).
        labels: [N] int64 class indices in [0, C).
        centers: [C, D] tensor of the embeddings' dtype and device. It receives the exact
            gradient when it requires grad; it must not when ``update_centers`` is set.
        alpha: the center learning rate of the update rule, in [0, 1].
        update_centers: apply the update rule in place.

    Returns:
        The scalar loss, in the embeddings' dtype (accumulated in fp32 or better).
    """
    _check(embeddings, labels, centers, alpha)
    if update_centers and any(stride == 0 and size > 1 for stride, size in zip(centers.stride(), centers.shape)):
        raise ValueError(
            f"{_OP}: centers is expanded (stride 0), so updating one class's center would move "
            "them all; give every class its own row (centers.contiguous())"
        )
    if update_centers and centers.requires_grad:
        raise ValueError(
            f"{_OP}: update_centers=True moves centers by Wen et al.'s rule, so centers must "
            "not require grad (use a buffer, or update_centers=False to learn them by gradient)"
        )
    loss, _, updated = _CenterLoss.apply(embeddings, labels, centers, float(alpha), update_centers)
    if update_centers:
        with torch.no_grad():
            torch.ops.facekernels.center_loss_update_(centers, labels, updated)
    return loss
