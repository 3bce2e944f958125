// Kernels that use the emulator right and wrong, written as CUDA: tests/test_simt.py checks
// that the emulator runs the first and reports the second as a GPU would (or better).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/runtime.cuh"

namespace facekernels {
namespace {

constexpr int kThreads = 64;
using Reduce = cub::BlockReduce<double, kThreads>;

// Every thread records what the block's sum looks like from where it stands.
__global__ void reduce_kernel(double* out) {
  __shared__ Reduce::TempStorage storage;
  const double sum = Reduce(storage).Sum(threadIdx.x + 1.0);
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// A second reduction on the same storage; `synced` puts the barrier cub asks for between.
__global__ void reuse_kernel(double* out, bool synced) {
  __shared__ Reduce::TempStorage storage;
  double sum = Reduce(storage).Sum(1.0);
  if (synced) {
    __syncthreads();
  }
  sum += Reduce(storage).Sum(2.0);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = sum;
  }
}

// Threads of one block wait at two different barriers.
__global__ void divergent_barrier_kernel(double* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Thread 0 leaves before a barrier the others wait at.
__global__ void early_exit_kernel(double* out) {
  if (threadIdx.x == 0) {
    return;
  }
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Thread 0 publishes through shared memory; after the barrier every thread reads it.
__global__ void shared_kernel(double* out) {
  __shared__ double value;
  if (threadIdx.x == 0) {
    value = blockIdx.x + 0.5;
  }
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

// The order in which threads and blocks run, phase by phase: each thread appends
// block * blockDim + thread to the log before and after one barrier.
__global__ void order_kernel(double* out, int64_t* cursor) {
  const double id = blockIdx.x * blockDim.x + threadIdx.x;
  out[(*cursor)++] = id;
  __syncthreads();
  out[(*cursor)++] = id;
}

at::Tensor selftest(const std::string& kernel, int64_t grid, int64_t block) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(grid, 1 << 12)) *
                          std::max<int64_t>(1, std::min<int64_t>(block, 1024));
  at::Tensor out = at::zeros({2 * threads}, at::kDouble);
  double* o = out.mutable_data_ptr<double>();
  const cudaStream_t stream = current_stream();
  if (kernel == "reduce") {
    FK_LAUNCH(grid, block, stream, reduce_kernel)(o);
  } else if (kernel == "reuse") {
    FK_LAUNCH(grid, block, stream, reuse_kernel)(o, false);
  } else if (kernel == "reuse_synced") {
    FK_LAUNCH(grid, block, stream, reuse_kernel)(o, true);
  } else if (kernel == "divergent_barrier") {
    FK_LAUNCH(grid, block, stream, divergent_barrier_kernel)(o);
  } else if (kernel == "early_exit") {
    FK_LAUNCH(grid, block, stream, early_exit_kernel)(o);
  } else if (kernel == "shared") {
    FK_LAUNCH(grid, block, stream, shared_kernel)(o);
  } else if (kernel == "order") {
    int64_t cursor = 0;
    FK_LAUNCH(grid, block, stream, order_kernel)(o, &cursor);
  } else if (kernel == "unchecked") {
    // A refused launch nobody checks, then another launch.
    FK_LAUNCH(0, block, stream, shared_kernel)(o);
    FK_LAUNCH(grid, block, stream, shared_kernel)(o);
  } else {
    TORCH_CHECK_VALUE(false, "facekernels_simt::selftest: unknown kernel ", kernel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace facekernels

TORCH_LIBRARY_FRAGMENT(facekernels_simt, m) {
  m.def("selftest(str kernel, int grid, int block) -> Tensor", &facekernels::selftest);
}
