import pytest
import torch

import simt

# Tolerances for kernel-vs-reference parity in each dtype (DESIGN.md §5). Half precisions,
# and fp32 where large logit scales amplify rounding, are compared against the reference's
# own error instead: see assert_no_worse_than_reference.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}

# Errors below this fraction of the largest true value always pass the "no worse than the
# reference" rule: a normwise bound at the dtype's rounding level, so a reference that is
# luckily exact does not set an unreachable bar.
NORMWISE_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-6, torch.float16: 1e-6}

# "simt": CPU tensors, with facekernels' kernels replaced by the CUDA kernels run under the
# SIMT emulator (tests/simt.py), so that every CUDA test also runs without a GPU.
DEVICES = ["cpu"] + (["simt"] if simt.enabled else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def simt_library(request):
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    with capture.global_and_fixture_disabled():
        simt.build(say=lambda line: reporter.write_line(line) if reporter else print(line))


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param != "simt":
        yield torch.device(request.param)
        return
    request.getfixturevalue("simt_library")
    with simt.routed(simt.seed_for(request.node.nodeid)):
        yield torch.device("cpu")


def pytest_report_header(config):
    if simt.enabled:
        seed = simt.session_seed()
        return f"facekernels_simt: seed {seed} (FACEKERNELS_SIMT_SEED={seed} replays it)"


def assert_close(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def assert_no_worse_than_reference(kernel, reference, truth, factor=2.0):
    """The low-precision rule: the kernel's error against an fp64 truth is at most `factor`
    times the error of the reference computed in the same precision (or within the
    dtype's normwise floor)."""
    kernel_error = (kernel.double() - truth).abs().max().item()
    reference_error = (reference.double() - truth).abs().max().item()
    floor = NORMWISE_FLOOR[reference.dtype] * truth.abs().max().item()
    assert kernel_error <= factor * max(reference_error, floor), (
        f"kernel error {kernel_error:.3g} > {factor} x max(reference error "
        f"{reference_error:.3g}, floor {floor:.3g})"
    )


def assert_argmax(predicted, scores, tol=None):
    """predicted [N] is the argmax of scores [N, C] up to rounding, as a kernel whose GEMMs
    round differently (chunked, on a GPU) may decide a near tie otherwise: the score it
    picks is within tol of the row's best, and it is the argmax wherever the best two are
    further apart than tol. tol: 16 ulps of the scores' dtype at their largest magnitude
    (at least 1)."""
    if tol is None:
        tol = 16 * torch.finfo(scores.dtype).eps * max(1.0, scores.abs().max().item())
    picked = scores.gather(1, predicted[:, None]).squeeze(1)
    assert (scores.amax(1) - picked <= tol).all(), "a prediction is not among the best scores"
    top = scores.topk(min(2, scores.shape[1]), dim=1).values
    clear = top[:, 0] - top[:, -1] > tol if scores.shape[1] > 1 else torch.ones_like(picked, dtype=torch.bool)
    assert torch.equal(predicted[clear], scores.argmax(1)[clear])


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true",
                     help="run test_fuzz.py with the long hypothesis profile (thousands of cases)")


def pytest_configure(config):
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # test_fuzz.py skips itself
        return
    # The device fixture is meant to hold for every example of a test.
    suppress = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                              suppress_health_check=suppress)
    settings.register_profile("fuzz", max_examples=3000, deadline=None,
                              suppress_health_check=suppress)
    settings.load_profile("fuzz" if config.getoption("--fuzz") else "ci")
