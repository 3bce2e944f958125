import pytest
import torch

import facekernels
from facekernels import reference
from conftest import assert_close, assert_no_worse_than_reference


def make_batch(n, dim, num_classes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centers = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    return x.to(device, dtype), labels.to(device), centers.to(device, dtype)


SHAPES = [(1, 3, 1), (7, 5, 3), (37, 64, 10), (64, 33, 500), (130, 128, 4)]


@pytest.mark.parametrize("n, dim, num_classes", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_gradients_match_reference(device, n, dim, num_classes, dtype):
    x, labels, centers = make_batch(n, dim, num_classes, device, dtype)
    x_k, c_k = x.clone().requires_grad_(), centers.clone().requires_grad_()
    x_r, c_r = x.clone().requires_grad_(), centers.clone().requires_grad_()

    loss = facekernels.center_loss(x_k, labels, c_k)
    expected = reference.center_loss(x_r, labels, c_r)
    assert loss.dtype == dtype and loss.shape == ()
    assert_close(loss, expected)

    grad = torch.rand((), dtype=dtype, device=device) + 0.5
    loss.backward(grad)
    expected.backward(grad)
    assert_close(x_k.grad, x_r.grad)
    assert_close(c_k.grad, c_r.grad)


def test_gradcheck_fp64():
    x, labels, centers = make_batch(9, 4, 3, "cpu", torch.float64)
    labels[:3] = 1  # a class with several members
    x.requires_grad_()
    centers.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, c: facekernels.center_loss(x, labels, c), (x, centers)
    )


def test_hand_worked_example(device):
    # Two classes in 2-D. Class 0: x=(1,0),(3,0), c0=(0,0); class 1: x=(0,2), c1=(0,1).
    # Squared distances 1, 9, 1 -> loss = 1/3 * 1/2 * 11 = 11/6.
    # Update (alpha=0.5): delta_0 = ((0-1)+(0-3), 0)/(1+2) = (-4/3, 0) -> c0 = (2/3, 0);
    # delta_1 = (0, 1-2)/(1+1) = (0, -1/2) -> c1 = (0, 1.25); class 2 absent stays (5,5).
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], device=device)
    labels = torch.tensor([0, 1, 0], device=device)
    centers = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]], device=device)
    loss = facekernels.center_loss(x, labels, centers, alpha=0.5, update_centers=True)
    assert loss.item() == pytest.approx(11 / 6)
    expected = torch.tensor([[2 / 3, 0.0], [0.0, 1.25], [5.0, 5.0]], device=device)
    assert_close(centers, expected)


@pytest.mark.parametrize("n, dim, num_classes", SHAPES)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_paper_update_matches_reference(device, n, dim, num_classes, alpha):
    x, labels, centers = make_batch(n, dim, num_classes, device)
    before = centers.clone()
    expected_centers = reference.center_loss_update(centers, x, labels, alpha)
    x_ref = x.clone().requires_grad_()
    expected_loss = reference.center_loss(x_ref, labels, before)
    x = x.requires_grad_()
    loss = facekernels.center_loss(x, labels, centers, alpha=alpha, update_centers=True)
    assert_close(centers, expected_centers)
    # Loss and gradient are formed with the centers as they were before the update.
    assert_close(loss, expected_loss)
    loss.backward()
    expected_loss.backward()
    assert_close(x.grad, x_ref.grad)


def test_only_present_classes_move(device):
    x, labels, centers = make_batch(16, 8, 100, device)
    before = centers.clone()
    facekernels.center_loss(x, labels, centers, update_centers=True)
    present = torch.zeros(100, dtype=torch.bool, device=device)
    present[labels] = True
    assert torch.equal(centers[~present], before[~present])
    assert not torch.equal(centers[present], before[present])


def test_module_paper_mode_updates_in_training_only(device):
    module = facekernels.CenterLoss(10, 6, alpha=0.5).to(device)
    assert "centers" in dict(module.named_buffers())
    assert not list(module.parameters())
    x, labels, _ = make_batch(12, 6, 10, device)
    module.centers.normal_()
    start = module.centers.clone()

    module.eval()
    eval_loss = module(x, labels)
    assert torch.equal(module.centers, start)
    assert_close(eval_loss, reference.center_loss(x, labels, start))

    module.train()
    x.requires_grad_()
    loss = module(x, labels)
    assert_close(loss, reference.center_loss(x.detach(), labels, start))
    assert_close(module.centers, reference.center_loss_update(start, x.detach(), labels, 0.5))
    loss.backward()
    assert_close(x.grad, (x.detach() - start[labels]) / 12)


