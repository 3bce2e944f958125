"""Shared benchmark machinery: time a step with pytest-benchmark, record its peak extra
memory in extra_info, and print every group's ratios against facekernels at the end."""

import collections

import pytest
import torch

from facekernels.train.memory import current_bytes, peak_bytes, reset_peak

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_RESULTS = collections.defaultdict(dict)  # group -> impl -> (median s, peak extra bytes)


def peak_extra_memory(step, device):
    """Peak memory one call of `step` adds on top of what was allocated before it:
    torch's allocator peak on CUDA; on CPU the peak resident set."""
    reset_peak(device)
    start = current_bytes(device)
    step()
    return peak_bytes(device) - start


@pytest.fixture
def measure(benchmark, request):
    """measure(step, device, impl, rounds): times `step`, records memory and the result."""

    def run(step, device, impl, rounds=5):
        if device.type == "cuda":

            def timed():
                step()
                torch.cuda.synchronize()

        else:
            timed = step
        timed()  # warm-up (and compilation for compiled providers), outside both figures
        memory = peak_extra_memory(step, device)
        benchmark.extra_info["impl"] = impl
        benchmark.extra_info["peak_extra_mb"] = round(memory / 2**20, 1)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        _RESULTS[benchmark.group][impl] = (benchmark.stats.stats.median, memory)

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("facekernels vs the alternatives (median of one run, this machine)")
    write(f"{'group':<44} {'impl':<20} {'median ms':>10} {'time / fk':>10} {'peak extra MB':>14}")
    for group, impls in _RESULTS.items():
        base = impls.get("facekernels")
        for impl, (median, memory) in impls.items():
            ratio = f"{median / base[0]:.2f}x" if base else "-"
            write(f"{group:<44} {impl:<20} {median * 1e3:>10.2f} {ratio:>10} {memory / 2**20:>14.1f}")
