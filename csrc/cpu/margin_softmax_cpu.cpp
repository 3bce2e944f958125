#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/row_grain.h"
#include "cpu/vector_math.h"
#include "margin_softmax.h"

// Each task owns whole rows. Per row of a chunk, the epilogue reads u: the classes' cosines
// before the clamp, z times its weight row's inverse norm, on the fly where z holds one
// class per column in the accumulate type, else gathered into a buffer (with K sub-centers,
// the winner's; or from bf16 and fp16). The target class then goes through the scalar
// C10_HOST_DEVICE math that the GPU runs; every other class through vector loops that
// evaluate the same Margin expressions lane by lane, with vector_exp for std::exp. The
// forward takes the row's max over the chunk first and sums the exponentials in a second
// pass, while the row's logits are in cache, then merges the chunk into the row's state.

namespace facekernels {
namespace {

// A row's cosines before the clamp, values[j] * inverse[j] (values[j] where inverse is
// null): z and the weight's inverse norms, or a buffer that gather_cosines filled. The
// backward writes dL/du times the same inverse norms, that is dL/dz, into z (over the
// cosines: an iteration reads its element before it writes it, and omp simd asks for no
// alias check), or dL/du into a buffer that scatter_grads hands out.
template <typename acc_t>
struct Cosines {
  const acc_t* values;
  const acc_t* inverse;
};

// values[j] * inverse[j], or values[j] where kScaled is false, read by [] and written by
// set: the vector loops take the choice at compile time (a select in the loop kept GCC
// from vectorizing the backward's).
template <typename T, bool kScaled>
struct Scaled {
  using acc_t = std::remove_const_t<T>;
  T* values;
  const acc_t* inverse;

  FK_INLINE acc_t operator[](int64_t j) const {
    if constexpr (kScaled) {
      return values[j] * inverse[j];
    } else {
      return values[j];
    }
  }
  FK_INLINE void set(int64_t j, acc_t x) const {
    if constexpr (kScaled) {
      values[j] = x * inverse[j];
    } else {
      values[j] = x;
    }
  }
};

// What one chunk of one row adds to the forward's row state.
template <typename acc_t>
struct ChunkRow {
  acc_t max, sum;      // log-sum-exp state of the chunk's logits
  acc_t best;          // the largest margin-free cosine, at class best_index (-1: none)
  int64_t best_index;
  acc_t target_logit;  // written when the target is in the chunk
};

// The negatives among classes [begin, end): logits into `logit`, and the running max of
// the logits and of the cosines (NaNs skipped here; the sum carries them). The Margin
// comes by value here and below: by reference, GCC re-read its fields in every iteration
// and ran scalar versions of the loops.
template <typename acc_t, typename U>
FK_INLINE void negative_logits(const Margin<acc_t> margin, acc_t scale, const U u,
                               acc_t* __restrict__ logit,
                               int64_t begin, int64_t end, acc_t& max_logit,
                               acc_t& max_cosine) {
  acc_t top = max_logit, best = max_cosine;
#pragma omp simd reduction(max : top, best)
  for (int64_t j = begin; j < end; ++j) {
    const acc_t c = margin.cosine(u[j]);
    logit[j] = scale * margin.negative(c).value;
    top = logit[j] > top ? logit[j] : top;
    best = c > best ? c : best;
  }
  max_logit = top;
  max_cosine = best;
}

template <typename acc_t, typename U>
FK_INLINE void forward_row_impl(const Margin<acc_t> margin, acc_t scale, const U u,
                                acc_t* logit, int64_t length, int64_t target,
                                ChunkRow<acc_t>& out) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const bool has_target = target >= 0 && target < length;
  acc_t max_logit = -inf, max_cosine = -inf;
  negative_logits(margin, scale, u, logit, 0, has_target ? target : length, max_logit,
                  max_cosine);
  if (has_target) {
    negative_logits(margin, scale, u, logit, target + 1, length, max_logit, max_cosine);
    const acc_t c = margin.cosine(u[target]);
    logit[target] = out.target_logit = margin.logit(c, true, scale);
    max_logit = logit[target] > max_logit ? logit[target] : max_logit;
    max_cosine = c > max_cosine ? c : max_cosine;
  }

