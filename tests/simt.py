"""The SIMT emulation build: csrc/cuda/*.cu compiled by the host compiler against
csrc/simt/ (see README, "Contributing"), loaded as the op library facekernels_simt.

Tests only: it is built on first use into build/simt (ninja, cached), never installed.
FACEKERNELS_SIMT_CSRC and FACEKERNELS_SIMT_BUILD point it at other sources and another
build folder (scripts/simt_mutants.py builds mutated copies that way)."""

import contextlib
import os
import time
import warnings
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path(os.environ.get("FACEKERNELS_SIMT_CSRC", ROOT / "csrc"))
BUILD = Path(os.environ.get("FACEKERNELS_SIMT_BUILD", ROOT / "build" / "simt"))
# The emulated CUDA sources, the device-neutral orchestration they call, the runtime.
SOURCES = sorted(CSRC.glob("simt/*.cpp")) + sorted(CSRC.glob("*.cpp"))
SOURCES = [s for s in SOURCES if s.name != "facekernels.cpp"]
# The ops with a CUDA kernel: the ones the emulator replaces.
OPS = ("adaface_margins", "margin_softmax_forward", "margin_softmax_backward",
       "margin_softmax_forward_backward", "triplet_margin_forward", "triplet_mine",
       "center_loss_forward", "center_loss_backward", "center_loss_update_", "pairwise_distance",
       "pairwise_distance_backward")

enabled = os.environ.get("FACEKERNELS_SIMT", "1") != "0"


def session_seed():
    """FACEKERNELS_SIMT_SEED, or a fresh one exported so that the library uses it too."""
    if not os.environ.get("FACEKERNELS_SIMT_SEED"):
        os.environ["FACEKERNELS_SIMT_SEED"] = str(int.from_bytes(os.urandom(4), "little"))
    return int(os.environ["FACEKERNELS_SIMT_SEED"])


def build(say=print):
    """Builds (or finds up to date) and loads the emulation library."""
    if hasattr(torch.ops.facekernels_simt, "set_seed"):
        return
    from torch.utils.cpp_extension import load

    session_seed()
    BUILD.mkdir(parents=True, exist_ok=True)
    say(f"facekernels_simt: building the SIMT emulation of the CUDA kernels ({len(SOURCES)} "
        f"sources; about 2 minutes on 2 cores the first time, cached in {BUILD})")
    start = time.monotonic()
    load(name="facekernels_simt", sources=[str(s) for s in SOURCES],
         extra_include_paths=[str(CSRC)],
         # Hidden symbols: the copies of the device-neutral code never bind to facekernels._C's.
         extra_cflags=["-O2", "-DFACEKERNELS_SIMT", "-fvisibility=hidden"],
         build_directory=str(BUILD), is_python_module=False)
    say(f"facekernels_simt: ready in {time.monotonic() - start:.0f} s")


def seed_for(test_id):
    """The seed of one test: replaying FACEKERNELS_SIMT_SEED replays each test alone too."""
    return zlib.crc32(f"{session_seed()}:{test_id}".encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def routed(seed):
    """facekernels' CPU kernels replaced by the emulated CUDA kernels, seeded."""
    torch.ops.facekernels_simt.set_seed(seed)
    library = torch.library.Library("facekernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        for op in OPS:
            library.impl(op, getattr(torch.ops.facekernels_simt, op).default, "CPU")
    try:
        yield
    finally:
        library._destroy()
