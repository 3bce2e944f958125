#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "margin_softmax.h"

namespace facekernels {
namespace {

// Each task owns whole rows; a row's classes are visited in order, so sums are reproducible.
void forward_epilogue_cpu(const at::Tensor& z, int64_t class_start, const at::Tensor& labels,
                          const at::Tensor& row_scale, const MarginOptions& options,
                          RowState& state) {
  const int64_t n = z.size(0), k = options.sub_centers, length = z.size(1) / k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Margin<acc_t> margins = options.margin<acc_t>();
        const scalar_t* zp = z.const_data_ptr<scalar_t>();
        const int64_t* label = labels.const_data_ptr<int64_t>();
        const acc_t* scale = row_scale.const_data_ptr<acc_t>();
        acc_t* row_max = state.row_max.mutable_data_ptr<acc_t>();
        acc_t* row_sum = state.row_sum.mutable_data_ptr<acc_t>();
        acc_t* target_logit = state.target_logit.mutable_data_ptr<acc_t>();
        acc_t* best_cosine = state.best_cosine.mutable_data_ptr<acc_t>();
        int64_t* predicted = state.predicted.mutable_data_ptr<int64_t>();
        at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const Margin<acc_t> margin = margins.for_row(i);
            const scalar_t* row = zp + i * length * k;
            const int64_t target = label[i] - class_start;
            OnlineLse<acc_t> lse{row_max[i], row_sum[i]};
            ArgMax<acc_t> best{best_cosine[i], predicted[i]};
            for (int64_t j = 0; j < length; ++j) {
              int64_t winner;
              const acc_t c = margin.class_cosine(row + j * k, winner);
              const acc_t logit = margin.logit(c, j == target, scale[i]);
              lse.push(logit);
              best.push(c, class_start + j);
              if (j == target) {
                target_logit[i] = logit;
              }
            }
            row_max[i] = lse.max;
            row_sum[i] = lse.sum;
            best_cosine[i] = best.value;
            predicted[i] = best.index;
          }
        });
      });
}

void backward_epilogue_cpu(at::Tensor& z, int64_t class_start, const at::Tensor& labels,
                           const at::Tensor& row_scale, const MarginOptions& options,
                           RowGrads& grads) {
  const int64_t n = z.size(0), k = options.sub_centers, length = z.size(1) / k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Margin<acc_t> margins = options.margin<acc_t>();
        scalar_t* zp = z.mutable_data_ptr<scalar_t>();
        const int64_t* label = labels.const_data_ptr<int64_t>();
        const acc_t* scale = row_scale.const_data_ptr<acc_t>();
        const acc_t* max = grads.row_max.const_data_ptr<acc_t>();
        const acc_t* lsum = grads.log_sum.const_data_ptr<acc_t>();
        const acc_t* g_lsum = grads.grad_log_sum.const_data_ptr<acc_t>();
        const acc_t* g_target = grads.grad_target.const_data_ptr<acc_t>();
        acc_t* s_grad = grads.scale.mutable_data_ptr<acc_t>();
        acc_t* m2_grad = grads.m2.defined() ? grads.m2.mutable_data_ptr<acc_t>() : nullptr;
        acc_t* m3_grad = grads.m3.defined() ? grads.m3.mutable_data_ptr<acc_t>() : nullptr;
        at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const Margin<acc_t> margin = margins.for_row(i);
            const RowBackward<acc_t> r{scale[i], max[i], lsum[i], g_lsum[i], g_target[i]};
            scalar_t* row = zp + i * length * k;
            const int64_t target = label[i] - class_start;
            acc_t row_scale_grad = 0;
            for (int64_t j = 0; j < length; ++j) {
              class_backward<scalar_t, acc_t>(margin, row + j * k, j == target, r, row_scale_grad,
                                              m2_grad ? m2_grad + i : nullptr,
                                              m3_grad ? m3_grad + i : nullptr);
            }
            s_grad[i] += row_scale_grad;
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("margin_softmax_forward", &margin_softmax_forward<&forward_epilogue_cpu>);
  m.impl("margin_softmax_backward", &margin_softmax_backward<&backward_epilogue_cpu>);
}

}  // namespace facekernels