  // The first class at the max cosine (ArgMax's tie rule): a min-reduction of indices, a
  // block at a time up to the block that holds it (a scalar scan took a tenth of the pass).
  constexpr int64_t kBlock = 128;
  int64_t first = length;
  for (int64_t begin = 0; begin < length && first == length; begin += kBlock) {
    const int64_t end = std::min(length, begin + kBlock);
#pragma omp simd reduction(min : first)
    for (int64_t j = begin; j < end; ++j) {
      first = margin.cosine(u[j]) == max_cosine && j < first ? j : first;
    }
  }
  out.best = max_cosine;
  out.best_index = first < length ? first : -1;

  if (std::isfinite(max_logit)) {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < length; ++j) {
      logit[j] = vector_exp(logit[j] - max_logit);  // for a backward of the same row
      sum += logit[j];
    }
    out.max = max_logit;
    out.sum = sum;
  } else {  // +-inf logits: the online state's rules for them
    OnlineLse<acc_t> lse;
    for (int64_t j = 0; j < length; ++j) {
      lse.push(logit[j]);
    }
    out.max = lse.max;
    out.sum = lse.sum;
  }
}

// The negatives among classes [begin, end): dL/du into g (see Cosines);
// returns their part of dL/ds.
template <typename acc_t, typename U, typename G>
FK_INLINE acc_t negative_grads(const Margin<acc_t> margin, const RowBackward<acc_t> r,
                               const U u, const G g, int64_t begin, int64_t end) {
  acc_t scale_grad = 0;
#pragma omp simd reduction(+ : scale_grad)
  for (int64_t j = begin; j < end; ++j) {
    const acc_t c = margin.cosine(u[j]);
    const NegativeValue<acc_t> v = margin.negative(c);
    const acc_t grad_logit = r.grad_log_sum * vector_exp((r.scale * v.value - r.max) - r.log_sum);
    scale_grad += grad_logit * v.value;
    g.set(j, grad_logit * r.scale * v.slope * margin.cosine_slope(u[j]));
  }
  return scale_grad;
}

// The same from the exponentials e_j = exp(logit_j - max) that forward_row left, where
// p_j = e_j / sum: weight = dL/dlog_sum / sum. No exp: a row's forward and backward in one.
template <typename acc_t, typename U, typename G>
FK_INLINE acc_t negative_grads_from_exps(const Margin<acc_t> margin, acc_t scale, acc_t weight,
                                         const U u, const acc_t* __restrict__ e, const G g,
                                         int64_t begin, int64_t end) {
  acc_t scale_grad = 0;
#pragma omp simd reduction(+ : scale_grad)
  for (int64_t j = begin; j < end; ++j) {
    const acc_t c = margin.cosine(u[j]);
    const NegativeValue<acc_t> v = margin.negative(c);
    const acc_t grad_logit = weight * e[j];
    scale_grad += grad_logit * v.value;
    g.set(j, grad_logit * scale * v.slope * margin.cosine_slope(u[j]));
  }
  return scale_grad;
}

// The negatives of classes [begin, end) by either of the above: from the exponentials e
// where given (with weight), else with their own.
template <typename acc_t, typename U, typename G>
FK_INLINE acc_t negatives_of(const Margin<acc_t> margin, const RowBackward<acc_t> r, acc_t weight,
                             const U u, const acc_t* e, const G g, int64_t begin, int64_t end) {
  return e != nullptr ? negative_grads_from_exps(margin, r.scale, weight, u, e, g, begin, end)
                      : negative_grads(margin, r, u, g, begin, end);
}

