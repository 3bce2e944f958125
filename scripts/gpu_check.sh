#!/usr/bin/env bash
# One command for a GPU machine (H100/H200, system python3 with torch, pytest and
# pytest-benchmark, no network): build in place for sm_90 with every core, run the whole
# test suite (CUDA parametrizations included), run the GPU benchmarks, and write a JSON
# summary to $OUT/gpu_report.json (./gpu_report.json when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$(date +%s)
"$python" setup.py -q build_ext --inplace > "$out/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
echo "build: rc=$build_rc in ${build_s}s (log: $out/build.log)"
[ $build_rc -eq 0 ] || { tail -40 "$out/build.log"; exit $build_rc; }

"$python" -m pytest tests -q -p no:cacheprovider --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

# The trainer on the GPU: a short ArcFace run under bf16 autocast, both impls.
"$python" -m facekernels.train --device cuda --amp bf16 --epochs 5 --report "$out/train_cuda.json" \
  2>&1 | tail -12
train_rc=${PIPESTATUS[0]}

# GPU benchmarks: every center-loss and triplet shape, ArcFace at N=512 (C = 100K and 1M),
# the adaptive heads at N=512, D=512, C=1M.
"$python" -m pytest benchmarks -k "cuda and (center_loss or triplet or 512-512 or adaptive_head)" \
  --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$out/benchmarks.json" 2>&1 | tee "$out/benchmarks.log" \
  | sed -n '/facekernels vs the alternatives/,/^$/p'
bench_rc=${PIPESTATUS[0]}

"$python" - "$out" "$build_s" "$tests_rc" "$bench_rc" "$train_rc" <<'PY'
import json, os, sys
import xml.etree.ElementTree as ET
import torch, facekernels

out = sys.argv[1]
build_s, tests_rc, bench_rc, train_rc = (int(a) for a in sys.argv[2:6])
suite = ET.parse(os.path.join(out, "tests.xml")).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
          if case.find("failure") is not None or case.find("error") is not None]
benchmarks = []
path = os.path.join(out, "benchmarks.json")
if os.path.exists(path):
    for b in json.load(open(path))["benchmarks"]:
        benchmarks.append({"group": b["group"], "impl": b["extra_info"].get("impl"),
                           "median_ms": b["stats"]["median"] * 1e3,
                           "peak_extra_mb": b["extra_info"].get("peak_extra_mb")})
report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "build": facekernels.build_info(),
          "build_seconds": build_s, "tests": counts, "failed_tests": failed,
          "tests_rc": tests_rc, "benchmarks_rc": bench_rc, "benchmarks": benchmarks,
          "trainer_rc": train_rc}
train_report = os.path.join(out, "train_cuda.json")
if os.path.exists(train_report):
    trained = json.load(open(train_report))
    report["trainer"] = {k: trained.get(k) for k in ("parity", "parity_fp64", "speedup", "loss_speedup")}
json.dump(report, open(os.path.join(out, "gpu_report.json"), "w"), indent=2)
print(json.dumps({k: report.get(k) for k in ("gpu", "build_seconds", "tests", "tests_rc",
                                              "benchmarks_rc", "trainer_rc", "trainer")}))
PY
exit $(( tests_rc != 0 || bench_rc != 0 || train_rc != 0 ))
