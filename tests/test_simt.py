"""The SIMT emulator itself (tests/simt.py, csrc/simt/), and the emulated CUDA kernels
against the CPU kernels on the same inputs at the shapes that hit a kernel's edges.

The device-parametrized tests elsewhere run the emulated kernels against the reference
twins; here both compiled implementations see identical inputs, op by op."""

import math

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


# --- emulated CUDA kernels vs CPU kernels ------------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# Sums run in another order (a tree per block instead of a loop per row): the accumulate
# type's rounding, or the storage dtype's where a gradient is stored in it.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def both(name, *args, **kwargs):
    cpu = getattr(torch.ops.facekernels, name)(*args, **kwargs)
    emulated = getattr(torch.ops.facekernels_simt, name)(*args, **kwargs)
    return cpu, emulated


def assert_same(cpu, emulated, dtype):
    for index, (a, b) in enumerate(zip(cpu, emulated)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {index}"
        if a.is_floating_point():
            torch.testing.assert_close(b, a, equal_nan=True, **TOLERANCES[dtype], msg=f"output {index}")
        else:
            assert torch.equal(a, b), f"output {index}"


def generator(seed):
    return torch.Generator().manual_seed(seed)


MARGIN_DEFAULTS = dict(scale=16.0, m1=1.0, m2=0.5, m3=0.0, sphere_lambda=0.0, margin_kind=0,
                       exact_gradient=True, normalize_embeddings=True, normalize_weight=True)
# name: (rows N, classes C, chunk_size, options). Threads stride over a chunk's classes,
# 256 to a block, one block per row.
MARGIN_CASES = {
    "one_row": (1, 5, 2, {}),
    "tail_chunk": (37, 300, 128, {}),
    "chunk_wider_than_a_block": (5, 700, 600, {}),
    "cosface": (9, 40, 16, dict(m2=0.0, m3=0.35)),
    "sphereface": (9, 40, 16, dict(m1=4.0, m2=0.0, sphere_lambda=5.0, margin_kind=1,
                                   normalize_embeddings=False, scale=1.0)),
    "detached": (9, 40, 16, dict(exact_gradient=False)),
    "unnormalized_embeddings": (9, 40, 16, dict(normalize_embeddings=False, scale=1.0)),
    "adaface": (9, 40, 16, dict(margin_kind=2, per_row=True)),
    "easy_margin": (9, 40, 16, dict(margin_kind=3)),
    "per_row_margins": (9, 40, 16, dict(per_row=True)),
    "sub_centers": (9, 40, 7, dict(sub_centers=3)),
    "rows": (9, 40, 7, dict(rows=True)),
    "class_shard": (9, 40, 16, dict(labels_in_range=False)),
    "interclass_filtering": (9, 40, 16, dict(interclass_filtering_threshold=0.1)),
    "curricularface": (9, 40, 16, dict(hard=True)),
}


def margin_inputs(case, dtype):
    n, c, chunk, options = MARGIN_CASES[case]
    options = {**MARGIN_DEFAULTS, **options}
    g = generator(len(case))
    k = options.get("sub_centers", 1)
    rows = None
    if options.pop("rows", False):
        rows = torch.randperm(3 * c, generator=g)[:c].sort().values
        weight_rows = 3 * c
    else:
        weight_rows = c * k
    x = torch.randn(n, 8, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(weight_rows, 8, generator=g, dtype=torch.float64).to(dtype)
    in_range = options.pop("labels_in_range", True)
    labels = torch.randint(0, c if in_range else 2 * c, (n,), generator=g)
    extra = dict(labels_in_range=in_range, rows=rows, chunk_size=chunk)
    if options.pop("per_row", False):
        extra["row_m2"] = 0.5 * torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
        extra["row_m3"] = 0.2 * torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    if options.pop("hard", False):
        extra["hard_threshold"] = torch.linspace(-0.3, 0.3, n, dtype=dtype)
        extra["hard_t"] = torch.full((n,), 0.2, dtype=dtype)
    return x, w, labels, {**options, **extra}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MARGIN_CASES)
def test_margin_softmax_matches_the_cpu_kernels(case, dtype):
    x, w, labels, options = margin_inputs(case, dtype)
    forward_only = {k: v for k, v in options.items() if k != "margins_grad"}
    cpu, emulated = both("margin_softmax_forward", x, w, labels, **forward_only)
    assert_same(cpu, emulated, dtype)
    if case != "class_shard":
        assert (cpu[4] >= 0).all()  # every row saw classes and predicted one
    row_max, log_sum = cpu[0], cpu[1]
    g = generator(7)
    grad_log_sum = torch.randn(len(x), generator=g, dtype=torch.float64).to(row_max.dtype)
    grad_target = torch.randn(len(x), generator=g, dtype=torch.float64).to(row_max.dtype)
    margins_grad = "row_m2" in options
    cpu, emulated = both("margin_softmax_backward", grad_log_sum, grad_target, x, w, labels,
                         row_max, log_sum, margins_grad=margins_grad,
                         **{k: v for k, v in options.items() if k != "labels_in_range"})
    assert_same(cpu, emulated, dtype)
    assert cpu[0].abs().sum() > 0 and cpu[1].abs().sum() > 0
    if margins_grad:
        assert cpu[2].abs().sum() > 0


def test_overflowing_logits_give_the_same_log_sum_exp_sequentially_and_in_a_tree():
    """normalize_embeddings=False with s |x| past the float range: logits of +inf. The CPU
    pushes a row's logits one by one, the emulated kernel merges 256 partial states."""
    x = torch.tensor([[3e38, 1e38, 0.0], [1.0, 2.0, 0.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.1]] * 80)
    options = {**MARGIN_DEFAULTS, "normalize_embeddings": False, "m2": 0.0, "chunk_size": 1000}
    cpu, emulated = both("margin_softmax_forward", x, w, torch.tensor([3, 1]), **options)
    assert cpu[0][0] == math.inf and cpu[1][0] == pytest.approx(math.log(240))
    assert_same(cpu, emulated, torch.float32)


# name: (anchors N, columns M or None for the batch itself, classes, rounding of distances,
# non-finite distances)
TRIPLET_CASES = {
    "one_anchor": (1, None, 1, None, False),
    "pairs_not_a_multiple_of_the_block": (37, 300, 6, None, False),
    "more_columns_than_threads": (300, None, 100, None, False),
    "tied_distances": (24, None, 4, 0.5, False),
    "nan_and_infinite_distances": (19, 53, 3, None, True),
}


def triplet_inputs(case, dtype):
    n, m, classes, rounding, non_finite = TRIPLET_CASES[case]
    g = generator(len(case))
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    if m is None:
        ref, ref_labels = x, labels
    else:
        ref = torch.randn(m, 8, generator=g, dtype=torch.float64)
        # Reference classes both shared with the anchors and not.
        ref_labels = torch.randint(0, classes + 2, (m,), generator=g)
    dist = torch.cdist(x, ref)
    if rounding:
        dist = (dist / rounding).round() * rounding
    if non_finite:  # every rule's window meets NaN, +inf and -inf as d_ap and as d_an
        cells = torch.randperm(dist.numel(), generator=g)[:3 * 12].view(3, 12)
        for cell, value in zip(cells, (math.nan, math.inf, -math.inf)):
            dist.view(-1)[cell] = value
    return dist.to(dtype), labels, ref_labels, m is None


MININGS = {"all": 0, "hard": 1, "semihard": 2, "easy": 3, "batch_hard": 4, "facenet": 5, "every": 6}


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("case, dtype", [
    (case, dtype) for case in TRIPLET_CASES for dtype in DTYPES
    # One dtype is enough for the largest shape.
    if case != "more_columns_than_threads" or dtype == torch.float32
], ids=str)
def test_triplet_kernels_match_the_cpu_kernels(case, mining, dtype):
    dist, labels, ref_labels, self_ref = triplet_inputs(case, dtype)
    for smooth in (False, True):
        cpu, emulated = both("triplet_margin_forward", dist, labels, ref_labels, 0.2,
                             MININGS[mining], self_ref, smooth)
        assert_same(cpu, emulated, dtype)
    if mining != "every":
        cpu, emulated = both("triplet_mine", dist, labels, ref_labels, 0.2, MININGS[mining], self_ref)
        assert_same(cpu, emulated, dtype)
        if case != "one_anchor" and mining in ("all", "batch_hard", "facenet"):
            assert len(cpu[0]) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("self_ref, squared", [(True, False), (True, True), (False, False)])
def test_distance_kernels_match_the_cpu_kernels(dtype, self_ref, squared):
    """One element math on both devices, the ATen parts alike: equal, bit for bit."""
    g = generator(3)
    x = torch.nn.functional.normalize(torch.randn(37, 16, generator=g, dtype=torch.float64), dim=1)
    x[5] = x[2]  # distance 0 off the diagonal
    x[7] = torch.nn.functional.normalize(x[3] + 1e-3 * torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    x[11, 4] = math.nan
    x = x.to(dtype)
    # Another reference set that shares rows with x: its close pairs are refined too.
    ref = x if self_ref else torch.cat([x[:9], torch.randn(291, 16, generator=g, dtype=dtype)])
    dist, emulated = both("pairwise_distance", x, ref, self_ref, squared)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(emulated, dist, **exact)
    assert dist.isnan().any() and (dist == 0).sum() > (len(x) if self_ref else 0)
    grad = torch.randn(dist.shape, generator=g, dtype=torch.float64).to(dtype)
    for cpu_grad, emulated_grad in zip(*both("pairwise_distance_backward", grad, dist, x, ref, squared)):
        torch.testing.assert_close(emulated_grad, cpu_grad, **exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, dim", [(1, 5), (37, 300)])
def test_center_loss_matches_the_cpu_kernels(n, dim, dtype):
    g = generator(n)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    centers = torch.randn(50, dim, generator=g, dtype=torch.float64).to(dtype)
    # Repeated classes and absent ones.
    labels = torch.tensor([3, 7, 7, 40, 3, 3, 12, 49][: n] * 5)[:n]
    for update in (False, True):
        cpu, emulated = both("center_loss_forward", x, labels, centers, 0.5, update)
        assert_same(cpu, emulated, dtype)
    grad = torch.tensor(1.5, dtype=cpu[0].dtype)
    for centers_grad in (False, True):
        cpu_b, emulated_b = both("center_loss_backward", grad, cpu[1], labels, 50, centers_grad)
        assert_same(cpu_b, emulated_b, dtype)


@pytest.mark.parametrize("library", ["facekernels", "facekernels_simt"])
@pytest.mark.parametrize("argument", ["grad_log_sum", "grad_target", "row_max", "log_sum"])
def test_backward_refuses_row_statistics_from_another_device(library, argument):
    """The kernels read these through raw pointers: one on another device than the
    embeddings (a CPU tensor given to the CUDA kernel) is an error naming it. The kernel is
    called directly, as the dispatcher would call the CUDA kernel on a GPU machine."""
    x, w, labels, options = margin_inputs("tail_chunk", torch.float32)
    row_max, log_sum = torch.ops.facekernels.margin_softmax_forward(x, w, labels, **options)[:2]
    args = dict(grad_log_sum=torch.ones(len(x)), grad_target=torch.ones(len(x)),
                row_max=row_max, log_sum=log_sum)
    args[argument] = args[argument].to("meta")
    kernel = getattr(torch.ops, library).margin_softmax_backward.default
    options.pop("labels_in_range")
    with pytest.raises(ValueError, match=f"margin_softmax_loss: {argument} is on meta but embeddings are on cpu"):
        kernel.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), args["grad_log_sum"],
                          args["grad_target"], x, w, labels, args["row_max"], args["log_sum"], **options)
