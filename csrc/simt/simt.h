// The SIMT emulator: enough of CUDA for the host compiler to build csrc/cuda/*.cu and run
// their kernels on the CPU, for tests only (never part of a user's install).
//
// A launch runs its blocks one after another in a random order; a block's threads are
// fibers that run one at a time, each until its next __syncthreads, and resume in a new
// random order after every barrier. cub::BlockReduce keeps cub's contract strictly: the
// aggregate is valid in thread 0 only (every other thread gets random bytes), and reusing
// its TempStorage without a barrier is an error. The seed comes from FACEKERNELS_SIMT_SEED
// or the facekernels_simt::set_seed op.
//
// What it cannot see: the memory model, warp-level behaviour, real cub internals,
// host/device pointer mix-ups, streams, cuBLAS, the device math library, register and
// shared-memory limits, speed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One variable per block: blocks run one at a time on the launching thread.
#define __shared__ static thread_local
#define __syncthreads() ::facekernels::simt::barrier(__FILE__, __LINE__)
#define threadIdx (::facekernels::simt::thread_index())
#define blockIdx (::facekernels::simt::block_index())
#define blockDim (::facekernels::simt::block_dim())
#define gridDim (::facekernels::simt::grid_dim())

typedef struct CUstream_st* cudaStream_t;

namespace facekernels {
namespace simt {

struct uint3 {
  unsigned int x, y, z;
};

uint3 thread_index();
uint3 block_index();
uint3 block_dim();
uint3 grid_dim();

// __syncthreads of the running thread. `file:line` (and a collective's storage) name the
// barrier: every thread of the block must wait at the same one.
void barrier(const char* file, int line, const void* storage = nullptr);

// Ends the running thread's kernel with an error, reported by the launch.
[[noreturn]] void fail(const std::string& message);

// Random bytes from the launch's seeded generator: what a thread reads where cub leaves a
// value undefined.
void random_bytes(void* out, size_t size);

// Runs body on every thread of every block: one launch, synchronous. A configuration the
// driver refuses is recorded as the pending launch error (cudaErrorInvalidConfiguration)
// and nothing runs, as on a GPU.
void launch(const char* kernel, int64_t grid, int64_t block, cudaStream_t stream,
            const std::function<void()>& body);

// C10_CUDA_KERNEL_LAUNCH_CHECK: raises the pending launch error, if any, and clears it.
void check_last_launch(const char* file, int line);

// A cub collective's use of its TempStorage: which block and barrier epoch last read it.
struct StorageUse {
  uint64_t block = 0;
  uint64_t epoch = 0;
};

// Entry into a collective over BLOCK_DIM_X threads: the block must have that many, and the
// storage must not have been read since the last barrier.
void collective_enter(const char* collective, StorageUse& use, int block_dim_x);
// The collective's internal barrier; afterwards the storage counts as read in this epoch.
void collective_barrier(StorageUse& use);

template <typename Kernel>
struct Launcher;

// FK_LAUNCH(grid, block, stream, kernel)(args...): every thread calls the kernel with its
// own copy of the arguments, converted to the kernel's parameter types.
template <typename... Params>
struct Launcher<void (*)(Params...)> {
  void (*kernel)(Params...);
  const char* name;
  int64_t grid, block;
  cudaStream_t stream;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    launch(name, grid, block, stream, [&] { std::apply(kernel, params); });
  }
};

template <typename... Params>
Launcher<void (*)(Params...)> make_launcher(void (*kernel)(Params...), const char* name,
                                            int64_t grid, int64_t block, cudaStream_t stream) {
  return {kernel, name, grid, block, stream};
}

cudaStream_t current_stream();

// Launches that ran, since the library was loaded.
int64_t launch_count();

// Reseeds the generator behind block and thread orders and undefined values.
void set_seed(int64_t seed);

// Stands for c10::cuda::CUDAGuard: the emulated kernels read CPU tensors.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "facekernels_simt: the emulated CUDA kernels take CPU tensors, got ",
                device);
  }
};

}  // namespace simt
}  // namespace facekernels

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::facekernels::simt::check_last_launch(__FILE__, __LINE__)

namespace cub {

// cub::BlockReduce<T, BLOCK_DIM_X> with cub's default algorithm's order: each warp of 32
// reduces as a shuffle tree (offsets 1, 2, 4, 8, 16), then thread 0 folds the warps' results
// in order.
template <typename T, int BLOCK_DIM_X>
class BlockReduce {
  static_assert(std::is_trivially_copyable<T>::value, "BlockReduce takes trivially copyable types");

 public:
  struct TempStorage {
    facekernels::simt::StorageUse use;
    T values[BLOCK_DIM_X];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  T Sum(T input) {
    return Reduce(input, [](const T& a, const T& b) { return a + b; });
  }

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp op) {
    facekernels::simt::collective_enter("cub::BlockReduce", storage_.use, BLOCK_DIM_X);
    const unsigned int tid = threadIdx.x;
    storage_.values[tid] = input;
    facekernels::simt::collective_barrier(storage_.use);
    T result;
    if (tid != 0) {
      facekernels::simt::random_bytes(&result, sizeof(T));
      return result;
    }
    constexpr int kWarp = 32;
    for (int warp = 0; warp < BLOCK_DIM_X; warp += kWarp) {
      const int lanes = BLOCK_DIM_X - warp < kWarp ? BLOCK_DIM_X - warp : kWarp;
      T lane[kWarp];
      for (int l = 0; l < lanes; ++l) {
        lane[l] = storage_.values[warp + l];
      }
      for (int offset = 1; offset < lanes; offset *= 2) {
        for (int l = 0; l + offset < lanes; l += 2 * offset) {
          lane[l] = op(lane[l], lane[l + offset]);
        }
      }
      result = warp == 0 ? lane[0] : op(result, lane[0]);
    }
    return result;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
