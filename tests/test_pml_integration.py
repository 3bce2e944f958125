"""Both directions between facekernels and pytorch-metric-learning's machinery: our losses
and miner (facekernels.integrations.pml) inside PML's DistributedLossWrapper,
DistributedMinerWrapper, CrossBatchMemory and MultipleLosses, against PML's own classes
in the same places; and PML's losses inside our wrappers and memory (test_pml_distributed
and test_cross_batch_memory cover those on gloo and over many batches)."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is not installed")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning.utils import distributed as pml_distributed  # noqa: E402

import facekernels  # noqa: E402
from facekernels.integrations import pml as fk_pml  # noqa: E402

D = 8


def batch(seed, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


PAIRS = [  # (ours as a PML class, PML's)
    (lambda: fk_pml.TripletMarginLoss(margin=0.2), lambda: pml_losses.TripletMarginLoss(margin=0.2)),
    (lambda: fk_pml.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9),
     lambda: pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9)),
]


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_our_losses_are_pml_losses(ours, theirs):
    loss = ours()
    assert isinstance(loss, pml_losses.BaseMetricLossFunction)
    x, y = batch(0)
    torch.testing.assert_close(loss(x, y), theirs()(x, y), rtol=1e-10, atol=1e-12)
    indices = pml_miners.TripletMarginMiner(margin=0.5)(x, y)
    torch.testing.assert_close(loss(x, y, indices), theirs()(x, y, indices), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_our_losses_inside_pml_cross_batch_memory(ours, theirs):
    mine = pml_losses.CrossBatchMemory(ours(), D, memory_size=40)
    reference = pml_losses.CrossBatchMemory(theirs(), D, memory_size=40)
    for step in range(6):
        x, y = batch(step)
        torch.testing.assert_close(mine(x, y), reference(x, y), rtol=1e-10, atol=1e-12)


def test_our_miner_is_a_pml_miner():
    miner = fk_pml.TripletMiner(margin=0.3, type_of_triplets="semihard")
    assert isinstance(miner, pml_miners.BaseMiner)
    x, y = batch(1)
    got = {t for t in zip(*(i.tolist() for i in miner(x, y)))}
    want = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")(x, y)
    assert got == {t for t in zip(*(i.tolist() for i in want))}


def test_multiple_losses_take_ours():
    x, y = batch(2)
    mixed = pml_losses.MultipleLosses([fk_pml.TripletMarginLoss(margin=0.2), fk_pml.ContrastiveLoss()],
                                      miners=[fk_pml.TripletMiner(margin=0.2), None], weights=[1.0, 0.5])
    want = pml_losses.MultipleLosses([pml_losses.TripletMarginLoss(margin=0.2), pml_losses.ContrastiveLoss()],
                                     miners=[pml_miners.TripletMarginMiner(margin=0.2), None], weights=[1.0, 0.5])
    torch.testing.assert_close(mixed(x, y), want(x, y), rtol=1e-10, atol=1e-12)


def test_pml_wrappers_take_ours_at_world_size_one(tmp_path):
    """PML's wrappers accept our classes (at one rank they call them as they are; their
    type check is what refused our losses before)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        x, y = batch(3)
        loss = pml_distributed.DistributedLossWrapper(fk_pml.TripletMarginLoss(margin=0.2))
        miner = pml_distributed.DistributedMinerWrapper(fk_pml.TripletMiner(margin=0.2))
        want = pml_losses.TripletMarginLoss(margin=0.2)(x, y, pml_miners.TripletMarginMiner(margin=0.2)(x, y))
        torch.testing.assert_close(loss(x, y, miner(x, y)), want, rtol=1e-10, atol=1e-12)
    finally:
        torch.distributed.destroy_process_group()


def test_facekernels_imports_without_pml():
    """facekernels itself, and everything but this integration, works without PML."""
    code = ("import sys; sys.modules['pytorch_metric_learning'] = None\n"
            "import torch, facekernels\n"
            "x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])\n"
            "assert facekernels.CrossBatchMemory(facekernels.TripletMarginLoss(), 4, 12)(x, y).isfinite()\n"
            "try:\n    import facekernels.integrations.pml\nexcept ImportError as e:\n"
            "    assert 'needs pytorch-metric-learning' in str(e)\nelse:\n    raise SystemExit('imported')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
