// Margin-softmax cross entropy (SphereFace / CosFace / ArcFace / the combined margin),
// chunked over classes so the N x C logits never exist.
//
// Per class chunk c0..c0+len: Z = xn @ wn^T (a GEMM), then an epilogue kernel per device
// that turns each z into a logit and folds it into the row's online log-sum-exp (forward),
// or into dL/dz (backward). The element math below is shared by both devices.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "common/reductions.h"

namespace facekernels {

enum MarginKind : int64_t {
  kCombinedMargin = 0,  // target s * (cos(m1 theta + m2) - m3)
  kSphereMargin = 1,    // target s * (psi(theta) + lambda cos) / (1 + lambda), psi with m = m1
};

// Floor of sin(theta) in d theta / d cos = -1 / sin(theta), finite at |cos| = 1.
constexpr double kSinFloor = 1e-6;
// F.normalize's floor on a row norm.
constexpr double kNormFloor = 1e-12;

template <typename acc_t>
struct Margin {
  acc_t m1, m2, m3, lambda;
  int64_t kind;
  bool exact_gradient;  // false: the margin shifts the value only (slope 1)
  bool clamp;           // the weight is normalized: z is a cosine, clamped to [-1, 1]
  acc_t filter;         // > 0: a non-target cosine above it gives logit 0 and no gradient
                        // (insightface's interclass filtering of likely mislabeled classes)

  C10_HOST_DEVICE bool filtered(acc_t c, bool is_target) const {
    return !is_target && filter > acc_t(0) && c > filter;
  }

  C10_HOST_DEVICE acc_t cosine(acc_t z) const {
    return clamp ? (z < acc_t(-1) ? acc_t(-1) : (z > acc_t(1) ? acc_t(1) : z)) : z;
  }

  // d cosine / d z: zero where the clamp is active, at the bounds too (as torch.clamp).
  C10_HOST_DEVICE acc_t cosine_slope(acc_t z) const {
    return (!clamp || (z > acc_t(-1) && z < acc_t(1))) ? acc_t(1) : acc_t(0);
  }

  // The target's margin function of the cosine, and its slope d value / d cos.
  C10_HOST_DEVICE void target(acc_t c, acc_t& value, acc_t& slope) const {
    if (kind == kCombinedMargin && m1 == acc_t(1) && m2 == acc_t(0)) {
      value = c - m3;  // CosFace and plain softmax: no arccos needed
      slope = acc_t(1);
      return;
    }
    const acc_t theta = std::acos(c);
    const acc_t sin_theta = std::sqrt(acc_t(1) - c * c);
    const acc_t inv_sin = acc_t(1) / (sin_theta > acc_t(kSinFloor) ? sin_theta : acc_t(kSinFloor));
    const acc_t pi = static_cast<acc_t>(M_PI);
    if (kind == kSphereMargin) {
      const acc_t k = std::floor(m1 * theta / pi);
      const acc_t sign = std::fmod(k, acc_t(2)) == acc_t(0) ? acc_t(1) : acc_t(-1);
      const acc_t psi = sign * std::cos(m1 * theta) - acc_t(2) * k;
      value = (psi + lambda * c) / (acc_t(1) + lambda);
      slope = (sign * m1 * std::sin(m1 * theta) * inv_sin + lambda) / (acc_t(1) + lambda);
    } else if (m1 == acc_t(1) && m3 == acc_t(0) && theta + m2 > pi) {
      value = c - m2 * std::sin(m2);  // ArcFace's monotone continuation past pi
      slope = acc_t(1);
    } else {
      value = std::cos(m1 * theta + m2) - m3;
      slope = m1 * std::sin(m1 * theta + m2) * inv_sin;
    }
    if (!exact_gradient) {
      slope = acc_t(1);
    }
  }

  // A logit s * f(cos) and the margin-free cosine behind it.
  C10_HOST_DEVICE acc_t logit(acc_t z, bool is_target, acc_t row_scale) const {
    const acc_t c = cosine(z);
    if (!is_target) {
      return filtered(c, false) ? acc_t(0) : row_scale * c;
    }
    acc_t value, slope;
    target(c, value, slope);
    return row_scale * value;
  }
};

// Backward of one logit. The row's log-sum-exp is row_max + log_sum; with
// p = exp(logit - row_max - log_sum), dL/dlogit = g_log_sum p + g_target [target].
// Returns dL/dz; adds dL/dlogit * logit / s (= dL/ds for the row) to `scale_grad`.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t margin_logit_backward(const Margin<acc_t>& margin, acc_t z,
                                                   bool is_target, acc_t row_scale,
                                                   acc_t row_max, acc_t log_sum,
                                                   acc_t grad_log_sum, acc_t grad_target,
                                                   acc_t& scale_grad) {
  const acc_t c = margin.cosine(z);
  acc_t value = c, slope = acc_t(1);
  if (is_target) {
    margin.target(c, value, slope);
  } else if (margin.filtered(c, false)) {
    value = acc_t(0);
    slope = acc_t(0);
  }
  const acc_t p = std::exp((row_scale * value - row_max) - log_sum);
  const acc_t grad_logit = grad_log_sum * p + (is_target ? grad_target : acc_t(0));
  scale_grad += grad_logit * value;
  return grad_logit * row_scale * slope * margin.cosine_slope(z);
}

