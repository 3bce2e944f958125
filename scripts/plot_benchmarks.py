"""Turns pytest-benchmark's JSON into a PNG: for each benchmark measured at several sizes,
the median time and the peak extra memory against the number of classes (or the batch
size), one line per implementation.

    .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-json bench.json
    .venv/bin/python scripts/plot_benchmarks.py bench.json bench.png [--device cpu]
"""

import argparse
import collections
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The parameter a benchmark's sizes vary along, in order of preference, and its label.
SIZES = (("num_classes", "classes C"), ("n", "batch size N"))
STYLES = {"facekernels": dict(color="tab:red", marker="o", linewidth=2.2)}


def panels(benchmarks, device):
    """{(benchmark, fixed parameters, size parameter): {impl: [(size, median ms, peak MB)]}},
    keeping the benchmarks measured at two sizes or more."""
    found = collections.defaultdict(lambda: collections.defaultdict(list))
    for b in benchmarks:
        params = b.get("params") or {}
        size = next((name for name, _ in SIZES if name in params), None)
        if params.get("device") != device or size is None:
            continue
        impl = params.get("impl", b.get("extra_info", {}).get("impl", "?"))
        fixed = tuple((k, v) for k, v in sorted(params.items()) if k not in ("impl", "device", size))
        found[(b["name"].split("[")[0], fixed, size)][impl].append(
            (params[size], 1e3 * b["stats"]["median"], b.get("extra_info", {}).get("peak_extra_mb")))
    return {key: impls for key, impls in found.items()
            if len({point[0] for points in impls.values() for point in points}) > 1}


def _short(size):
    return f"{size // 1000}K" if size >= 10_000 and size % 1000 == 0 else str(size)


def plot(found, device, path):
    fig, axes = plt.subplots(len(found), 2, figsize=(11, 3.6 * len(found)), squeeze=False)
    for row, ((name, fixed, size), impls) in zip(axes, sorted(found.items())):
        title = name.removeprefix("test_").replace("_", " ")
        if fixed:
            title += " (" + ", ".join(f"{k}={v}" for k, v in fixed) + ")"
        for impl, points in sorted(impls.items(), key=lambda item: item[0] != "facekernels"):
            points.sort()
            xs = [p[0] for p in points]
            style = STYLES.get(impl, dict(marker="."))
            row[0].plot(xs, [p[1] for p in points], label=impl, **style)
            # The CPU figure is a resident-set difference: a few MB of noise, never below 0.
            memory = [(x, max(p[2], 0.0)) for x, p in zip(xs, points) if p[2] is not None]
            if memory:
                row[1].plot(*zip(*memory), label=impl, **style)
        label = dict(SIZES)[size]
        sizes = sorted({p[0] for points in impls.values() for p in points})
        row[0].set(title=f"{title}: time", ylabel="median ms", yscale="log")
        row[1].set(title=f"{title}: peak extra memory", ylabel="MB")
        row[1].set_yscale("symlog", linthresh=1.0)
        row[1].set_ylim(bottom=0)
        for ax in row:
            ax.set_xscale("log")
            ax.set_xticks(sizes, [_short(x) for x in sizes], minor=False)
            ax.set_xticks([], minor=True)
            ax.set_xlabel(label)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(f"facekernels benchmarks, {device.upper()} (pytest-benchmark medians of one run)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark's --benchmark-json file")
    parser.add_argument("png", help="the picture to write")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    with open(args.json) as f:
        found = panels(json.load(f)["benchmarks"], args.device)
    if not found:
        sys.exit(f"plot_benchmarks: {args.json} holds no {args.device} benchmark measured at two sizes or more")
    plot(found, args.device, args.png)
    print(f"plot_benchmarks: {len(found)} benchmarks -> {args.png}")


if __name__ == "__main__":
    main()
