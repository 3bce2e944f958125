"""DistributedLossWrapper / DistributedMinerWrapper on gloo process groups spawned on the CPU
(world sizes 2 and 3), against pytorch-metric-learning's own wrappers on the same per-rank
data (fp64 loss values and local gradients), against single-process oracles where PML's
wrappers cannot go (unequal local batches, ref_emb with efficient=True, a sub-group), and for
collective errors. One process group per world size runs every check in turn; each check is
reported as its own test."""

import importlib.util
import json
import multiprocessing
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import facekernels
from facekernels.distributed.metric import DistributedLossWrapper, DistributedMinerWrapper

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None
N, D, CLASSES = 6, 4, 3  # local batch, width, identities
WORLDS = (2, 3)


def local_data(rank, size=N, seed=0, dim=D):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return (torch.randn(size, dim, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (size,), generator=g))


def gathered(tensors, rank):
    """PML's gathered order: this rank's part first, then the others' in rank order."""
    return torch.cat([tensors[rank]] + [t for r, t in enumerate(tensors) if r != rank])


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def step(loss_wrapper, miner_wrapper, emb, labels, **refs):
    """(loss, local gradient, mined indices or None) of one forward and backward."""
    x = emb.clone().requires_grad_()
    indices = None if miner_wrapper is None else miner_wrapper(x, labels)
    loss = loss_wrapper(x, labels, indices, **refs)
    loss.backward()
    return loss.detach(), x.grad, indices


# The contrastive loss averages over all its terms, so that zero terms, such as those of a
# row with its own copy, change the value; the miner's margin keeps triplets (i, i, n).
def fk_loss(kind):
    return facekernels.TripletMarginLoss(margin=0.2) if kind == "triplet" else \
        facekernels.ContrastiveLoss(reducer="mean")


def pml_loss(kind):
    from pytorch_metric_learning import losses, reducers
    return losses.TripletMarginLoss(margin=0.2) if kind == "triplet" else \
        losses.ContrastiveLoss(reducer=reducers.MeanReducer())


MINER_MARGIN = 1.0


# ---- checks run on every rank of a spawned group, in this order -----------------------------

def bad_labels_on_one_rank(rank, world):
    emb, labels = local_data(rank)
    bad = rank == world - 1
    if bad:
        labels = labels.double()
    for wrapper in (DistributedLossWrapper(facekernels.ContrastiveLoss()),
                    DistributedMinerWrapper(facekernels.TripletMiner())):
        # A wrong type is a TypeError where it arose, as in one process.
        with pytest.raises(TypeError if bad else ValueError, match="labels must be an integer tensor"
                           if bad else rf"the input of rank\(s\) \[{world - 1}\] was rejected"):
            wrapper(emb, labels)


def widths_differ(rank, world):
    emb, labels = local_data(rank, dim=D if rank == 0 else D + 1)
    with pytest.raises(ValueError, match=r"embedding widths differ: \[4, 5"):
        DistributedLossWrapper(facekernels.TripletMarginLoss(), efficient=True)(emb, labels)


def loss_raises_on_one_rank(rank, world):
    emb, labels = local_data(rank)
    bad = rank == world - 1
    index = torch.tensor([100 if bad else 0])
    with pytest.raises(ValueError if bad else RuntimeError,
                       match="must lie in" if bad else rf"rank\(s\) \[{world - 1}\] raised"):
        DistributedLossWrapper(facekernels.ContrastiveLoss())(emb, labels, (index, index, index))
    # The group is still in step: a good call right after works on every rank.
    assert torch.isfinite(DistributedLossWrapper(facekernels.ContrastiveLoss())(emb, labels))


