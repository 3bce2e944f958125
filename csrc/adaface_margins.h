// AdaFace's per-row margins (Kim et al. 2022): the math both devices share, plus the
// device-neutral setup that the CPU and CUDA kernels plug into.
//
// Everything runs in double: the norms' sums of squares (a finite fp32 row never overflows),
// the batch's moments and the running statistics, whatever the buffers' dtype. The kernels
// take the two running values as a double [2] (mean, std) and write the new ones as two
// double [1].
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace facekernels {

constexpr double kAdaFaceEps = 1e-3;

C10_HOST_DEVICE inline bool is_finite(double v) {
  return v - v == 0;  // false for NaN and +-inf alike
}

// n_i = clip(|x_i|, 0.001, 100) from the row's sum of squares; NaN where |x_i| is not finite,
// so that the row joins no statistic (clipped, an inf row would count as 100).
C10_HOST_DEVICE inline double adaface_norm(double sum_of_squares) {
  const double norm = std::sqrt(sum_of_squares);
  return is_finite(norm) ? (norm < 0.001 ? 0.001 : norm > 100.0 ? 100.0 : norm)
                         : std::numeric_limits<double>::quiet_NaN();
}

// The unbiased std of `count` finite norms from their squared deviations' sum; NaN for fewer
// than two (not 0 / -1 = -0, which would pass for a finite std).
C10_HOST_DEVICE inline double unbiased_std(double squares, double count) {
  return count > 1 ? std::sqrt(squares / (count - 1)) : std::numeric_limits<double>::quiet_NaN();
}

// The EMA step rate * batch + (1 - rate) * old, or old where that is not finite (no finite
// row in the batch): a buffer once NaN would poison every later batch.
C10_HOST_DEVICE inline double running_value(double old, double batch, double rate) {
  const double next = rate * batch + (1 - rate) * old;
  return is_finite(next) ? next : old;
}

// Row i's margins from z_i = clip(h (n_i - mean) / (std + eps), -1, 1): m2 = -margin z_i
// (angular), m3 = margin + margin z_i (additive). A NaN norm gives NaN margins (that row's
// loss is NaN anyway): the clip keeps NaN.
template <typename acc_t>
C10_HOST_DEVICE inline void adaface_row_margins(double norm, double mean, double std_dev, double h,
                                                double margin, acc_t* m2, acc_t* m3) {
  const double raw = h * (norm - mean) / (std_dev + kAdaFaceEps);
  const acc_t z = static_cast<acc_t>(raw < -1.0 ? -1.0 : raw > 1.0 ? 1.0 : raw);
  const acc_t m = static_cast<acc_t>(margin);
  *m2 = -m * z;
  *m3 = m + m * z;
}

// Device-neutral parts (adaface_margins.cpp): validation and allocation before the per-device
// kernel, the buffers' dtypes after it.
struct AdaFaceMargins {
  at::Tensor embeddings;         // contiguous [N, D]
  at::Tensor running;            // double [2]: the running mean and std as they are
  at::Tensor new_mean, new_std;  // double [1] each (the old values when not training)
  at::Tensor row_m2, row_m3;     // [N] in the embeddings' accumulate type
};

AdaFaceMargins adaface_margins_setup(const at::Tensor& embeddings, const at::Tensor& mean,
                                     const at::Tensor& std_dev, double h, double margin,
                                     double t_alpha, bool training);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaface_margins_finish(
    const AdaFaceMargins& a, const at::Tensor& mean, const at::Tensor& std_dev);

}  // namespace facekernels
