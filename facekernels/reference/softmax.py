"""Reference softmax losses: plain softmax cross-entropy and L2-constrained softmax."""

from typing import Optional

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def softmax_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Softmax cross-entropy over a linear classifier.

    ``logits = x W^T + b`` with ``weight`` of shape [C, D] (as ``nn.Linear``), and
    ``loss_i = -log softmax(logits_i)[y_i]``, reduced by ``reduction``
    ("mean" | "sum" | "none").

    The baseline identification loss of face recognition, e.g. Taigman et al. 2014,
    "DeepFace: Closing the Gap to Human-Level Performance in Face Verification".
    """
    _check_reduction("softmax_cross_entropy", reduction)
    logits = F.linear(embeddings, weight, bias)
    return F.cross_entropy(logits, labels, reduction=reduction)


def l2_softmax_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 16.0,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""L2-constrained softmax loss.

    Each feature is rescaled onto the sphere of radius ``alpha``,
    ``x'_i = alpha * x_i / |x_i|``, then softmax cross-entropy over ``x' W^T + b``.

    Ranjan, Castillo, Chellappa 2017, "L2-constrained Softmax Loss for Discriminative
    Face Verification".
    """
    _check_reduction("l2_softmax_loss", reduction)
    scaled = alpha * F.normalize(embeddings, p=2.0, dim=1)
    return softmax_cross_entropy(scaled, weight, labels, bias=bias, reduction=reduction)
