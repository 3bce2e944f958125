"""margin_softmax: margin-softmax cross entropy that never builds the N x C logits
(facekernels::margin_softmax_forward / _backward)."""

import torch

from facekernels.ops.checks import (
    check_choice,
    check_embeddings,
    check_labels,
    check_number,
    check_rows,
)

_OP = "margin_softmax_loss"
_COMBINED, _SPHERE = 0, 1
_REDUCTIONS = ("mean", "sum", "none")
_GRADIENTS = ("exact", "detached")
# Bytes of one [N, chunk] block of fp32 logits: about the L2 cache on a Hopper GPU, a
# slice of it on a CPU.
_CHUNK_BYTES = {"cuda": 32 * 2**20, "cpu": 4 * 2**20}


def default_chunk_size(num_rows, device):
    """Classes per chunk so that N x chunk fp32 values fit the device's cache budget."""
    budget = _CHUNK_BYTES.get(torch.device(device).type, _CHUNK_BYTES["cpu"])
    return max(128, budget // (4 * max(num_rows, 1)) // 128 * 128)


def _check_tensors(embeddings, weight, labels):
    """Checks that need no data, shared by eager calls and the fake kernel."""
    check_embeddings(_OP, embeddings)
    check_rows(_OP, "weight", weight, embeddings)
    check_labels(_OP, labels, embeddings)


def check_chunk_size(owner, chunk_size):
    """None, or a positive int that fits the op's int64."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or not 1 <= chunk_size < 2**63):
        raise ValueError(f"{owner}: chunk_size must be a positive int below 2^63, got {chunk_size!r}")


def check_modes(reduction, gradient):
    check_choice(_OP, "reduction", reduction, _REDUCTIONS)
    check_choice(_OP, "gradient", gradient, _GRADIENTS)


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("facekernels::margin_softmax_forward")
def _(embeddings, weight, labels, *options):
    _check_tensors(embeddings, weight, labels)
    n = embeddings.shape[0]
    acc = _accumulate_dtype(embeddings.dtype)
    rows = [embeddings.new_empty((n,), dtype=acc) for _ in range(4)]
    return (*rows, embeddings.new_empty((n,), dtype=torch.int64))


@torch.library.register_fake("facekernels::margin_softmax_backward")
def _(grad_log_sum, grad_target, embeddings, weight, labels, row_max, log_sum, scale, m1, m2,
      m3, sphere_lambda, margin_kind, exact_gradient, normalize_embeddings, normalize_weight,
      chunk_size, embeddings_grad=True, weight_grad=True, rows=None,
      interclass_filtering_threshold=0.0):
    def gradient(t, wanted):
        shape = t.shape if wanted else (0, t.shape[1])
        return t.new_empty(shape)

    return gradient(embeddings, embeddings_grad), gradient(weight, weight_grad)


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels, *options, _labels_in_range, rows, threshold = inputs
    row_max, log_sum, _, best_cosine, predicted = output
    ctx.save_for_backward(embeddings, weight, labels, row_max, log_sum, rows)
    ctx.options, ctx.threshold = options, threshold  # the backward's options
    # row_max only shifts log_sum; the loss log_sum + row_max - target does not depend on it.
    ctx.mark_non_differentiable(row_max, best_cosine, predicted)


def _backward(ctx, grad_max, grad_log_sum, grad_target, grad_best, grad_predicted):
    embeddings, weight, labels, row_max, log_sum, rows = ctx.saved_tensors
    if grad_log_sum is None:
        grad_log_sum = torch.zeros_like(log_sum)
    if grad_target is None:
        grad_target = torch.zeros_like(log_sum)
    embeddings_grad, weight_grad = ctx.needs_input_grad[:2]
    grad_embeddings, grad_weight = torch.ops.facekernels.margin_softmax_backward(
        grad_log_sum, grad_target, embeddings, weight, labels, row_max, log_sum, *ctx.options,
        embeddings_grad=embeddings_grad, weight_grad=weight_grad, rows=rows,
        interclass_filtering_threshold=ctx.threshold,
    )
    return (
        grad_embeddings if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        *([None] * (4 + len(ctx.options))),
    )


torch.library.register_autograd(
    "facekernels::margin_softmax_forward", _backward, setup_context=_setup_context
)


def margin_softmax_rows(embeddings, weight, labels, *, kind, scale, m1, m2, m3, sphere_lambda,
                        gradient, normalize_embeddings, normalize_weight, chunk_size,
                        labels_in_range=True, rows=None, interclass_filtering_threshold=0.0):
    """Per row (row_max, log_sum, target_logit, predicted) of the fused op: the softmax's
    log-sum-exp is row_max + log_sum, and the loss log_sum + (row_max - target_logit). A
    class shard (distributed.PartialFC) passes labels_in_range=False (labels outside
    [0, C) are other shards' classes: target 0) and, when it samples classes, their sorted
    indices as rows (labels then index rows), and may filter similar non-target classes
    (interclass_filtering_threshold > 0: a non-target cosine above it gives logit 0)."""
    _check_tensors(embeddings, weight, labels)
    check_choice(_OP, "gradient", gradient, _GRADIENTS)
    if chunk_size is None:
        chunk_size = default_chunk_size(embeddings.shape[0], embeddings.device)
    else:
        check_chunk_size(_OP, chunk_size)
    device_type = embeddings.device.type
    if (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and embeddings.dtype == torch.float32):
        # The GEMMs run in the autocast dtype; the weight's chunks are cast inside the op,
        # so an fp32 master weight is never copied whole, and its gradient stays fp32.
        embeddings = embeddings.to(torch.get_autocast_dtype(device_type))
    row_max, log_sum, target_logit, _, predicted = torch.ops.facekernels.margin_softmax_forward(
        embeddings,
        weight,
        labels,
        check_number(_OP, "scale", scale, 0.0),
        check_number(_OP, "m1", m1, 0.0),
        check_number(_OP, "m2", m2),
        check_number(_OP, "m3", m3),
        check_number(_OP, "sphere_lambda", sphere_lambda, 0.0),
        kind,
        gradient == "exact",
        bool(normalize_embeddings),
        bool(normalize_weight),
        chunk_size,
        labels_in_range,
        rows,
        check_number(_OP, "interclass_filtering_threshold", interclass_filtering_threshold),
    )
    return row_max, log_sum, target_logit, predicted


def fused_margin_loss(embeddings, weight, labels, *, reduction, return_predictions, **options):
    """The common path of every margin-softmax flavour; see margin_softmax_loss."""
    check_modes(reduction, options["gradient"])
    row_max, log_sum, target_logit, predicted = margin_softmax_rows(embeddings, weight, labels, **options)
    # The target is usually the largest logit: subtracting it from the max first keeps a
    # small loss accurate (lse - target would cancel two large numbers).
    loss = log_sum + (row_max - target_logit)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return (loss, predicted) if return_predictions else loss


def margin_softmax_loss(
    embeddings,
    weight,
    labels,
    *,
    scale=64.0,
    m1=1.0,
    m2=0.0,
    m3=0.0,
    reduction="mean",
    gradient="exact",
    normalize_embeddings=True,
    chunk_size=None,
    return_predictions=False,
):
    """Combined-margin softmax cross entropy (insightface's form; ArcFace is (1, m, 0),
    CosFace (1, 0, m)) without the N x C logits:

        cos_ij = <x_i/|x_i|, w_j/|w_j|>,  target logit s (cos(m1 theta + m2) - m3),
        every other logit s cos_ij, loss_i = logsumexp_j(logit_ij) - target logit.

    When m1 == 1 and m3 == 0, a target with theta + m2 > pi continues as
    cos theta - m2 sin m2 (ArcFace's monotone fallback).

    Args:
        embeddings: [N, D] fp32 / bf16 / fp16 / fp64. The GEMMs run in this dtype (the
            autocast dtype under torch.autocast); sums accumulate in fp32 (fp64 for fp64).
        weight: [C, D], one row per identity (as nn.Linear and insightface), any float dtype.
        labels: [N] int64 in [0, C).
        scale: s. m1, m2, m3: the margins (m2 in radians).
        reduction: "mean" | "sum" | "none" (the loss is fp32, or fp64 for fp64 inputs).
        gradient: "exact", the true derivative; "detached", the margin shifts the value
            only (insightface's and OpenSphere's behaviour).
        normalize_embeddings: False uses s |x_i| as row i's scale (SphereFace / NormFace).
        chunk_size: classes per chunk; default: N x chunk fp32 values in about 32 MiB on a
            GPU (its L2 cache), 4 MiB on a CPU.
        return_predictions: also return each row's argmax of the margin-free cosine
            (int64 [N]) for the training accuracy, at no extra pass.

    Extra memory: the two gradients, N x chunk logits and chunk x D weight rows; never N x C.
    """
    return fused_margin_loss(
        embeddings, weight, labels, kind=_COMBINED, scale=scale, m1=m1, m2=m2, m3=m3,
        sphere_lambda=0.0, gradient=gradient, normalize_embeddings=normalize_embeddings,
        normalize_weight=True, reduction=reduction, chunk_size=chunk_size,
        return_predictions=return_predictions,
    )


def sphereface_loss(
    embeddings,
    weight,
    labels,
    *,
    margin=4,
    lambda_=5.0,
    scale=1.0,
    reduction="mean",
    gradient="exact",
    normalize_embeddings=False,
    chunk_size=None,
    return_predictions=False,
):
    """SphereFace / A-Softmax (Liu et al. 2017) on the same fused op: the target logit is
    r_i (psi(theta) + lambda cos theta) / (1 + lambda) with psi(theta) = (-1)^k cos(m theta)
    - 2k, k = floor(m theta / pi), and r_i = scale |x_i| (scale when normalize_embeddings).
    Other arguments as margin_softmax_loss.
    """
    return fused_margin_loss(
        embeddings, weight, labels, kind=_SPHERE, scale=scale, m1=margin, m2=0.0, m3=0.0,
        sphere_lambda=lambda_, gradient=gradient, normalize_embeddings=normalize_embeddings,
        normalize_weight=True, reduction=reduction, chunk_size=chunk_size,
        return_predictions=return_predictions,
    )
