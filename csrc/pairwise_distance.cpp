#include "pairwise_distance.h"

#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>

#include "common/checks.h"

namespace facekernels {
namespace {

constexpr const char* kOp = "pairwise_distance";

void check_rows(const at::Tensor& x, const at::Tensor& ref, bool self_ref) {
  check_defined_floating(kOp, "x", x);
  check_defined_floating(kOp, "ref", ref);
  check_dim(kOp, "x", x, 2);
  check_dim(kOp, "ref", ref, 2);
  check_same_device(kOp, "ref", ref, x);
  TORCH_CHECK_TYPE(ref.scalar_type() == x.scalar_type(), kOp, ": ref must have x's dtype ",
                   x.scalar_type(), ", got ", ref.scalar_type());
  TORCH_CHECK_VALUE(ref.size(1) == x.size(1), kOp, ": ref must have x's ", x.size(1),
                    " columns, got ", ref.sizes());
  TORCH_CHECK_VALUE(!self_ref || ref.size(0) == x.size(0), kOp,
                    ": self_ref needs ref to be x, got ", x.size(0), " and ", ref.size(0), " rows");
}

// sum_k x_k^2 per row, by the reference's tensor ops (their rounding included).
at::Tensor squared_norms(const at::Tensor& x) {
  return (x * x).sum(1);
}

// The entries `close` (flat indices) of squared recomputed as sum_k (x_ik - r_jk)^2 in
// opmath, by the reference's tensor ops: where the Gram form cancels it keeps only about
// sqrt(eps) of a small distance.
void refine(at::Tensor& squared, const at::Tensor& close, const at::Tensor& x,
            const at::Tensor& ref) {
  const auto acc = at::toOpMathType(x.scalar_type());
  // K x D temporaries, at most ~16M elements at a time.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(x.size(1), 1));
  at::Tensor flat = squared.view({-1});
  for (int64_t begin = 0; begin < close.size(0); begin += chunk) {
    const at::Tensor part = close.slice(0, begin, std::min(begin + chunk, close.size(0)));
    const at::Tensor rows = part.div(squared.size(1), "floor");
    const at::Tensor cols = part - rows * squared.size(1);
    const at::Tensor diff = x.index_select(0, rows).to(acc) - ref.index_select(0, cols).to(acc);
    flat.index_copy_(0, part, diff.square().sum(1).to(squared.scalar_type()));
  }
}

}  // namespace

at::Tensor pairwise_distance_impl(const at::Tensor& x, const at::Tensor& ref, bool self_ref,
                                  bool squared_only, const DistanceKernels& kernels) {
  check_rows(x, ref, self_ref);
  const c10::DeviceGuard device(x.device());
  at::Tensor squared = at::mm(x, ref.t());
  if (squared.numel() == 0) {
    return squared;
  }
  const at::Tensor norm_x = squared_norms(x);
  const at::Tensor norm_ref = self_ref ? norm_x : squared_norms(ref);
  refine(squared, kernels.gram(squared, norm_x, norm_ref), x, ref);
  kernels.finish(squared, self_ref);
  // sqrt(0) = 0 and NaN stays NaN, as the reference's where(s > 0, sqrt(s), s * 0).
  return squared_only ? squared : squared.sqrt_();
}

// With h = d loss / d squared: d/dx_i = 2 x_i sum_j h_ij - 2 sum_j h_ij r_j, and the same
// for ref with h transposed (the refinement changes values only; the gradient is the Gram
// form's, equal in exact arithmetic).
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_impl(
    const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& x, const at::Tensor& ref,
    bool squared_only, bool x_grad, bool ref_grad, const DistanceKernels& kernels) {
  check_rows(x, ref, false);
  check_defined_floating(kOp, "grad", grad);
  check_defined_floating(kOp, "dist", dist);
  TORCH_CHECK_TYPE(grad.scalar_type() == dist.scalar_type(), kOp, ": grad must have dist's dtype ",
                   dist.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == dist.sizes() && dist.dim() == 2 &&
                        dist.size(0) == x.size(0) && dist.size(1) == ref.size(0),
                    kOp, ": grad ", grad.sizes(), " and dist ", dist.sizes(),
                    " must be [", x.size(0), ", ", ref.size(0), "]");
  check_same_device(kOp, "grad", grad, x);
  check_same_device(kOp, "dist", dist, x);
  const c10::DeviceGuard device(x.device());
  at::Tensor h = at::empty(dist.sizes(), dist.options());
  if (h.numel() > 0) {
    kernels.slopes(h, grad.contiguous(), dist.contiguous(), squared_only);
  }
  at::Tensor grad_x = x_grad ? at::addmm(x * (2 * h.sum(1, /*keepdim=*/true)), h, ref, 1, -2)
                             : at::empty({0, x.size(1)}, x.options());
  at::Tensor grad_ref = ref_grad
                            ? at::addmm(ref * (2 * h.sum(0).unsqueeze(1)), h.t(), x, 1, -2)
                            : at::empty({0, ref.size(1)}, ref.options());
  return {grad_x, grad_ref};
}

}  // namespace facekernels