def pml_parity(kind, efficient, mined):
    """Our wrappers around our loss and miner, and around PML's, equal PML's wrappers around
    PML's: loss value, local gradient, mined indices; labels of other integer dtypes."""

    def check(rank, world):
        from pytorch_metric_learning import miners
        from pytorch_metric_learning.utils import distributed as pml

        emb, labels = local_data(rank, seed=1)

        def run(loss_wrapper, miner_wrapper, loss, miner, label_dtype):
            return step(loss_wrapper(loss, efficient=efficient),
                        miner_wrapper(miner, efficient=efficient) if mined else None,
                        emb, labels.to(label_dtype))

        want = run(pml.DistributedLossWrapper, pml.DistributedMinerWrapper, pml_loss(kind),
                   miners.TripletMarginMiner(margin=MINER_MARGIN), torch.int64)
        ours = run(DistributedLossWrapper, DistributedMinerWrapper, fk_loss(kind),
                   facekernels.TripletMiner(margin=MINER_MARGIN), torch.int32)
        wrapping_pml = run(DistributedLossWrapper, DistributedMinerWrapper, pml_loss(kind),
                           miners.TripletMarginMiner(margin=MINER_MARGIN), torch.int16)
        values = [torch.empty(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(values, ours[0].reshape(1))
        for got in (ours, wrapping_pml):
            close(got[0], want[0])
            close(got[1], want[1])
            if mined:
                assert all(torch.equal(g, w) for g, w in zip(got[2], want[2]))
        assert want[0] > 0 and (not mined or len(want[2][0]) > 0)  # a case with something to compare
        if not efficient:  # the loss of the whole batch: one value on every rank
            close(torch.cat(values), values[0].expand(world))

    return check


def unequal_batches(rank, world):
    """Local batches of 3, 5, 7 rows: PML's wrappers need equal sizes, so the oracle is PML's
    loss and miner on the gathered batch, with its own utilities for the efficient pairs."""
    from pytorch_metric_learning import miners
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    data = [local_data(r, size=3 + 2 * r, seed=2) for r in range(world)]
    emb, labels = data[rank]
    all_emb = gathered([e for e, _ in data], rank)
    all_labels = gathered([y for _, y in data], rank)
    n = len(emb)
    for kind in ("triplet", "contrastive"):
        for efficient in (False, True):
            got = step(DistributedLossWrapper(fk_loss(kind), efficient=efficient), None, emb, labels)
            x = emb.clone().requires_grad_()
            everyone = torch.cat([x, all_emb[n:]])
            if efficient:
                pairs = lmu.remove_self_comparisons(lmu.get_all_pairs_indices(labels, all_labels),
                                                    torch.arange(n), len(all_labels))
                want = pml_loss(kind)(x, labels, pairs, everyone, all_labels) * world
            else:
                want = pml_loss(kind)(everyone, all_labels) * world
            want.backward()
            close(got[0], want.detach())
            close(got[1], x.grad)
    miner = miners.TripletMarginMiner(margin=MINER_MARGIN)
    mined = DistributedMinerWrapper(facekernels.TripletMiner(margin=MINER_MARGIN))(emb, labels)
    assert all(torch.equal(g, w) for g, w in zip(mined, miner(all_emb, all_labels)))
    mined = DistributedMinerWrapper(facekernels.TripletMiner(margin=MINER_MARGIN), efficient=True)(emb, labels)
    want = lmu.remove_self_comparisons(miner(emb, labels, all_emb, all_labels), torch.arange(n), len(all_labels))
    assert all(torch.equal(g, w) for g, w in zip(mined, want))


def reference_set(rank, world):
    """ref_emb / ref_labels of 4 rows per rank, both modes, as PML's wrapper: with
    efficient=True the positive pair (anchor i, reference row i) is dropped, as PML does."""
    from pytorch_metric_learning.utils import distributed as pml

    emb, labels = local_data(rank, seed=3)
    ref, ref_labels = local_data(rank, size=4, seed=4)
    results = []
    for efficient in (False, True):
        for wrapper, loss in ((pml.DistributedLossWrapper, pml_loss("contrastive")),
                              (DistributedLossWrapper, fk_loss("contrastive"))):
            r = ref.clone().requires_grad_()
            loss, grad, _ = step(wrapper(loss, efficient=efficient), None, emb, labels.int(),
                                 ref_emb=r, ref_labels=ref_labels)
            results.append((loss, grad, r.grad))
    for want, got in (results[0:2], results[2:4]):
        for a, b in zip(got, want):
            close(a, b)


def sub_group(rank, world):
    """process_group=ranks {0, 1}: the loss of their two batches, times 2."""
    group = dist.new_group([0, 1])  # called on every rank, as torch requires
    if rank > 1:
        return
    data = [local_data(r, seed=5) for r in (0, 1)]
    emb, labels = data[rank]
    got = step(DistributedLossWrapper(fk_loss("contrastive"), process_group=group), None, emb, labels)
    x = emb.clone().requires_grad_()
    want = fk_loss("contrastive")(torch.cat([x, data[1 - rank][0]]), gathered([y for _, y in data], rank)) * 2
    want.backward()
    close(got[0], want.detach())
    close(got[1], x.grad)


CHECKS = {"bad_labels_on_one_rank": bad_labels_on_one_rank, "widths_differ": widths_differ,
          "loss_raises_on_one_rank": loss_raises_on_one_rank, "sub_group": sub_group}
PML_CHECKS = {f"pml_{kind}_{'efficient' if efficient else 'gathered'}{'_mined' if mined else ''}":
              pml_parity(kind, efficient, mined)
              for kind in ("triplet", "contrastive") for efficient in (False, True) for mined in (False, True)}
PML_CHECKS.update(unequal_batches=unequal_batches, reference_set=reference_set)


def worker(rank, world, init, out_dir, names):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    results = {}
    try:
        for name in names:
            try:
                {**CHECKS, **PML_CHECKS}[name](rank, world)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=lambda world: f"world{world}")
def outcomes(request, tmp_path_factory):
    """{rank: {check: None or the traceback}} of one spawned group running every check."""
    world, out_dir = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    names = list(CHECKS) + (list(PML_CHECKS) if HAVE_PML else [])
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker, args=(rank, world, f"file://{out_dir}/init",
                                                      str(out_dir), names))
                 for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 90
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0))
    for process in processes:
        if process.is_alive():
            process.kill()
    outcome = {}
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        outcome[rank] = json.loads(path.read_text()) if path.exists() else {}
    return outcome


