"""The CUDA kernels against the CPU kernels on the same inputs, op by op, at the shapes that
hit a kernel's edges: emulated on the CPU ("simt", tests/simt.py) wherever the emulator is
on, and on the GPU ("cuda") wherever there is one.

The device-parametrized tests elsewhere hold each device to the reference twins; here both
compiled implementations see identical inputs."""

import math

import pytest
import torch

import facekernels  # noqa: F401  (loads torch.ops.facekernels)
import simt

TARGETS = (["simt"] if simt.enabled else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not TARGETS, reason="no CUDA kernels here: FACEKERNELS_SIMT=0 and no GPU")

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# Sums run in another order (a tree per block instead of a loop per row; on a GPU, cuBLAS's
# GEMMs): the accumulate type's rounding, or the storage dtype's where a gradient is stored
# in it.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _outputs(result, args):
    """An op's outputs as a tuple; an in-place op's (it returns nothing): its first argument."""
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(result) if result else (args[0],)


@pytest.fixture(params=TARGETS or [None])
def both(request):
    """both(op, *args, **kwargs) -> (the CPU kernel's outputs, the CUDA kernel's outputs on
    the CPU), from CPU inputs; the CUDA kernel gets copies of them, taken before either runs
    (emulated: clones; on the GPU: the inputs moved there)."""
    target = request.param
    if target == "simt":
        request.getfixturevalue("simt_library")
        torch.ops.facekernels_simt.set_seed(simt.seed_for(request.node.nodeid))
    library = torch.ops.facekernels_simt if target == "simt" else torch.ops.facekernels

    def copy(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.clone() if target == "simt" else value.to("cuda")

    def run(name, *args, **kwargs):
        copies, copied_kwargs = [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}
        cpu = _outputs(getattr(torch.ops.facekernels, name)(*args, **kwargs), args)
        cuda = _outputs(getattr(library, name)(*copies, **copied_kwargs), copies)
        return cpu, tuple(t.cpu() for t in cuda)

    run.target = target
    return run


def assert_same(cpu, cuda, dtype):
    for index, (a, b) in enumerate(zip(cpu, cuda)):
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
def test_margin_softmax_matches_the_cpu_kernels(case, dtype, both):
    x, w, labels, options = margin_inputs(case, dtype)
    forward_only = {k: v for k, v in options.items() if k != "margins_grad"}
    cpu, cuda = both("margin_softmax_forward", x, w, labels, **forward_only)
    assert_same(cpu, cuda, dtype)
    if case != "class_shard":
        assert (cpu[4] >= 0).all()  # every row saw classes and predicted one
    row_max, log_sum = cpu[0], cpu[1]
    g = generator(7)
    grad_log_sum = torch.randn(len(x), generator=g, dtype=torch.float64).to(row_max.dtype)
    grad_target = torch.randn(len(x), generator=g, dtype=torch.float64).to(row_max.dtype)
    margins_grad = "row_m2" in options
    cpu, cuda = both("margin_softmax_backward", grad_log_sum, grad_target, x, w, labels,
                         row_max, log_sum, margins_grad=margins_grad,
                         **{k: v for k, v in options.items() if k != "labels_in_range"})
    assert_same(cpu, cuda, dtype)
    assert cpu[0].abs().sum() > 0 and cpu[1].abs().sum() > 0
    if margins_grad:
        assert cpu[2].abs().sum() > 0


def test_overflowing_logits_give_the_same_log_sum_exp_sequentially_and_in_a_tree(both):
    """normalize_embeddings=False with s |x| past the float range: logits of +inf. The CPU
    pushes a row's logits one by one, the CUDA kernel merges 256 partial states."""
    x = torch.tensor([[3e38, 1e38, 0.0], [1.0, 2.0, 0.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.1]] * 80)
    options = {**MARGIN_DEFAULTS, "normalize_embeddings": False, "m2": 0.0, "chunk_size": 1000}
    cpu, cuda = both("margin_softmax_forward", x, w, torch.tensor([3, 1]), **options)
    assert cpu[0][0] == math.inf and cpu[1][0] == pytest.approx(math.log(240))
    assert_same(cpu, cuda, torch.float32)


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
def test_triplet_kernels_match_the_cpu_kernels(case, mining, dtype, both):
    dist, labels, ref_labels, self_ref = triplet_inputs(case, dtype)
    for smooth in (False, True):
        cpu, cuda = both("triplet_margin_forward", dist, labels, ref_labels, 0.2,
                             MININGS[mining], self_ref, smooth)
        assert_same(cpu, cuda, dtype)
    if mining != "every":
        cpu, cuda = both("triplet_mine", dist, labels, ref_labels, 0.2, MININGS[mining], self_ref)
        assert_same(cpu, cuda, dtype)
        if case != "one_anchor" and mining in ("all", "batch_hard", "facenet"):
            assert len(cpu[0]) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("self_ref, squared", [(True, False), (True, True), (False, False)])
def test_distance_kernels_match_the_cpu_kernels(dtype, self_ref, squared, both):
    """One element math on both devices: emulated, with the ATen parts alike, equal bit for
    bit; on a GPU, within the rounding that cuBLAS's GEMM leaves."""
    g = generator(3)
    x = torch.nn.functional.normalize(torch.randn(37, 16, generator=g, dtype=torch.float64), dim=1)
    x[5] = x[2]  # distance 0 off the diagonal
    x[7] = torch.nn.functional.normalize(x[3] + 1e-3 * torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    x[11, 4] = math.nan
    x = x.to(dtype)
    # Another reference set that shares rows with x: its close pairs are refined too.
    ref = x if self_ref else torch.cat([x[:9], torch.randn(291, 16, generator=g, dtype=dtype)])
    (dist,), (cuda,) = both("pairwise_distance", x, ref, self_ref, squared)
    exact = dict(rtol=0, atol=0) if both.target == "simt" else TOLERANCES[dtype]
    torch.testing.assert_close(cuda, dist, equal_nan=True, **exact)
    assert dist.isnan().any() and (dist == 0).sum() > (len(x) if self_ref else 0)
    grad = torch.randn(dist.shape, generator=g, dtype=torch.float64).to(dtype)
    for cpu_grad, cuda_grad in zip(*both("pairwise_distance_backward", grad, dist, x, ref, squared)):
        torch.testing.assert_close(cuda_grad, cpu_grad, equal_nan=True, **exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, dim", [(1, 5), (37, 300)])
def test_center_loss_matches_the_cpu_kernels(n, dim, dtype, both):
    g = generator(n)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    centers = torch.randn(50, dim, generator=g, dtype=torch.float64).to(dtype)
    # Repeated classes and absent ones.
    labels = torch.tensor([3, 7, 7, 40, 3, 3, 12, 49][: n] * 5)[:n]
    for update in (False, True):
        cpu, cuda = both("center_loss_forward", x, labels, centers, 0.5, update)
        assert_same(cpu, cuda, dtype)
    grad = torch.tensor(1.5, dtype=cpu[0].dtype)
    for centers_grad in (False, True):
        cpu_b, cuda_b = both("center_loss_backward", grad, cpu[1], labels, 50, centers_grad)
        assert_same(cpu_b, cuda_b, dtype)
    cpu_c, cuda_c = both("center_loss_update_", centers.clone(), labels, cpu[2])
    assert_same(cpu_c, cuda_c, dtype)
    assert not torch.equal(cpu_c[0], centers)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, training", [(1, False), (37, True), (300, True)])
def test_adaface_margins_match_the_cpu_kernel(n, training, dtype, both):
    """Norms one row per thread, then one block strides over the rows for the batch's moments
    and the margins (300 rows: past its 256 threads), a NaN row left out of the moments."""
    x = (3 * torch.randn(n, 24, generator=generator(n), dtype=torch.float64)).to(dtype)
    if n > 1:
        x[n // 2, 5] = math.nan
    cpu, cuda = both("adaface_margins", x, torch.tensor([20.0]), torch.tensor([100.0]), 0.333, 0.4,
                     0.01, training)
    assert_same(cpu, cuda, dtype)
    assert cpu[0].isfinite().sum() == n - (n > 1)


@pytest.mark.skipif(not simt.enabled, reason="FACEKERNELS_SIMT=0")
@pytest.mark.parametrize("library", ["facekernels", "facekernels_simt"])
@pytest.mark.parametrize("argument", ["grad_log_sum", "grad_target", "row_max", "log_sum"])
def test_backward_refuses_row_statistics_from_another_device(library, argument, simt_library):
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