// Writes dL/du into g and returns the row's dL/ds from this chunk (e, weight: see
// negatives_of).
template <typename acc_t, typename U, typename G>
FK_INLINE acc_t backward_row_impl(const Margin<acc_t> margin, const RowBackward<acc_t> r,
                                  acc_t weight, const U u, const acc_t* e, const G g,
                                  int64_t length, int64_t target, acc_t* grad_m2,
                                  acc_t* grad_m3) {
  const bool has_target = target >= 0 && target < length;
  const int64_t split = has_target ? target : length;
  // One call site for the vector loops: GCC stops inlining Margin's functions into more.
  acc_t scale_grad = 0;
  for (const auto& [begin, end] :
       {std::pair{int64_t(0), split}, std::pair{split + has_target, length}}) {
    scale_grad += negatives_of(margin, r, weight, u, e, g, begin, end);
  }
  if (!has_target) {
    return scale_grad;
  }
  Margin<acc_t> one = margin;  // u holds one cosine per class
  one.sub_centers = 1;
  acc_t cell = u[target];
  class_backward<acc_t, acc_t>(one, &cell, nullptr, 1, true, r, scale_grad, grad_m2, grad_m3);
  g.set(target, cell);
  return scale_grad;
}

// The vector loops, one instance per accumulate type and kind of row (scaled by inverse
// norms or not: one instance each, as GCC stops inlining Margin's functions into more),
// compiled per vector width.
template <typename acc_t, bool kScaled>
FK_VECTOR_CLONES void forward_row(const Margin<acc_t>& margin, acc_t scale,
                                  Scaled<const acc_t, kScaled> u, acc_t* logit, int64_t length,
                                  int64_t target, ChunkRow<acc_t>& out) {
  forward_row_impl(margin, scale, u, logit, length, target, out);
}
template <typename acc_t, bool kScaled>
FK_VECTOR_CLONES acc_t backward_row(const Margin<acc_t>& margin, const RowBackward<acc_t>& r,
                                    acc_t weight, Scaled<const acc_t, kScaled> u, const acc_t* e,
                                    Scaled<acc_t, kScaled> g, int64_t length, int64_t target,
                                    acc_t* grad_m2, acc_t* grad_m3) {
  return backward_row_impl(margin, r, weight, u, e, g, length, target, grad_m2, grad_m3);
}

// The same for a row of either kind. g: see Cosines.
template <typename acc_t>
void forward_row(const Margin<acc_t>& margin, acc_t scale, Cosines<acc_t> u, acc_t* logit,
                 int64_t length, int64_t target, ChunkRow<acc_t>& out) {
  if (u.inverse != nullptr) {
    forward_row<acc_t, true>(margin, scale, {u.values, u.inverse}, logit, length, target, out);
  } else {
    forward_row<acc_t, false>(margin, scale, {u.values, nullptr}, logit, length, target, out);
  }
}
// A parameter whose type is not deduced from its argument (std::type_identity_t is C++20).
template <typename T>
struct NotDeduced {
  using type = T;
};
template <typename acc_t>
acc_t backward_row(const Margin<acc_t>& margin, const RowBackward<acc_t>& r, acc_t weight,
                   Cosines<acc_t> u, typename NotDeduced<const acc_t*>::type e, acc_t* g,
                   int64_t length, int64_t target, acc_t* grad_m2, acc_t* grad_m3) {
  if (u.inverse != nullptr) {
    return backward_row<acc_t, true>(margin, r, weight, {u.values, u.inverse}, e, {g, u.inverse},
                                     length, target, grad_m2, grad_m3);
  }
  return backward_row<acc_t, false>(margin, r, weight, {u.values, nullptr}, e, {g, nullptr},
                                    length, target, grad_m2, grad_m3);
}

// u for one row of the chunk; with K > 1 also each class's winning sub-center: the first
// max before the clamp (the first NaN wins), one sub-center at a time over all classes (the
// row is sub-center-major: sub-center q of class j at q * length + j, so every pass reads
// contiguous memory). Margin::class_cosine takes the first max after the
// clamp; the two differ only among sub-centers clamped alike, whose gradient is 0 either
// way, so the outputs are the same.
template <typename scalar_t, typename acc_t>
FK_INLINE void gather_cosines_impl(const Margin<acc_t> margin, const scalar_t* __restrict__ z,
                                   const acc_t* __restrict__ inverse, int64_t length,
                                   acc_t* __restrict__ u, int32_t* __restrict__ winners) {
  const int64_t k = margin.sub_centers;
#pragma omp simd
  for (int64_t j = 0; j < length; ++j) {
    u[j] = Margin<acc_t>::unclamped(z, inverse, j);
  }
  if (k > 1) {
    std::fill_n(winners, length, 0);
  }
  for (int32_t q = 1; q < k; ++q) {
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      const acc_t best = u[j];
      const acc_t c = Margin<acc_t>::unclamped(z, inverse, q * length + j);
      const bool take = (best == best) & ((c > best) | (c != c));
      u[j] = take ? c : best;
      winners[j] = take ? q : winners[j];
    }
  }
}

