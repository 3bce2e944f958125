#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/runtime.cuh"
#include "margin_softmax.h"

namespace facekernels {
namespace {

constexpr int kThreads = 256;

// The row's running state after one chunk: an online log-sum-exp and an argmax.
template <typename acc_t>
struct RowSummary {
  OnlineLse<acc_t> lse;
  ArgMax<acc_t> best;
};

struct MergeSummaries {
  template <typename acc_t>
  __device__ RowSummary<acc_t> operator()(RowSummary<acc_t> a, const RowSummary<acc_t>& b) const {
    a.lse.merge(b.lse);
    a.best.merge(b.best);
    return a;
  }
};

// One block per row: threads stride over the chunk's classes, then merge their partial
// states in cub's fixed tree order (deterministic) and fold the result into the row.
template <typename scalar_t, typename acc_t>
__global__ void forward_epilogue_kernel(const scalar_t* __restrict__ z,
                                        const acc_t* __restrict__ inverse, int64_t length,
                                        int64_t class_start, const int64_t* __restrict__ labels,
                                        const acc_t* __restrict__ row_scale, Margin<acc_t> margins,
                                        acc_t* __restrict__ row_max, acc_t* __restrict__ row_sum,
                                        acc_t* __restrict__ target_logit,
                                        acc_t* __restrict__ best_cosine,
                                        int64_t* __restrict__ predicted) {
  const int64_t i = blockIdx.x, k = margins.sub_centers;
  const Margin<acc_t> margin = margins.for_row(i);
  const scalar_t* row = z + i * length * k;
  const int64_t target = labels[i] - class_start;
  const acc_t scale = row_scale[i];
  RowSummary<acc_t> mine;
  for (int64_t j = threadIdx.x; j < length; j += blockDim.x) {
    int64_t winner;
    const acc_t c =
        margin.class_cosine(row + j, inverse ? inverse + j : nullptr, length, winner);
    const acc_t logit = margin.logit(c, j == target, scale);
    mine.lse.push(logit);
    mine.best.push(c, class_start + j);
    if (j == target) {
      target_logit[i] = logit;
    }
  }
  using Reduce = cub::BlockReduce<RowSummary<acc_t>, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const RowSummary<acc_t> chunk = Reduce(storage).Reduce(mine, MergeSummaries());
  if (threadIdx.x == 0) {
    RowSummary<acc_t> state{{row_max[i], row_sum[i]}, {best_cosine[i], predicted[i]}};
    state = MergeSummaries()(state, chunk);
    row_max[i] = state.lse.max;
    row_sum[i] = state.lse.sum;
    best_cosine[i] = state.best.value;
    predicted[i] = state.best.index;
  }
}

// The row's target is one class, so one thread writes its margin gradients.
template <typename scalar_t, typename acc_t>
__global__ void backward_epilogue_kernel(scalar_t* __restrict__ z,
                                         const acc_t* __restrict__ inverse, int64_t length,
                                         int64_t class_start, const int64_t* __restrict__ labels,
                                         const acc_t* __restrict__ row_scale,
                                         const acc_t* __restrict__ row_max,
                                         const acc_t* __restrict__ log_sum,
                                         const acc_t* __restrict__ grad_log_sum,
                                         const acc_t* __restrict__ grad_target,
                                         Margin<acc_t> margins, acc_t* __restrict__ scale_grad,
                                         acc_t* __restrict__ m2_grad,
                                         acc_t* __restrict__ m3_grad) {
  const int64_t i = blockIdx.x, k = margins.sub_centers;
  const Margin<acc_t> margin = margins.for_row(i);
  scalar_t* row = z + i * length * k;
  const int64_t target = labels[i] - class_start;
  const RowBackward<acc_t> r{row_scale[i], row_max[i], log_sum[i], grad_log_sum[i],
                             grad_target[i]};
  acc_t mine = 0;
  for (int64_t j = threadIdx.x; j < length; j += blockDim.x) {
    class_backward<scalar_t, acc_t>(margin, row + j, inverse ? inverse + j : nullptr, length,
                                    j == target, r, mine,
                                    m2_grad ? m2_grad + i : nullptr,
                                    m3_grad ? m3_grad + i : nullptr);
  }
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const acc_t chunk = Reduce(storage).Sum(mine);
  if (threadIdx.x == 0) {
    scale_grad[i] += chunk;
  }
}

void forward_epilogue_cuda(const at::Tensor& z, const at::Tensor& inverse, int64_t class_start,
                           const at::Tensor& labels, const at::Tensor& row_scale,
                           const MarginOptions& options, RowState& state) {
  const int64_t n = z.size(0), length = z.size(1) / options.sub_centers;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        FK_LAUNCH(n, kThreads, stream, forward_epilogue_kernel<scalar_t, acc_t>)(
            z.const_data_ptr<scalar_t>(), optional_data<acc_t>(inverse), length, class_start,
            labels.const_data_ptr<int64_t>(), row_scale.const_data_ptr<acc_t>(),
            options.margin<acc_t>(),
            state.row_max.mutable_data_ptr<acc_t>(), state.row_sum.mutable_data_ptr<acc_t>(),
            state.target_logit.mutable_data_ptr<acc_t>(),
            state.best_cosine.mutable_data_ptr<acc_t>(),
            state.predicted.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void backward_epilogue_cuda(at::Tensor& z, const at::Tensor& inverse, int64_t class_start,
                            const at::Tensor& labels, const at::Tensor& row_scale,
                            const MarginOptions& options, RowGrads& grads) {
  const int64_t n = z.size(0), length = z.size(1) / options.sub_centers;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        FK_LAUNCH(n, kThreads, stream, backward_epilogue_kernel<scalar_t, acc_t>)(
            z.mutable_data_ptr<scalar_t>(), optional_data<acc_t>(inverse), length, class_start,
            labels.const_data_ptr<int64_t>(), row_scale.const_data_ptr<acc_t>(),
            grads.row_max.const_data_ptr<acc_t>(),
            grads.log_sum.const_data_ptr<acc_t>(), grads.grad_log_sum.const_data_ptr<acc_t>(),
            grads.grad_target.const_data_ptr<acc_t>(), options.margin<acc_t>(),
            grads.scale.mutable_data_ptr<acc_t>(), optional_mutable_data<acc_t>(grads.m2),
            optional_mutable_data<acc_t>(grads.m3));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

FK_CUDA_KERNELS(m) {
  m.impl("margin_softmax_forward", &margin_softmax_forward<&forward_epilogue_cuda>);
  m.impl("margin_softmax_backward", &margin_softmax_backward<&backward_epilogue_cuda>);
  m.impl("margin_softmax_forward_backward",
         &margin_softmax_forward_backward<
             &sequential_step<&forward_epilogue_cuda, &backward_epilogue_cuda>>);
}

}  // namespace facekernels
