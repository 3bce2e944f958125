"""Memory readings for the trainer's report and the benchmarks: torch's allocator on CUDA,
the process's resident set on CPU (whose peak, VmHWM, Linux lets a process reset)."""

import contextlib

import torch


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device):
    """Start a new peak at the current usage."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set


def current_bytes(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _status_bytes("VmRSS:")


def peak_bytes(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM:")