// dL/dz from dL/du: times the inverse norm, at the winning sub-center, 0 at the others.
template <typename scalar_t, typename acc_t>
FK_INLINE void scatter_grads_impl(const acc_t* __restrict__ g, const acc_t* __restrict__ inverse,
                                  const int32_t* __restrict__ winners, int64_t length, int64_t k,
                                  scalar_t* __restrict__ z) {
  if (k == 1) {
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      z[j] = static_cast<scalar_t>(inverse != nullptr ? g[j] * inverse[j] : g[j]);
    }
    return;
  }
  for (int32_t q = 0; q < k; ++q) {
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      const int64_t at = q * length + j;
      const acc_t scale = inverse != nullptr ? inverse[at] : acc_t(1);
      z[at] = static_cast<scalar_t>(winners[j] == q ? g[j] * scale : acc_t(0));
    }
  }
}

template <typename scalar_t, typename acc_t>
void gather_cosines(const Margin<acc_t>& margin, const scalar_t* z, const acc_t* inverse,
                    int64_t length, acc_t* u, int32_t* winners) {
  gather_cosines_impl(margin, z, inverse, length, u, winners);
}
template <typename scalar_t, typename acc_t>
void scatter_grads(const acc_t* g, const acc_t* inverse, const int32_t* winners, int64_t length,
                   int64_t k, scalar_t* z) {
  scatter_grads_impl(g, inverse, winners, length, k, z);
}
// fp32 and fp64 chunks, compiled per vector width too.
FK_VECTOR_CLONES void gather_cosines(const Margin<float>& margin, const float* z,
                                     const float* inverse, int64_t length, float* u,
                                     int32_t* winners) {
  gather_cosines_impl(margin, z, inverse, length, u, winners);
}
FK_VECTOR_CLONES void gather_cosines(const Margin<double>& margin, const double* z,
                                     const double* inverse, int64_t length, double* u,
                                     int32_t* winners) {
  gather_cosines_impl(margin, z, inverse, length, u, winners);
}
FK_VECTOR_CLONES void scatter_grads(const float* g, const float* inverse, const int32_t* winners,
                                    int64_t length, int64_t k, float* z) {
  scatter_grads_impl(g, inverse, winners, length, k, z);
}
FK_VECTOR_CLONES void scatter_grads(const double* g, const double* inverse,
                                    const int32_t* winners, int64_t length, int64_t k, double* z) {
  scatter_grads_impl(g, inverse, winners, length, k, z);
}

// The forward's row state, and the fold of one chunk's part of a row into it.
template <typename acc_t>
struct StateRows {
  acc_t* row_max;
  acc_t* row_sum;
  acc_t* target_logit;
  acc_t* best_cosine;
  int64_t* predicted;

  explicit StateRows(RowState& state)
      : row_max(state.row_max.mutable_data_ptr<acc_t>()),
        row_sum(state.row_sum.mutable_data_ptr<acc_t>()),
        target_logit(state.target_logit.mutable_data_ptr<acc_t>()),
        best_cosine(state.best_cosine.mutable_data_ptr<acc_t>()),
        predicted(state.predicted.mutable_data_ptr<int64_t>()) {}

  void fold(int64_t i, const ChunkRow<acc_t>& chunk, bool has_target, int64_t class_start) {
    OnlineLse<acc_t> lse{row_max[i], row_sum[i]};
    lse.merge({chunk.max, chunk.sum});
    row_max[i] = lse.max;
    row_sum[i] = lse.sum;
    if (has_target) {
      target_logit[i] = chunk.target_logit;
    }
    if (chunk.best_index >= 0) {
      ArgMax<acc_t> best{best_cosine[i], predicted[i]};
      best.push(chunk.best, class_start + chunk.best_index);
      best_cosine[i] = best.value;
      predicted[i] = best.index;
    }
  }
};

