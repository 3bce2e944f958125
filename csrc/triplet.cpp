#include "triplet.h"

#include <c10/core/DeviceGuard.h>

#include "common/checks.h"

namespace facekernels {

TripletInputs triplet_setup(const char* op, const at::Tensor& dist, const at::Tensor& labels,
                            const at::Tensor& ref_labels, int64_t mining, bool self_ref) {
  check_defined_floating(op, "dist", dist);
  check_dim(op, "dist", dist, 2);
  TORCH_CHECK_VALUE(mining >= kMineAll && mining <= kMineEvery, op, ": unknown mining type ",
                    mining);
  TORCH_CHECK_VALUE(!self_ref || dist.size(0) <= dist.size(1), op,
                    ": dist must have at least as many columns as rows when the reference set "
                    "starts with the batch, got ", dist.sizes());
  const auto check_label_vector = [&](const char* name, const at::Tensor& t, int64_t n) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
                      "], got ", t.sizes());
    check_same_device(op, name, t, dist);
  };
  TORCH_CHECK_VALUE(dist.size(1) <= INT32_MAX, op, ": dist must have fewer than 2^31 columns, got ",
                    dist.sizes());
  check_label_vector("labels", labels, dist.size(0));
  check_label_vector("ref_labels", ref_labels, dist.size(1));
  TripletInputs in;
  in.dist = dist.contiguous();
  in.labels = labels.contiguous();
  in.ref_labels = ref_labels.contiguous();
  auto [sorted, order] = ref_labels.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  in.sorted_ref = sorted.contiguous();
  in.ref_order = order.contiguous();
  in.self_ref = self_ref;
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_forward_finish(
    const at::Tensor& loss, const at::Tensor& active, const at::Tensor& count,
    const at::Tensor& grad_dist, at::ScalarType dtype) {
  return {loss.sum().to(dtype), active.sum(), count.sum(), grad_dist.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_mine_impl(
    const at::Tensor& dist, const at::Tensor& labels, const at::Tensor& ref_labels,
    double margin, int64_t mining, bool self_ref, const TripletMinerKernels& kernels) {
  const TripletInputs in = triplet_setup("triplet_mine", dist, labels, ref_labels, mining, self_ref);
  const c10::DeviceGuard device(dist.device());  // after the checks, for the kernels
  if (mining == kMineBatchHard) {
    auto [positive, negative] = kernels.hardest(in);
    const at::Tensor anchors = ((positive >= 0) & (negative >= 0)).nonzero().squeeze(1);
    return {anchors, positive.index_select(0, anchors), negative.index_select(0, anchors)};
  }
  if (mining == kMineFacenet) {
    const at::Tensor choices = kernels.facenet_choices(in);
    const at::Tensor pairs = (choices >= 0).nonzero();  // row-major: lexicographic (a, p)
    // Copies: for a single pair a contiguous() column would still share pairs' storage.
    const at::Tensor anchors = pairs.select(1, 0).clone(at::MemoryFormat::Contiguous);
    const at::Tensor positives = pairs.select(1, 1).clone(at::MemoryFormat::Contiguous);
    return {anchors, positives, choices.index({anchors, positives})};
  }
  const at::Tensor counts = kernels.pair_counts(in, margin, mining);
  const at::Tensor ends = counts.flatten().cumsum(0);
  const int64_t total = dist.numel() == 0 ? 0 : ends[-1].item<int64_t>();
  const at::Tensor offsets = (ends - counts.flatten()).view_as(counts);
  at::Tensor anchors = at::empty({total}, labels.options());
  at::Tensor positives = at::empty({total}, labels.options());
  at::Tensor negatives = at::empty({total}, labels.options());
  kernels.fill(in, margin, mining, offsets, anchors, positives, negatives);
  return {anchors, positives, negatives};
}

}  // namespace facekernels
