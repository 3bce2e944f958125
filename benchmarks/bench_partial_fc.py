"""The class-sharded head on CPU gloo process groups: facekernels.distributed.PartialFC
against the insightface-style head (reference.partial_fc_v2_loss: global_batch x
local_classes logits), forward + backward, C = 200K classes, D = 128, global N = 512.
This process is rank 0 (timed by pytest-benchmark, its peak memory recorded); the other
ranks are spawned and run the same calls. World sizes 1, 2 and 4 show how the per-rank
memory falls; at world size 2, every head that PartialFC shards against the same dense
ArcFace shard (insightface has none of the adaptive heads sharded).

    pytest benchmarks/bench_partial_fc.py --benchmark-only
"""

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import facekernels
from facekernels import reference
from facekernels.distributed import PartialFC

C, D, N = 200_000, 128, 512
MARGINS = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)
# measure() calls a step 8 times: its warm-up, the memory reading, pedantic's warm-up round
# and 5 timed rounds. The spawned ranks make the same 8 calls.
CALLS = 8
# The margin_loss of each impl (PartialFC reads its options only: one class is enough).
HEADS = {
    "facekernels": lambda: facekernels.ArcFaceLoss(1, D, margin=0.5, gradient="detached"),
    "insightface_style": lambda: facekernels.ArcFaceLoss(1, D, margin=0.5, gradient="detached"),
    "curricularface": lambda: facekernels.CurricularFaceLoss(1, D),
    "adaface": lambda: facekernels.AdaFaceLoss(1, D),
    "magface": lambda: facekernels.MagFaceLoss(1, D),
    "subcenter_k3": lambda: facekernels.SubCenterArcFaceLoss(1, D, k=3),
    "elasticface_plus": lambda: facekernels.ElasticFaceLoss(1, D, plus=True),
}


def make_step(impl, rank, world):
    torch.manual_seed(rank)
    head = PartialFC(HEADS[impl](), D, C)
    x = torch.randn(N // world, D, requires_grad=True)
    y = torch.randint(0, C, (N // world,))
    if impl != "insightface_style":
        loss_fn = lambda: head(x, y)  # noqa: E731
    else:
        loss_fn = lambda: reference.partial_fc_v2_loss(x, y, head.weight, head.class_start, **MARGINS)  # noqa: E731

    def step():
        x.grad = head.weight.grad = None
        loss_fn().backward()

    return step


def other_rank(index, world, init, impl):
    rank = index + 1  # this process is rank 0
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    step = make_step(impl, rank, world)
    for _ in range(CALLS):
        step()
    dist.destroy_process_group()


def run_ranks(benchmark, measure, impl, world):
    init = f"file://{tempfile.mkdtemp()}/init"
    others = mp.start_processes(other_rank, args=(world, init, impl), nprocs=world - 1, join=False,
                                start_method="spawn") if world > 1 else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per rank, as a GPU per rank
    try:
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=world)
        step = make_step(impl, 0, world)
        measure(step, torch.device("cpu"), impl)
        benchmark.extra_info["world_size"] = world
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        if others is not None:
            others.join()


@pytest.mark.parametrize("impl", ["facekernels", "insightface_style"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_partial_fc(benchmark, measure, impl, world):
    benchmark.group = f"PartialFC fwd+bwd cpu C={C // 1000}K D={D} global N={N} world={world}"
    run_ranks(benchmark, measure, impl, world)


@pytest.mark.parametrize("impl", [impl for impl in HEADS if impl != "facekernels"])
def test_partial_fc_heads(benchmark, measure, impl):
    """Each head under PartialFC at world size 2 against the dense ArcFace shard."""
    benchmark.group = f"PartialFC heads fwd+bwd cpu C={C // 1000}K D={D} global N={N} world=2"
    run_ranks(benchmark, measure, impl, 2)
