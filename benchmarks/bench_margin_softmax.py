"""ArcFace forward + backward (gradients for embeddings and weight): the fused op against
the eager reference, its torch.compile, and the floor of three bare GEMMs (logits,
dX = dZ W, dW = dZ^T X). On the GPU everything runs under bf16 autocast with fp32 master
weights, as face-recognition training does.

    pytest benchmarks/bench_margin_softmax.py --benchmark-only
"""

import pytest
import torch

import facekernels
from facekernels import reference
from conftest import DEVICES

# (N, D, C)
SHAPES = {
    "cpu": [(256, 128, c) for c in (20_000, 50_000, 200_000)],
    "cuda": [(n, 512, c) for c in (100_000, 1_000_000) for n in (128, 512, 1024)],
}
PARAMS = [(device, *shape) for device in DEVICES for shape in SHAPES[device]]
MARGIN, SCALE = 0.5, 64.0


def facekernels_loss(x, w, y):
    return facekernels.margin_softmax_loss(x, w, y, scale=SCALE, m2=MARGIN)


def reference_loss(x, w, y):
    return reference.margin_softmax_loss(x, w, y, scale=SCALE, m2=MARGIN)


COMPILED_REFERENCE = torch.compile(reference_loss)


def bare_gemms(x, w, y):
    """The three GEMMs any fwd+bwd must run, with no epilogue at all."""
    z = x @ w.t()
    z @ w
    z.t() @ x


IMPLS = {
    "facekernels": facekernels_loss,
    "reference": reference_loss,
    "reference_compiled": COMPILED_REFERENCE,
    "3_bare_gemms": None,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device, n, dim, num_classes", PARAMS)
def test_arcface(benchmark, measure, impl, device, n, dim, num_classes):
    device = torch.device(device)
    benchmark.group = f"arcface {device.type} N={n} D={dim} C={num_classes}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    w = (torch.randn(num_classes, dim, generator=g) * 0.01).to(device).requires_grad_()
    y = torch.randint(0, num_classes, (n,), generator=g).to(device)
    low = torch.bfloat16 if device.type == "cuda" else None

    if impl == "3_bare_gemms":
        xs, ws = x.detach().to(low or x.dtype), w.detach().to(low or w.dtype)

        def step():
            bare_gemms(xs, ws, y)

    else:
        loss_fn = IMPLS[impl]

        def step():
            x.grad = w.grad = None
            with torch.autocast(device.type, dtype=low, enabled=low is not None):
                loss = loss_fn(x, w, y)
            loss.backward()

    measure(step, device, impl, rounds=3 if device.type == "cpu" else 10)
