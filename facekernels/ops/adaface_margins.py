"""adaface_margins: AdaFace's per-row margins and the step of its running norm statistics in
one call (facekernels::adaface_margins), where tensor ops took forty."""

import torch

from facekernels.ops.checks import check_embeddings, check_number, check_one_device
from facekernels.ops.margin_softmax import accumulate_dtype

_OP = "adaface_margins"


def _check(embeddings, mean, std, h, margin, t_alpha, training, owner=_OP):
    check_embeddings(owner, embeddings)
    for name, t in (("mean", mean), ("std", std)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != 1:
            raise TypeError(f"{owner}: {name} must be a floating-point tensor of one value, got "
                            f"{getattr(t, 'shape', type(t).__name__)}")
    check_one_device(owner, embeddings=embeddings, mean=mean, std=std)
    check_number(owner, "h", h, 0.0)
    check_number(owner, "margin", margin)
    check_number(owner, "t_alpha", t_alpha, 0.0, 1.0)
    if training and embeddings.shape[0] < 2:
        raise ValueError(f"{owner}: a training batch needs at least 2 rows for the norm's "
                         f"standard deviation, got {embeddings.shape[0]}")


@torch.library.register_fake("facekernels::adaface_margins")
def _(embeddings, mean, std, h, margin, t_alpha, training):
    _check(embeddings, mean, std, h, margin, t_alpha, training)
    rows = embeddings.new_empty((embeddings.shape[0],), dtype=accumulate_dtype(embeddings.dtype))
    return rows, torch.empty_like(rows), mean.new_empty(mean.shape), std.new_empty(std.shape)


def adaface_margins(embeddings, mean, std, h, margin, t_alpha, training, owner=_OP):
    """-> (row_m2, row_m3, new mean, new std): see reference.adaface_margins. No gradient
    (the norms enter detached); mean and std are read, never written. owner: the name the
    errors start with (a head passes its own)."""
    _check(embeddings, mean, std, h, margin, t_alpha, training, owner)
    return torch.ops.facekernels.adaface_margins(embeddings.detach(), mean, std, h, margin,
                                                  t_alpha, training)
