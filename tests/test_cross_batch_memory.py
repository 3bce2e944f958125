"""facekernels.CrossBatchMemory against pytorch-metric-learning's, the contract: what PML's
tests/losses/test_cross_batch_memory.py checks (the queue, the memory-size-equals-batch
sanity check, the loss with and without inner and outer miners, enqueue masks), written
here from its behaviour, with our class swapped in for PML's, and PML's class itself as
the oracle of every loss value, over many batches that wrap the ring buffer."""

import pytest
import torch

import facekernels

pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is not installed")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

D, MEMORY = 16, 50  # 50 is no multiple of the batch sizes: the queue wraps mid-batch

LOSSES = {  # ours, PML's (the same arguments)
    "triplet": (lambda: facekernels.TripletMarginLoss(margin=0.2),
                lambda: pml_losses.TripletMarginLoss(margin=0.2)),
    "triplet_squared": (lambda: facekernels.TripletMarginLoss(margin=0.5, distance="squared_euclidean",
                                                              reducer="mean"),
                        None),  # compared with our own unfused path below
    "contrastive": (lambda: facekernels.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8),
                    lambda: pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8)),
}


def batches(count, size, seed, dtype=torch.float64, classes=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, D, generator=g, dtype=dtype), torch.randint(0, classes, (size,), generator=g))
            for _ in range(count)]


@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
@pytest.mark.parametrize("miner", [None, "triplet", "multi_similarity"])
@pytest.mark.parametrize("mask", [False, True])
def test_equals_pml_over_wrapping_batches(loss, miner, mask):
    """Loss values and gradients step by step, PML's own class as the oracle: fused (no
    miner) or PML's algorithm (a miner), with and without enqueue masks."""
    make_miner = {None: lambda: None,
                  "triplet": lambda: pml_miners.TripletMarginMiner(margin=0.3),
                  "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(0.2)}[miner]
    ours = facekernels.CrossBatchMemory(LOSSES[loss][0](), D, memory_size=MEMORY, miner=make_miner())
    theirs = pml_losses.CrossBatchMemory(LOSSES[loss][1](), D, memory_size=MEMORY, miner=make_miner())
    for step, (x, y) in enumerate(batches(12, 16, seed=1)):
        enqueue = (torch.arange(16) % 3 == step % 3) if mask and step % 2 else None
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = ours(a, y, enqueue_mask=enqueue), theirs(b, y, enqueue_mask=enqueue)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        got.backward(), want.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=f"step {step}")
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)


@pytest.mark.parametrize("name", ["triplet", "triplet_squared", "contrastive"])
def test_fused_path_equals_the_pair_path(device, name):
    """Our fused memory loss (ref_starts_with_batch: the triplet kernels with more columns
    than rows, emulated CUDA included) against the same loss on PML's explicit pairs."""
    fused = facekernels.CrossBatchMemory(LOSSES[name][0](), D, memory_size=MEMORY)
    explicit = facekernels.CrossBatchMemory(LOSSES[name][0](), D, memory_size=MEMORY)
    for x, y in batches(8, 16, seed=2):
        x, y = x.to(device), y.to(device)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        want = explicit(x, y, indices_tuple=(empty,) * 3)  # forces the pairs
        torch.testing.assert_close(fused(x, y), want, rtol=1e-10, atol=1e-12)


def test_queue_and_reset():
    """PML's test_queue: the write position advances by the batch size modulo memory_size
    and each batch sits at its slots, wrapping around; reset_queue empties the memory."""
    memory = facekernels.CrossBatchMemory(facekernels.ContrastiveLoss(), D, memory_size=MEMORY)
    for i, (x, y) in enumerate(batches(30, 16, seed=3)):
        start = memory.queue_idx
        assert start == (i * 16) % MEMORY
        memory(x, y)
        slots = torch.arange(start, start + 16) % MEMORY
        assert torch.equal(memory.embedding_memory[slots], x) and torch.equal(memory.label_memory[slots], y)
        assert torch.equal(memory.curr_batch_idx, slots)
    memory.reset_queue()
    assert memory.queue_idx == 0 and not memory.has_been_filled and not memory.embedding_memory.any()


@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_memory_of_one_batch_is_the_inner_loss(loss):
    """PML's sanity check: with memory_size == batch size the memory is the batch, and the
    loss is the inner loss of the batch (with a miner, of its mined tuples)."""
    for size in range(20, 40, 5):
        inner = LOSSES[loss][0]()
        memory = facekernels.CrossBatchMemory(inner, D, memory_size=size)
        miner = pml_miners.TripletMarginMiner(margin=0.1)
        with_miner = facekernels.CrossBatchMemory(inner, D, memory_size=size, miner=miner)
        for x, y in batches(5, size, seed=size, dtype=torch.float32, classes=4):
            torch.testing.assert_close(memory(x, y), inner(x, y))
            torch.testing.assert_close(with_miner(x, y), inner(x, y, miner(x, y)))


def test_input_indices_tuple_is_added_to_the_memory_pairs():
    """PML's test_input_indices_tuple: create_indices_tuple returns the memory's pairs (self
    comparisons removed) followed by the given tuple converted to pairs."""
    memory = facekernels.CrossBatchMemory(facekernels.ContrastiveLoss(), D, memory_size=MEMORY)
    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), D, memory_size=MEMORY)
    for x, y in batches(6, 16, seed=4, dtype=torch.float32):
        outer = pml_miners.TripletMarginMiner(margin=1.0)(x, y)
        for module in (memory, theirs):
            module.add_to_memory(x, y, len(x))
        got = memory.create_indices_tuple(x, y, memory.embedding_memory, memory.label_memory, outer, True)
        want = theirs.create_indices_tuple(x, y, theirs.embedding_memory, theirs.label_memory, outer, True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x, y: m(x, y, indices_tuple=(y, y, y), enqueue_mask=y > 0), ValueError,
     "indices_tuple and enqueue_mask are mutually exclusive"),
    (lambda m, x, y: m(x[:, :3], y), ValueError, r"embeddings must have 16 columns \(embedding_size\)"),
    (lambda m, x, y: m(x, y.double()), TypeError, "labels must be an integer tensor"),
    (lambda m, x, y: m(x, y, enqueue_mask=y), ValueError, "enqueue_mask must be a bool tensor"),
    (lambda m, x, y: m(torch.cat([x] * 4), torch.cat([y] * 4)), ValueError,
     "a batch of 64 rows does not fit a memory of 50"),
])
def test_bad_input_names_the_argument_and_leaves_the_memory(call, error, message):
    memory = facekernels.CrossBatchMemory(facekernels.ContrastiveLoss(), D, memory_size=MEMORY)
    x, y = batches(1, 16, seed=5)[0]
    memory(x, y)
    before = (memory.embedding_memory.clone(), memory.label_memory.clone(), memory.queue_idx)
    with pytest.raises(error, match=message):
        call(memory, x, y)
    assert torch.equal(before[0], memory.embedding_memory) and torch.equal(before[1], memory.label_memory)
    assert before[2] == memory.queue_idx


def test_constructor_checks():
    with pytest.raises(TypeError, match="loss must be a metric loss"):
        facekernels.CrossBatchMemory("triplet", D)
    with pytest.raises(ValueError, match="memory_size must be a positive int"):
        facekernels.CrossBatchMemory(facekernels.ContrastiveLoss(), D, memory_size=0)
