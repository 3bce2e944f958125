"""margin_softmax: margin-softmax cross entropy that never builds the N x C logits
(facekernels::margin_softmax_forward / _backward)."""

import struct

import torch

from facekernels.ops.checks import (
    check_choice,
    check_embeddings,
    check_labels,
    check_number,
    check_one_device,
    check_positive_int,
    check_rows,
)

_OP = "margin_softmax_loss"
COMBINED, SPHERE, ADAFACE, EASY = 0, 1, 2, 3  # margin_kind
_REDUCTIONS = ("mean", "sum", "none")
_GRADIENTS = ("exact", "detached")
# Bytes of one [N, chunk] block of fp32 logits: about the L2 cache on a Hopper GPU, a
# slice of it on a CPU.
_CHUNK_BYTES = {"cuda": 32 * 2**20, "cpu": 4 * 2**20}


# On a CPU, a loss about to be differentiated runs forward and backward in one op, a block of
# rows x every class at a time: three GEMMs where forward and backward over class chunks run
# four. A block has at least 128 rows (or all N): each block reads the whole weight three
# times, and thinner ones lost more than the fourth GEMM costs (sub-center ArcFace, K = 3,
# C = 20K, D = 512, in blocks of 64: 1.41-1.43x the floor before, 1.52-1.64x after). Its
# logits take 16 MiB; or up to D rows, no more numbers than the weight rows it sees (so the
# extra memory stays within the weight gradient's), within 256 MiB; or the N x chunk of a
# given chunk_size. The GEMM saved grows with D, the epilogue's cache misses on a larger
# block do not: at D = 512, C = 200K a 205 MB block ran 1.17x the floor against the two
# passes' 1.39x; at D = 128, C = 100K and 200K, 51 and 102 MB blocks ran even with them; at
# D = 512, C = 1M a 1 GB block lost (0.76x the floor's time against 0.66x).
_BLOCK_BYTES, _MAX_BLOCK_BYTES = 16 * 2**20, 256 * 2**20
_MIN_BLOCK_ROWS = 128