// The backward's per-row inputs and outputs.
template <typename acc_t>
struct GradRows {
  const acc_t* max;
  const acc_t* log_sum;
  const acc_t* grad_log_sum;
  const acc_t* grad_target;
  acc_t* scale;
  acc_t* m2;
  acc_t* m3;

  explicit GradRows(RowGrads& grads)
      : max(grads.row_max.const_data_ptr<acc_t>()),
        log_sum(grads.log_sum.const_data_ptr<acc_t>()),
        grad_log_sum(grads.grad_log_sum.const_data_ptr<acc_t>()),
        grad_target(grads.grad_target.const_data_ptr<acc_t>()),
        scale(grads.scale.mutable_data_ptr<acc_t>()),
        m2(optional_mutable_data<acc_t>(grads.m2)),
        m3(optional_mutable_data<acc_t>(grads.m3)) {}

  RowBackward<acc_t> row(int64_t i, acc_t row_scale) const {
    return {row_scale, max[i], log_sum[i], grad_log_sum[i], grad_target[i]};
  }
  acc_t* m2_of(int64_t i) const { return m2 ? m2 + i : nullptr; }
  acc_t* m3_of(int64_t i) const { return m3 ? m3 + i : nullptr; }
};

// A task's row buffers: logits (then exponentials); unless z holds one cosine per class in
// the accumulate type (K = 1, fp32 or fp64: `direct`), cosines u, dL/du and the winning
// sub-centers, which a row's cosines are gathered into and its dL/dz scattered from.
template <typename scalar_t, typename acc_t>
struct RowBuffers {
  static constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const bool direct;
  const int64_t length, k;
  std::vector<acc_t> u, logit, g;
  std::vector<int32_t> winners;

  RowBuffers(int64_t length, int64_t k, bool forward, bool backward)
      : direct(kSameType && k == 1), length(length), k(k), u(direct ? 0 : length),
        logit(forward ? length : 0), g(backward && !direct ? length : 0),
        winners(k > 1 ? length : 0) {}

  Cosines<acc_t> cosines(const Margin<acc_t>& margin, const scalar_t* row,
                         const acc_t* inverse) {
    if constexpr (kSameType) {
      if (direct) {
        return {row, inverse};
      }
    }
    gather_cosines(margin, row, inverse, length, u.data(), winners.data());
    return {u.data(), nullptr};
  }
  // Where the backward writes: see Cosines.
  acc_t* grads(scalar_t* row) {
    if constexpr (kSameType) {
      if (direct) {
        return row;
      }
    }
    return g.data();
  }
  // After the backward of a row: dL/dz into z, where grads did not write it there.
  void scatter(scalar_t* row, const acc_t* inverse) {
    if (!direct) {
      scatter_grads(g.data(), inverse, winners.data(), length, k, row);
    }
  }
};

void forward_epilogue_cpu(const at::Tensor& z, const at::Tensor& inverse, int64_t class_start,
                          const at::Tensor& labels, const at::Tensor& row_scale,
                          const MarginOptions& options, RowState& state) {
  const int64_t n = z.size(0), k = options.sub_centers, length = z.size(1) / k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Margin<acc_t> margins = options.margin<acc_t>();
        const scalar_t* zp = z.const_data_ptr<scalar_t>();
        const acc_t* inv = optional_data<acc_t>(inverse);
        const int64_t* label = labels.const_data_ptr<int64_t>();
        const acc_t* scale = row_scale.const_data_ptr<acc_t>();
        StateRows<acc_t> out(state);
        at::parallel_for(0, n, row_grain(length * k), [&](int64_t begin, int64_t end) {
          RowBuffers<scalar_t, acc_t> b(length, k, true, false);
          for (int64_t i = begin; i < end; ++i) {
            const Margin<acc_t> margin = margins.for_row(i);
            const int64_t target = label[i] - class_start;
            ChunkRow<acc_t> chunk;
            forward_row(margin, scale[i], b.cosines(margin, zp + i * length * k, inv),
                        b.logit.data(), length, target, chunk);
            out.fold(i, chunk, target >= 0 && target < length, class_start);
          }
        });
      });
}

