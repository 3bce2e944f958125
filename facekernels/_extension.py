"""Loads the compiled extension and refuses one that does not match this checkout."""

import os

import torch

from facekernels._sources import sources_digest
from facekernels.version import __version__

_REBUILD = (
    "Rebuild it from the source checkout with "
    "`pip install --no-build-isolation -e .` (see README.md; "
    "FACEKERNELS_FORCE_CPU=1 skips the CUDA sources for a quick CPU-only build)."
)
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _load():
    try:
        from facekernels import _C
    except ImportError as error:  # also a .so built against another torch (undefined symbols)
        raise ImportError(f"facekernels: the compiled extension facekernels._C could not be loaded ({error}). {_REBUILD}") from error
    stale = []
    if _C.version != __version__:
        stale.append(f"it was built for facekernels {_C.version}, this is {__version__}")
    if _C.torch_version != torch.__version__:
        stale.append(f"it was built against torch {_C.torch_version}, this is torch {torch.__version__}")
    # In a source checkout, a C++/CUDA edit since the build means the extension is out of date.
    if os.path.isdir(_CSRC) and _C.sources_digest != sources_digest(_CSRC):
        stale.append(f"the sources in {_CSRC} changed since it was built")
    if stale:
        raise ImportError(f"facekernels: the compiled extension is stale: {'; '.join(stale)}. {_REBUILD}")
    return _C


_C = _load()


def build_info():
    """What the loaded extension was built from: versions, CUDA support, arch list, compiler."""
    return {
        "facekernels": _C.version,
        "torch": _C.torch_version,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_arch_list": _C.cuda_arch_list.split(";") if _C.cuda_arch_list else [],
        "compiler": _C.compiler,
        "cuda_available": torch.cuda.is_available(),
    }
