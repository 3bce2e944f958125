"""Reference Ring loss."""

from typing import Union

import torch


def ring_loss(
    embeddings: torch.Tensor,
    radius: Union[torch.Tensor, float],
    loss_weight: float = 0.01,
) -> torch.Tensor:
    r"""Ring loss: pulls feature norms towards a (learnable) radius R.

    ``L_R = lambda / (2m) * sum_i (|f_i|_2 - R)^2`` with m the batch size and
    lambda = ``loss_weight``. ``radius`` is usually a scalar ``nn.Parameter`` so that R
    is learned jointly with the network (it receives a gradient here).

    Zheng, Pal, Savvides 2018, "Ring loss: Convex Feature Normalization for Face
    Recognition".
    """
    m = embeddings.shape[0]
    if m == 0:
        raise ValueError("ring_loss: embeddings must hold at least one row (the loss divides by m)")
    norms = torch.linalg.vector_norm(embeddings, dim=1)
    return loss_weight / (2 * m) * ((norms - radius) ** 2).sum()