void backward_epilogue_cpu(at::Tensor& z, const at::Tensor& inverse, int64_t class_start,
                           const at::Tensor& labels, const at::Tensor& row_scale,
                           const MarginOptions& options, RowGrads& grads) {
  const int64_t n = z.size(0), k = options.sub_centers, length = z.size(1) / k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Margin<acc_t> margins = options.margin<acc_t>();
        scalar_t* zp = z.mutable_data_ptr<scalar_t>();
        const acc_t* inv = optional_data<acc_t>(inverse);
        const int64_t* label = labels.const_data_ptr<int64_t>();
        const acc_t* scale = row_scale.const_data_ptr<acc_t>();
        const GradRows<acc_t> out(grads);
        at::parallel_for(0, n, row_grain(length * k), [&](int64_t begin, int64_t end) {
          RowBuffers<scalar_t, acc_t> b(length, k, false, true);
          for (int64_t i = begin; i < end; ++i) {
            const Margin<acc_t> margin = margins.for_row(i);
            scalar_t* row = zp + i * length * k;
            out.scale[i] += backward_row(margin, out.row(i, scale[i]), acc_t(0),
                                         b.cosines(margin, row, inv), nullptr, b.grads(row),
                                         length, label[i] - class_start, out.m2_of(i),
                                         out.m3_of(i));
            b.scatter(row, inv);
          }
        });
      });
}

// Both for a block of rows that holds every class, a row at a time while it is in cache:
// the backward reads the cosines the forward read (or gathered) and takes its exponentials.
void step_epilogue_cpu(at::Tensor& z, const at::Tensor& inverse, const at::Tensor& labels,
                       const at::Tensor& row_scale, const MarginOptions& options, RowState& state,
                       RowGrads& grads) {
  const int64_t n = z.size(0), k = options.sub_centers, length = z.size(1) / k;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "margin_softmax_step_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Margin<acc_t> margins = options.margin<acc_t>();
        scalar_t* zp = z.mutable_data_ptr<scalar_t>();
        const acc_t* inv = optional_data<acc_t>(inverse);
        const int64_t* label = labels.const_data_ptr<int64_t>();
        const acc_t* scale = row_scale.const_data_ptr<acc_t>();
        StateRows<acc_t> forward(state);
        acc_t* log_sum = grads.log_sum.mutable_data_ptr<acc_t>();
        const GradRows<acc_t> out(grads);
        at::parallel_for(0, n, row_grain(length * k), [&](int64_t begin, int64_t end) {
          RowBuffers<scalar_t, acc_t> b(length, k, true, true);
          for (int64_t i = begin; i < end; ++i) {
            const Margin<acc_t> margin = margins.for_row(i);
            const int64_t target = label[i];
            scalar_t* row = zp + i * length * k;
            const Cosines<acc_t> u = b.cosines(margin, row, inv);
            ChunkRow<acc_t> chunk;
            forward_row(margin, scale[i], u, b.logit.data(), length, target, chunk);
            forward.fold(i, chunk, target >= 0 && target < length, 0);
            log_sum[i] = std::log(forward.row_sum[i]);
            const RowBackward<acc_t> r = out.row(i, scale[i]);
            // With a finite max, forward_row left the exponentials (the fold of one chunk
            // into the empty state keeps its max and sum).
            const bool exps = std::isfinite(chunk.max);
            out.scale[i] += backward_row(margin, r, r.grad_log_sum / chunk.sum, u,
                                         exps ? b.logit.data() : nullptr, b.grads(row),
                                         length, target, out.m2_of(i), out.m3_of(i));
            b.scatter(row, inv);
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("margin_softmax_forward", &margin_softmax_forward<&forward_epilogue_cpu>);
  m.impl("margin_softmax_backward", &margin_softmax_backward<&backward_epilogue_cpu>);
  m.impl("margin_softmax_forward_backward", &margin_softmax_forward_backward<&step_epilogue_cpu>);
}

}  // namespace facekernels