def test_module_gradient_mode_learns_centers_by_gradient(device):
    module = facekernels.CenterLoss(5, 4, update="gradient").to(device)
    assert isinstance(module.centers, torch.nn.Parameter)
    x, labels, _ = make_batch(8, 4, 5, device)
    with torch.no_grad():
        module.centers.normal_()
    start = module.centers.detach().clone()
    module(x, labels).backward()
    c_ref = start.clone().requires_grad_()
    reference.center_loss(x, labels, c_ref).backward()
    assert torch.equal(module.centers.detach(), start)  # only the optimizer moves them
    assert_close(module.centers.grad, c_ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_no_worse_than_reference(device, dtype):
    x64, labels, c64 = make_batch(96, 128, 7, device, torch.float64)
    truth_loss = reference.center_loss(x64, labels, c64)
    truth_centers = reference.center_loss_update(c64, x64, labels, 0.5)
    x_low = x64.to(dtype).requires_grad_()
    x_ref = x64.to(dtype).requires_grad_()
    c_low, c_ref = c64.to(dtype), c64.to(dtype)

    loss = facekernels.center_loss(x_low, labels, c_low, update_centers=True)
    ref_loss = reference.center_loss(x_ref, labels, c_ref)
    ref_centers = reference.center_loss_update(c_ref, x_ref, labels, 0.5)
    assert loss.dtype == dtype
    assert_no_worse_than_reference(loss, ref_loss, truth_loss)
    assert_no_worse_than_reference(c_low, ref_centers, truth_centers)

    loss.backward()
    ref_loss.backward()
    x_truth = x64.clone().requires_grad_()
    reference.center_loss(x_truth, labels, c64).backward()
    assert_no_worse_than_reference(x_low.grad, x_ref.grad, x_truth.grad)


def test_bitwise_deterministic(device):
    x, labels, centers = make_batch(512, 256, 20, device, seed=3)
    results = []
    for _ in range(3):
        c = centers.clone()
        xg = x.clone().requires_grad_()
        loss = facekernels.center_loss(xg, labels, c, update_centers=True)
        loss.backward()
        results.append((loss, c, xg.grad))
    for loss, c, grad in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(c, results[0][1])
        assert torch.equal(grad, results[0][2])


def test_nan_embeddings_give_nan_loss(device):
    x, labels, centers = make_batch(6, 4, 3, device)
    x[2, 1] = float("nan")
    assert torch.isnan(facekernels.center_loss(x, labels, centers))


def test_an_update_whose_loss_overflows_is_refused(device):
    """Every group's sum of squares is finite (1e38 < 3.4e38), their sum is not: the update
    is refused as for a non-finite row, and the centers stay as they were."""
    x = torch.zeros(4, 2, device=device)
    x[:, 0] = 1e19
    labels = torch.tensor([0, 1, 2, 3], device=device)
    centers = torch.zeros(4, 2, device=device)
    with pytest.raises(ValueError, match="differences too large to square; the centers were left unchanged"):
        facekernels.center_loss(x, labels, centers, update_centers=True)
    assert not centers.any()
    assert facekernels.center_loss(x, labels, centers) == float("inf")  # no update: the loss


def test_opcheck(device):
    x, labels, centers = make_batch(10, 8, 4, device)
    for update in (False, True):
        torch.library.opcheck(
            torch.ops.facekernels.center_loss_forward.default,
            (x.clone().requires_grad_(), labels, centers.clone().requires_grad_(), 0.5, update),
        )
    diff = torch.randn(10, 8, device=device)
    grad = torch.tensor(1.5, device=device)
    for centers_grad in (False, True):
        torch.library.opcheck(
            torch.ops.facekernels.center_loss_backward.default, (grad, diff, labels, 4, centers_grad)
        )


def test_opcheck_of_the_update(device):
    x, labels, centers = make_batch(10, 8, 4, device)
    torch.library.opcheck(torch.ops.facekernels.center_loss_update_.default, (centers, labels, x))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_the_update_writes_each_row_at_its_label(device, layout, dtype):
    """As index_copy_, for rows of one class that hold the same values (the forward's)."""
    x, labels, centers = make_batch(10, 8, 4, device)
    rows = centers.index_select(0, labels).add_(torch.arange(4, device=device)[labels, None]).to(dtype)
    centers = centers.to(dtype)
    if layout == "strided":  # every other column of a wider table
        centers = torch.zeros(4, 16, dtype=dtype, device=device)[:, ::2].copy_(centers)
    want = centers.clone().index_copy_(0, labels, rows)
    torch.ops.facekernels.center_loss_update_(centers, labels, rows)
    assert torch.equal(centers, want)


UPDATE_BAD_INPUTS = [
    ("label >= C", lambda c, y, r: (c, y.index_fill(0, torch.tensor([1], device=y.device), 4), r),
     ValueError, r"center_loss_update_: labels must be int64 with values in \[0, 4\), got max 4"),
    ("D mismatch", lambda c, y, r: (c, y, r[:, :-1]), ValueError,
     r"updated_centers must have shape \[N, 8\] to match centers"),
    ("dtype mismatch", lambda c, y, r: (c, y, r.double()), TypeError, "must share a dtype"),
    ("labels too short", lambda c, y, r: (c, y[:-1], r), ValueError, r"labels must have shape \[10\]"),
]


@pytest.mark.parametrize("case", UPDATE_BAD_INPUTS, ids=[case[0] for case in UPDATE_BAD_INPUTS])
def test_a_bad_update_is_a_clear_error_and_centers_stay(device, case):
    _, mutate, error, message = case
    x, labels, centers = make_batch(10, 8, 4, device)
    centers, labels, rows = mutate(centers, labels, x)
    before = centers.clone()
    with pytest.raises(error, match=message):
        torch.ops.facekernels.center_loss_update_(centers, labels, rows)
    assert torch.equal(centers, before)


@pytest.mark.parametrize("update", ["paper", "gradient"])
def test_torch_compile_fullgraph(device, update):
    torch._dynamo.reset()
    x, labels, _ = make_batch(16, 8, 5, device)
    eager = facekernels.CenterLoss(5, 8, update=update).to(device)
    compiled_module = facekernels.CenterLoss(5, 8, update=update).to(device)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        le, lc = eager(xe + step, labels), compiled(xc + step, labels)
        le.backward()
        lc.backward()
        assert_close(lc, le)
        assert_close(xc.grad, xe.grad)
        assert_close(compiled_module.centers.detach(), eager.centers.detach())


BAD_INPUTS = [
    # (description, mutate(x, labels, centers) -> (x, labels, centers), error, message)
    ("label >= C", lambda x, y, c: (x, y.index_fill(0, torch.tensor([1], device=y.device), 4), c),
     ValueError, r"labels must be int64 with values in \[0, 4\), got max 4"),
    ("label < 0", lambda x, y, c: (x, y.index_fill(0, torch.tensor([0], device=y.device), -1), c),
     ValueError, r"values in \[0, 4\), got min -1"),
    ("1-D embeddings", lambda x, y, c: (x[0], y, c), ValueError, "embeddings must be 2-D"),
    ("3-D centers", lambda x, y, c: (x, y, c[None]), ValueError, "centers must have shape"),
    ("D mismatch", lambda x, y, c: (x, y, c[:, :-1]), ValueError, r"centers must have shape \[num_classes, 8\]"),
    ("dtype mismatch", lambda x, y, c: (x.double(), y, c), TypeError, "must share a dtype"),
    ("int embeddings", lambda x, y, c: (x.long(), y, c.long()), TypeError, "floating-point"),
    ("int32 labels", lambda x, y, c: (x, y.int(), c), TypeError, "labels must be int64"),
    ("labels too short", lambda x, y, c: (x, y[:-1], c), ValueError, r"labels must have shape \[10\]"),
    ("empty batch", lambda x, y, c: (x[:0], y[:0], c), ValueError, "at least one row|between 1 and"),
]


@pytest.mark.parametrize("path", ["python", "op"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_centers_stay(device, case, path):
    _, mutate, error, message = case
    x, labels, centers = mutate(*make_batch(10, 8, 4, device))
    before = centers.clone()
    with pytest.raises(error, match=message):
        if path == "python":
            facekernels.center_loss(x, labels, centers, update_centers=True)
        else:
            torch.ops.facekernels.center_loss_forward(x, labels, centers, 0.5, True)
    assert torch.equal(centers, before)


def test_bad_arguments_are_errors():
    x, labels, centers = make_batch(4, 3, 2, "cpu")
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\]"):
        facekernels.center_loss(x, labels, centers, alpha=1.5)
    with pytest.raises(ValueError, match="must not require grad"):
        facekernels.center_loss(x, labels, centers.requires_grad_(), update_centers=True)
    with pytest.raises(ValueError, match="update must be one of"):
        facekernels.CenterLoss(3, 4, update="momentum")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        facekernels.CenterLoss(0, 4)
