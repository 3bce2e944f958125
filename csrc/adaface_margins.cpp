#include "adaface_margins.h"

#include <ATen/OpMathType.h>

#include "common/checks.h"

namespace facekernels {
namespace {

constexpr const char* kOp = "adaface_margins";

void check_statistic(const char* name, const at::Tensor& t, const at::Tensor& embeddings) {
  check_defined_floating(kOp, name, t);
  check_same_device(kOp, name, t, embeddings);
  TORCH_CHECK_VALUE(t.numel() == 1, kOp, ": ", name, " must hold one value, got shape ",
                    t.sizes());
}

}  // namespace

AdaFaceMargins adaface_margins_setup(const at::Tensor& embeddings, const at::Tensor& mean,
                                     const at::Tensor& std_dev, double h, double margin,
                                     double t_alpha, bool training) {
  check_defined_floating(kOp, "embeddings", embeddings);
  check_dim(kOp, "embeddings", embeddings, 2);
  TORCH_CHECK_VALUE(embeddings.size(0) > 0, kOp, ": embeddings must hold at least one row");
  TORCH_CHECK_VALUE(!training || embeddings.size(0) >= 2, kOp,
                    ": a training batch needs at least 2 rows for the norm's standard "
                    "deviation, got ", embeddings.size(0));
  check_statistic("mean", mean, embeddings);
  check_statistic("std", std_dev, embeddings);
  TORCH_CHECK_VALUE(std::isfinite(h) && h >= 0, kOp, ": h must be a finite number >= 0, got ", h);
  TORCH_CHECK_VALUE(std::isfinite(margin), kOp, ": margin must be finite, got ", margin);
  TORCH_CHECK_VALUE(t_alpha >= 0 && t_alpha <= 1, kOp, ": t_alpha must lie in [0, 1], got ",
                    t_alpha);
  const auto acc = embeddings.options().dtype(at::toOpMathType(embeddings.scalar_type()));
  const int64_t n = embeddings.size(0);
  return {embeddings.contiguous(),
          at::cat({mean.reshape(1), std_dev.reshape(1)}).to(at::kDouble),
          at::empty({1}, embeddings.options().dtype(at::kDouble)),
          at::empty({1}, embeddings.options().dtype(at::kDouble)),
          at::empty({n}, acc),
          at::empty({n}, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaface_margins_finish(
    const AdaFaceMargins& a, const at::Tensor& mean, const at::Tensor& std_dev) {
  return {a.row_m2, a.row_m3, a.new_mean.view(mean.sizes()).to(mean.scalar_type()),
          a.new_std.view(std_dev.sizes()).to(std_dev.scalar_type())};
}

}  // namespace facekernels
