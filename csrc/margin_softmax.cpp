#include "margin_softmax.h"

#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "common/checks.h"

namespace facekernels {
namespace {

constexpr const char* kOp = "margin_softmax_loss";

// Labels are range-checked by the forward unless the weight is a class shard, where a label
// outside [0, C) means "this weight does not hold the row's class": no target logit.
void check_inputs(const at::Tensor& embeddings, const at::Tensor& weight,
                  const at::Tensor& labels, const MarginOptions& options) {
  check_defined_floating(kOp, "embeddings", embeddings);
  check_defined_floating(kOp, "weight", weight);
  check_dim(kOp, "embeddings", embeddings, 2);
  TORCH_CHECK_VALUE(embeddings.size(0) > 0 && embeddings.size(0) <= INT32_MAX, kOp,
                    ": embeddings must hold between 1 and 2^31 - 1 rows, got shape ",
                    embeddings.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == embeddings.size(1), kOp,
                    ": weight must have shape [num_classes, ", embeddings.size(1),
                    "] to match embeddings, got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, kOp, ": weight must hold at least one class");
  check_same_device(kOp, "weight", weight, embeddings);
  check_same_device(kOp, "labels", labels, embeddings);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, kOp, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0), kOp,
                    ": labels must have shape [", embeddings.size(0),
                    "] to match embeddings, got ", labels.sizes());
  TORCH_CHECK_VALUE(options.chunk_size > 0, kOp, ": chunk_size must be positive, got ",
                    options.chunk_size);
  TORCH_CHECK_VALUE(options.kind == kCombinedMargin || options.kind == kSphereMargin, kOp,
                    ": unknown margin kind ", options.kind);
}

// Rows scaled to unit norm as F.normalize does (norm floored at 1e-12), computed in the
// accumulate type. Returns (normalized rows in `dtype`, 1 / floored norms, norms).
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_rows(const at::Tensor& rows,
                                                              at::ScalarType dtype,
                                                              bool double_norm = false) {
  const at::Tensor wide = rows.to(at::toOpMathType(dtype));
  // The sum of squares of an fp32 row overflows from a norm of 1.8e19 on, which would make
  // the row zero; the embeddings' norms (N of them) are therefore summed in double.
  const at::Tensor norms =
      double_norm ? at::linalg_vector_norm(wide, 2, {1}, /*keepdim=*/true, at::kDouble).to(wide.scalar_type())
                  : at::linalg_vector_norm(wide, 2, {1}, /*keepdim=*/true);
  const at::Tensor inverse = norms.clamp_min(kNormFloor).reciprocal();
  return {(wide * inverse).to(dtype), inverse, norms};
}

// Backward of F.normalize for rows with unit directions `unit`, given dL/d unit:
// (g - <g, unit> unit) / |row| where |row| >= floor, else g / floor.
at::Tensor normalize_backward(const at::Tensor& grad_unit, const at::Tensor& unit,
                              const at::Tensor& inverse, const at::Tensor& norms) {
  const at::Tensor along = (grad_unit * unit).sum(1, /*keepdim=*/true);
  return (grad_unit - along.masked_fill(norms < kNormFloor, 0) * unit) * inverse;
}

// Per-row logit scale: s, or s * |x_i| when the embeddings are not normalized.
at::Tensor row_scales(const at::Tensor& norms, const MarginOptions& options) {
  return options.normalize_embeddings ? at::full_like(norms.squeeze(1), options.scale)
                                      : norms.squeeze(1) * options.scale;
}

// The embeddings' side, shared by forward and backward.
struct Rows {
  at::Tensor unit, inverse, norms;  // normalized rows (GEMM dtype), 1 / norms, norms
  at::Tensor scales;                // per-row logit scale, accumulate type
};

Rows prepare_rows(const at::Tensor& embeddings, const MarginOptions& options) {
  auto [unit, inverse, norms] = normalize_rows(embeddings, embeddings.scalar_type(), true);
  return {unit, inverse, norms, row_scales(norms, options)};
}

// The weight rows of one chunk, ready for the GEMM in the embeddings' dtype.
struct WeightChunk {
  at::Tensor rows, inverse, norms;
};

WeightChunk weight_chunk(const at::Tensor& weight, int64_t start, int64_t length,
                         at::ScalarType dtype, const MarginOptions& options) {
  const at::Tensor raw = weight.narrow(0, start, length);
  if (!options.normalize_weight) {
    return {raw.to(dtype), at::Tensor(), at::Tensor()};
  }
  auto [rows, inverse, norms] = normalize_rows(raw, dtype);
  return {rows, inverse, norms};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginOptions& options, bool labels_in_range, ForwardEpilogue epilogue) {
  // Dtypes are chosen here (GEMMs in the embeddings' dtype): autocast must not re-cast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(embeddings, weight, labels, options);
  if (labels_in_range) {
    // Here rather than in Python, so that a compiled graph checks too (one sync on a GPU).
    check_labels(kOp, labels, embeddings.size(0), weight.size(0));
  }
  const c10::DeviceGuard device(embeddings.device());
  const at::ScalarType dtype = embeddings.scalar_type();
  const int64_t n = embeddings.size(0), num_classes = weight.size(0);
  const Rows rows = prepare_rows(embeddings, options);
  const auto acc = rows.scales.options();
  RowState state{at::full({n}, -std::numeric_limits<double>::infinity(), acc),
                 at::zeros({n}, acc), at::zeros({n}, acc),
                 at::full({n}, -std::numeric_limits<double>::infinity(), acc),
                 at::full({n}, -1, labels.options())};
  const at::Tensor labels_c = labels.contiguous();
  for (int64_t start = 0; start < num_classes; start += options.chunk_size) {
    const int64_t length = std::min(options.chunk_size, num_classes - start);
    const WeightChunk chunk = weight_chunk(weight, start, length, dtype, options);
    const at::Tensor z = at::matmul(rows.unit, chunk.rows.t()).contiguous();
    epilogue(z, start, labels_c, rows.scales, options, state);
  }
  return {state.row_max, state.row_sum.log(), state.target_logit, state.best_cosine,
          state.predicted};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_backward_impl(
    const at::Tensor& grad_log_sum, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_max,
    const at::Tensor& log_sum, const MarginOptions& options, bool embeddings_grad,
    bool weight_grad, BackwardEpilogue epilogue) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(embeddings, weight, labels, options);
  const c10::DeviceGuard device(embeddings.device());
  const at::ScalarType dtype = embeddings.scalar_type();
  const int64_t n = embeddings.size(0), num_classes = weight.size(0);
  const Rows rows = prepare_rows(embeddings, options);
  const auto acc = rows.scales.options();
  const auto check_row_vector = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, kOp, ": ", name, " must have shape [", n,
                      "], got ", t.sizes());
  };
  check_row_vector("grad_log_sum", grad_log_sum);
  check_row_vector("grad_target", grad_target);
  check_row_vector("row_max", row_max);
  check_row_vector("log_sum", log_sum);
  const at::Tensor grad_log_sum_c = grad_log_sum.to(acc).contiguous();
  const at::Tensor grad_target_c = grad_target.to(acc).contiguous();
  const at::Tensor row_max_c = row_max.to(acc).contiguous();
  const at::Tensor log_sum_c = log_sum.to(acc).contiguous();
  const at::Tensor labels_c = labels.contiguous();

  at::Tensor grad_unit = at::zeros({n, embeddings.size(1)}, acc);
  at::Tensor scale_grad = at::zeros({n}, acc);
  at::Tensor grad_weight = weight_grad ? at::empty_like(weight, at::MemoryFormat::Contiguous)
                                       : weight.new_empty({0, weight.size(1)});
  for (int64_t start = 0; start < num_classes; start += options.chunk_size) {
    const int64_t length = std::min(options.chunk_size, num_classes - start);
    const WeightChunk chunk = weight_chunk(weight, start, length, dtype, options);
    at::Tensor dz = at::matmul(rows.unit, chunk.rows.t()).contiguous();
    epilogue(dz, start, labels_c, rows.scales, row_max_c, log_sum_c, grad_log_sum_c,
             grad_target_c, options, scale_grad);
    if (embeddings_grad) {
      grad_unit.add_(at::matmul(dz, chunk.rows));
    }
    if (weight_grad) {
      const at::Tensor grad_rows = at::matmul(dz.t(), rows.unit).to(acc.dtype());
      grad_weight.narrow(0, start, length)
          .copy_(options.normalize_weight
                     ? normalize_backward(grad_rows, chunk.rows.to(acc.dtype()), chunk.inverse,
                                          chunk.norms)
                     : grad_rows);
    }
  }
  if (!embeddings_grad) {
    return {embeddings.new_empty({0, embeddings.size(1)}), grad_weight};
  }
  const at::Tensor unit = rows.unit.to(acc.dtype());
  at::Tensor grad_embeddings = normalize_backward(grad_unit, unit, rows.inverse, rows.norms);
  if (!options.normalize_embeddings) {
    // s_i = scale |x_i| also depends on x_i: d|x_i|/dx_i is the unit direction.
    grad_embeddings.add_(unit * (scale_grad * options.scale).unsqueeze(1));
  }
  return {grad_embeddings.to(dtype), grad_weight};
}

}  // namespace facekernels
