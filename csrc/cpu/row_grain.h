// How the CPU kernels split the rows of a matrix across threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace facekernels {

// Rows per task: at least this many elements each, so that a small matrix (a few classes,
// the last chunk, a small batch) is not spread over every core for microseconds of work.
constexpr int64_t kTaskElements = 32768;

inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, row_elements));
}

}  // namespace facekernels
