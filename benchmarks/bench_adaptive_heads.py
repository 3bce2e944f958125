"""The adaptive heads (CurricularFace, AdaFace, MagFace, sub-center ArcFace, ElasticFace)
forward + backward: the fused module against the eager reference twin and its
torch.compile. CPU: N=256, D=128, C=200K (sub-center: K=3, 600K weight rows); GPU: N=512,
D=512, C=1M under bf16 autocast with fp32 master weights.

    pytest benchmarks/bench_adaptive_heads.py --benchmark-only
"""

import pytest
import torch

import facekernels
from facekernels import reference
from conftest import DEVICES

SHAPES = {"cpu": (256, 128, 200_000), "cuda": (512, 512, 1_000_000)}
SCALE = 64.0


def _raw_embeddings(n, dim, generator):
    """Norms spread over MagFace's [10, 110] and AdaFace's running range."""
    x = torch.randn(n, dim, generator=generator)
    return x / x.norm(dim=1, keepdim=True) * torch.empty(n, 1).uniform_(10, 110, generator=generator)


# name -> (module factory, reference loss over (x, w, y, module)): the reference reads the
# module's running state so both sides run the same step.
HEADS = {
    "curricularface": (
        lambda c, d: facekernels.CurricularFaceLoss(c, d, scale=SCALE),
        lambda x, w, y, m: reference.curricularface_loss(x, w, y, m.t, scale=SCALE)[0],
    ),
    "adaface": (
        lambda c, d: facekernels.AdaFaceLoss(c, d, scale=SCALE),
        lambda x, w, y, m: reference.adaface_loss(x, w, y, m.batch_mean, m.batch_std, scale=SCALE)[0],
    ),
    "magface": (
        lambda c, d: facekernels.MagFaceLoss(c, d, scale=SCALE),
        lambda x, w, y, m: reference.magface_loss(x, w, y, scale=SCALE),
    ),
    "subcenter": (
        lambda c, d: facekernels.SubCenterArcFaceLoss(c, d, k=3, scale=SCALE),
        lambda x, w, y, m: reference.subcenter_arcface_loss(x, w, y, k=3, scale=SCALE),
    ),
    "elasticface": (
        lambda c, d: facekernels.ElasticFaceLoss(c, d, scale=SCALE),
        lambda x, w, y, m: reference.elasticface_loss(
            x, w, y, torch.normal(0.5, 0.0125, (len(y),), device=x.device), scale=SCALE),
    ),
}
IMPLS = ("facekernels", "reference", "reference_compiled")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_head(benchmark, measure, impl, head, device):
    device = torch.device(device)
    n, dim, num_classes = SHAPES[device.type]
    benchmark.group = f"{head} {device.type} N={n} D={dim} C={num_classes}"
    make_module, reference_loss = HEADS[head]
    module = make_module(num_classes, dim).to(device)
    g = torch.Generator().manual_seed(0)
    x = _raw_embeddings(n, dim, g).to(device).requires_grad_()
    y = torch.randint(0, num_classes, (n,), generator=g).to(device)
    w = module.weight
    low = torch.bfloat16 if device.type == "cuda" else None
    if impl == "facekernels":
        loss_fn = lambda: module(x, y)  # noqa: E731
    else:
        fn = torch.compile(reference_loss) if impl == "reference_compiled" else reference_loss
        loss_fn = lambda: fn(x, w, y, module)  # noqa: E731

    def step():
        x.grad = w.grad = None
        with torch.autocast(device.type, dtype=low, enabled=low is not None):
            loss = loss_fn()
        loss.backward()

    measure(step, device, impl, rounds=3 if device.type == "cpu" else 10)
