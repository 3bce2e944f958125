// How the CPU kernels split the rows of a matrix across threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace facekernels {

// Rows per task: at least this many elements each, so that a small matrix (a few classes,
// the last chunk, a small batch) is not spread over every core for microseconds of work.
constexpr int64_t kTaskElements = 32768;

inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, row_elements));
}

// body(i, m) for every row i of the matrix t with m columns, rows split by row_grain.
template <typename Body>
void for_rows(const at::Tensor& t, Body body) {
  const int64_t m = t.size(1);
  at::parallel_for(0, t.size(0), row_grain(m), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      body(i, m);
    }
  });
}

}  // namespace facekernels
