#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "cpu/row_grain.h"
#include "cpu/vector_math.h"
#include "pairwise_distance.h"

namespace facekernels {
namespace {

// One row's element passes, vector loops over the columns.
template <typename scalar_t>
FK_INLINE int64_t gram_row_impl(scalar_t norm_x, const scalar_t* __restrict__ norm_ref,
                                scalar_t* __restrict__ row, bool* __restrict__ close,
                                int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t j = 0; j < m; ++j) {
    const GramSquared<scalar_t> g = gram_squared<scalar_t, acc_t>(norm_x, norm_ref[j], row[j]);
    row[j] = g.squared;
    close[j] = g.close;
    count += g.close ? 1 : 0;
  }
  return count;
}

template <typename scalar_t>
FK_INLINE void finish_row_impl(scalar_t* __restrict__ row, int64_t m, int64_t diagonal) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    row[j] = finish_squared<scalar_t, acc_t>(row[j], j == diagonal);
  }
}

template <typename scalar_t>
FK_INLINE void slope_row_impl(scalar_t* __restrict__ out, const scalar_t* __restrict__ grad,
                              const scalar_t* __restrict__ dist, int64_t m, bool squared_only) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    out[j] = distance_slope<acc_t>(grad[j], dist[j], squared_only);
  }
}

// fp32 and fp64 compiled per vector width; half types take the plain instances.
template <typename scalar_t>
int64_t gram_row(scalar_t norm_x, const scalar_t* norm_ref, scalar_t* row, bool* close,
                 int64_t m) {
  return gram_row_impl(norm_x, norm_ref, row, close, m);
}
template <typename scalar_t>
void finish_row(scalar_t* row, int64_t m, int64_t diagonal) {
  finish_row_impl(row, m, diagonal);
}
template <typename scalar_t>
void slope_row(scalar_t* out, const scalar_t* grad, const scalar_t* dist, int64_t m,
               bool squared_only) {
  slope_row_impl(out, grad, dist, m, squared_only);
}
#define FK_DISTANCE_ROWS(T)                                                                   \
  FK_VECTOR_CLONES int64_t gram_row(T norm_x, const T* norm_ref, T* row, bool* close,        \
                                    int64_t m) {                                             \
    return gram_row_impl(norm_x, norm_ref, row, close, m);                                   \
  }                                                                                          \
  FK_VECTOR_CLONES void finish_row(T* row, int64_t m, int64_t diagonal) {                   \
    finish_row_impl(row, m, diagonal);                                                       \
  }                                                                                          \
  FK_VECTOR_CLONES void slope_row(T* out, const T* grad, const T* dist, int64_t m,           \
                                  bool squared_only) {                                       \
    slope_row_impl(out, grad, dist, m, squared_only);                                        \
  }
FK_DISTANCE_ROWS(float)
FK_DISTANCE_ROWS(double)
#undef FK_DISTANCE_ROWS

// The close flags row by row with their counts, then their flat indices gathered in order
// (memchr, where ATen's nonzero took 3 ns an element).
at::Tensor gram_cpu(at::Tensor& squared, const at::Tensor& norm_x, const at::Tensor& norm_ref) {
  const int64_t n = squared.size(0);
  at::Tensor close = at::empty(squared.sizes(), squared.options().dtype(at::kBool));
  std::vector<int64_t> starts(n + 1, 0);
  bool* c = close.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, squared.scalar_type(), "pairwise_distance_gram_cpu", [&] {
    scalar_t* s = squared.mutable_data_ptr<scalar_t>();
    const scalar_t* nx = norm_x.const_data_ptr<scalar_t>();
    const scalar_t* nr = norm_ref.const_data_ptr<scalar_t>();
    for_rows(squared, [&](int64_t i, int64_t m) {
      starts[i + 1] = gram_row(nx[i], nr, s + i * m, c + i * m, m);
    });
  });
  std::partial_sum(starts.begin(), starts.end(), starts.begin());
  at::Tensor index = at::empty({starts[n]}, squared.options().dtype(at::kLong));
  int64_t* out = index.mutable_data_ptr<int64_t>();
  for_rows(squared, [&](int64_t i, int64_t m) {
    const auto* row = reinterpret_cast<const unsigned char*>(c + i * m);  // true is 1
    const unsigned char* next = row;
    for (int64_t at = starts[i]; at < starts[i + 1]; ++at, ++next) {
      next = static_cast<const unsigned char*>(std::memchr(next, 1, row + m - next));
      out[at] = i * m + (next - row);
    }
  });
  return index;
}

void finish_cpu(at::Tensor& squared, bool self_ref) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, squared.scalar_type(), "pairwise_distance_finish_cpu", [&] {
    scalar_t* s = squared.mutable_data_ptr<scalar_t>();
    for_rows(squared, [&](int64_t i, int64_t m) {
      finish_row(s + i * m, m, self_ref ? i : -1);
    });
  });
}

void slopes_cpu(at::Tensor& out, const at::Tensor& grad, const at::Tensor& dist,
                bool squared_only) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pairwise_distance_slopes_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    for_rows(out, [&](int64_t i, int64_t m) {
      slope_row(o + i * m, g + i * m, d + i * m, m, squared_only);
    });
  });
}

constexpr DistanceKernels kCpuKernels{&gram_cpu, &finish_cpu, &slopes_cpu};

at::Tensor pairwise_distance_cpu(const at::Tensor& x, const at::Tensor& ref, bool self_ref,
                                 bool squared) {
  return pairwise_distance_impl(x, ref, self_ref, squared, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(
    const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& x, const at::Tensor& ref,
    bool squared, bool x_grad, bool ref_grad) {
  return pairwise_distance_backward_impl(grad, dist, x, ref, squared, x_grad, ref_grad,
                                         kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance_cpu);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_cpu);
}

}  // namespace facekernels
