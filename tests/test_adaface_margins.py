"""facekernels::adaface_margins (AdaFace's per-row margins and running norm statistics)
against its reference twin: every dtype, rows with NaN or inf, batches past one block of the
CUDA kernel, eval mode, bad input, opcheck and torch.compile."""

import math

import pytest
import torch

from facekernels import reference
from facekernels.ops import adaface_margins
from conftest import TOLERANCES

H, MARGIN = 0.333, 0.4


def raw_embeddings(n, dim, dtype, device, seed=0):
    """Norms spread over [0, 120]: some clipped at 100, most inside the running range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    norms = torch.empty(n, 1, dtype=torch.float64).uniform_(0.0, 120.0, generator=g)
    return (x / x.norm(dim=1, keepdim=True) * norms).to(device, dtype)


def statistics(device, dtype=torch.float32, mean=20.0, std=100.0):
    return (torch.tensor([mean], dtype=dtype, device=device),
            torch.tensor([std], dtype=dtype, device=device))


def assert_matches_reference(x, mean, std, t_alpha, training):
    kept = mean.clone(), std.clone()
    got = adaface_margins(x, mean, std, H, MARGIN, t_alpha, training)
    expected = reference.adaface_margins(x, mean, std, h=H, margin=MARGIN, t_alpha=t_alpha,
                                         training=training)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.device == x.device
        # A half-precision buffer: the same double, rounded once (at most one step apart).
        tolerance = TOLERANCES.get(e.dtype, {"rtol": torch.finfo(e.dtype).eps, "atol": 0.0})
        torch.testing.assert_close(g, e, equal_nan=True, **tolerance)
    assert torch.equal(mean, kept[0]) and torch.equal(std, kept[1]), "the buffers were written"
    return got


# (300, 64): more rows than the CUDA kernel's block of 256 threads.
@pytest.mark.parametrize("n, dim", [(2, 1), (7, 5), (37, 128), (300, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(device, n, dim, dtype, training):
    x = raw_embeddings(n, dim, dtype, device)
    m2, m3, new_mean, new_std = assert_matches_reference(x, *statistics(device), 0.3, training)
    assert m2.isfinite().all() and m3.isfinite().all()
    assert (m2.abs() <= MARGIN).all() and torch.equal(m3, MARGIN - m2)
    assert (new_mean != 20.0).item() == training and (new_std != 100.0).item() == training


@pytest.mark.parametrize("buffer_dtype", [torch.float64, torch.float16])
def test_buffers_keep_their_dtype(device, buffer_dtype):
    x = raw_embeddings(16, 8, torch.float32, device)
    mean, std = statistics(device, buffer_dtype, 30.0, 10.0)
    assert_matches_reference(x, mean, std, 0.5, True)
    scalar_mean, scalar_std = mean.reshape(()), std.reshape(())  # a 0-d buffer stays 0-d
    assert_matches_reference(x, scalar_mean, scalar_std, 0.5, True)


def test_non_finite_rows_join_no_statistic(device):
    x = raw_embeddings(40, 16, torch.float32, device)
    x[3, 0], x[17, 5], x[30] = math.nan, math.inf, -math.inf
    m2, m3, new_mean, new_std = assert_matches_reference(x, *statistics(device), 0.5, True)
    bad = torch.zeros(40, dtype=torch.bool, device=device)
    bad[[3, 17, 30]] = True
    assert m2[bad].isnan().all() and m3[bad].isnan().all()
    assert m2[~bad].isfinite().all() and new_mean.isfinite().all() and new_std.isfinite().all()
    finite = x[~bad].double().norm(dim=1).clamp(0.001, 100.0)
    assert new_mean.item() == pytest.approx(0.5 * finite.mean().item() + 0.5 * 20.0, rel=1e-6)
    assert new_std.item() == pytest.approx(0.5 * finite.std().item() + 0.5 * 100.0, rel=1e-6)


def test_statistics_move_only_where_defined(device):
    # One finite row: a mean but no std. None: neither moves, and every margin is NaN.
    x = raw_embeddings(4, 3, torch.float32, device)
    x[1:] = math.nan
    _, _, new_mean, new_std = assert_matches_reference(x, *statistics(device), 0.5, True)
    assert new_mean.item() != 20.0 and new_std.item() == 100.0
    x[0] = math.nan
    m2, _, new_mean, new_std = assert_matches_reference(x, *statistics(device), 0.5, True)
    assert m2.isnan().all() and new_mean.item() == 20.0 and new_std.item() == 100.0


def test_hand_worked_example(device):
    # Norms 3 and 5 (t_alpha = 1: the batch's values): mean 4, std sqrt(2); z = h (n - 4) /
    # (sqrt(2) + 1e-3) for h = 1, margin = 0.5: m2 = -0.5 z, m3 = 0.5 + 0.5 z.
    x = torch.tensor([[3.0, 0.0], [0.0, 5.0]], device=device)
    m2, m3, mean, std = adaface_margins(x, *statistics(device), 1.0, 0.5, 1.0, True)
    z = 1.0 / (math.sqrt(2.0) + 1e-3)
    assert mean.item() == pytest.approx(4.0) and std.item() == pytest.approx(math.sqrt(2.0))
    assert m2.tolist() == pytest.approx([0.5 * z, -0.5 * z])
    assert m3.tolist() == pytest.approx([0.5 - 0.5 * z, 0.5 + 0.5 * z])


def test_bad_input_names_the_argument(device):
    x = raw_embeddings(4, 3, torch.float32, device)
    mean, std = statistics(device)
    op = torch.ops.facekernels.adaface_margins  # the C++ checks, past the Python ones
    cases = [
        (lambda: adaface_margins(x[:1], mean, std, H, MARGIN, 0.1, True), ValueError,
         "adaface_margins: a training batch needs at least 2 rows"),
        (lambda: op(x[:1], mean, std, H, MARGIN, 0.1, True), ValueError,
         "adaface_margins: a training batch needs at least 2 rows"),
        (lambda: adaface_margins(x, torch.zeros(2, device=device), std, H, MARGIN, 0.1, True),
         TypeError, "adaface_margins: mean must be a floating-point tensor of one value"),
        (lambda: op(x, mean, torch.zeros(2, device=device), H, MARGIN, 0.1, True), ValueError,
         "adaface_margins: std must hold one value"),
        (lambda: op(x, mean.long(), std, H, MARGIN, 0.1, True), TypeError,
         "adaface_margins: mean must be a floating-point tensor"),
        (lambda: adaface_margins(x, mean, std, -1.0, MARGIN, 0.1, True), ValueError,
         "adaface_margins: h must be a finite number"),
        (lambda: op(x, mean, std, H, MARGIN, 1.5, True), ValueError,
         r"adaface_margins: t_alpha must lie in \[0, 1\]"),
        (lambda: op(x[:, :0].T, mean, std, H, MARGIN, 0.1, False), ValueError,
         "adaface_margins: embeddings must hold at least one row"),
        (lambda: op(x[0], mean, std, H, MARGIN, 0.1, False), ValueError,
         "adaface_margins: embeddings must be 2-D"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    m2, _, new_mean, _ = adaface_margins(x[:1], mean, std, H, MARGIN, 0.1, False)
    assert m2.shape == (1,) and new_mean.item() == 20.0  # eval mode takes one row


def test_opcheck(device):
    x = raw_embeddings(11, 6, torch.float32, device)
    for training in (True, False):
        torch.library.opcheck(torch.ops.facekernels.adaface_margins,
                              (x, *statistics(device), H, MARGIN, 0.2, training))


def test_compiles_fullgraph():
    x = raw_embeddings(9, 4, torch.float32, "cpu")
    mean, std = statistics("cpu")
    compiled = torch.compile(adaface_margins, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, mean, std, H, MARGIN, 0.2, True),
                             adaface_margins(x, mean, std, H, MARGIN, 0.2, True)):
        assert torch.equal(got, expected)
