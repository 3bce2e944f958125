"""Center loss, the plain-PyTorch way: gather each sample's center, then index_add."""

import torch


def center_loss(embeddings, labels, centers):
    """Center loss (Wen, Zhang, Li, Qiao 2016, "A Discriminative Feature Learning Approach
    for Deep Face Recognition"):

        L = 1/N * sum_i 1/2 |x_i - c_{y_i}|^2

    differentiable with respect to both the embeddings and the centers.
    """
    return 0.5 * (embeddings - centers[labels]).pow(2).sum(dim=1).mean()


def center_loss_update(centers, embeddings, labels, alpha=0.5):
    """Wen et al.'s center update (their eq. 4), returned as a new tensor:

        delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),   c_j <- c_j - alpha * delta_j

    with n_j the number of samples of class j in the batch; classes absent from the batch
    keep their centers (delta_j = 0).
    """
    centers = centers.detach()
    embeddings = embeddings.detach()
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)
    delta = torch.zeros_like(centers).index_add_(0, labels, centers[labels] - embeddings)
    return centers - alpha * delta / (1.0 + counts).unsqueeze(1)
