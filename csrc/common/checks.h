// Input checks shared by every op. Each message starts with the op's name and names the
// argument, so an error raised deep inside a training step points at the culprit.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

namespace facekernels {

inline void check_defined_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float32, float64, bfloat16, float16), got ",
                   t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ",
                    t.sizes());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but embeddings are on ", ref.device());
}

// The values of one-element tensors, as int64, read with one copy to the host: on a GPU
// one synchronization, where an item() call per value would make one each.
inline std::vector<int64_t> host_values(std::initializer_list<at::Tensor> scalars) {
  std::vector<at::Tensor> values;
  for (const at::Tensor& t : scalars) {
    values.push_back(t.reshape({1}).to(at::kLong));
  }
  const at::Tensor host = at::cat(values).cpu();
  const int64_t* begin = host.const_data_ptr<int64_t>();
  return {begin, begin + host.numel()};
}

// Labels: int64, shape [n], values in [0, num_classes). The range check reads the values,
// which on a GPU costs one synchronization; it is what keeps a bad label from writing
// outside the class table.
inline void check_labels(const char* op, const at::Tensor& labels, int64_t n,
                         int64_t num_classes) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n, op,
                    ": labels must have shape [", n, "] to match embeddings, got ",
                    labels.sizes());
  if (n == 0) {
    return;
  }
  int64_t min, max;
  if (labels.is_cpu()) {  // a loop: aminmax and two item() calls took 10 us
    const at::Tensor values = labels.contiguous();
    const int64_t* begin = values.const_data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(begin, begin + n);
    min = *lo;
    max = *hi;
  } else {
    const auto [lo, hi] = at::aminmax(labels);
    const std::vector<int64_t> values = host_values({lo, hi});
    min = values[0];
    max = values[1];
  }
  TORCH_CHECK_VALUE(min >= 0 && max < num_classes, op,
                    ": labels must be int64 with values in [0, ", num_classes, "), got ",
                    min < 0 ? "min " : "max ", min < 0 ? min : max);
}

}  // namespace facekernels
