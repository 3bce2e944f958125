#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "center_loss.h"

namespace facekernels {
namespace {

// Each task owns whole label groups, so no two threads touch the same row.
constexpr int64_t kGrain = 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor> center_loss_forward_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& centers,
    double alpha, bool compute_update) {
  CenterForward f = center_forward_setup(embeddings, labels, centers, compute_update);
  const int64_t n = f.embeddings.size(0), dim = f.embeddings.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, f.embeddings.scalar_type(), "center_loss_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = f.embeddings.const_data_ptr<scalar_t>();
        const scalar_t* c = f.centers.const_data_ptr<scalar_t>();
        const int64_t* sorted = f.sorted_labels.const_data_ptr<int64_t>();
        const int64_t* members = f.members.const_data_ptr<int64_t>();
        scalar_t* diff = f.diff.mutable_data_ptr<scalar_t>();
        scalar_t* updated = compute_update ? f.updated.mutable_data_ptr<scalar_t>() : nullptr;
        acc_t* partials = f.partials.mutable_data_ptr<acc_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            if (!is_group_start(sorted, k)) {
              continue;
            }
            const int64_t count = group_end(sorted, k, n) - k;
            const scalar_t* center = c + sorted[k] * dim;
            acc_t squares = 0;
            for (int64_t d = 0; d < dim; ++d) {
              squares += center_forward_column<scalar_t, acc_t>(
                  x + d, members + k, count, dim, center[d], static_cast<acc_t>(alpha),
                  diff + d, updated == nullptr ? nullptr : updated + d);
            }
            partials[k] = squares;
          }
        });
      });
  return center_forward_finish(f);
}

std::tuple<at::Tensor, at::Tensor> center_loss_backward_cpu(const at::Tensor& grad_loss,
                                                            const at::Tensor& diff,
                                                            const at::Tensor& labels,
                                                            int64_t num_classes,
                                                            bool centers_grad) {
  CenterBackward b = center_backward_setup(grad_loss, diff, labels, num_classes, centers_grad);
  const int64_t n = b.diff.size(0), dim = b.diff.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, b.diff.scalar_type(), "center_loss_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* dv = b.diff.const_data_ptr<scalar_t>();
        const int64_t* sorted = b.sorted_labels.const_data_ptr<int64_t>();
        const int64_t* members = b.members.const_data_ptr<int64_t>();
        const acc_t scale = *b.scale.const_data_ptr<acc_t>();
        scalar_t* gx = b.grad_embeddings.mutable_data_ptr<scalar_t>();
        scalar_t* gc = centers_grad ? b.grad_centers.mutable_data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            if (!is_group_start(sorted, k)) {
              continue;
            }
            const int64_t count = group_end(sorted, k, n) - k;
            for (int64_t d = 0; d < dim; ++d) {
              const acc_t sum = center_backward_column<scalar_t, acc_t>(dv + d, members + k, count,
                                                                        dim, scale, gx + d);
              if (gc != nullptr) {
                gc[sorted[k] * dim + d] = static_cast<scalar_t>(-scale * sum);
              }
            }
          }
        });
      });
  return {b.grad_embeddings, b.grad_centers};
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("center_loss_forward", &center_loss_forward_cpu);
  m.impl("center_loss_backward", &center_loss_backward_cpu);
}

}  // namespace facekernels
