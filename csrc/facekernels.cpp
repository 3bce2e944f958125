// The library's op schemas and the Python module that carries the build's identity.
// Kernels register per device in csrc/cpu/ and csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

#include "facekernels_build_info.h"
#include "schemas.h"

TORCH_LIBRARY(facekernels, m) { facekernels::define_ops(m); }

// A real module init, so `import facekernels._C` loads the op registrations above.
static struct PyModuleDef facekernels_module = {PyModuleDef_HEAD_INIT, "_C",
                                                "facekernels compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&facekernels_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "version", FACEKERNELS_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", FACEKERNELS_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "cuda_arch_list", FACEKERNELS_CUDA_ARCH_LIST) < 0 ||
      PyModule_AddStringConstant(module, "compiler", FACEKERNELS_COMPILER) < 0 ||
      PyModule_AddStringConstant(module, "sources_digest", FACEKERNELS_SOURCES_DIGEST) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", FACEKERNELS_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
