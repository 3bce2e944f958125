"""pytorch-metric-learning's own distributed test (tests/utils/test_distributed.py), written
here from its behaviour, run on gloo with two CPU ranks: a toy model trained for 10 steps
on the whole batch in one process must end with the parameters of the same model trained
under DDP on 2 ranks with the wrappers, for its 17 configurations (ContrastiveLoss alone
or inside a CrossBatchMemory with and without an enqueue mask, with PairMarginMiner, with
reference embeddings, labels passed to the loss or not, efficient or not), fp32 and fp64.

Each configuration runs with four stacks:
- "pml": PML's wrappers, loss, memory and miner (the control: PML passes its own test);
- "wrappers": facekernels' DistributedLossWrapper / DistributedMinerWrapper swapped in for
  PML's, around PML's loss, memory and miner;
- "facekernels": our wrappers around our ContrastiveLoss and CrossBatchMemory (PML's
  PairMarginMiner: facekernels has no pair miner);
- "integration": PML's wrappers and memory around our ContrastiveLoss as a PML class
  (facekernels.integrations.pml).

PML compares with torch.allclose(rtol=1e-2); here fp64 must also agree to 1e-9.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is not installed")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning.miners import PairMarginMiner  # noqa: E402
from pytorch_metric_learning.utils import distributed as pml_distributed  # noqa: E402

import facekernels  # noqa: E402
from facekernels.distributed import DistributedLossWrapper, DistributedMinerWrapper  # noqa: E402
from facekernels.integrations import pml as fk_pml  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, BATCH, ITERATIONS, LR = 2, 20, 10, 0.1
# (miner, efficient, xbm, use_ref, pass_labels_to_loss_fn, use_xbm_enqueue_mask), PML's 17.
CONFIGS = (
    [(False, False, xbm, ref, True, mask) for xbm in (False, True) for ref in (False, True)
     for mask in (False, True) if not (xbm and ref)]
    + [(True, False, xbm, ref, labels, False) for xbm in (False, True) for ref in (False, True)
       for labels in (False, True) if not (xbm and ref or xbm and not labels)]
    + [(False, True, False, ref, True, False) for ref in (False, True)]
    + [(True, True, False, ref, labels, False) for ref in (False, True) for labels in (False, True)]
)
STACKS = {
    "pml": (pml_distributed.DistributedLossWrapper, pml_distributed.DistributedMinerWrapper,
            pml_losses.ContrastiveLoss, pml_losses.CrossBatchMemory),
    "wrappers": (DistributedLossWrapper, DistributedMinerWrapper, pml_losses.ContrastiveLoss,
                 pml_losses.CrossBatchMemory),
    "facekernels": (DistributedLossWrapper, DistributedMinerWrapper, facekernels.ContrastiveLoss,
                    facekernels.CrossBatchMemory),
    "integration": (pml_distributed.DistributedLossWrapper, pml_distributed.DistributedMinerWrapper,
                    fk_pml.ContrastiveLoss, pml_losses.CrossBatchMemory),
}


class ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5))

    def forward(self, x):
        return self.net(x)


def make_loss(stack, xbm):
    loss = STACKS[stack][2]()
    return STACKS[stack][3](loss, embedding_size=5) if xbm else loss


def make_miner():
    return PairMarginMiner(pos_margin=0.5, neg_margin=0.5)


def data(config, dtype):
    """Per iteration and rank: inputs, labels, ref inputs, ref labels; per rank: the mask."""
    torch.manual_seed(75210)
    g = torch.Generator().manual_seed(1)

    def batches(draw):
        return [[draw() for _ in range(WORLD)] for _ in range(ITERATIONS)]

    inputs = batches(lambda: torch.randn(BATCH, 10, generator=g).to(dtype))
    labels = batches(lambda: torch.randint(0, 2, (BATCH,), generator=g))
    use_ref = config[3]
    ref_inputs = batches(lambda: torch.randn(BATCH, 10, generator=g).to(dtype)) if use_ref else None
    ref_labels = batches(lambda: torch.randint(0, 2, (BATCH,), generator=g)) if use_ref else None
    masks = [torch.randint(0, 2, (BATCH,), generator=g).bool() for _ in range(WORLD)]
    return inputs, labels, ref_inputs, ref_labels, masks


def efficient_batch(all_values, all_ref, rank):
    """Rank `rank`'s rows, and the reference set PML's efficient wrapper builds for it."""
    source = all_values if all_ref is None else all_ref
    s, e = rank * BATCH, (rank + 1) * BATCH
    others = torch.cat([source[:s], source[e:]]).detach()
    return all_values[s:e], torch.cat([source[s:e], others])


def single_process(model, stack, config, batches):
    """PML's expected run: the whole batch in one process (efficient: the sum of every
    rank's loss over its reference set)."""
    miner_on, efficient, xbm, use_ref, _, use_mask = config
    inputs, labels, ref_inputs, ref_labels, masks = batches
    loss_fn, miner = make_loss(stack, xbm), make_miner() if miner_on else None
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for i in range(ITERATIONS):
        optimizer.zero_grad()
        out, y = model(torch.cat(inputs[i])), torch.cat(labels[i])
        ref_out = model(torch.cat(ref_inputs[i])) if use_ref else None
        ref_y = torch.cat(ref_labels[i]) if use_ref else None
        if efficient:
            loss = 0
            for rank in range(WORLD):
                emb, other = efficient_batch(out, ref_out, rank)
                lab, other_lab = efficient_batch(y, ref_y, rank)
                indices = pml_distributed.get_indices_tuple(lab, other_lab, emb, other, miner)
                loss = loss + loss_fn(emb, lab, indices, other, other_lab)
        else:
            indices = miner(out, y, ref_out, ref_y) if miner else None
            if xbm:
                loss = loss_fn(out, y, indices, torch.cat(masks) if use_mask else None)
            else:
                loss = loss_fn(out, y, indices, ref_out, ref_y)
        loss.backward()
        optimizer.step()


