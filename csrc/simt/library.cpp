// facekernels_simt: the library's ops, with the emulated CUDA kernels as their CPU kernels,
// and the seed of the emulator.
#include <torch/library.h>

#include "schemas.h"
#include "simt/simt.h"

TORCH_LIBRARY(facekernels_simt, m) {
  facekernels::define_ops(m);
  m.def("set_seed(int seed) -> ()", &facekernels::simt::set_seed);
  m.def("launch_count() -> int", &facekernels::simt::launch_count);
}
