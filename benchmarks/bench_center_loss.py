"""Center loss forward + backward + center update: the fused op against what a careful
user writes in eager PyTorch (gather the batch's centers, update only the batch's classes
in place with unique + index_add_) and its torch.compile, the gather reference (whose
update builds a dense C x D delta), and the common N x C distance-matrix formulation.

    pytest benchmarks/bench_center_loss.py --benchmark-only
"""

import pytest
import torch

import facekernels
from facekernels import reference
from conftest import DEVICES

ALPHA = 0.5
# (N, D, C): CPU shapes finish in seconds; the GPU also runs a million identities.
SHAPES = {"cpu": [(120, 128, 29), (512, 512, 1_000), (512, 512, 100_000)], "cuda": [(512, 512, 100_000), (512, 512, 1_000_000)]}
PARAMS = [(device, *shape) for device in DEVICES for shape in SHAPES[device]]


def distance_matrix_loss(x, labels, centers):
    """The formulation many center-loss ports use: all N x C squared distances, masked."""
    distances = (
        x.pow(2).sum(1, keepdim=True)
        + centers.pow(2).sum(1).unsqueeze(0)
        - 2.0 * x @ centers.t()
    )
    mask = labels.unsqueeze(1) == torch.arange(centers.shape[0], device=x.device).unsqueeze(0)
    return 0.5 * (distances * mask).clamp(min=1e-12).sum() / x.shape[0]


def reference_step(x, labels, centers, loss_fn=reference.center_loss,
                   update_fn=reference.center_loss_update):
    loss_fn(x, labels, centers).backward()
    centers.copy_(update_fn(centers, x, labels, ALPHA))


def reference_compiled_step(x, labels, centers):
    reference_step(x, labels, centers, COMPILED_LOSS, COMPILED_UPDATE)


def distance_matrix_step(x, labels, centers):
    distance_matrix_loss(x, labels, centers).backward()
    centers.copy_(reference.center_loss_update(centers, x, labels, ALPHA))


def sparse_eager_step(x, labels, centers):
    """The strongest eager anchor: the loss on the gathered centers, then Wen et al.'s
    update on the batch's classes only, in place."""
    loss = 0.5 * (x - centers[labels]).square().sum() / x.shape[0]
    loss.backward()
    with torch.no_grad():
        classes, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
        delta = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device)
        delta.index_add_(0, inverse, centers[labels] - x)
        centers.index_add_(0, classes, delta * (-ALPHA / (1.0 + counts.to(x.dtype))).unsqueeze(1))


def facekernels_step(x, labels, centers):
    facekernels.center_loss(x, labels, centers, alpha=ALPHA, update_centers=True).backward()


COMPILED_LOSS = torch.compile(reference.center_loss)
COMPILED_UPDATE = torch.compile(reference.center_loss_update)
IMPLS = {
    "facekernels": facekernels_step,
    "sparse_eager": sparse_eager_step,
    "sparse_eager_compiled": torch.compile(sparse_eager_step),
    "reference": reference_step,
    "reference_compiled": reference_compiled_step,
    "distance_matrix": distance_matrix_step,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device, n, dim, num_classes", PARAMS)
def test_center_loss(benchmark, measure, impl, device, n, dim, num_classes):
    device = torch.device(device)
    benchmark.group = f"center_loss {device.type} N={n} D={dim} C={num_classes}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, num_classes, (n,), generator=g).to(device)
    centers = torch.randn(num_classes, dim, generator=g).to(device)
    step = IMPLS[impl]

    def run():
        x.grad = None
        step(x, labels, centers)

    measure(run, device, impl)
