"""Triplet mining + loss, forward and backward: the fused op against the N^3 reference, its
torch.compile, and pytorch-metric-learning (TripletMarginMiner + TripletMarginLoss) when
installed. Batches hold 16 photos per identity.

    pytest benchmarks/bench_triplet.py --benchmark-only
"""

import pytest
import torch

import facekernels
from facekernels import reference
from conftest import DEVICES

try:
    from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
except ImportError:
    pml_losses = pml_miners = None

MARGIN = 0.2
# (N, D); the N^3 alternatives only run where they fit. The loss at N=4096 on CPU shows its
# O(N^2) memory (the miner's output alone would be 250 M triplets there).
SHAPES = {"cpu": [(128, 128), (256, 128), (512, 128), (4096, 128)], "cuda": [(2048, 512), (8192, 512)]}
N3_LIMIT = {"cpu": 512, "cuda": 2048}
PARAMS = [(device, *shape) for device in DEVICES for shape in SHAPES[device]]
COMPILED_REFERENCE = torch.compile(reference.triplet_margin_loss)


def loss_step(impl, mining):
    if impl == "facekernels":
        return lambda x, y: facekernels.triplet_margin_loss(x, y, margin=MARGIN, mining=mining)
    if impl == "reference":
        return lambda x, y: reference.triplet_margin_loss(x, y, margin=MARGIN, mining=mining)
    if impl == "reference_compiled":
        return lambda x, y: COMPILED_REFERENCE(x, y, margin=MARGIN, mining=mining)
    miner = pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets=mining)
    criterion = pml_losses.TripletMarginLoss(margin=MARGIN)
    return lambda x, y: criterion(x, y, miner(x, y))


def miner_step(impl):
    if impl == "facekernels":
        return lambda x, y: facekernels.mine_triplets(x, y, margin=MARGIN)
    if impl == "reference":
        return lambda x, y: reference.mine_triplets(x, y, margin=MARGIN)
    miner = pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="all")
    return lambda x, y: miner(x, y)


def batch(n, dim, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    labels = torch.arange(n // 16).repeat_interleave(16)[torch.randperm(n, generator=g)]
    return x, labels.to(device)


def skip_unavailable(impl, device, n):
    if impl == "pml" and pml_losses is None:
        pytest.skip("pytorch-metric-learning is not installed (pip install '.[bench]')")
    if impl != "facekernels" and n > N3_LIMIT[device.type]:
        pytest.skip(f"{impl} builds N^3 temporaries: N={n} does not fit")


@pytest.mark.parametrize("impl", ["facekernels", "reference", "reference_compiled", "pml"])
@pytest.mark.parametrize("mining", ["all", "semihard"])
@pytest.mark.parametrize("device, n, dim", PARAMS)
def test_triplet_loss(benchmark, measure, impl, mining, device, n, dim):
    device = torch.device(device)
    skip_unavailable(impl, device, n)
    benchmark.group = f"triplet {mining} loss fwd+bwd {device.type} N={n} D={dim}"
    x, labels = batch(n, dim, device)
    step_fn = loss_step(impl, mining)

    def step():
        x.grad = None
        step_fn(x, labels).backward()

    measure(step, device, impl)


@pytest.mark.parametrize("impl", ["facekernels", "reference", "pml"])
@pytest.mark.parametrize("device, n, dim", [p for p in PARAMS if p[1] <= N3_LIMIT[p[0]]])
def test_triplet_miner(benchmark, measure, impl, device, n, dim):
    device = torch.device(device)
    skip_unavailable(impl, device, n)
    benchmark.group = f"triplet miner (all) {device.type} N={n} D={dim}"
    x, labels = batch(n, dim, device)
    x = x.detach()
    step_fn = miner_step(impl)
    measure(lambda: step_fn(x, labels), device, impl)
