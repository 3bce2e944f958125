"""The SIMT emulator itself (tests/simt.py, csrc/simt/). The emulated kernels against the
CPU kernels: tests/test_cuda_kernels.py."""

import pytest
import torch

import facekernels  # noqa: F401  (loads torch.ops.facekernels)
import simt

pytestmark = pytest.mark.skipif(not simt.enabled, reason="FACEKERNELS_SIMT=0")

THREADS = 64  # the self-test kernels' BlockReduce width
INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module", autouse=True)
def library(simt_library, request):
    torch.ops.facekernels_simt.set_seed(simt.seed_for(request.node.nodeid))


def selftest(kernel, grid=3, block=THREADS):
    return torch.ops.facekernels_simt.selftest(kernel, grid, block)


# --- the emulator ------------------------------------------------------------------------


def test_block_reduce_result_is_valid_in_thread_zero_only():
    out = selftest("reduce").view(2, -1)[0].view(3, THREADS)
    total = THREADS * (THREADS + 1) / 2
    assert (out[:, 0] == total).all()
    # cub leaves the other threads' result undefined: the emulator hands them random bytes.
    others = out[:, 1:]
    assert (others != total).float().mean() > 0.9


def test_shared_memory_is_per_block_and_visible_after_a_barrier():
    out = selftest("shared", grid=5).view(2, -1)[0].view(5, THREADS)
    assert torch.equal(out, (torch.arange(5, dtype=torch.float64) + 0.5)[:, None].expand(5, THREADS))


def test_reusing_temp_storage_without_a_barrier_is_an_error():
    with pytest.raises(RuntimeError, match=r"TempStorage is reused before a __syncthreads\(\)"):
        selftest("reuse")
    out = selftest("reuse_synced").view(2, -1)[0]
    assert (out[:3] == 3 * THREADS).all()


def test_a_barrier_reached_by_some_threads_only_is_an_error():
    with pytest.raises(RuntimeError, match=r"reached by 63 of 64 threads; the others had exited"):
        selftest("early_exit")
    with pytest.raises(RuntimeError, match=r"at another one"):
        selftest("divergent_barrier")


def test_block_reduce_checks_the_block_size_it_was_written_for():
    with pytest.raises(RuntimeError, match=r"instantiated for 64 threads but the block has 32"):
        selftest("reduce", block=32)


@pytest.mark.parametrize("grid, block", [
    (0, THREADS),                # no block
    (3, 0),                      # no thread
    (3, 1025),                   # more threads than a block holds
    (INT32_MAX + 1, THREADS),    # grid x past 2^31 - 1
    (2**32 + 3, THREADS),        # a 64-bit count that a dim3 would truncate to 3
])
def test_a_launch_the_driver_refuses_is_an_invalid_configuration(grid, block):
    with pytest.raises(RuntimeError, match=r"CUDA error: invalid configuration argument"):
        selftest("shared", grid=grid, block=block)
    selftest("shared")  # the error was read: the next launch runs


def test_an_unchecked_launch_error_surfaces_at_the_next_launch():
    with pytest.raises(RuntimeError, match=r"launched after an earlier launch failed unchecked"):
        selftest("unchecked")
    selftest("shared")


def order(seed, grid=4, block=THREADS):
    torch.ops.facekernels_simt.set_seed(seed)
    log = selftest("order", grid=grid, block=block)[: 2 * grid * block].view(grid, 2, block)
    return log.long()


def test_blocks_and_threads_run_in_a_seeded_random_order():
    first, again, other = order(1), order(1), order(2)
    assert torch.equal(first, again)  # the seed replays the schedule
    assert not torch.equal(first, other)
    # Blocks run one at a time, in a shuffled order; within a block, each phase between
    # barriers runs every thread once, in a new order after the barrier.
    blocks = first[:, 0, 0] // THREADS
    assert sorted(blocks.tolist()) == [0, 1, 2, 3] and blocks.tolist() != [0, 1, 2, 3]
    for b in range(4):
        before, after = first[b, 0] % THREADS, first[b, 1] % THREADS
        assert sorted(before.tolist()) == list(range(THREADS))
        assert sorted(after.tolist()) == list(range(THREADS))
        assert not torch.equal(before, after)


def test_the_device_fixture_runs_the_emulated_kernels(device, request):
    before = torch.ops.facekernels_simt.launch_count()
    x, y = torch.randn(6, 4, device=device), torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    torch.ops.facekernels.triplet_mine(torch.cdist(x, x), y, y, 0.2, 0, True)
    emulated = request.node.callspec.params["device"] == "simt"
    assert (torch.ops.facekernels_simt.launch_count() > before) == emulated
