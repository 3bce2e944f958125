import importlib
import os
import shutil
import sys
import types

import pytest
import torch

import facekernels
from facekernels import _extension
from facekernels._sources import sources_digest


def test_build_info_describes_the_loaded_extension():
    info = facekernels.build_info()
    assert info["facekernels"] == facekernels.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert info["compiler"]
    if info["cuda_kernels"]:
        assert info["cuda_arch_list"], "a CUDA build names its architectures"
        assert "nvcc" in info["compiler"]
    assert torch.ops.facekernels.center_loss_forward.default is not None


def test_cuda_kernels_are_registered_when_compiled_in():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "facekernels::center_loss_forward", "CUDA"
    )
    assert has_cuda_kernel == facekernels.build_info()["cuda_kernels"]


def _reload_with_fake_extension(monkeypatch, **fields):
    fake = types.SimpleNamespace(**{**vars_of(_extension._C), **fields})
    monkeypatch.setitem(sys.modules, "facekernels._C", fake)
    monkeypatch.setattr(facekernels, "_C", fake, raising=False)
    try:
        importlib.reload(_extension)
    finally:
        monkeypatch.undo()
        importlib.reload(_extension)


def vars_of(module):
    names = ("version", "torch_version", "cuda_arch_list", "compiler", "sources_digest", "with_cuda")
    return {name: getattr(module, name) for name in names}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("version", "0.0.0-old", "built for facekernels 0.0.0-old"),
        ("torch_version", "1.0.0", "built against torch 1.0.0"),
    ],
)
def test_stale_extension_is_refused_with_rebuild_instructions(monkeypatch, field, value, message):
    with pytest.raises(ImportError, match="stale") as error:
        _reload_with_fake_extension(monkeypatch, **{field: value})
    assert message in str(error.value)
    assert "pip install --no-build-isolation -e ." in str(error.value)


def test_edited_sources_are_detected(monkeypatch):
    if not os.path.isdir(_extension._CSRC):
        pytest.skip("installed without a source checkout: there are no sources to compare")
    with pytest.raises(ImportError, match="changed since it was built"):
        _reload_with_fake_extension(monkeypatch, sources_digest="0" * 64)


def test_missing_extension_says_how_to_rebuild(monkeypatch):
    monkeypatch.setitem(sys.modules, "facekernels._C", None)  # makes the import fail
    monkeypatch.delattr(facekernels, "_C", raising=False)
    try:
        with pytest.raises(ImportError, match="could not be loaded.*pip install"):
            importlib.reload(_extension)
    finally:
        monkeypatch.undo()
        importlib.reload(_extension)


def test_the_emulator_is_not_part_of_the_extension(tmp_path):
    """csrc/simt/ builds the test-only emulation library, not facekernels._C: editing it
    does not make the extension stale; editing a kernel does."""
    if not os.path.isdir(_extension._CSRC):
        pytest.skip("installed without a source checkout: there are no sources to compare")
    csrc = tmp_path / "csrc"
    shutil.copytree(_extension._CSRC, csrc)
    digest = sources_digest(csrc)
    (csrc / "simt" / "runtime.cpp").write_text("// edited")
    assert sources_digest(csrc) == digest
    (csrc / "cuda" / "triplet_cuda.cu").write_text("// edited")
    assert sources_digest(csrc) != digest