@pytest.mark.parametrize("check", list(CHECKS) + list(PML_CHECKS))
def test_on_every_rank(outcomes, check):
    if check in PML_CHECKS and not HAVE_PML:
        pytest.skip("pytorch-metric-learning is not installed (the oracle)")
    for rank, results in outcomes.items():
        assert check in results, f"rank {rank} did not report {check} (crashed or hung past 90 s)"
        assert results[check] is None, f"rank {rank}:\n{results[check]}"


def test_not_initialized():
    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    emb, labels = local_data(0)
    for wrapper in (DistributedLossWrapper(facekernels.TripletMarginLoss()),
                    DistributedMinerWrapper(facekernels.TripletMiner())):
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            wrapper(emb, labels)


def test_one_rank_is_the_wrapped_loss(tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        emb, labels = local_data(0)
        miner, loss = facekernels.TripletMiner(), facekernels.TripletMarginLoss(margin=0.2)
        for efficient in (False, True):
            mined = DistributedMinerWrapper(miner, efficient)(emb, labels)
            assert all(torch.equal(g, w) for g, w in zip(mined, miner(emb, labels)))
            close(DistributedLossWrapper(loss, efficient)(emb, labels), loss(emb, labels))
    finally:
        dist.destroy_process_group()


def test_wrapped_object_is_checked():
    with pytest.raises(TypeError, match="must be a metric loss"):
        DistributedLossWrapper("triplet")
    with pytest.raises(TypeError, match="miner must be called as"):
        DistributedMinerWrapper(None)
    with pytest.raises(ValueError, match="efficient=True does not apply to a CrossBatchMemory"):
        DistributedLossWrapper(facekernels.CrossBatchMemory(facekernels.ContrastiveLoss(), D), efficient=True)
