#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/runtime.cuh"
#include "pairwise_distance.h"

namespace facekernels {
namespace {

constexpr int kThreads = 256;

// One thread per element of the [n, m] matrix.
template <typename scalar_t>
__global__ void gram_kernel(scalar_t* squared, const scalar_t* norm_x, const scalar_t* norm_ref,
                            bool* close, int64_t n, int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < n * m) {
    const GramSquared<scalar_t> g = gram_squared<scalar_t, acc_t>(norm_x[k / m], norm_ref[k % m], squared[k]);
    squared[k] = g.squared;
    close[k] = g.close;
  }
}

template <typename scalar_t>
__global__ void finish_kernel(scalar_t* squared, int64_t n, int64_t m, bool self_ref) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < n * m) {
    squared[k] = finish_squared<scalar_t, acc_t>(squared[k], self_ref && k / m == k % m);
  }
}

template <typename scalar_t>
__global__ void slopes_kernel(scalar_t* out, const scalar_t* grad, const scalar_t* dist,
                              int64_t count, bool squared_only) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < count) {
    out[k] = distance_slope<acc_t>(grad[k], dist[k], squared_only);
  }
}

unsigned int blocks(const at::Tensor& t) {
  return element_blocks("pairwise_distance", t, kThreads);
}

#define FK_DISPATCH(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), name, __VA_ARGS__)

at::Tensor gram_cuda(at::Tensor& squared, const at::Tensor& norm_x, const at::Tensor& norm_ref) {
  at::Tensor close = at::empty(squared.sizes(), squared.options().dtype(at::kBool));
  FK_DISPATCH(squared, "pairwise_distance_gram_cuda", [&] {
    FK_LAUNCH(blocks(squared), kThreads, current_stream(), gram_kernel<scalar_t>)(
        squared.mutable_data_ptr<scalar_t>(), norm_x.const_data_ptr<scalar_t>(),
        norm_ref.const_data_ptr<scalar_t>(), close.mutable_data_ptr<bool>(), squared.size(0),
        squared.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return close.view({-1}).nonzero().squeeze(1);
}

void finish_cuda(at::Tensor& squared, bool self_ref) {
  FK_DISPATCH(squared, "pairwise_distance_finish_cuda", [&] {
    FK_LAUNCH(blocks(squared), kThreads, current_stream(), finish_kernel<scalar_t>)(
        squared.mutable_data_ptr<scalar_t>(), squared.size(0), squared.size(1), self_ref);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void slopes_cuda(at::Tensor& out, const at::Tensor& grad, const at::Tensor& dist,
                 bool squared_only) {
  FK_DISPATCH(out, "pairwise_distance_slopes_cuda", [&] {
    FK_LAUNCH(blocks(out), kThreads, current_stream(), slopes_kernel<scalar_t>)(
        out.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        dist.const_data_ptr<scalar_t>(), out.numel(), squared_only);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr DistanceKernels kCudaKernels{&gram_cuda, &finish_cuda, &slopes_cuda};

at::Tensor pairwise_distance_cuda(const at::Tensor& x, const at::Tensor& ref, bool self_ref,
                                  bool squared) {
  return pairwise_distance_impl(x, ref, self_ref, squared, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(
    const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& x, const at::Tensor& ref,
    bool squared, bool x_grad, bool ref_grad) {
  return pairwise_distance_backward_impl(grad, dist, x, ref, squared, x_grad, ref_grad,
                                         kCudaKernels);
}

}  // namespace

FK_CUDA_KERNELS(m) {
  m.impl("pairwise_distance", &pairwise_distance_cuda);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_cuda);
}

}  // namespace facekernels
