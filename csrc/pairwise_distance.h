// Euclidean distances between the rows of x [N, D] and ref [M, D] from one GEMM: the Gram
// form |x|^2 + |r|^2 - 2 <x, r>, recomputed from differences where it cancels, clamped at
// 0, 0 on the diagonal when ref is x, then the square root. The element math below is the
// one definition both devices use; every step is rounded to the tensor's dtype as the
// reference's tensor ops round it (facekernels/reference/triplet.py), so the fused op
// returns the reference's distances bit for bit.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <tuple>

namespace facekernels {

template <typename scalar_t>
struct GramSquared {
  scalar_t squared;
  bool close;  // below half of |x|^2 + |r|^2: recomputed from differences
};

// 2 <x, r> is exact (a doubling), so a contracted multiply-add rounds alike.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline GramSquared<scalar_t> gram_squared(scalar_t norm_x, scalar_t norm_ref,
                                                          scalar_t inner) {
  const scalar_t norms = static_cast<acc_t>(norm_x) + static_cast<acc_t>(norm_ref);
  const scalar_t twice = acc_t(2) * static_cast<acc_t>(inner);
  const scalar_t squared = static_cast<acc_t>(norms) - static_cast<acc_t>(twice);
  const scalar_t half_norms = acc_t(0.5) * static_cast<acc_t>(norms);
  return {squared, static_cast<acc_t>(squared) < static_cast<acc_t>(half_norms)};
}

// The refined squared distance clamped at 0, times 0 on the diagonal (NaN stays NaN). The
// square root is then ATen's, the reference's own: on the CPU it is not always correctly
// rounded, and the distances must match bit for bit.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t finish_squared(scalar_t squared, bool diagonal) {
  acc_t s = static_cast<acc_t>(squared);
  s = s < acc_t(0) ? acc_t(0) : s;
  return diagonal ? s * acc_t(0) : s;
}

// d loss / d squared from d loss / d dist: 0 where the distance is 0 (the clamp, the
// diagonal, identical points: no NaN from the square root) or NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t distance_slope(acc_t grad, acc_t dist, bool squared_only) {
  const bool positive = dist > acc_t(0);
  const acc_t slope = squared_only ? grad : grad / (acc_t(2) * (positive ? dist : acc_t(1)));
  return positive ? slope : acc_t(0);
}

// What each device provides: element passes over [N, M].
struct DistanceKernels {
  // inner (the GEMM's <x_i, r_j>) -> the Gram form, in place; returns the flat indices
  // (int64, ascending) of the entries where it cancels.
  at::Tensor (*gram)(at::Tensor& squared, const at::Tensor& norm_x, const at::Tensor& norm_ref);
  void (*finish)(at::Tensor& squared, bool self_ref);
  // d loss / d squared into out, from grad = d loss / d dist.
  void (*slopes)(at::Tensor& out, const at::Tensor& grad, const at::Tensor& dist,
                 bool squared_only);
};

// Device-neutral parts (pairwise_distance.cpp): checks, GEMMs, norms and the refinement.
at::Tensor pairwise_distance_impl(const at::Tensor& x, const at::Tensor& ref, bool self_ref,
                                  bool squared_only, const DistanceKernels& kernels);

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_impl(
    const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& x, const at::Tensor& ref,
    bool squared_only, bool x_grad, bool ref_grad, const DistanceKernels& kernels);

}  // namespace facekernels
