// Margin-softmax cross entropy (SphereFace / CosFace / ArcFace / the combined margin),
// chunked over classes so the N x C logits never exist.
//
// Per class chunk c0..c0+len: Z = xn @ W^T (a GEMM on the raw weight rows), then an
// epilogue kernel per device that scales each z by its weight row's inverse norm into a
// cosine, turns it into a logit and folds it into the row's log-sum-exp (forward), or into
// dL/dz (backward). The element math below is shared by both devices.
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
  kAdaMargin = 2,       // AdaFace: cosines clamped to +-(1 - eps), target
                        // s * (cos(clip(theta + m2, eps, pi - eps)) - m3)
  kEasyMargin = 3,      // the combined margin where cos > 0, else s * cos (MagFace's default)
};

// Floor of sin(theta) in d theta / d cos = -1 / sin(theta), finite at |cos| = 1.
constexpr double kSinFloor = 1e-6;
// F.normalize's floor on a row norm.
constexpr double kNormFloor = 1e-12;
// AdaFace's eps: the bound of its cosines and of its angles.
constexpr double kAdaEps = 1e-3;

// The target's margin function of the cosine and its derivatives.
template <typename acc_t>
struct TargetValue {
  acc_t value;
  acc_t slope;           // d value / d cos
  acc_t dm2, dm3;        // d value / d m2, d value / d m3
};

// A non-target's logit function of the cosine: value and d value / d cos.
template <typename acc_t>
struct NegativeValue {
  acc_t value, slope;
};

template <typename acc_t>
struct Margin {
  acc_t m1, m2, m3, lambda;
  int64_t kind;
  bool exact_gradient;  // false: the margin shifts the value only (slope 1, no margin gradient)
  bool clamp;           // the weight is normalized: z is a cosine, clamped to [-limit, limit]
  acc_t limit;          // 1, or 1 - eps for AdaFace
  acc_t filter;         // > 0: a non-target cosine above it gives logit 0 and no gradient
                        // (insightface's interclass filtering of likely mislabeled classes)
  acc_t hard, hard_t;   // CurricularFace: a non-target cosine c > hard becomes c (hard_t + c)
  int64_t sub_centers;  // K: a class's cosine is the max over its K consecutive weight rows;
                        // a chunk's z holds them sub-center-major (see ChunkGemm)
  // Per-row overrides ([N], or null): m2, m3, hard and hard_t.
  const acc_t* row_m2;
  const acc_t* row_m3;
  const acc_t* row_hard;
  const acc_t* row_hard_t;

  // The margin of row i: the scalars with that row's overrides.
  C10_HOST_DEVICE Margin for_row(int64_t i) const {
    Margin row = *this;
    if (row_m2 != nullptr) row.m2 = row_m2[i];
    if (row_m3 != nullptr) row.m3 = row_m3[i];
    if (row_hard != nullptr) row.hard = row_hard[i];
    if (row_hard_t != nullptr) row.hard_t = row_hard_t[i];
    return row;
  }

  // The element functions below are written as selects, without branches or short
  // circuits, so that the CPU's vector loops if-convert them whatever the options.
  C10_HOST_DEVICE bool filtered(acc_t c) const { return (filter > acc_t(0)) & (c > filter); }

  // Sub-center k's z times its inverse weight norm: its cosine before the clamp.
  template <typename scalar_t>
  C10_HOST_DEVICE static acc_t unclamped(const scalar_t* z, const acc_t* inverse, int64_t k) {
    return static_cast<acc_t>(z[k]) * (inverse != nullptr ? inverse[k] : acc_t(1));
  }

  C10_HOST_DEVICE acc_t cosine(acc_t z) const {
    return clamp ? (z < -limit ? -limit : (z > limit ? limit : z)) : z;
  }

  // d cosine / d z: zero where the clamp is active, at the bounds too.
  C10_HOST_DEVICE acc_t cosine_slope(acc_t z) const {
    return ((!clamp) | ((z > -limit) & (z < limit))) ? acc_t(1) : acc_t(0);
  }