// Online log-sum-exp: (max, sum of exp(x - max)). An empty state has sum 0. A NaN logit
// makes the sum NaN, so non-finite inputs cannot yield a finite loss.
template <typename acc_t>
struct OnlineLse {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = acc_t(0);

  C10_HOST_DEVICE void push(acc_t x) {
    if (x == -std::numeric_limits<acc_t>::infinity()) {
      return;  // exp(-inf) adds nothing, and -inf - -inf would be NaN
    }
    if (x > max) {
      sum = sum * std::exp(max - x) + acc_t(1);
      max = x;
    } else {
      sum += std::exp(x - max);
    }
  }

  C10_HOST_DEVICE void merge(const OnlineLse& other) {
    if (other.sum == acc_t(0)) {
      return;
    }
    if (sum == acc_t(0)) {
      *this = other;
      return;
    }
    const acc_t m = other.max > max ? other.max : max;
    // The side holding the max keeps its sum as is: exp(max - m) would be exp(inf - inf)
    // = NaN for a +inf logit, where push gives +inf.
    sum = (max == m ? sum : sum * std::exp(max - m)) +
          (other.max == m ? other.sum : other.sum * std::exp(other.max - m));
    max = m;
  }
};

// What the per-device epilogues receive. All [N] tensors are contiguous, in the accumulate
// type except `labels` and `predicted` (int64).
struct MarginOptions {
  double scale, m1, m2, m3, lambda;
  int64_t kind;
  bool exact_gradient, normalize_embeddings, normalize_weight;
  int64_t chunk_size;
  double filter;

  template <typename acc_t>
  Margin<acc_t> margin() const {
    return {static_cast<acc_t>(m1), static_cast<acc_t>(m2), static_cast<acc_t>(m3),
            static_cast<acc_t>(lambda), kind, exact_gradient, normalize_weight,
            static_cast<acc_t>(filter)};
  }
};

struct RowState {
  at::Tensor row_max, row_sum;        // online log-sum-exp
  at::Tensor target_logit;            // 0 where the label is not in this weight
  at::Tensor best_cosine, predicted;  // argmax of the margin-free cosine
};

// Folds the chunk z [N, len] (classes class_start..) into the row state.
using ForwardEpilogue = void (*)(const at::Tensor& z, int64_t class_start,
                                 const at::Tensor& labels, const at::Tensor& row_scale,
                                 const MarginOptions& options, RowState& state);

// Overwrites z [N, len] with dL/dz and adds each row's dL/ds into scale_grad [N].
using BackwardEpilogue = void (*)(at::Tensor& z, int64_t class_start, const at::Tensor& labels,
                                  const at::Tensor& row_scale, const at::Tensor& row_max,
                                  const at::Tensor& log_sum, const at::Tensor& grad_log_sum,
                                  const at::Tensor& grad_target, const MarginOptions& options,
                                  at::Tensor& scale_grad);

// The device-neutral chunk loops (margin_softmax.cpp); each device passes its epilogue.
// Forward returns (row_max, log_sum, target_logit, best_cosine, predicted), each [N]: the
// loss is log_sum + (row_max - target_logit), which keeps a small loss accurate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginOptions& options, bool labels_in_range, const std::optional<at::Tensor>& rows,
    ForwardEpilogue epilogue);

// Returns (grad_embeddings, grad_weight); an unwanted one is not computed and is [0, D].
std::tuple<at::Tensor, at::Tensor> margin_softmax_backward_impl(
    const at::Tensor& grad_log_sum, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_max,
    const at::Tensor& log_sum, const MarginOptions& options, bool embeddings_grad,
    bool weight_grad, const std::optional<at::Tensor>& rows, BackwardEpilogue epilogue);

// The ops' entry points (schemas in facekernels.cpp); each device registers them with its
// own epilogue.
template <ForwardEpilogue epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    double scale, double m1, double m2, double m3, double lambda, int64_t kind,
    bool exact_gradient, bool normalize_embeddings, bool normalize_weight, int64_t chunk_size,
    bool labels_in_range, const std::optional<at::Tensor>& rows, double filter) {
  return margin_softmax_forward_impl(
      embeddings, weight, labels,
      {scale, m1, m2, m3, lambda, kind, exact_gradient, normalize_embeddings, normalize_weight,
       chunk_size, filter},
      labels_in_range, rows, epilogue);
}

template <BackwardEpilogue epilogue>
std::tuple<at::Tensor, at::Tensor> margin_softmax_backward(
    const at::Tensor& grad_log_sum, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_max,
    const at::Tensor& log_sum, double scale, double m1, double m2, double m3, double lambda,
    int64_t kind, bool exact_gradient, bool normalize_embeddings, bool normalize_weight,
    int64_t chunk_size, bool embeddings_grad, bool weight_grad,
    const std::optional<at::Tensor>& rows, double filter) {
  return margin_softmax_backward_impl(
      grad_log_sum, grad_target, embeddings, weight, labels, row_max, log_sum,
      {scale, m1, m2, m3, lambda, kind, exact_gradient, normalize_embeddings, normalize_weight,
       chunk_size, filter},
      embeddings_grad, weight_grad, rows, epilogue);
}

}  // namespace facekernels
