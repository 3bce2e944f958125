// Center loss (Wen et al. 2016): the math both devices share, plus the device-neutral
// orchestration that the CPU and CUDA kernels plug into.
//
// Samples are visited grouped by class: labels are sorted (stably) once, and the first
// sorted position of each class owns that class. Every sum then runs in a fixed order, so
// results are bitwise reproducible without atomics, and each center row is read once.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <tuple>

namespace facekernels {

// True where sorted position k starts a run of equal labels.
C10_HOST_DEVICE inline bool is_group_start(const int64_t* sorted_labels, int64_t k) {
  return k == 0 || sorted_labels[k] != sorted_labels[k - 1];
}

// One past the last sorted position holding the same label as position k.
C10_HOST_DEVICE inline int64_t group_end(const int64_t* sorted_labels, int64_t k, int64_t n) {
  int64_t end = k + 1;
  while (end < n && sorted_labels[end] == sorted_labels[k]) {
    ++end;
  }
  return end;
}

// Wen et al.'s moved center: c + alpha * sum_i (x_i - c) / (1 + count), given that sum.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t moved_center(acc_t center, acc_t alpha, acc_t sum, int64_t count) {
  return center + alpha * sum / static_cast<acc_t>(count + 1);
}

// One embedding dimension of one class with `count` members (row indices in `members`).
// `x`, `diff` and `updated` point at that dimension's column (row stride `stride`).
// Writes diff_i = x_i - c for each member and, when `updated` is non-null, Wen's update
//   c + alpha * sum_i (x_i - c) / (1 + count)
// into each member's row, so the caller can scatter it back without a [C, D] temporary.
// Returns sum_i (x_i - c)^2.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t center_forward_column(const scalar_t* x, const int64_t* members,
                                                   int64_t count, int64_t stride,
                                                   scalar_t center, acc_t alpha,
                                                   scalar_t* diff, scalar_t* updated) {
  const acc_t c = static_cast<acc_t>(center);
  acc_t sum = 0, squares = 0;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t at = members[m] * stride;
    const acc_t v = static_cast<acc_t>(x[at]) - c;
    diff[at] = static_cast<scalar_t>(v);
    sum += v;
    squares += v * v;
  }
  if (updated != nullptr) {
    const scalar_t moved = static_cast<scalar_t>(moved_center(c, alpha, sum, count));
    for (int64_t m = 0; m < count; ++m) {
      updated[members[m] * stride] = moved;
    }
  }
  return squares;
}

// Backward for one dimension of one class: grad_x_i = scale * diff_i for each member,
// with scale = dL/dloss / N. Returns sum_i diff_i, whose -scale multiple is the center's
// gradient.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t center_backward_column(const scalar_t* diff, const int64_t* members,
                                                    int64_t count, int64_t stride, acc_t scale,
                                                    scalar_t* grad_x) {
  acc_t sum = 0;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t at = members[m] * stride;
    const acc_t v = static_cast<acc_t>(diff[at]);
    grad_x[at] = static_cast<scalar_t>(scale * v);
    sum += v;
  }
  return sum;
}

// Device-neutral parts (center_loss.cpp): validation, grouping and allocation before the
// per-device kernel, the final reduction after it.
struct CenterForward {
  at::Tensor embeddings, centers;     // contiguous inputs
  at::Tensor sorted_labels, members;  // stably sorted labels and the row of each position
  at::Tensor diff;                    // [N, D] x_i - c_{y_i}
  at::Tensor updated;                 // [N, D] moved center of each row's class, or [0, D]
  at::Tensor partials;                // [N] sum of squares per group (at its first position)
};

CenterForward center_forward_setup(const at::Tensor& embeddings, const at::Tensor& labels,
                                   const at::Tensor& centers, bool compute_update);

// (loss, diff, updated), loss = sum(partials) / (2N) in the embeddings' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> center_forward_finish(const CenterForward& f);

// The checks of center_loss_update_, every device's.
void check_center_update(const at::Tensor& centers, const at::Tensor& labels,
                         const at::Tensor& updated);

struct CenterBackward {
  at::Tensor diff;                    // contiguous
  at::Tensor sorted_labels, members;
  at::Tensor scale;                   // [1] dL/dloss / N in the accumulate type, on device
  at::Tensor grad_embeddings;         // [N, D]
  at::Tensor grad_centers;            // [C, D] zeros, or [0, D] when not wanted
};

// group: sort the labels into groups (a kernel that sums per class needs them).
CenterBackward center_backward_setup(const at::Tensor& grad_loss, const at::Tensor& diff,
                                     const at::Tensor& labels, int64_t num_classes,
                                     bool centers_grad, bool group = true);

}  // namespace facekernels