  // Class j's cosine from the z of its K sub-centers, `stride` apart, and their weight rows'
  // inverse norms (null: the weight is not normalized), laid out alike: the max (a NaN
  // wins, so that it propagates); `winner` is the sub-center that gave it.
  template <typename scalar_t>
  C10_HOST_DEVICE acc_t class_cosine(const scalar_t* z, const acc_t* inverse, int64_t stride,
                                     int64_t& winner) const {
    acc_t best = cosine(unclamped(z, inverse, 0));
    winner = 0;
    for (int64_t k = 1; k < sub_centers && best == best; ++k) {
      const acc_t c = cosine(unclamped(z, inverse, k * stride));
      if (c > best || c != c) {
        best = c;
        winner = k;
      }
    }
    return best;
  }

  C10_HOST_DEVICE TargetValue<acc_t> target(acc_t c) const {
    if (kind == kEasyMargin && c <= acc_t(0)) {
      return finish({c, acc_t(1), acc_t(0), acc_t(0)});
    }
    if (kind != kSphereMargin && kind != kAdaMargin && m1 == acc_t(1) && m2 == acc_t(0)) {
      // CosFace and plain softmax: no arccos for the value. d/dm2 at m2 = 0 is -sin(theta).
      return finish({c - m3, acc_t(1), -std::sqrt(acc_t(1) - c * c), acc_t(-1)});
    }
    const acc_t theta = std::acos(c);
    const acc_t sin_theta = std::sqrt(acc_t(1) - c * c);
    const acc_t inv_sin = acc_t(1) / (sin_theta > acc_t(kSinFloor) ? sin_theta : acc_t(kSinFloor));
    const acc_t pi = static_cast<acc_t>(M_PI);
    if (kind == kSphereMargin) {
      const acc_t k = std::floor(m1 * theta / pi);
      const acc_t sign = std::fmod(k, acc_t(2)) == acc_t(0) ? acc_t(1) : acc_t(-1);
      const acc_t psi = sign * std::cos(m1 * theta) - acc_t(2) * k;
      return finish({(psi + lambda * c) / (acc_t(1) + lambda),
                     (sign * m1 * std::sin(m1 * theta) * inv_sin + lambda) / (acc_t(1) + lambda),
                     acc_t(0), acc_t(0)});
    }
    if (kind == kAdaMargin) {
      // The angle is clipped into [eps, pi - eps] instead of ArcFace's fallback.
      const acc_t eps = static_cast<acc_t>(kAdaEps);
      const acc_t angle = theta + m2;
      const bool inside = angle >= eps && angle <= pi - eps;
      const acc_t phi = angle < eps ? eps : (angle > pi - eps ? pi - eps : angle);
      const acc_t dphi = inside ? -std::sin(phi) : acc_t(0);  // d cos(phi) / d angle
      return finish({std::cos(phi) - m3, -dphi * inv_sin, dphi, acc_t(-1)});
    }
    if (kind == kCombinedMargin && m1 == acc_t(1) && m3 == acc_t(0) && theta + m2 > pi) {
      // ArcFace's monotone continuation past pi.
      return finish({c - m2 * std::sin(m2), acc_t(1), -(std::sin(m2) + m2 * std::cos(m2)),
                     acc_t(-1)});
    }
    const acc_t sin_angle = std::sin(m1 * theta + m2);
    return finish({std::cos(m1 * theta + m2) - m3, m1 * sin_angle * inv_sin, -sin_angle, acc_t(-1)});
  }

  // A non-target's logit function of the cosine (returned by value, not through
  // references, so that the CPU's vector loops keep it in registers).
  C10_HOST_DEVICE NegativeValue<acc_t> negative(acc_t c) const {
    const bool harder = c > hard, dropped = filtered(c);
    const acc_t value = harder ? c * (hard_t + c) : c;
    const acc_t slope = harder ? hard_t + acc_t(2) * c : acc_t(1);
    return {dropped ? acc_t(0) : value, dropped ? acc_t(0) : slope};
  }

  // A logit s * f(cos) from the (class) cosine.
  C10_HOST_DEVICE acc_t logit(acc_t c, bool is_target, acc_t row_scale) const {
    return row_scale * (is_target ? target(c).value : negative(c).value);
  }

