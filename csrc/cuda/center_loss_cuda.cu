#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/runtime.cuh"
#include "center_loss.h"

namespace facekernels {
namespace {

constexpr int kThreads = 128;

// One block per sorted position; the block at the start of a label group handles that
// class, its threads striding over the embedding dimensions. Blocks elsewhere exit at once.
// The group's sum of squares is reduced in a fixed tree order (deterministic).
template <typename scalar_t, typename acc_t>
__global__ void center_forward_kernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ centers,
                                      const int64_t* __restrict__ sorted,
                                      const int64_t* __restrict__ members, int64_t n,
                                      int64_t dim, acc_t alpha, scalar_t* __restrict__ diff,
                                      scalar_t* __restrict__ updated,
                                      acc_t* __restrict__ partials) {
  const int64_t k = blockIdx.x;
  if (!is_group_start(sorted, k)) {
    return;
  }
  const int64_t count = group_end(sorted, k, n) - k;
  const scalar_t* center = centers + sorted[k] * dim;
  acc_t squares = 0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    squares += center_forward_column<scalar_t, acc_t>(x + d, members + k, count, dim, center[d],
                                                      alpha, diff + d,
                                                      updated == nullptr ? nullptr : updated + d);
  }
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const acc_t total = Reduce(storage).Sum(squares);
  if (threadIdx.x == 0) {
    partials[k] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void center_backward_kernel(const scalar_t* __restrict__ diff,
                                       const int64_t* __restrict__ sorted,
                                       const int64_t* __restrict__ members, int64_t n,
                                       int64_t dim, const acc_t* __restrict__ scale_ptr,
                                       scalar_t* __restrict__ grad_x,
                                       scalar_t* __restrict__ grad_centers) {
  const int64_t k = blockIdx.x;
  if (!is_group_start(sorted, k)) {
    return;
  }
  const int64_t count = group_end(sorted, k, n) - k;
  const acc_t scale = *scale_ptr;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const acc_t sum =
        center_backward_column<scalar_t, acc_t>(diff + d, members + k, count, dim, scale, grad_x + d);
    if (grad_centers != nullptr) {
      grad_centers[sorted[k] * dim + d] = static_cast<scalar_t>(-scale * sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> center_loss_forward_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& centers,
    double alpha, bool compute_update) {
  // Checks first: a CPU tensor among CUDA ones gets our message, not the guard's.
  CenterForward f = center_forward_setup(embeddings, labels, centers, compute_update);
  const DeviceGuard guard(embeddings.device());
  const int64_t n = f.embeddings.size(0), dim = f.embeddings.size(1);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, f.embeddings.scalar_type(), "center_loss_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        FK_LAUNCH(n, kThreads, stream, center_forward_kernel<scalar_t, acc_t>)(
            f.embeddings.const_data_ptr<scalar_t>(), f.centers.const_data_ptr<scalar_t>(),
            f.sorted_labels.const_data_ptr<int64_t>(), f.members.const_data_ptr<int64_t>(), n,
            dim, static_cast<acc_t>(alpha), f.diff.mutable_data_ptr<scalar_t>(),
            compute_update ? f.updated.mutable_data_ptr<scalar_t>() : nullptr,
            f.partials.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return center_forward_finish(f);
}

std::tuple<at::Tensor, at::Tensor> center_loss_backward_cuda(const at::Tensor& grad_loss,
                                                             const at::Tensor& diff,
                                                             const at::Tensor& labels,
                                                             int64_t num_classes,
                                                             bool centers_grad) {
  CenterBackward b = center_backward_setup(grad_loss, diff, labels, num_classes, centers_grad);
  const DeviceGuard guard(diff.device());
  const int64_t n = b.diff.size(0), dim = b.diff.size(1);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, b.diff.scalar_type(), "center_loss_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        FK_LAUNCH(n, kThreads, stream, center_backward_kernel<scalar_t, acc_t>)(
            b.diff.const_data_ptr<scalar_t>(), b.sorted_labels.const_data_ptr<int64_t>(),
            b.members.const_data_ptr<int64_t>(), n, dim, b.scale.const_data_ptr<acc_t>(),
            b.grad_embeddings.mutable_data_ptr<scalar_t>(),
            centers_grad ? b.grad_centers.mutable_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {b.grad_embeddings, b.grad_centers};
}

void center_loss_update_cuda(const at::Tensor& centers, const at::Tensor& labels,
                             const at::Tensor& updated) {
  check_center_update(centers, labels, updated);
  const DeviceGuard guard(centers.device());
  centers.index_copy_(0, labels, updated);
}

}  // namespace

FK_CUDA_KERNELS(m) {
  m.impl("center_loss_forward", &center_loss_forward_cuda);
  m.impl("center_loss_backward", &center_loss_backward_cuda);
  m.impl("center_loss_update_", &center_loss_update_cuda);
}

}  // namespace facekernels
