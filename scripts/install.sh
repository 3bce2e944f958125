#!/usr/bin/env bash
# Sets up .venv from nothing and builds facekernels in place, naming each phase as it
# starts and showing the build's progress: the CPU kernels always, the CUDA kernels when a
# GPU is visible or when asked (FACEKERNELS_FORCE_CUDA=1; see setup.py for every knob).
#   bash scripts/install.sh        informative
#   bash scripts/install.sh -q     errors and the closing line only
set -euo pipefail
cd "$(dirname "$0")/.."
quiet=0
[ "${1:-}" = "-q" ] && quiet=1
start=$SECONDS
say() { [ "$quiet" = 1 ] || printf 'install.sh [%d:%02d] %s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$*"; }
clock() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
compiling() {
  ps -eo args | grep -o "$PWD/csrc/[^ ]*\.\(cpp\|cu\)" | sed "s|^$PWD/||" | sort -u | paste -sd, - | sed 's/,/, /g'
}
# Every 30 s while a phase runs: that it still does, and which files are compiling.
heartbeat() {
  local since=$SECONDS files
  while sleep 30; do
    files=$(compiling || true)  # none (grep finds nothing) must not end the heartbeat: set -e
    say "  ... still $1, $(clock $((SECONDS - since))) so far${files:+: compiling $files}"
  done
}
beat() { [ "$quiet" = 1 ] || { heartbeat "$1" & }; }
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# torch's wheel unpacks to about 6 GB (CUDA libraries included): on a fuller disk pip dies
# halfway with "No space left on device", so say it before starting.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  free_gb=$(df -Pk .venv | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 8 ]; then
    echo "install.sh: torch needs about 8 GB free to install into .venv; $(df -Ph .venv | awk 'NR == 2 {print $6}') has $free_gb GB" >&2
    exit 1
  fi
fi
say "installing torch 2.14.1, setuptools and ninja into .venv (about 6 GB the first time)"
beat "installing torch"
.venv/bin/python -m pip install -q torch==2.14.1 setuptools wheel ninja
kill $(jobs -p) 2>/dev/null || true
say "installing facekernels' dependencies, then building the extension"

# pip -v carries setup.py's plan and ninja's [k/n] lines (printed as each file is done):
# show those, keep the rest in a log.
log=.venv/build.log
show_progress() {
  local line plan=""
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"  # pip indents its subprocess's output
    case "$line" in
      facekernels:*) [ "$line" = "$plan" ] || say "$line"; plan=$line ;;  # setup.py runs twice
      \[[0-9]*/[0-9]*\]\ *)
        say "  ${line%%]*}] compiled $(grep -o '[^ ]*\.\(cpp\|cu\) ' <<<"$line" | head -1 | sed "s|^$PWD/||; s| $||")" ;;
    esac
  done
}
beat "building"
if ! .venv/bin/python -m pip install -v --no-build-isolation -e '.[test,bench,plot]' 2>&1 | tee "$log" | show_progress; then
  echo "install.sh: the build failed; the last lines of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
kill $(jobs -p) 2>/dev/null || true

summary=$(.venv/bin/python -c 'import facekernels
i = facekernels.build_info()
print("facekernels", i["facekernels"], "for torch", i["torch"] + ",",
      "CUDA kernels for " + ", ".join(i["cuda_arch_list"]) if i["cuda_kernels"] else "CPU kernels only")')
echo "install.sh: done in $(clock $((SECONDS - start))): $summary"
say "next: .venv/bin/facekernels-train (the main job) or .venv/bin/python -m pytest (the tests)"
