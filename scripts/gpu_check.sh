#!/usr/bin/env bash
# One call on a GPU machine (H100/H200; system python3 with torch, pytest and
# pytest-benchmark; no network), within a time budget: build in place for sm_90 with every
# core, then the checks, most important first, each under its own time limit and never past
# the budget (BUDGET_S, default 480 s from the start, the build included). Every step writes
# its log under $OUT (./gpu_out when OUT is unset) as it runs, and $OUT/steps.tsv gains a
# line when it ends, so a call cut short still returns what ran; $OUT/gpu_report.json sums
# up whatever finished.
#
#   1. build                  setup.py build_ext --inplace
#   2. kernels_vs_cpu         tests/test_cuda_kernels.py: every CUDA kernel against the CPU
#                             kernel on the same inputs, at the shapes of its edges
#   3. bench_arcface          ArcFace N=512, D=512, C=100K and 1M vs floor / compile / eager
#   4. memcheck               compute-sanitizer over one call of every kernel (fp32 cases
#   5. racecheck              of test_cuda_kernels.py)
#   6. initcheck
#   7. tests_cuda             the suite's CUDA parametrizations
#   8. bench_metric           center loss and triplet mining
#   9. bench_heads            the adaptive heads at C=1M (each warms torch.compile up)
#  10. train                  the trainer, ArcFace under bf16 autocast, both impls
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
export FACEKERNELS_SIMT=0  # the real kernels only: no emulation build here
# The build is in place, not installed: subprocesses (torchrun, the trainer's CLI) import it
# from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))
printf 'step\trc\tseconds\n' > "$out/steps.tsv"
# Wheels carried in .whl/ (the image lacks pytorch-metric-learning; see README.md) go to a
# folder of their own, as the image's site-packages may not be writable.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && PYTHONPATH+=":/tmp/site"
fi

# step NAME LIMIT_S CMD...: CMD with its output in $OUT/NAME.log, stopped by SIGINT (pytest
# then still writes its reports) at LIMIT_S or at the deadline, whichever comes first;
# skipped (rc "skipped", status 1) when less than 20 s are left. Returns CMD's exit status.
step() {
  local name=$1 limit=$2 left rc start seconds
  shift 2
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$out/steps.tsv"
    echo "== $name: skipped, ${left}s left of the budget"
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (at most ${limit}s; log: $out/$name.log)"
  start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$seconds" >> "$out/steps.tsv"
  echo "   rc=$rc in ${seconds}s"
  tail -4 "$out/$name.log"
  return "$rc"
}

pytest=("$python" -m pytest -q -p no:cacheprovider --continue-on-collection-errors)
bench=("${pytest[@]}" --benchmark-only)
# One fp32 call of each kernel, at edge shapes, for compute-sanitizer.
once="float32 and (tail_chunk or sub_centers or rows or curricularface or adaface"
once+=" or pairs_not_a_multiple or center_loss or test_distance)"
kernels_once=("${pytest[@]}" tests/test_cuda_kernels.py -k "$once")
sanitizer=(compute-sanitizer --error-exitcode 99 --tool)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
if ! step build 300 "$python" setup.py build_ext --inplace; then
  [ -f "$out/build.log" ] && tail -40 "$out/build.log"
  exit 1
fi
step kernels_vs_cpu 90 "${pytest[@]}" tests/test_cuda_kernels.py --junitxml="$out/kernels_vs_cpu.xml"
step bench_arcface 120 "${bench[@]}" benchmarks/bench_margin_softmax.py -k "cuda-512-512" \
  --benchmark-json="$out/bench_arcface.json"
for tool in memcheck racecheck initcheck; do
  step "$tool" 90 "${sanitizer[@]}" "$tool" "${kernels_once[@]}" --junitxml="$out/$tool.xml"
done
step tests_cuda 180 "${pytest[@]}" tests -k "cuda and not test_cuda_kernels" \
  --junitxml="$out/tests_cuda.xml"
step bench_metric 120 "${bench[@]}" benchmarks/bench_center_loss.py benchmarks/bench_triplet.py \
  -k cuda --benchmark-json="$out/bench_metric.json"
step bench_heads 180 "${bench[@]}" benchmarks/bench_adaptive_heads.py -k cuda \
  --benchmark-json="$out/bench_heads.json"
step train 90 "$python" -m facekernels.train --device cuda --amp bf16 --epochs 5 \
  --report "$out/train_cuda.json"

"$python" - "$out" <<'PY'
import csv, glob, json, os, subprocess, sys
import xml.etree.ElementTree as ET
import torch, facekernels

out = sys.argv[1]
steps = {row["step"]: {"rc": row["rc"], "seconds": int(row["seconds"])}
         for row in csv.DictReader(open(os.path.join(out, "steps.tsv")), delimiter="\t")}
tests = {}
for path in sorted(glob.glob(os.path.join(out, "*.xml"))):
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests[os.path.basename(path)[:-4]] = {
        **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
        "failed": [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None]}
benchmarks = []
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    for b in json.load(open(path))["benchmarks"]:
        benchmarks.append({"group": b["group"], "impl": b["extra_info"].get("impl"),
                           "median_ms": b["stats"]["median"] * 1e3,
                           "peak_extra_mb": b["extra_info"].get("peak_extra_mb")})
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "torch": torch.__version__, "commit": commit or os.environ.get("FACEKERNELS_COMMIT"),
          "build": facekernels.build_info(), "steps": steps, "tests": tests,
          "benchmarks": benchmarks}
train = os.path.join(out, "train_cuda.json")
if os.path.exists(train):
    trained = json.load(open(train))
    report["trainer"] = {k: trained.get(k) for k in ("parity", "parity_fp64", "speedup", "loss_speedup")}
json.dump(report, open(os.path.join(out, "gpu_report.json"), "w"), indent=2)
print(json.dumps({k: report[k] for k in ("gpu", "torch", "commit", "steps", "tests")}, indent=1))
PY
# 0 when every step ran and passed.
awk -F'\t' 'NR > 1 && $2 != "0" {failed = 1} END {exit failed}' "$out/steps.tsv"
