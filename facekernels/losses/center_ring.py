"""Center loss (fused, with Wen et al.'s update) and ring loss (elementwise)."""

import torch
from torch import nn

from facekernels.ops.center_loss import center_loss
from facekernels.ops.checks import check_embeddings, check_number, check_sizes

_CENTER_UPDATES = ("paper", "gradient")


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): ``mean_i 1/2 |x_i - c_{y_i}|^2`` over the batch.

    Args:
        num_classes: number of identities C.
        embedding_size: embedding width D.
        alpha: center learning rate of the paper's update rule, in [0, 1].
        update: ``"paper"`` (default): ``.centers`` is a buffer moved by Wen et al.'s rule
            in training mode, right after the loss is formed with the current centers (only
            the classes present in the batch move; eval mode leaves them alone).
            ``"gradient"``: ``.centers`` is an ``nn.Parameter`` that receives the exact
            gradient, for your optimizer to step.
        deterministic: ask for bitwise-reproducible results. The fused kernels group rows
            by label and use no floating-point atomics, so both settings currently run the
            same reproducible path.

    ``.centers`` is [C, D], zero-initialized, in the module's dtype: cast the module and
    the embeddings to the same dtype (``.to(torch.bfloat16)``, say).

    Example::

        center_loss = facekernels.CenterLoss(num_classes=1000, embedding_size=128)
        loss = ce(logits, labels) + 0.01 * center_loss(embeddings, labels)
    """

    def __init__(self, num_classes, embedding_size, alpha=0.5, update="paper", deterministic=True):
        super().__init__()
        if update not in _CENTER_UPDATES:
            raise ValueError(f"CenterLoss: update must be one of {_CENTER_UPDATES}, got {update!r}")
        check_sizes("CenterLoss", num_classes, embedding_size)
        check_number("CenterLoss", "alpha", alpha, 0.0, 1.0)
        if not isinstance(deterministic, bool):
            raise ValueError(f"CenterLoss: deterministic must be a bool, got {deterministic!r}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.alpha = float(alpha)
        self.update = update
        self.deterministic = deterministic
        centers = torch.zeros(num_classes, embedding_size)
        if update == "paper":
            self.register_buffer("centers", centers)
        else:
            self.centers = nn.Parameter(centers)

    def forward(self, embeddings, labels):
        return center_loss(
            embeddings,
            labels,
            self.centers,
            alpha=self.alpha,
            update_centers=self.update == "paper" and self.training,
        )

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"alpha={self.alpha}, update={self.update!r}"
        )


class RingLoss(nn.Module):
    """Ring loss (Zheng et al. 2018): loss_weight / (2N) * sum_i (|x_i| - R)^2 with the
    radius R learned, added to a softmax loss to pull feature norms to one ring.
    Elementwise, so plain PyTorch: there is nothing to fuse."""

    def __init__(self, loss_weight=0.01, radius=1.0):
        super().__init__()
        self.loss_weight = check_number("RingLoss", "loss_weight", loss_weight, 0.0)
        self.radius = nn.Parameter(torch.tensor(check_number("RingLoss", "radius", radius)))

    def forward(self, embeddings):
        return ring_loss(embeddings, self.radius, self.loss_weight)


def ring_loss(embeddings, radius, loss_weight=0.01):
    """RingLoss's functional form: loss_weight / (2N) * sum_i (|x_i| - radius)^2."""
    check_embeddings("RingLoss", embeddings)
    norms = torch.linalg.vector_norm(embeddings, dim=1)
    return loss_weight / (2 * embeddings.shape[0]) * (norms - radius).square().sum()
