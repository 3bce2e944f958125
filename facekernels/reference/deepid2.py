"""Reference DeepID2 joint identification-verification loss."""

from typing import Optional

import torch
import torch.nn.functional as F


def joint_identification_verification_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    margin: float = 1.0,
    verification_weight: float = 0.05,
) -> torch.Tensor:
    r"""DeepID2 loss ``Ident + lambda * Verif``.

    ``Ident`` is the mean softmax cross-entropy of ``x W^T + b``; ``Verif`` is the mean over
    all unordered pairs i < j of the batch of ``1/2 |f_i - f_j|^2`` when
    ``y_i == y_j`` and ``1/2 max(0, m - |f_i - f_j|)^2`` otherwise
    (0 for a batch of one). lambda = ``verification_weight``, m = ``margin``.

    Sun, Chen, Wang, Tang 2014, "Deep Learning Face Representation by Joint
    Identification-Verification".
    """
    ident = F.cross_entropy(F.linear(embeddings, weight, bias), labels)
    n = embeddings.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=embeddings.device)
    d = torch.linalg.vector_norm(embeddings[i] - embeddings[j], dim=1)
    same = labels[i] == labels[j]
    per_pair = torch.where(same, 0.5 * d**2, 0.5 * F.relu(margin - d) ** 2)
    # sum() of no pairs is 0 and keeps the graph; mean() would be NaN.
    verif = per_pair.mean() if per_pair.numel() > 0 else per_pair.sum()
    return ident + verification_weight * verif
