// What the .cu files use of CUDA, from nvcc and cub or, for tests, from the SIMT emulator
// (csrc/simt/, built with -DFACEKERNELS_SIMT by the host compiler).
#pragma once

#include <torch/library.h>

#ifdef FACEKERNELS_SIMT

#include "simt/simt.h"

// The emulated kernels are CPU kernels of their own namespace, facekernels_simt.
#define FK_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(facekernels_simt, CPU, m)
#define FK_LAUNCH(grid, block, stream, ...) \
  ::facekernels::simt::make_launcher(__VA_ARGS__, #__VA_ARGS__, grid, block, stream)

namespace facekernels {
using simt::current_stream;
using simt::DeviceGuard;
}  // namespace facekernels

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_reduce.cuh>

#define FK_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(facekernels, CUDA, m)
// FK_LAUNCH(grid, block, stream, kernel)(args...): kernel<<<grid, block, 0, stream>>>(args...)
#define FK_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>

namespace facekernels {
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace facekernels

#endif

namespace facekernels {

// Blocks of `threads` for one thread per element of t (a 1-D grid, whose size is 32-bit).
inline unsigned int element_blocks(const char* op, const at::Tensor& t, int threads) {
  const int64_t blocks = (t.numel() + threads - 1) / threads;
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, op, ": too many elements for one thread each, got ",
                    t.sizes());
  return static_cast<unsigned int>(blocks);
}

}  // namespace facekernels
