"""AdaFace's per-row margins and running-statistics step (the part of an AdaFace step that
depends on the batch): the fused op against its reference twin and its torch.compile. The
whole head's step is in bench_adaptive_heads.py.

    pytest benchmarks/bench_adaface_margins.py --benchmark-only
"""

import pytest
import torch

from facekernels import reference
from facekernels.ops import adaface_margins
from conftest import DEVICES

SHAPES = {"cpu": (256, 128), "cuda": (512, 512)}
COMPILED = torch.compile(reference.adaface_margins)
IMPLS = {
    "facekernels": lambda x, mean, std: adaface_margins(x, mean, std, 0.333, 0.4, 0.01, True),
    "reference": lambda x, mean, std: reference.adaface_margins(x, mean, std),
    "reference_compiled": lambda x, mean, std: COMPILED(x, mean, std),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_adaface_margins(benchmark, measure, impl, device):
    device = torch.device(device)
    n, dim = SHAPES[device.type]
    benchmark.group = f"adaface_margins {device.type} N={n} D={dim}"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, dim, generator=g) * 30).to(device)
    mean = torch.tensor([20.0], device=device)
    std = torch.tensor([100.0], device=device)
    call = IMPLS[impl]
    measure(lambda: call(x, mean, std), device, impl, rounds=200)