def one_rank(rank, stack, config, batches, start, dtype):
    """The same run under DDP on this rank, with the stack's wrappers; its parameters."""
    miner_on, efficient, xbm, use_ref, pass_labels, use_mask = config
    inputs, labels, ref_inputs, ref_labels, masks = batches
    model = ToyModel().to(dtype)
    model.load_state_dict(start)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_wrapper, miner_wrapper = STACKS[stack][:2]
    loss_fn = loss_wrapper(make_loss(stack, xbm), efficient=efficient)
    miner = miner_wrapper(make_miner(), efficient=efficient) if miner_on else None
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    for i in range(ITERATIONS):
        optimizer.zero_grad()
        out, y = ddp(inputs[i][rank]), labels[i][rank]
        ref_out = ddp(ref_inputs[i][rank]) if use_ref else None
        ref_y = ref_labels[i][rank] if use_ref else None
        indices = miner(out, y, ref_out, ref_y) if miner else None
        if miner and not pass_labels:
            loss = loss_fn(out, indices_tuple=indices, ref_emb=ref_out)
        elif use_mask and xbm:
            loss = loss_fn(out, y, indices, enqueue_mask=masks[rank])
        else:
            loss = loss_fn(out, y, indices, ref_out, ref_y)
        loss.backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def worker(rank, init, stack, failures):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        for dtype in (torch.float32, torch.float64):
            for config in CONFIGS:
                torch.manual_seed(0)
                model = ToyModel().to(dtype)
                start = {k: v.clone() for k, v in model.state_dict().items()}
                batches = data(config, dtype)
                single_process(model, stack, config, batches)
                got = one_rank(rank, stack, config, batches, start, dtype)
                for a, b in zip(got, model.parameters()):
                    b = b.detach()
                    pml_criterion = torch.allclose(a, b, rtol=1e-2)
                    tight = dtype != torch.float64 or torch.allclose(a, b, rtol=1e-9, atol=1e-9)
                    if not (pml_criterion and tight):
                        failures.append(f"rank {rank} {dtype} {config}: max diff {float((a - b).abs().max()):.3g}")
                        break
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank, init, stack, path):
    failures = []
    worker(rank, init, stack, failures)
    with open(f"{path}.{rank}", "w") as out:
        out.write("\n".join(failures))


@pytest.mark.parametrize("stack", list(STACKS))
def test_pml_distributed_configurations(stack, tmp_path):
    assert len(CONFIGS) == 17
    init = f"file://{tmp_path}/init"
    mp.start_processes(_run, args=(init, stack, str(tmp_path / "failures")), nprocs=WORLD,
                       start_method="spawn", join=True)
    failures = [line for rank in range(WORLD)
                for line in (tmp_path / f"failures.{rank}").read_text().splitlines()]
    assert not failures, "\n".join(failures)


def test_single_process_group(tmp_path):
    """PML's test_single_proc: at world size 1 the wrappers are the wrapped loss and miner."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        loss, miner = facekernels.ContrastiveLoss(), PairMarginMiner()
        emb, labels = torch.randn(32, 128), torch.randint(0, 3, (32,))
        got = DistributedLossWrapper(loss)(emb, labels, indices_tuple=DistributedMinerWrapper(miner)(emb, labels))
        assert got == loss(emb, indices_tuple=miner(emb, labels))
    finally:
        dist.destroy_process_group()