def default_chunk_size(num_rows, device):
    """Classes per chunk so that N x chunk fp32 values fit the device's cache budget."""
    budget = _CHUNK_BYTES.get(torch.device(device).type, _CHUNK_BYTES["cpu"])
    return max(128, budget // (4 * max(num_rows, 1)) // 128 * 128)


def check_tensors(embeddings, weight, labels, owner=_OP):
    """Checks that need no data, shared by eager calls, the fake kernel and the heads."""
    check_embeddings(owner, embeddings)
    check_rows(owner, "weight", weight, embeddings)
    check_labels(owner, labels, embeddings)


def check_chunk_size(owner, chunk_size):
    """None, or a positive int that fits the op's int64."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or not 1 <= chunk_size < 2**63):
        raise ValueError(f"{owner}: chunk_size must be a positive int below 2^63, got {chunk_size!r}")


def check_modes(reduction, gradient, owner=_OP):
    check_choice(owner, "reduction", reduction, _REDUCTIONS)
    check_choice(owner, "gradient", gradient, _GRADIENTS)


def accumulate_dtype(dtype):
    """The dtype the op sums in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_count(weight, rows, sub_centers):
    """The classes the op sees: the weight's, K rows each, or those of `rows`."""
    return weight.shape[0] // sub_centers if rows is None else rows.shape[0]


@torch.library.register_fake("facekernels::margin_softmax_forward")
def _(embeddings, weight, labels, scale, m1, m2, m3, sphere_lambda, margin_kind, exact_gradient,
      normalize_embeddings, normalize_weight, chunk_size, labels_in_range=True, rows=None,
      interclass_filtering_threshold=0.0, row_m2=None, row_m3=None, sub_centers=1,
      hard_threshold=None, hard_t=None):
    per_row = _fake_rows(embeddings, weight, labels, rows, row_m2, row_m3, hard_threshold, hard_t)
    classes = _class_count(weight, rows, sub_centers)
    last = classes - (classes - 1) // chunk_size * chunk_size if classes else 0
    return (*per_row, embeddings.new_empty((embeddings.shape[0], last * sub_centers)))


def _fake_rows(embeddings, weight, labels, rows, row_m2, row_m3, hard_threshold, hard_t):
    """The checks of a forward's fake kernel, and its five per-row outputs."""
    check_one_device(_OP, embeddings=embeddings, weight=weight, labels=labels, rows=rows, row_m2=row_m2,
                     row_m3=row_m3, hard_threshold=hard_threshold, hard_t=hard_t)
    check_tensors(embeddings, weight, labels)
    n = embeddings.shape[0]
    acc = accumulate_dtype(embeddings.dtype)
    return (*(embeddings.new_empty((n,), dtype=acc) for _ in range(4)),
            embeddings.new_empty((n,), dtype=torch.int64))


@torch.library.register_fake("facekernels::margin_softmax_forward_backward")
def _(embeddings, weight, labels, scale, m1, m2, m3, sphere_lambda, margin_kind, exact_gradient,
      normalize_embeddings, normalize_weight, block_rows, labels_in_range=True, rows=None,
      interclass_filtering_threshold=0.0, row_m2=None, row_m3=None, sub_centers=1,
      hard_threshold=None, hard_t=None, grad_scale=1.0, embeddings_grad=True, weight_grad=True,
      margins_grad=False):
    per_row = _fake_rows(embeddings, weight, labels, rows, row_m2, row_m3, hard_threshold, hard_t)

    def margin_gradient(t):
        n = embeddings.shape[0] if margins_grad and t is not None else 0
        return embeddings.new_empty((n,), dtype=accumulate_dtype(embeddings.dtype))

    return (*per_row,
            embeddings.new_empty(embeddings.shape if embeddings_grad else (0, embeddings.shape[1])),
            weight.new_empty(weight.shape if weight_grad else (0, weight.shape[1])),
            margin_gradient(row_m2), margin_gradient(row_m3))


@torch.library.register_fake("facekernels::margin_softmax_backward")
def _(grad_log_sum, grad_target, embeddings, weight, labels, row_max, log_sum, scale, m1, m2,
      m3, sphere_lambda, margin_kind, exact_gradient, normalize_embeddings, normalize_weight,
      chunk_size, embeddings_grad=True, weight_grad=True, rows=None,
      interclass_filtering_threshold=0.0, row_m2=None, row_m3=None, sub_centers=1,
      hard_threshold=None, hard_t=None, margins_grad=False, last_logits=None):
    check_one_device(_OP, embeddings=embeddings, grad_log_sum=grad_log_sum, grad_target=grad_target,
                     weight=weight, labels=labels, row_max=row_max, log_sum=log_sum, rows=rows,
                     row_m2=row_m2, row_m3=row_m3, hard_threshold=hard_threshold, hard_t=hard_t,
                     last_logits=last_logits)

    def gradient(t, wanted):
        shape = t.shape if wanted else (0, t.shape[1])
        return t.new_empty(shape)

    def margin_gradient(t):
        n = embeddings.shape[0] if margins_grad and t is not None else 0
        return row_max.new_empty((n,))

    return (gradient(embeddings, embeddings_grad), gradient(weight, weight_grad),
            margin_gradient(row_m2), margin_gradient(row_m3))


# The forward's arguments after labels that the backward takes again, by position
# (scale .. chunk_size), and those it takes by name after labels_in_range, with defaults:
# the dispatcher drops trailing arguments equal to their defaults from `inputs`.
_NUM_OPTIONS = 10
_EXTRAS = {"rows": None, "interclass_filtering_threshold": 0.0, "row_m2": None, "row_m3": None,
           "sub_centers": 1, "hard_threshold": None, "hard_t": None}
_M2_INDEX = 4 + _NUM_OPTIONS + list(_EXTRAS).index("row_m2")  # row_m3 follows


def _setup_context(ctx, inputs, output, keep_logits=True):
    embeddings, weight, labels = inputs[:3]
    ctx.options = inputs[3:3 + _NUM_OPTIONS]
    extras = {**_EXTRAS, **dict(zip(_EXTRAS, inputs[4 + _NUM_OPTIONS:]))}
    tensors = [extras.pop(name) for name in ("rows", "row_m2", "row_m3", "hard_threshold", "hard_t")]
    row_max, log_sum, _, best_cosine, predicted, last_logits = output
    # row_max only shifts log_sum; the loss log_sum + row_max - target does not depend on it.
    ctx.mark_non_differentiable(row_max, best_cosine, predicted, last_logits)
    # Else autograd fills an N x chunk zero gradient for last_logits on every backward.
    ctx.set_materialize_grads(False)
    # The last chunk's z is kept when the classes fit one chunk: then the backward runs no
    # logits GEMM at all, for N x C extra (at most N x chunk). With more chunks it would
    # spare a fraction of them and hold N x chunk beyond the backward's own buffer.
    classes = _class_count(weight, tensors[0], extras["sub_centers"])
    kept = last_logits if keep_logits and classes <= ctx.options[-1] else None  # chunk_size
    ctx.save_for_backward(embeddings, weight, labels, row_max, log_sum, kept, *tensors)
    ctx.extras = extras  # the non-tensor ones


def _backward(ctx, grad_max, grad_log_sum, grad_target, grad_best, grad_predicted, grad_last):
    (embeddings, weight, labels, row_max, log_sum, last_logits, rows, row_m2, row_m3, hard,
     hard_t) = ctx.saved_tensors
    if grad_log_sum is None:
        grad_log_sum = torch.zeros_like(log_sum)
    if grad_target is None:
        grad_target = torch.zeros_like(log_sum)
    needs = _needs(ctx)
    gradients = torch.ops.facekernels.margin_softmax_backward(
        grad_log_sum, grad_target, embeddings, weight, labels, row_max, log_sum, *ctx.options,
        embeddings_grad=needs[0], weight_grad=needs[1], rows=rows, row_m2=row_m2,
        row_m3=row_m3, hard_threshold=hard, hard_t=hard_t,
        margins_grad=needs[_M2_INDEX] or needs[_M2_INDEX + 1], last_logits=last_logits,
        **ctx.extras,
    )
    return _input_grads(ctx, *gradients)


def _needs(ctx):
    """needs_input_grad, padded to the per-row margins' positions."""
    return ctx.needs_input_grad + (False,) * (_M2_INDEX + 2 - len(ctx.needs_input_grad))


def _input_grads(ctx, grad_embeddings, grad_weight, grad_m2, grad_m3):
    """The op's gradients in the places (and the margins' dtypes) of the inputs that want one."""
    needs = _needs(ctx)
    grads = [None] * len(ctx.needs_input_grad)
    grads[0] = grad_embeddings if needs[0] else None
    grads[1] = grad_weight if needs[1] else None
    row_m2, row_m3 = ctx.saved_tensors[7:9]
    if needs[_M2_INDEX]:
        grads[_M2_INDEX] = grad_m2.to(row_m2.dtype)
    if needs[_M2_INDEX + 1]:
        grads[_M2_INDEX + 1] = grad_m3.to(row_m3.dtype)
    return tuple(grads)


torch.library.register_autograd(
    "facekernels::margin_softmax_forward", _backward, setup_context=_setup_context
)


class _MarginSoftmax(torch.autograd.Function):
    """The same autograd, for our own calls, which pass every argument, then block_rows and
    grad_scale. The wrapper that register_autograd builds refills the schema's defaults on
    each grad-mode call (torch._library.utils.fill_defaults reads schema.arguments, a fresh
    list, once per argument): 0.2 ms a call for this op's 21 arguments, a quarter of a small
    step. Inside this Function grad mode is off, so the op skips that wrapper.
    pytorch/pytorch#195110 fixes it upstream.

    block_rows > 0: the forward computes the gradients of grad_scale * sum_i loss_i as well
    (margin_softmax_forward_backward, three GEMMs where forward and backward take four),
    and the backward hands them out, scaled, when its incoming gradient is that one times a
    constant (a mean or sum of the rows' losses, scaled or not); for any other, and for a
    second backward of the graph, it runs the backward op."""

    @staticmethod
    def forward(ctx, *inputs):  # not split: a separate setup_context costs an inspect.signature
        *inputs, block_rows, grad_scale = inputs
        ctx.gradients = None
        if not block_rows:
            output = torch.ops.facekernels.margin_softmax_forward(*inputs)
            _setup_context(ctx, inputs, output)
            return output
        needs = _needs(ctx)
        *output, grad_embeddings, grad_weight, grad_m2, grad_m3 = (
            torch.ops.facekernels.margin_softmax_forward_backward(
                *inputs[:12], block_rows, *inputs[13:], grad_scale, needs[0], needs[1],
                needs[_M2_INDEX] or needs[_M2_INDEX + 1]))
        output = (*output, inputs[0].new_empty((inputs[0].shape[0], 0)))  # no last_logits
        _setup_context(ctx, inputs, output, keep_logits=False)
        ctx.gradients = (grad_embeddings, grad_weight, grad_m2, grad_m3)
        ctx.grad_scale = grad_scale
        return output

    @staticmethod
    def backward(ctx, *grads):
        gradients, ctx.gradients = ctx.gradients, None  # a graph kept for more runs recomputes
        if gradients is not None:
            ratio = _ratio_to(ctx.grad_scale, grads[1], grads[2])
            if ratio is not None:
                return _input_grads(ctx, *(g if ratio == 1 else g.mul_(ratio) for g in gradients))
        return _backward(ctx, *grads)


def _ratio_to(grad_scale, grad_log_sum, grad_target):
    """c / grad_scale when d loss / d log_sum is c for every row and d loss / d target_logit is
    -c (the gradient of c * sum_i loss_i), else None. (Two torch.equal calls: a quarter of
    the time of elementwise comparisons, on a step that may take 1 ms.)"""
    if grad_log_sum is None or grad_target is None:
        return None
    c = grad_log_sum[:1]
    if not (torch.equal(grad_log_sum, c.expand_as(grad_log_sum))
            and torch.equal(grad_target, grad_log_sum.neg())):
        return None
    c = c.item()
    # grad_scale as the op rounded it into the gradients' (accumulate) dtype.
    expected = grad_scale if grad_log_sum.dtype == torch.float64 else _to_float32(grad_scale)
    return 1 if c == expected else c / expected


def _to_float32(value):
    return struct.unpack("f", struct.pack("f", value))[0]


def _check_row_values(name, values, embeddings):
    """None, or a floating [N] tensor on the embeddings' device."""
    if values is None:
        return
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"{_OP}: {name} must be a floating-point tensor, got {values!r:.80}")
    if values.shape != embeddings.shape[:1] or values.device != embeddings.device:
        raise ValueError(f"{_OP}: {name} must have shape [{embeddings.shape[0]}] on "
                         f"{embeddings.device}, got {tuple(values.shape)} on {values.device}")


