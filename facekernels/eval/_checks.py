"""Argument checks shared by facekernels.eval. Each error names the function and the
argument as the caller wrote it, and is raised before anything is computed or stored."""

import math
import operator

import torch


def as_tensor(op, name, value):
    """``value`` as a detached tensor; what torch cannot read is a TypeError naming it."""
    try:
        return torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{op}: {name} must be a tensor or a nested list of numbers, "
                        f"got {type(value).__name__} ({error})") from None


def check_embeddings(op, name, embeddings, dim=None):
    """A floating-point [N, D] tensor, N, D >= 1 (D == dim when given)."""
    embeddings = as_tensor(op, name, embeddings)
    if embeddings.dim() != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"{op}: {name} must be a non-empty [N, D] tensor, got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point, got {embeddings.dtype}")
    if dim is not None and embeddings.shape[1] != dim:
        raise ValueError(f"{op}: {name} has dimension {embeddings.shape[1]}, expected {dim}")
    return embeddings


def check_integer(op, name, tensor):
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor, got {tensor.dtype}")


def check_finite(op, name, tensor):
    """NaN or inf has no rank and no nearest neighbour, so any metric over it would be a
    silent guess (a NaN impostor is never accepted, a NaN gallery row wins every max)."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        where = f"in row {first}" if tensor.dim() == 2 else f"at index {first}"
        raise ValueError(f"{op}: {name} has non-finite values {where}")


def check_int(op, name, value, low):
    """An int >= low. Floats (2.5, NaN) are refused rather than truncated, and so are bools."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {value!r}") from None
    if value < low:
        raise ValueError(f"{op}: {name} must be at least {low}, got {value}")
    return value


def check_real(op, name, value):
    """A real number other than NaN, as a float (bools and strings refused)."""
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{op}: {name} must be a number, got nan")
    return number
