#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/runtime.cuh"
#include "adaface_margins.h"

namespace facekernels {
namespace {

constexpr int kThreads = 256;

// One thread per row: n_i, or NaN for a row whose norm is not finite.
template <typename scalar_t, typename acc_t>
__global__ void adaface_norms_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t dim,
                                     double* __restrict__ norms) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) {
    return;
  }
  double squares = 0;
  for (int64_t d = 0; d < dim; ++d) {
    const double v = static_cast<acc_t>(x[i * dim + d]);
    squares += v * v;
  }
  norms[i] = adaface_norm(squares);
}

// One block: when training, the finite norms' count, sum and squared deviations in a fixed
// tree order (deterministic) and the running statistics' step; then every row's margins with
// the statistics in use. A batch is O(N) numbers: one block reads them all.
template <typename acc_t>
__global__ void adaface_margins_kernel(const double* __restrict__ norms, int64_t n,
                                       const double* __restrict__ running, double h,
                                       double margin, double t_alpha, bool training,
                                       acc_t* __restrict__ m2, acc_t* __restrict__ m3,
                                       double* __restrict__ new_mean,
                                       double* __restrict__ new_std) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ double batch_mean;
  __shared__ double in_use[2];  // the running mean and std the margins use
  if (training) {
    double count = 0, sum = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double v = norms[i];
      if (v == v) {
        count += 1;
        sum += v;
      }
    }
    const double total_count = Reduce(storage).Sum(count);  // valid in thread 0 only
    __syncthreads();
    const double total = Reduce(storage).Sum(sum);
    if (threadIdx.x == 0) {
      batch_mean = total / total_count;
    }
    __syncthreads();
    double squares = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double v = norms[i];
      if (v == v) {
        squares += (v - batch_mean) * (v - batch_mean);
      }
    }
    const double total_squares = Reduce(storage).Sum(squares);
    if (threadIdx.x == 0) {
      in_use[0] = running_value(running[0], batch_mean, t_alpha);
      in_use[1] = running_value(running[1], unbiased_std(total_squares, total_count), t_alpha);
    }
  } else if (threadIdx.x == 0) {
    in_use[0] = running[0];
    in_use[1] = running[1];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    adaface_row_margins(norms[i], in_use[0], in_use[1], h, margin, m2 + i, m3 + i);
  }
  if (threadIdx.x == 0) {
    *new_mean = in_use[0];
    *new_std = in_use[1];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaface_margins_cuda(
    const at::Tensor& embeddings, const at::Tensor& mean, const at::Tensor& std_dev, double h,
    double margin, double t_alpha, bool training) {
  AdaFaceMargins a = adaface_margins_setup(embeddings, mean, std_dev, h, margin, t_alpha, training);
  const DeviceGuard guard(embeddings.device());
  const int64_t n = a.embeddings.size(0), dim = a.embeddings.size(1);
  const at::Tensor norms = at::empty({n}, a.running.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.embeddings.scalar_type(), "adaface_margins_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        FK_LAUNCH(element_blocks("adaface_margins", norms, kThreads), kThreads, stream,
                  adaface_norms_kernel<scalar_t, acc_t>)(
            a.embeddings.const_data_ptr<scalar_t>(), n, dim, norms.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        FK_LAUNCH(1, kThreads, stream, adaface_margins_kernel<acc_t>)(
            norms.const_data_ptr<double>(), n, a.running.const_data_ptr<double>(), h, margin,
            t_alpha, training, a.row_m2.mutable_data_ptr<acc_t>(),
            a.row_m3.mutable_data_ptr<acc_t>(), a.new_mean.mutable_data_ptr<double>(),
            a.new_std.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return adaface_margins_finish(a, mean, std_dev);
}

}  // namespace

FK_CUDA_KERNELS(m) { m.impl("adaface_margins", &adaface_margins_cuda); }

}  // namespace facekernels
