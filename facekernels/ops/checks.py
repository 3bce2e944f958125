"""Argument checks shared by the op wrappers: each error names the op and the argument.
They read only shapes and dtypes, so the fake kernels run them too."""

import math

import torch


def check_choice(op, name, value, allowed):
    try:
        known = value in allowed
    except TypeError:  # an unhashable value (a list) is no key of a dict of choices
        known = False
    if not known:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")


def check_number(op, name, value, low=-math.inf, high=math.inf):
    """A finite int or float (not a bool) in [low, high], returned as a float. Plain
    arithmetic (x - x is 0 for finite x only), not math.isfinite: under torch.compile a
    module's float attribute may arrive symbolic (dynamo makes floats that differ between
    compiled modules dynamic), and the comparisons become the graph's guards."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not value - value == 0 or not low <= value <= high):
        bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low}, {high}]"
        raise ValueError(f"{op}: {name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def check_positive_int(op, name, value):
    """An int (not a bool) >= 1, returned."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


def check_embeddings(op, embeddings, name="embeddings", allow_empty=False):
    """A floating-point [N, D] tensor with D >= 1 and N >= 1 (N >= 0 when allow_empty)."""
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got "
                        f"{getattr(embeddings, 'dtype', type(embeddings).__name__)}")
    if embeddings.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{op}: {name} must hold at least one row, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{op}: {name} must have at least one column, got shape {tuple(embeddings.shape)}")


def check_labels(op, labels, embeddings, name="labels"):
    """An int64 [N] tensor beside the embeddings."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"{op}: {name} must have shape [{embeddings.shape[0]}] to match the "
                         f"embeddings, got {tuple(labels.shape)}")
    check_device(op, name, labels, embeddings)


def check_one_device(op, **arguments):
    """Every tensor argument on the device of the first. The fake kernels run it: the
    dispatcher sends a call that mixes a meta tensor with real ones to the fake kernel (which
    would return uninitialized memory), and a CUDA kernel must never get a host pointer."""
    tensors = [(name, t) for name, t in arguments.items() if isinstance(t, torch.Tensor)]
    first, device = tensors[0][0], tensors[0][1].device
    for name, t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}")


def check_device(op, name, tensor, embeddings):
    if tensor.device != embeddings.device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but the embeddings are on {embeddings.device}")


def check_rows(op, name, tensor, embeddings, what="num_classes"):
    """A floating-point [K, D] tensor matching the embeddings' width and device."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor")
    if tensor.dim() != 2 or tensor.shape[1] != embeddings.shape[1] or tensor.shape[0] == 0:
        raise ValueError(f"{op}: {name} must have shape [{what}, {embeddings.shape[1]}] to match "
                         f"the embeddings, got {tuple(tensor.shape)}")
    check_device(op, name, tensor, embeddings)


def check_sizes(owner, num_classes, embedding_size):
    """Positive ints, checked by the constructors of the heads and CenterLoss."""
    for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_label_range(op, labels, num_classes):
    """Labels in [0, num_classes), for Python code that indexes with them before the op's
    own check (one sync on a GPU)."""
    low, high = torch.aminmax(labels)
    if low < 0 or high >= num_classes:
        bound = f"min {int(low)}" if low < 0 else f"max {int(high)}"
        raise ValueError(f"{op}: labels must be int64 with values in [0, {num_classes}), got {bound}")
