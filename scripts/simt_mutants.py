"""Plants known bugs in the CUDA kernels, one at a time, and runs the emulated kernels'
tests on each: does the SIMT emulator catch them?

    .venv/bin/python scripts/simt_mutants.py [--seed S] [--tests tests/test_cuda_kernels.py]

Each mutant is a copy of csrc/ with one edit to a file of csrc/cuda/, built against
csrc/simt/ in its own folder (ninja recompiles what the edit touches) and tested in a fresh
process. The working tree is never touched. Prints a table: caught (by which test) or survived."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (file, what the bug is, the text, its mutation). Each text occurs once in its file.
MUTANTS = [
    ("margin_softmax_cuda.cu", "stride loop misses the chunk's last class",
     "for (int64_t j = threadIdx.x; j < length; j += blockDim.x) {\n    int64_t winner;",
     "for (int64_t j = threadIdx.x; j < length - 1; j += blockDim.x) {\n    int64_t winner;"),
    ("margin_softmax_cuda.cu", "forward keeps only the last chunk (state merge dropped)",
     "state = MergeSummaries()(state, chunk);", "state = chunk;"),
    ("margin_softmax_cuda.cu", "one block too few: the last row is never reduced",
     "FK_LAUNCH(n, kThreads, stream, forward_epilogue_kernel<scalar_t, acc_t>)",
     "FK_LAUNCH(n - 1, kThreads, stream, forward_epilogue_kernel<scalar_t, acc_t>)"),
    ("margin_softmax_cuda.cu", "reduction result used on every thread",
     "  if (threadIdx.x == 0) {\n    scale_grad[i] += chunk;\n  }", "  scale_grad[i] += chunk;"),
    ("margin_softmax_cuda.cu", "backward row offset off by one class",
     "\n  scalar_t* row = z + i * length * k;", "\n  scalar_t* row = z + (i * length + 1) * k;"),
    ("center_loss_cuda.cu", "result written by the wrong thread",
     "  if (threadIdx.x == 0) {\n    partials[k] = total;", "  if (threadIdx.x == 1) {\n    partials[k] = total;"),
    ("center_loss_cuda.cu", "stride loop starts one dimension late",
     "for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {\n    squares",
     "for (int64_t d = threadIdx.x + 1; d < dim; d += blockDim.x) {\n    squares"),
    ("triplet_cuda.cu", "deleted __syncthreads between two reductions on one TempStorage",
     "  __syncthreads();\n  count = ReduceInt", "  count = ReduceInt"),
    ("triplet_cuda.cu", "deleted __syncthreads at the end of the per-positive loop",
     "      g_row[p] = total;\n    }\n    __syncthreads();", "      g_row[p] = total;\n    }"),
    ("triplet_cuda.cu", "deleted __syncthreads: FaceNet's choices read before thread 0 wrote them",
     "        g_row[p] = slope;\n      }\n    }\n    __syncthreads();",
     "        g_row[p] = slope;\n      }\n    }"),
    ("runtime.cuh", "block count rounded down: the tail of a one-thread-per-element grid never runs",
     "(t.numel() + threads - 1) / threads", "t.numel() / threads"),
    ("triplet_cuda.cu", "batch-hard result read by a thread other than 0",
     "  if (threadIdx.x != 0) {\n    return;\n  }\n  const int64_t p = hardest.first.index",
     "  if (threadIdx.x != 1) {\n    return;\n  }\n  const int64_t p = hardest.first.index"),
    ("triplet_cuda.cu", "guard off by one: one thread past the last pair",
     "  if (index >= v.n * v.m) {\n    return;\n  }\n  const int64_t a = index / v.m, p = index % v.m;\n  const AnchorRow<scalar_t> row = v.row(a);\n  if (row.negative(p) || p == row.self) {\n    return;\n  }\n  ArgMax",
     "  if (index > v.n * v.m) {\n    return;\n  }\n  const int64_t a = index / v.m, p = index % v.m;\n  const AnchorRow<scalar_t> row = v.row(a);\n  if (row.negative(p) || p == row.self) {\n    return;\n  }\n  ArgMax"),
    ("triplet_cuda.cu", "negatives' stride loop misses the last column",
     "  for (int64_t n = threadIdx.x; n < v.m; n += blockDim.x) {\n    if (!row.negative(n)) {\n      continue;\n    }\n    const acc_t d_an",
     "  for (int64_t n = threadIdx.x; n < v.m - 1; n += blockDim.x) {\n    if (!row.negative(n)) {\n      continue;\n    }\n    const acc_t d_an"),
]


def run(cmd, env, timeout):
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(cmd, -1, error.stdout or "", "timed out")


def first_failure(output):
    for line in output.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line.split(" - ")[0].split("::", 1)[-1]
    return "the test process died" if "Fatal Python error" in output or not output else "failed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="FACEKERNELS_SIMT_SEED for the tests")
    parser.add_argument("--tests", default="tests/test_cuda_kernels.py", help="what pytest runs on each mutant")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="simt_mutants_"))
    csrc = work / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    env = dict(os.environ, FACEKERNELS_SIMT_CSRC=str(csrc), FACEKERNELS_SIMT_BUILD=str(work / "build"),
               FACEKERNELS_SIMT_SEED=str(args.seed))
    build = [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import facekernels, simt; simt.build()"]
    test = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", args.tests]
    rows = []
    print(f"{len(MUTANTS)} mutants, tests: {args.tests}, seed {args.seed}, work folder {work}", flush=True)
    for number, (name, what, text, mutation) in enumerate(MUTANTS, 1):
        path = csrc / "cuda" / name
        original = path.read_text()
        assert original.count(text) == 1, f"mutant {number}: its text must occur once in {name}"
        path.write_text(original.replace(text, mutation))
        start = time.monotonic()
        built = run(build, env, 900)
        if built.returncode != 0:
            sys.exit(f"mutant {number} ({what}) does not compile:\n{built.stdout}{built.stderr}")
        tested = run(test, env, 900)
        caught = tested.returncode != 0
        verdict = first_failure(tested.stdout + tested.stderr) if caught else "SURVIVED"
        rows.append((number, name, what, verdict))
        print(f"[{number}/{len(MUTANTS)}] {name}: {what}: "
              f"{'caught by ' + verdict if caught else verdict} ({time.monotonic() - start:.0f} s)", flush=True)
        path.write_text(original)
    caught = sum(row[3] != "SURVIVED" for row in rows)
    print(f"\ncaught {caught} of {len(rows)}\n")
    print("| # | file | planted bug | caught by |\n|---|---|---|---|")
    for number, name, what, verdict in rows:
        print(f"| {number} | {name} | {what} | {verdict} |")
    shutil.rmtree(work)
    sys.exit(0 if caught == len(rows) else 1)


if __name__ == "__main__":
    main()
