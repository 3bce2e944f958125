import pytest
import torch

# Tolerances for kernel-vs-reference parity in each dtype (DESIGN.md §5). Half precisions
# are not compared against a tolerance but against the reference's own error: see
# assert_no_worse_than_reference.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def assert_close(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def assert_no_worse_than_reference(kernel, reference, truth, factor=2.0, floor=1e-6):
    """The bf16/fp16 rule: the kernel's error against an fp64 truth is at most `factor`
    times the error of the reference computed in the same low precision."""
    kernel_error = (kernel.double() - truth).abs().max().item()
    reference_error = (reference.double() - truth).abs().max().item()
    assert kernel_error <= factor * max(reference_error, floor), (
        f"kernel error {kernel_error:.3g} > {factor} x reference error {reference_error:.3g}"
    )
