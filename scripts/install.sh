#!/usr/bin/env bash
# Sets up .venv from nothing and builds facekernels in place: the CUDA sources too whenever
# a CUDA toolkit is found (also on a machine without a GPU), else CPU only.
# Honours FACEKERNELS_FORCE_CPU=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q torch==2.14.1 setuptools wheel ninja
.venv/bin/python -m pip install -q --no-build-isolation -e '.[test,bench,plot]'
.venv/bin/python -c 'import json, facekernels; print("facekernels build:", json.dumps(facekernels.build_info()))'
