// Small reduction states shared by several ops, usable on both devices and mergeable in
// any fixed tree order (cub block reductions on the GPU).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

namespace facekernels {

// Running argmax; ties go to the lower index and NaN candidates are skipped, so the result
// does not depend on the order in which candidates arrive (CPU loops and GPU trees agree).
// An empty state has index -1.
template <typename acc_t>
struct ArgMax {
  acc_t value = -std::numeric_limits<acc_t>::infinity();
  int64_t index = -1;

  C10_HOST_DEVICE void push(acc_t v, int64_t i) {
    if (v != v) {
      return;
    }
    if (index < 0 || v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }

  C10_HOST_DEVICE void merge(const ArgMax& other) {
    if (other.index >= 0) {
      push(other.value, other.index);
    }
  }
};

}  // namespace facekernels
