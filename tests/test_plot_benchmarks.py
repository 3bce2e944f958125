"""scripts/plot_benchmarks.py on a pytest-benchmark JSON of its own making."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "plot_benchmarks.py"


def entry(name, impl, device, median, peak, **sizes):
    params = {"impl": impl, "device": device, **sizes}
    return {"name": f"{name}[{impl}-{device}]", "params": params, "stats": {"median": median},
            "extra_info": {"impl": impl, "peak_extra_mb": peak}}


def run(tmp_path, benchmarks, *extra):
    data = tmp_path / "bench.json"
    data.write_text(json.dumps({"benchmarks": benchmarks}))
    png = tmp_path / "bench.png"
    result = subprocess.run([sys.executable, str(SCRIPT), str(data), str(png), *extra],
                            capture_output=True, text=True)
    return result, png


def test_plots_time_and_memory_against_the_size(tmp_path):
    benchmarks = [entry("test_arcface", impl, "cpu", t * c / 1e5, m * c / 1e5, n=256, dim=128, num_classes=c)
                  for c in (20_000, 200_000)
                  for impl, t, m in (("facekernels", 0.5, 1), ("reference", 1.3, 500))]
    benchmarks += [entry("test_triplet", "facekernels", "cpu", 0.01 * n, 0, n=n, dim=128) for n in (128, 512)]
    # One size only, or another device: nothing to draw a line through.
    benchmarks += [entry("test_center", "facekernels", "cpu", 1e-3, 2, n=512, dim=512, num_classes=100_000),
                   entry("test_arcface", "facekernels", "cuda", 1e-3, 2, n=512, dim=512, num_classes=10**6)]
    result, png = run(tmp_path, benchmarks)
    assert result.returncode == 0, result.stderr
    assert "2 benchmarks" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_says_when_nothing_can_be_plotted(tmp_path):
    result, png = run(tmp_path, [entry("test_center", "facekernels", "cpu", 1e-3, 2, n=512, num_classes=10)],
                      "--device", "cpu")
    assert result.returncode != 0 and "measured at two sizes or more" in result.stderr
    assert not png.exists()