def margin_softmax_rows(embeddings, weight, labels, *, kind, scale, m1, m2, m3, sphere_lambda,
                        gradient, normalize_embeddings, normalize_weight, chunk_size,
                        labels_in_range=True, rows=None, interclass_filtering_threshold=0.0,
                        row_m2=None, row_m3=None, sub_centers=1, hard_threshold=None,
                        hard_t=None, grad_scale=None):
    """Per row (row_max, log_sum, target_logit, predicted) of the fused op: the softmax's
    log-sum-exp is row_max + log_sum, and the loss log_sum + (row_max - target_logit).

    A class shard (distributed.PartialFC) passes labels_in_range=False (labels outside
    [0, C) are other shards' classes: target 0) and, when it samples classes, their sorted
    indices as rows (labels then index rows), and may filter similar non-target classes
    (interclass_filtering_threshold > 0: a non-target cosine above it gives logit 0).
    The adaptive heads pass per-row margins row_m2 / row_m3 ([N], differentiable), K
    sub_centers per class (weight [C * K, D], class-major), or CurricularFace's per-row
    hard_threshold and hard_t (a non-target cosine c above hard_threshold_i becomes
    c (hard_t_i + c); tensors, so that a compiled graph does not specialize on t).

    grad_scale: the caller's loss is grad_scale * sum_i (log_sum + row_max - target_logit)_i
    times a constant (its mean is 1 / N): a CPU forward in grad mode may then run the
    backward's work at once (see _MarginSoftmax). None: any other use of the outputs.
    """
    check_tensors(embeddings, weight, labels)
    check_choice(_OP, "gradient", gradient, _GRADIENTS)
    check_positive_int(_OP, "sub_centers", sub_centers)
    if not isinstance(labels_in_range, bool):
        raise TypeError(f"{_OP}: labels_in_range must be a bool, got {labels_in_range!r}")
    if rows is not None and not isinstance(rows, torch.Tensor):
        raise TypeError(f"{_OP}: rows must be an int64 tensor or None, got {type(rows).__name__}")
    for name, values in (("row_m2", row_m2), ("row_m3", row_m3),
                         ("hard_threshold", hard_threshold), ("hard_t", hard_t)):
        _check_row_values(name, values, embeddings)
    if (hard_threshold is None) != (hard_t is None):
        raise ValueError(f"{_OP}: hard_threshold and hard_t go together")
    given_chunk = chunk_size is not None
    if given_chunk:
        check_chunk_size(_OP, chunk_size)
    else:
        chunk_size = max(1, default_chunk_size(embeddings.shape[0], embeddings.device) // sub_centers)
    device_type = embeddings.device.type
    # The op's kernels are CPU and CUDA ones (meta infers shapes, and has no autocast:
    # is_autocast_enabled raises there). A plain comparison: torch.compile in torch 2.11
    # cannot trace torch.amp.is_autocast_available.
    if (device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
            and embeddings.dtype == torch.float32):
        # The GEMMs run in the autocast dtype; the weight's chunks are cast inside the op,
        # so an fp32 master weight is never copied whole, and its gradient stays fp32.
        embeddings = embeddings.to(torch.get_autocast_dtype(device_type))
    block_rows = 0
    if grad_scale is not None and _differentiated(embeddings, weight, row_m2, row_m3):
        block_rows = _block_rows(embeddings, _class_count(weight, rows, sub_centers) * sub_centers,
                                 chunk_size * sub_centers if given_chunk else None)
    row_max, log_sum, target_logit, _, predicted, _ = _MarginSoftmax.apply(
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
        row_m2,
        row_m3,
        sub_centers,
        hard_threshold,
        hard_t,
        block_rows,
        grad_scale,
    )
    return row_max, log_sum, target_logit, predicted


def _differentiated(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _block_rows(embeddings, columns, chunk_columns):
    """Rows per block of the one-op forward and backward for C x K = columns logits per row
    (chunk_columns: a given chunk's, whose N x chunk bounds the block), or 0 where it does not
    pay: off the CPU (to be measured on a GPU), in a compiled graph (whose backward cannot
    branch on the incoming gradient), with no classes, or in blocks of too few rows."""
    if embeddings.device.type != "cpu" or torch.compiler.is_compiling() or not columns:
        return 0
    n, dim = embeddings.shape
    if chunk_columns is None:
        rows = min(n, max(_BLOCK_BYTES // 4 // columns, min(dim, _MAX_BLOCK_BYTES // 4 // columns)))
    else:
        rows = min(n, n * chunk_columns // columns)
    if rows < min(n, _MIN_BLOCK_ROWS):
        return 0
    return -(-n // -(-n // rows))  # as many blocks, of equal rows


def fused_margin_loss(embeddings, weight, labels, *, reduction, return_predictions,
                      penalty=None, **options):
    """The common path of every margin-softmax flavour; see margin_softmax_loss. penalty:
    a per-row term [N] added to each row's loss before the reduction (MagFace's g)."""
    check_modes(reduction, options["gradient"])
    check_embeddings(_OP, embeddings)
    # Each row's loss is log_sum + row_max - target_logit (+ penalty, which does not change
    # their gradients), the sum of which "sum" and "none" pass on with weight 1 (a caller
    # may weigh them otherwise) and "mean" with 1 / N.
    grad_scale = 1.0 / embeddings.shape[0] if reduction == "mean" else 1.0
    row_max, log_sum, target_logit, predicted = margin_softmax_rows(
        embeddings, weight, labels, grad_scale=grad_scale, **options)
    # The target is usually the largest logit: subtracting it from the max first keeps a
    # small loss accurate (lse - target would cancel two large numbers).
    loss = log_sum + (row_max - target_logit)
    if penalty is not None:
        loss = loss + penalty
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
            GPU (its L2 cache), 4 MiB on a CPU. A given one also bounds the CPU step's blocks.
        return_predictions: also return each row's argmax of the margin-free cosine
            (int64 [N]) for the training accuracy, at no extra pass.

    Extra memory: the two gradients, N x chunk logits and chunk x D weight rows; never N x C.
    On a CPU in grad mode, where blocks of at least 128 rows (or all N) x every class fit
    16 MiB of logits, or D rows within 256 MiB (N x chunk_size when given), forward and
    backward run as one step over such blocks (three GEMMs where the two passes take
    four): the forward then holds the gradients until the backward, and one block's
    logits; with bf16 / fp16 GEMMs or sampled rows, also the weight's rows in the GEMM
    dtype and an fp32 sum of its gradient.
    """
    return fused_margin_loss(
        embeddings, weight, labels, kind=COMBINED, scale=scale, m1=m1, m2=m2, m3=m3,
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
    # Named as the caller wrote them (the op knows them as m1 and sphere_lambda).
    check_number("sphereface_loss", "margin", margin, 0.0)
    check_number("sphereface_loss", "lambda_", lambda_, 0.0)
    return fused_margin_loss(
        embeddings, weight, labels, kind=SPHERE, scale=scale, m1=margin, m2=0.0, m3=0.0,
        sphere_lambda=lambda_, gradient=gradient, normalize_embeddings=normalize_embeddings,
        normalize_weight=True, reduction=reduction, chunk_size=chunk_size,
        return_predictions=return_predictions,
    )