 private:
  C10_HOST_DEVICE TargetValue<acc_t> finish(TargetValue<acc_t> t) const {
    if (!exact_gradient) {
      t.slope = acc_t(1);
      t.dm2 = t.dm3 = acc_t(0);
    }
    return t;
  }
};

// The backward's per-row values: the logit scale, the log-sum-exp row_max + log_sum, the
// incoming gradients of log_sum and of the target logit.
template <typename acc_t>
struct RowBackward {
  acc_t scale, max, log_sum, grad_log_sum, grad_target;
};

// Backward of class j's logit in place over its K sub-centers' z (`stride` apart, as
// class_cosine reads them): dL/dz goes to the winning sub-center (times its inverse weight
// norm, so that the backward GEMMs take the raw weight), 0 to the others. With
// p = exp(logit - row_max - log_sum), dL/dlogit = g_log_sum p + g_target [target]. Adds
// dL/dlogit * logit / s (= dL/ds for the row) to `scale_grad`; for the target, writes
// dL/dm2 and dL/dm3 where asked (non-null).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void class_backward(const Margin<acc_t>& margin, scalar_t* z,
                                           const acc_t* inverse, int64_t stride, bool is_target,
                                           const RowBackward<acc_t>& row, acc_t& scale_grad,
                                           acc_t* grad_m2, acc_t* grad_m3) {
  int64_t winner;
  const acc_t c = margin.class_cosine(z, inverse, stride, winner);
  acc_t value, slope;
  TargetValue<acc_t> t;
  if (is_target) {
    t = margin.target(c);
    value = t.value;
    slope = t.slope;
  } else {
    const NegativeValue<acc_t> v = margin.negative(c);
    value = v.value;
    slope = v.slope;
  }
  const acc_t p = std::exp((row.scale * value - row.max) - row.log_sum);
  const acc_t grad_logit = row.grad_log_sum * p + (is_target ? row.grad_target : acc_t(0));
  scale_grad += grad_logit * value;
  if (is_target && grad_m2 != nullptr) {
    *grad_m2 = grad_logit * row.scale * t.dm2;
  }
  if (is_target && grad_m3 != nullptr) {
    *grad_m3 = grad_logit * row.scale * t.dm3;
  }
  const acc_t u = Margin<acc_t>::unclamped(z, inverse, winner * stride);
  const acc_t grad_z = grad_logit * row.scale * slope * margin.cosine_slope(u) *
                       (inverse != nullptr ? inverse[winner * stride] : acc_t(1));
  for (int64_t k = 0; k < margin.sub_centers; ++k) {
    z[k * stride] = static_cast<scalar_t>(k == winner ? grad_z : acc_t(0));
  }
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
      // A logit equal to the max adds exp(0) = 1, also at +inf (where inf - inf is NaN),
      // as merge counts it: the order of pushes and merges does not change the result.
      sum += x == max ? acc_t(1) : std::exp(x - max);
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

// An optional tensor's data for a kernel argument: null when the tensor is undefined.
template <typename T>
const T* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* optional_mutable_data(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// What the per-device epilogues receive. All [N] tensors are contiguous, in the accumulate
// type except `labels` and `predicted` (int64).
struct MarginOptions {
  double scale, m1, m2, m3, lambda;
  int64_t kind;
  bool exact_gradient, normalize_embeddings, normalize_weight;
  int64_t chunk_size;  // classes per chunk (chunk_size * sub_centers weight rows)
  double filter;
  int64_t sub_centers;
  at::Tensor row_m2, row_m3, row_hard, row_hard_t;  // per-row overrides [N], or undefined

  template <typename acc_t>
  Margin<acc_t> margin() const {
    const acc_t limit = static_cast<acc_t>(kind == kAdaMargin ? 1.0 - kAdaEps : 1.0);
    return {static_cast<acc_t>(m1), static_cast<acc_t>(m2), static_cast<acc_t>(m3),
            static_cast<acc_t>(lambda), kind, exact_gradient, normalize_weight, limit,
            static_cast<acc_t>(filter), std::numeric_limits<acc_t>::infinity(), acc_t(0),
            sub_centers, optional_data<acc_t>(row_m2), optional_data<acc_t>(row_m3),
            optional_data<acc_t>(row_hard), optional_data<acc_t>(row_hard_t)};
  }
};

struct RowState {
  at::Tensor row_max, row_sum;        // online log-sum-exp
  at::Tensor target_logit;            // 0 where the label is not in this weight
  at::Tensor best_cosine, predicted;  // argmax of the margin-free cosine
};

// The backward's per-row tensors [N]: inputs, then outputs (scale: dL/ds, added to; m2, m3:
// dL/dm2 and dL/dm3, written at the target, undefined when not wanted).
struct RowGrads {
  at::Tensor row_max, log_sum, grad_log_sum, grad_target;
  at::Tensor scale, m2, m3;
};

// Folds the chunk z [N, len * K] (classes class_start..) into the row state. `inverse`
// [len * K] (accumulate type): the weight rows' inverse norms, undefined when the weight is
// not normalized.
using ForwardEpilogue = void (*)(const at::Tensor& z, const at::Tensor& inverse,
                                 int64_t class_start, const at::Tensor& labels,
                                 const at::Tensor& row_scale, const MarginOptions& options,
                                 RowState& state);

// Overwrites z [N, len * K] with dL/dz, the gradient of the raw weight rows' dot products,
// and fills the outputs of `grads`.
using BackwardEpilogue = void (*)(at::Tensor& z, const at::Tensor& inverse, int64_t class_start,
                                  const at::Tensor& labels, const at::Tensor& row_scale,
                                  const MarginOptions& options, RowGrads& grads);

// Both for z [N, C * K] that holds every class (class_start 0): folds it into the empty row
// state, writes log(row_sum) into grads.log_sum (whose row_max is the state's), then
// overwrites z with dL/dz as the backward epilogue does.
using StepEpilogue = void (*)(at::Tensor& z, const at::Tensor& inverse, const at::Tensor& labels,
                              const at::Tensor& row_scale, const MarginOptions& options,
                              RowState& state, RowGrads& grads);

// A step epilogue made of a device's forward and backward epilogues.
template <ForwardEpilogue forward, BackwardEpilogue backward>
void sequential_step(at::Tensor& z, const at::Tensor& inverse, const at::Tensor& labels,
                     const at::Tensor& row_scale, const MarginOptions& options, RowState& state,
                     RowGrads& grads) {
  forward(z, inverse, 0, labels, row_scale, options, state);
  at::log_out(grads.log_sum, state.row_sum);
  backward(z, inverse, 0, labels, row_scale, options, grads);
}

// The device-neutral chunk loops (margin_softmax.cpp); each device passes its epilogue.
// Forward returns (row_max, log_sum, target_logit, best_cosine, predicted), each [N]: the
// loss is log_sum + (row_max - target_logit), which keeps a small loss accurate; and the
// last chunk's z, for the backward.
using ForwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ForwardOutputs margin_softmax_forward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginOptions& options, bool labels_in_range, const std::optional<at::Tensor>& rows,
    ForwardEpilogue epilogue);

// Returns (grad_embeddings, grad_weight, grad_m2, grad_m3); an unwanted one is not computed
// and is empty ([0, D], or [0] for the margins).
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
Gradients margin_softmax_backward_impl(
    const at::Tensor& grad_log_sum, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_max,
    const at::Tensor& log_sum, const MarginOptions& options, bool embeddings_grad,
    bool weight_grad, bool margins_grad, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& last_logits, BackwardEpilogue epilogue);

// The forward's five per-row outputs and the backward's four gradients, those of
// grad_scale * sum_i loss_i, in one call: blocks of block_rows rows that each see every
// class at once, so that each block's z feeds the backward's GEMMs as soon as its rows'
// log-sum-exp is known. Three GEMMs where a forward and a backward over class chunks take
// four, for a block_rows x C (x K) buffer in place of N x chunk.
using GradOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
GradOutputs margin_softmax_forward_backward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginOptions& options, bool labels_in_range, const std::optional<at::Tensor>& rows,
    int64_t block_rows, double grad_scale, bool embeddings_grad, bool weight_grad,
    bool margins_grad, StepEpilogue epilogue);

