"""The margin-softmax loss alone at a class count face models train with, fused against
the reference, forward + backward: where the speed-up and the memory saving show, which a
small training run (30 classes, a CNN-bound step) cannot.

Both run in every round, in alternating order, so that a change of load hits both alike;
the report gives medians and the spread of the per-round ratios."""

import statistics
import time

import torch

import facekernels
from facekernels import reference
from facekernels.train.loop import synchronize
from facekernels.train.memory import current_bytes, peak_bytes, reset_peak

# Face-model scale per device: what fits a few seconds on a CPU, DESIGN.md's GPU workload.
SHAPES = {"cpu": dict(rows=256, dim=128, classes=100_000),
          "cuda": dict(rows=512, dim=512, classes=1_000_000)}
# The trained loss's margins; the other losses are timed as ArcFace.
MARGINS = {"cosface": dict(m3=0.35), "combined": dict(m1=1.0, m2=0.3, m3=0.2)}
IMPLS = {"reference": reference.margin_softmax_loss, "facekernels": facekernels.margin_softmax_loss}


def _once(fn, x, weight, labels, margins, device):
    """Seconds and peak extra bytes of one forward + backward."""
    xr, wr = x.detach().requires_grad_(), weight.detach().requires_grad_()
    synchronize(device)
    before = current_bytes(device)
    reset_peak(device)
    start = time.perf_counter()
    fn(xr, wr, labels, scale=64.0, **margins).backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, max(peak_bytes(device) - before, 0)


def measure(loss="arcface", device="cpu", rounds=5, seed=0):
    """{shape, per impl: median/min/max ms and peak extra MB, speedup: median/min/max of the
    per-round ratios reference / facekernels, noise_exceeds_difference}."""
    device = torch.device(device)
    shape = SHAPES[device.type]
    margins = MARGINS.get(loss, dict(m2=0.5))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape["rows"], shape["dim"], generator=g).to(device)
    weight = torch.randn(shape["classes"], shape["dim"], generator=g).to(device)
    labels = torch.randint(0, shape["classes"], (shape["rows"],), generator=g).to(device)
    for fn in IMPLS.values():  # warm-up
        _once(fn, x, weight, labels, margins, device)
    seconds = {name: [] for name in IMPLS}
    peaks = {name: 0 for name in IMPLS}
    for r in range(rounds):
        for name in (IMPLS if r % 2 == 0 else reversed(IMPLS)):
            s, extra = _once(IMPLS[name], x, weight, labels, margins, device)
            seconds[name].append(s)
            peaks[name] = max(peaks[name], extra)
    ratios = [ref / fused for ref, fused in zip(seconds["reference"], seconds["facekernels"])]
    report = {"shape": {**shape, "loss": loss if loss in MARGINS else "arcface", "device": device.type,
                        "threads": torch.get_num_threads(), "rounds": rounds}}
    for name in IMPLS:
        ms = [1e3 * s for s in seconds[name]]
        report[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
                        "peak_extra_mb": peaks[name] / 2**20}
    report["speedup"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    report["noise_exceeds_difference"] = min(ratios) <= 1.0 <= max(ratios)
    return report


def describe(report):
    """The report as the few lines the trainer prints."""
    s, ref, fk, up = report["shape"], report["reference"], report["facekernels"], report["speedup"]
    where = "GPU" if s["device"] == "cuda" else f"CPU, {s['threads']} threads"
    lines = [f"the loss alone at a face model's scale ({s['loss']}, C = {s['classes']:,} classes, "
             f"N = {s['rows']}, D = {s['dim']}; {where}; forward + backward, {s['rounds']} interleaved rounds):"]
    for name, r in (("reference", ref), ("facekernels", fk)):
        spread = f"(range {r['min_ms']:.1f}-{r['max_ms']:.1f})"
        lines.append(f"  {name:<12} {r['median_ms']:8.1f} ms {spread:<22} peak extra memory "
                     f"{r['peak_extra_mb']:6.0f} MB")
    verdict = ("the noise exceeds the difference" if report["noise_exceeds_difference"]
               else "every round agrees")
    lines.append(f"  speed-up {up['median']:.2f}x (rounds {up['min']:.2f}-{up['max']:.2f}x: {verdict}); "
                 f"memory {ref['peak_extra_mb'] / max(fk['peak_extra_mb'], 1):.0f}x less")
    return "\n".join(lines)
