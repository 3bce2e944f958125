"""Timing that holds on a busy machine: the compared calls run in turn in each round, their
order rotating, so a slowdown hits them alike; ratios are taken round by round."""

import statistics
import time


def interleaved(calls, rounds):
    """{name: [seconds per round]} for {name: call}, after two warm-up calls each."""
    for call in calls.values():  # warm-up, compilation included
        call()
        call()
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_text(num, den):
    """The median of num / den over the rounds, and the middle half of them in brackets."""
    ratios = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f})"