// The ops' arguments as MarginOptions.
inline MarginOptions margin_options(double scale, double m1, double m2, double m3, double lambda,
                                    int64_t kind, bool exact_gradient, bool normalize_embeddings,
                                    bool normalize_weight, int64_t chunk_size, double filter,
                                    const std::optional<at::Tensor>& row_m2,
                                    const std::optional<at::Tensor>& row_m3, int64_t sub_centers,
                                    const std::optional<at::Tensor>& hard_threshold,
                                    const std::optional<at::Tensor>& hard_t) {
  const at::Tensor none;
  return {scale, m1, m2, m3, lambda, kind, exact_gradient, normalize_embeddings,
          normalize_weight, chunk_size, filter, sub_centers, row_m2.value_or(none),
          row_m3.value_or(none), hard_threshold.value_or(none), hard_t.value_or(none)};
}

// The ops' entry points (schemas in facekernels.cpp); each device registers them with its
// own epilogue.
template <ForwardEpilogue epilogue>
ForwardOutputs margin_softmax_forward(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    double scale, double m1, double m2, double m3, double lambda, int64_t kind,
    bool exact_gradient, bool normalize_embeddings, bool normalize_weight, int64_t chunk_size,
    bool labels_in_range, const std::optional<at::Tensor>& rows, double filter,
    const std::optional<at::Tensor>& row_m2, const std::optional<at::Tensor>& row_m3,
    int64_t sub_centers, const std::optional<at::Tensor>& hard_threshold,
    const std::optional<at::Tensor>& hard_t) {
  return margin_softmax_forward_impl(
      embeddings, weight, labels,
      margin_options(scale, m1, m2, m3, lambda, kind, exact_gradient, normalize_embeddings,
                     normalize_weight, chunk_size, filter, row_m2, row_m3, sub_centers,
                     hard_threshold, hard_t),
      labels_in_range, rows, epilogue);
}

