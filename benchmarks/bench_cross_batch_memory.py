"""CrossBatchMemory with TripletMarginLoss (every valid triplet of the batch against the
memory), forward + backward of one step with a full memory: facekernels' fused memory loss
(O(N x M)) against pytorch-metric-learning's CrossBatchMemory, which lists every
(positive pair, negative pair) of an anchor: a [positive pairs x negative pairs] mask,
about N^2 M^2 / identities bytes. N = 512 (16 photos per identity), D = 128, memory labels
from 1000 identities; PML runs only where that mask fits in PML_LIMIT bytes.

    pytest benchmarks/bench_cross_batch_memory.py --benchmark-only
"""

import pytest
import torch

import facekernels
from conftest import DEVICES

try:
    from pytorch_metric_learning import losses as pml_losses
except ImportError:
    pml_losses = None

N, D, IDENTITIES, MARGIN = 512, 128, 1000, 0.2
MEMORIES = [1024, 8192]
PML_LIMIT = 4 * 2**30


def pml_mask_bytes(memory):
    positives = N * memory / IDENTITIES  # pairs of an anchor with a same-label memory row
    return positives * N * memory  # torch.where(a1[:, None] == a2): one byte per entry


def make_step(impl, memory, device):
    g = torch.Generator().manual_seed(0)
    loss = facekernels.TripletMarginLoss(margin=MARGIN) if impl == "facekernels" else \
        pml_losses.TripletMarginLoss(margin=MARGIN)
    xbm = (facekernels.CrossBatchMemory if impl == "facekernels" else pml_losses.CrossBatchMemory)(
        loss, D, memory_size=memory).to(device)
    with torch.no_grad():  # a full memory
        for _ in range(memory // N):
            xbm(torch.randn(N, D, generator=g).to(device), torch.randint(0, IDENTITIES, (N,), generator=g).to(device))
    x = torch.randn(N, D, generator=g).to(device).requires_grad_()
    y = torch.arange(N // 16).repeat_interleave(16).to(device)

    def step():
        x.grad = None
        xbm(x, y).backward()

    return step


@pytest.mark.parametrize("impl", ["facekernels", "pytorch_metric_learning"])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("device", DEVICES)
def test_cross_batch_memory(benchmark, measure, device, memory, impl):
    if impl != "facekernels" and pml_losses is None:
        pytest.skip("pytorch-metric-learning is not installed")
    if impl != "facekernels" and pml_mask_bytes(memory) > PML_LIMIT:
        pytest.skip(f"PML's CrossBatchMemory needs a ~{pml_mask_bytes(memory) / 2**30:.0f} GiB "
                    f"pair mask at N={N}, M={memory}")
    benchmark.group = f"CrossBatchMemory triplet fwd+bwd {device} N={N} M={memory} D={D}"
    measure(make_step(impl, memory, torch.device(device)), torch.device(device), impl, rounds=3)
