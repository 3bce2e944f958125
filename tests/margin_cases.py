"""The margin-softmax op's cases that more than one test runs: every margin kind and
option on odd sizes, the op's arguments for each, and the names of its outputs."""

import torch

from facekernels.ops.margin_softmax import accumulate_dtype

N, D, C = 37, 24, 203  # odd sizes: vector tails and a chunk boundary inside a vector

# name -> forward options beyond the defaults (ArcFace: kind 0, m2 = 0.5, s = 64).
CASES = {
    "arcface": {},
    "cosface": dict(m2=0.0, m3=0.35),
    "combined": dict(m1=1.2, m2=0.3, m3=0.1),
    "plain_softmax": dict(m2=0.0, normalize_embeddings=False, normalize_weight=False, scale=1.0),
    "l2_softmax": dict(m2=0.0, normalize_weight=False, scale=16.0),
    "sphereface": dict(margin_kind=1, m1=4.0, m2=0.0, sphere_lambda=5.0),
    "adaface": dict(margin_kind=2, row_m2=True, row_m3=True),
    "easy_margin": dict(margin_kind=3),
    "detached": dict(exact_gradient=False),
    "unnormalized_embeddings": dict(normalize_embeddings=False, scale=2.0),
    "per_row_margins": dict(row_m2=True, row_m3=True),
    "curricularface": dict(hard=True),
    "interclass_filtering": dict(interclass_filtering_threshold=0.2),
    "sub_centers": dict(sub_centers=3),
    "rows": dict(rows=True),
}

HEAD = ("scale", "m1", "m2", "m3", "sphere_lambda", "margin_kind", "exact_gradient",
        "normalize_embeddings", "normalize_weight", "chunk_size")

# Two computations of one output that differ only in the exponentials' rounding and the
# order of sums agree to this many epsilons of the accumulate type, normwise (relative to
# the output's largest magnitude); outputs stored in half precision to one rounding of
# that type on top.
BOUND_EPS = 64


def bound(dtype):
    """The normwise bound for an output of `dtype` (see BOUND_EPS)."""
    acc = accumulate_dtype(dtype)
    half = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0
    return BOUND_EPS * torch.finfo(acc).eps + half


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# The forward's outputs (without last_logits), then the backward's.
NAMES = ["row_max", "log_sum", "target_logit", "best_cosine", "predicted",
         "grad_embeddings", "grad_weight", "grad_m2", "grad_m3"]


def inputs(options, dtype, seed, compute_dtype=None, special_targets=True):
    """(x, w, y, g): a batch rounded to dtype, in compute_dtype (default dtype), and the
    generator that goes on to draw the per-row options. special_targets: two targets at a
    cosine of +-1, where the margins' derivatives are ill-conditioned."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C // options.get("sub_centers", 1), (N,), generator=g)
    # Targets near the clamp and exactly at a cosine of 1, where the special cases live.
    if special_targets:
        w[y[0]] = x[0].double()
        w[y[1]] = -x[1].double()
    compute_dtype = compute_dtype or dtype
    return x.to(compute_dtype), w.to(dtype).to(compute_dtype), y, g


def arguments(options, x, w, y, g, **overrides):
    """(weight, head, extra, labels_in_range) of the op for `options` (and overrides of
    the defaults): head the positional options scale .. chunk_size, extra the keyword ones
    that the forward and backward share."""
    o = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0, sphere_lambda=0.0, margin_kind=0,
             exact_gradient=True, normalize_embeddings=True, normalize_weight=True, chunk_size=64)
    o.update(options)
    o.update(overrides)
    extra = {}
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if o.pop("row_m2", False):
        extra["row_m2"] = (0.2 + 0.4 * torch.rand(N, generator=g, dtype=torch.float64)).to(acc)
    if o.pop("row_m3", False):
        extra["row_m3"] = (0.1 * torch.rand(N, generator=g, dtype=torch.float64)).to(acc)
    if o.pop("hard", False):
        extra["hard_threshold"] = (0.1 * torch.rand(N, generator=g, dtype=torch.float64)).to(acc)
        extra["hard_t"] = torch.full((N,), 0.3, dtype=acc)
    if "interclass_filtering_threshold" in o:
        extra["interclass_filtering_threshold"] = o.pop("interclass_filtering_threshold")
    k = o.pop("sub_centers", 1)
    extra["sub_centers"] = k
    labels_in_range = True
    if o.pop("rows", False):
        extra["rows"] = torch.arange(0, C // k, 3)
        labels_in_range = False
    weight = w if k == 1 else w[: (C // k) * k]
    return weight, [o[name] for name in HEAD], extra, labels_in_range


def forward_then_backward(options, x, w, y, g, incoming, **overrides):
    """The forward op, then the backward op with the incoming gradients that
    incoming(accumulate dtype) gives, (d/d log_sum, d/d target_logit): every output of both
    but last_logits, as NAMES."""
    weight, head, extra, labels_in_range = arguments(options, x, w, y, g, **overrides)
    ops = torch.ops.facekernels
    forward = ops.margin_softmax_forward(x, weight, y, *head, labels_in_range=labels_in_range, **extra)
    row_max, log_sum = forward[0], forward[1]
    grad_log_sum, grad_target = incoming(log_sum.dtype)
    backward = ops.margin_softmax_backward(grad_log_sum, grad_target, x, weight, y, row_max, log_sum,
                                           *head, margins_grad=True, **extra)
    return forward[:5] + backward