template <BackwardEpilogue epilogue>
Gradients margin_softmax_backward(
    const at::Tensor& grad_log_sum, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_max,
    const at::Tensor& log_sum, double scale, double m1, double m2, double m3, double lambda,
    int64_t kind, bool exact_gradient, bool normalize_embeddings, bool normalize_weight,
    int64_t chunk_size, bool embeddings_grad, bool weight_grad,
    const std::optional<at::Tensor>& rows, double filter, const std::optional<at::Tensor>& row_m2,
    const std::optional<at::Tensor>& row_m3, int64_t sub_centers,
    const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_t,
    bool margins_grad, const std::optional<at::Tensor>& last_logits) {
  return margin_softmax_backward_impl(
      grad_log_sum, grad_target, embeddings, weight, labels, row_max, log_sum,
      margin_options(scale, m1, m2, m3, lambda, kind, exact_gradient, normalize_embeddings,
                     normalize_weight, chunk_size, filter, row_m2, row_m3, sub_centers,
                     hard_threshold, hard_t),
      embeddings_grad, weight_grad, margins_grad, rows, last_logits, epilogue);
}

template <StepEpilogue epilogue>
GradOutputs margin_softmax_forward_backward(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    double scale, double m1, double m2, double m3, double lambda, int64_t kind,
    bool exact_gradient, bool normalize_embeddings, bool normalize_weight, int64_t block_rows,
    bool labels_in_range, const std::optional<at::Tensor>& rows, double filter,
    const std::optional<at::Tensor>& row_m2, const std::optional<at::Tensor>& row_m3,
    int64_t sub_centers, const std::optional<at::Tensor>& hard_threshold,
    const std::optional<at::Tensor>& hard_t, double grad_scale, bool embeddings_grad,
    bool weight_grad, bool margins_grad) {
  // Every class in one chunk.
  constexpr int64_t all_classes = std::numeric_limits<int64_t>::max();
  return margin_softmax_forward_backward_impl(
      embeddings, weight, labels,
      margin_options(scale, m1, m2, m3, lambda, kind, exact_gradient, normalize_embeddings,
                     normalize_weight, all_classes, filter, row_m2, row_m3, sub_centers,
                     hard_threshold, hard_t),
      labels_in_range, rows, block_rows, grad_scale, embeddings_grad, weight_grad, margins_grad,
      epilogue);
}

}  // namespace facekernels
