#include "margin_softmax.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>

#include "common/checks.h"
#include "cpu/row_grain.h"

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
  TORCH_CHECK_VALUE(options.kind >= kCombinedMargin && options.kind <= kEasyMargin, kOp,
                    ": unknown margin kind ", options.kind);
  TORCH_CHECK_VALUE(options.sub_centers >= 1 && weight.size(0) % options.sub_centers == 0, kOp,
                    ": sub_centers must be a positive divisor of the weight's ", weight.size(0),
                    " rows, got ", options.sub_centers);
}

// The per-row overrides as [N] tensors in the accumulate type, checked.
MarginOptions with_row_inputs(MarginOptions options, const at::Tensor& embeddings,
                              at::ScalarType acc) {
  const auto prepare = [&](const char* name, at::Tensor& t) {
    if (!t.defined()) {
      return;
    }
    check_defined_floating(kOp, name, t);
    check_same_device(kOp, name, t, embeddings);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == embeddings.size(0), kOp, ": ", name,
                      " must have shape [", embeddings.size(0), "] to match embeddings, got ",
                      t.sizes());
    t = t.to(acc).contiguous();
  };
  prepare("row_m2", options.row_m2);
  prepare("row_m3", options.row_m3);
  prepare("hard_threshold", options.row_hard);
  prepare("hard_t", options.row_hard_t);
  TORCH_CHECK_VALUE(options.row_hard.defined() == options.row_hard_t.defined(), kOp,
                    ": hard_threshold and hard_t go together");
  return options;
}

// <a, b> in one fixed order, 16 running sums lane by lane then combined pairwise: the
// compiler vectorizes it without reordering the additions, so every build (the emulated
// CUDA kernels' included) gets the same norms and projections.
template <typename T>
T dot(const T* a, const T* b, int64_t dim) {
  constexpr int kLanes = 16;
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lane[l] += a[j + l] * b[j + l];
    }
  }
  for (int l = 0; j < dim; ++j, ++l) {
    lane[l] += a[j] * b[j];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lane[l] += lane[l + width];
    }
  }
  return lane[0];
}

// Row norms and 1 / norms floored at 1e-12 as F.normalize, both [R, 1] in the accumulate
// type of `dtype`. The sum of squares of an fp32 row overflows from a norm of 1.8e19 on,
// which would make the row zero: on the GPU the norms are summed in double; on the CPU,
// where that means a converted copy of the rows, in the accumulate type, then again in
// double if one came out non-finite. (Squares that underflow do not matter: they are below
// 1e-38, against a norm at least the floor's 1e-12 or else floored.)
std::tuple<at::Tensor, at::Tensor> row_norms(const at::Tensor& rows, at::ScalarType dtype) {
  const at::ScalarType acc = at::toOpMathType(dtype);
  if (rows.is_cpu() && acc == rows.scalar_type()) {
    // One pass for both outputs, where ATen took six ops (0.16 ms of a 1.2 ms forward at
    // N = 256, C = 1000, one thread).
    const at::Tensor c = rows.contiguous();
    at::Tensor norms = at::empty({rows.size(0), 1}, rows.options());
    at::Tensor inverse = at::empty_like(norms);
    std::atomic<bool> finite = true;
    AT_DISPATCH_FLOATING_TYPES(acc, "row_norms_cpu", [&] {
      const scalar_t* r = c.const_data_ptr<scalar_t>();
      scalar_t* norm = norms.mutable_data_ptr<scalar_t>();
      scalar_t* inv = inverse.mutable_data_ptr<scalar_t>();
      for_rows(c, [&](int64_t i, int64_t dim) {
        norm[i] = std::sqrt(dot(r + i * dim, r + i * dim, dim));
        inv[i] = scalar_t(1) / std::max(norm[i], scalar_t(kNormFloor));
        if (!std::isfinite(norm[i])) {
          finite = false;
        }
      });
    });
    if (finite) {
      return {norms, inverse};
    }
  }
  const at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true, at::kDouble).to(acc);
  return {norms, norms.clamp_min(kNormFloor).reciprocal()};
}

// Rows scaled to unit norm as F.normalize does. Returns (normalized rows in `dtype`,
// 1 / floored norms, norms).
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_rows(const at::Tensor& rows,
                                                              at::ScalarType dtype) {
  auto [norms, inverse] = row_norms(rows, dtype);
  return {(rows.to(norms.scalar_type()) * inverse).to(dtype), inverse, norms};
}

// h_r <- (h_r - a_r <h_r, v_r> v_r) b_r for every row r of the CPU tensors h and v, [R, D]
// in the accumulate type: one pass over each row where ATen takes five and a temporary of
// h's size. unit: v_r are unit rows, a_r = 1 and b_r = 1 / |row|; else v_r are raw rows,
// a_r = 1 / |v_r|^2 and b_r = 1. a_r = 0 for a row below the norm floor.
template <typename T>
void remove_component_row(T* __restrict__ h, const T* __restrict__ v, int64_t dim, T inverse,
                          T norm, bool unit) {
  const T along = dot(h, v, dim);
  const T a = norm < kNormFloor ? T(0) : unit ? along : along * inverse * inverse;
  const T b = unit ? inverse : T(1);
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    h[j] = (h[j] - a * v[j]) * b;
  }
}

void remove_component_cpu_(at::Tensor& h, const at::Tensor& v, const at::Tensor& inverse,
                           const at::Tensor& norms, bool unit) {
  TORCH_INTERNAL_ASSERT(h.is_contiguous() && h.scalar_type() == v.scalar_type());
  const at::Tensor rows = v.contiguous();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "remove_component_cpu", [&] {
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    const scalar_t* vp = rows.const_data_ptr<scalar_t>();
    const scalar_t* inv = inverse.const_data_ptr<scalar_t>();
    const scalar_t* norm = norms.const_data_ptr<scalar_t>();
    for_rows(h, [&](int64_t r, int64_t dim) {
      remove_component_row(hp + r * dim, vp + r * dim, dim, inv[r], norm[r], unit);
    });
  });
}

// Backward of F.normalize for rows with unit directions `unit`, given dL/d unit:
// (g - <g, unit> unit) / |row| where |row| >= floor, else g / floor. In place on a CPU g.
at::Tensor normalize_backward(at::Tensor grad_unit, const at::Tensor& unit,
                              const at::Tensor& inverse, const at::Tensor& norms) {
  if (grad_unit.is_cpu()) {
    remove_component_cpu_(grad_unit, unit, inverse, norms, /*unit=*/true);
    return grad_unit;
  }
  const at::Tensor along = (grad_unit * unit).sum(1, /*keepdim=*/true);
  return (grad_unit - along.masked_fill(norms < kNormFloor, 0) * unit) * inverse;
}

// The same for raw rows w, in place on h = dL/d unit / |w|, which the backward GEMM gives
// from the epilogue's inverse-scaled dL/dz: h - <h, w> w / |w|^2 (h alone below the floor).
void normalize_backward_raw_(at::Tensor& h, const at::Tensor& rows, const at::Tensor& inverse,
                             const at::Tensor& norms) {
  if (h.is_cpu()) {
    remove_component_cpu_(h, rows, inverse, norms, /*unit=*/false);
    return;
  }
  const at::Tensor along = (h * rows).sum(1, /*keepdim=*/true) * inverse * inverse;
  h.addcmul_(along.masked_fill_(norms < kNormFloor, 0), rows, -1);
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
  auto [unit, inverse, norms] = normalize_rows(embeddings, embeddings.scalar_type());
  return {unit, inverse, norms, row_scales(norms, options)};
}

// The weight rows of one chunk in the embeddings' dtype for the GEMM; their norms and
// inverse norms ([len * K], accumulate type) when the weight is normalized. The rows are
// raw and the epilogue applies the inverse norms, except in fp16, whose range (6e-5 to
// 65504 at full precision) would not hold every raw weight: there they are normalized
// before the cast, as F.normalize then a half GEMM does.
struct WeightChunk {
  at::Tensor rows, inverse, norms;
  bool prescaled;

  // What the epilogue multiplies z by, laid out as z (sub-center-major, see ChunkGemm):
  // undefined for raw rows of an unnormalized weight and for prescaled rows.
  at::Tensor epilogue_inverse(int64_t sub_centers) const {
    if (prescaled) {
      return at::Tensor();
    }
    if (!inverse.defined() || sub_centers == 1) {
      return inverse;
    }
    return inverse.view({-1, sub_centers}).t().contiguous().view(-1);
  }
};

// Sub-center q's rows of class-major rows [len * K, D]: [len, D], K rows apart (a strided
// matrix that the GEMMs take as it is).
at::Tensor sub_center_rows(const at::Tensor& rows, int64_t k, int64_t q) {
  return k == 1 ? rows : rows.view({-1, k, rows.size(1)}).select(1, q);
}

// Sub-center q's columns of a sub-center-major z [N, K * len]: [N, len].
at::Tensor sub_center_columns(const at::Tensor& z, int64_t k, int64_t q) {
  const int64_t length = z.size(1) / k;
  return z.narrow(1, q * length, length);
}

// The classes the op sees: the weight's rows in groups of K sub-centers, all of them or
// those of the classes `rows` (read chunk by chunk).
struct Classes {
  const at::Tensor& weight;
  std::optional<at::Tensor> weight_rows;  // of the classes `rows`, K per class
  int64_t sub_centers;

  int64_t count() const {
    return (weight_rows ? weight_rows->size(0) : weight.size(0)) / sub_centers;
  }
  // The weight rows of classes start..start+length.
  at::Tensor chunk(int64_t start, int64_t length) const {
    return weight_rows ? weight.index_select(0, rows_of(start, length))
                       : weight.narrow(0, start * sub_centers, length * sub_centers);
  }
  at::Tensor rows_of(int64_t start, int64_t length) const {
    return weight_rows->narrow(0, start * sub_centers, length * sub_centers);
  }
};

// rows: int64 class indices on the weight's device, strictly increasing (so the weight
// gradient is written by index_copy_, no accumulation), within [0, classes); may be empty
// (a PartialFC shard that samples none of its classes). Reads the values: one sync.
Classes classes_of(const at::Tensor& weight, const std::optional<at::Tensor>& rows,
                   int64_t sub_centers) {
  if (!rows) {
    return {weight, std::nullopt, sub_centers};
  }
  const at::Tensor& r = *rows;
  TORCH_CHECK_TYPE(r.scalar_type() == at::kLong, kOp, ": rows must be int64, got ", r.scalar_type());
  TORCH_CHECK_VALUE(r.dim() == 1, kOp, ": rows must be a 1-D tensor, got ", r.sizes());
  check_same_device(kOp, "rows", r, weight);
  const at::Tensor c = r.contiguous();
  const int64_t num_classes = weight.size(0) / sub_centers;
  if (c.size(0) > 0) {
    // One row has no differences: all() of none is true.
    const std::vector<int64_t> values = host_values({c.diff().gt(0).all(), c[0], c[-1]});
    TORCH_CHECK_VALUE(values[0] != 0, kOp, ": rows must be strictly increasing");
    TORCH_CHECK_VALUE(values[1] >= 0 && values[2] < num_classes, kOp,
                      ": rows must lie in [0, ", num_classes, ")");
  }
  const at::Tensor first = c * sub_centers;
  const at::Tensor weight_rows =
      sub_centers == 1 ? c
                       : (first.unsqueeze(1) + at::arange(sub_centers, c.options())).reshape(-1);
  return {weight, weight_rows, sub_centers};
}

WeightChunk weight_chunk(const Classes& classes, int64_t start, int64_t length,
                         at::ScalarType dtype, const MarginOptions& options) {
  const at::Tensor raw = classes.chunk(start, length);
  if (!options.normalize_weight) {
    return {raw.to(dtype), at::Tensor(), at::Tensor(), false};
  }
  if (dtype == at::kHalf) {
    auto [rows, inverse, norms] = normalize_rows(raw, dtype);
    return {rows, inverse.view(-1), norms.view(-1), true};
  }
  auto [norms, inverse] = row_norms(raw, dtype);
  return {raw.to(dtype), inverse.view(-1), norms.view(-1), false};
}

// A call's checked options (per-row inputs in the accumulate type) and classes.
struct Call {
  MarginOptions options;
  Classes classes;
};

// labels_in_range: the labels must index the classes. Checked here rather than in Python,
// so that a compiled graph checks too (one sync on a GPU); the backward takes the forward's.
Call checked_call(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
                  const MarginOptions& raw_options, const std::optional<at::Tensor>& rows,
                  bool labels_in_range) {
  check_inputs(embeddings, weight, labels, raw_options);
  MarginOptions options =
      with_row_inputs(raw_options, embeddings, at::toOpMathType(embeddings.scalar_type()));
  const int64_t sub_centers = options.sub_centers;
  Call call{std::move(options), classes_of(weight, rows, sub_centers)};
  if (labels_in_range) {
    check_labels(kOp, labels, embeddings.size(0), call.classes.count());
  }
  return call;
}

RowState initial_state(int64_t n, const at::TensorOptions& acc, const at::Tensor& labels) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  return {at::full({n}, -inf, acc), at::zeros({n}, acc), at::zeros({n}, acc),
          at::full({n}, -inf, acc), at::full({n}, -1, labels.options())};
}

// z = unit @ rows^T for one chunk, [N, rows], in one buffer that every chunk reuses: a
// fresh N x chunk tensor per chunk costs its page faults again on a CPU. With K sub-centers
// per class, z is sub-center-major (sub-center q of class j in column q * len + j), one GEMM
// per sub-center: the epilogues then read each pass, and each GPU warp, across classes in
// contiguous memory, where the weight's class-major order would put the K values side by
// side and make every read a stride-K gather.
class ChunkGemm {
 public:
  ChunkGemm(const at::Tensor& unit, at::Tensor buffer, int64_t sub_centers)
      : unit_(unit), buffer_(std::move(buffer)), sub_centers_(sub_centers) {}

  at::Tensor operator()(const at::Tensor& rows) {
    at::Tensor z = view(rows.size(0));
    for (int64_t q = 0; q < sub_centers_; ++q) {
      at::Tensor columns = sub_center_columns(z, sub_centers_, q);
      at::mm_out(columns, unit_, sub_center_rows(rows, sub_centers_, q).t());
    }
    return z;
  }

  // The forward's z of this chunk, copied in: the backward overwrites the buffer with dL/dz,
  // and a graph kept for another backward must find its saved z intact.
  at::Tensor saved(const at::Tensor& z) { return view(z.size(1)).copy_(z); }

 private:
  at::Tensor view(int64_t m) {
    const int64_t n = unit_.size(0);
    return buffer_.narrow(0, 0, n * m).view({n, m});
  }

  const at::Tensor& unit_;
  at::Tensor buffer_;
  int64_t sub_centers_;
};

// The z buffer of the backward and of the one-op step. On a CPU each thread keeps it from
// one call to the next (up to 32 MiB): a fresh one has every page faulted in again, as glibc
// hands large blocks back to the system (300 to 1000 faults, up to 3 ms, in a sub-center step
// at 1K classes). The forward's buffer leaves as last_logits, so it is always fresh; on a GPU
// the caching allocator keeps blocks anyway.
at::Tensor backward_buffer(int64_t numel, const at::TensorOptions& options) {
  constexpr int64_t kKeptBytes = 32 << 20;
  if (options.device().type() != at::kCPU ||
      numel * static_cast<int64_t>(options.dtype().itemsize()) > kKeptBytes) {
    return at::empty({numel}, options);
  }
  thread_local at::Tensor kept;
  if (!kept.defined() || kept.numel() < numel || kept.dtype() != options.dtype()) {
    // Not an inference tensor, even when the call that grows it runs in inference mode: a
    // later call outside it could not write into one.
    const c10::InferenceMode normal_tensor(false);
    kept = at::empty({numel}, options);
  }
  return kept.narrow(0, 0, numel);
}

// dL/dm per row for a per-row margin that wants one, zeros (a row whose label is outside a
// class shard has no target here: 0); else undefined.
at::Tensor margin_sums(bool wanted, const at::Tensor& row_margin, int64_t n,
                       const at::TensorOptions& acc) {
  return wanted && row_margin.defined() ? at::zeros({n}, acc) : at::Tensor();
}

at::Tensor margin_output(const at::Tensor& sums, const at::TensorOptions& acc) {
  return sums.defined() ? sums : at::empty({0}, acc);
}

// grad_unit += dz @ rows, dz sub-center-major (see ChunkGemm), one sub-center at a time.
void add_embedding_sums(at::Tensor& grad_unit, const at::Tensor& dz, const at::Tensor& rows,
                        int64_t k) {
  const bool in_acc = dz.scalar_type() == grad_unit.scalar_type();
  for (int64_t q = 0; q < k; ++q) {
    const at::Tensor dz_q = sub_center_columns(dz, k, q);
    const at::Tensor rows_q = sub_center_rows(rows, k, q);
    if (in_acc) {
      grad_unit.addmm_(dz_q, rows_q);
    } else {
      grad_unit.add_(at::matmul(dz_q, rows_q));
    }
  }
}

// sums (+)= dz^T @ unit into class-major weight rows [len * K, D]: written when `first`,
// else added to.
void add_weight_sums(at::Tensor& sums, const at::Tensor& dz, const at::Tensor& unit, int64_t k,
                     bool first) {
  const bool in_sums = dz.scalar_type() == sums.scalar_type();
  for (int64_t q = 0; q < k; ++q) {
    const at::Tensor dz_q = sub_center_columns(dz, k, q);
    at::Tensor sums_q = sub_center_rows(sums, k, q);
    if (in_sums) {
      if (first) {
        at::mm_out(sums_q, dz_q.t(), unit);
      } else {
        sums_q.addmm_(dz_q.t(), unit);
      }
    } else if (first) {
      sums_q.copy_(at::matmul(dz_q.t(), unit));
    } else {
      sums_q.add_(at::matmul(dz_q.t(), unit));
    }
  }
}

// The weight's gradient, filled chunk by chunk: the GEMMs' sums of a chunk's raw rows, then
// through the rows' normalization into place.
class WeightGradient {
 public:
  WeightGradient(const at::Tensor& weight, bool wanted, const Classes& classes,
                 at::ScalarType dtype, const at::TensorOptions& acc)
      : classes_(classes),
        acc_(acc),
        // With rows, the rows not seen get a zero gradient.
        tensor_(!wanted             ? weight.new_empty({0, weight.size(1)})
                : classes.weight_rows ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                      : at::empty_like(weight, at::MemoryFormat::Contiguous)),
        // Where the GEMMs run in the accumulate type, their sums go straight into the
        // gradient's rows.
        direct_(wanted && !classes.weight_rows && tensor_.scalar_type() == dtype &&
                dtype == acc.dtype().toScalarType()) {}

  // The buffer for the sums of classes start..start+length.
  at::Tensor sums(int64_t start, int64_t length) const {
    const int64_t k = classes_.sub_centers;
    return direct_ ? tensor_.narrow(0, start * k, length * k)
                   : at::empty({length * k, tensor_.size(1)}, acc_);
  }

  void finish(at::Tensor sums, const WeightChunk& chunk, int64_t start, int64_t length,
              const MarginOptions& options) {
    if (chunk.prescaled) {
      sums = normalize_backward(sums, chunk.rows.to(acc_.dtype()), chunk.inverse.unsqueeze(1),
                                chunk.norms.unsqueeze(1));
    } else if (options.normalize_weight) {
      normalize_backward_raw_(sums, chunk.rows.to(acc_.dtype()), chunk.inverse.unsqueeze(1),
                              chunk.norms.unsqueeze(1));
    }
    if (classes_.weight_rows) {
      tensor_.index_copy_(0, classes_.rows_of(start, length), sums.to(tensor_.scalar_type()));
    } else if (!direct_) {
      const int64_t k = classes_.sub_centers;
      tensor_.narrow(0, start * k, length * k).copy_(sums);
    }
  }

  const at::Tensor& tensor() const { return tensor_; }

 private:
  const Classes& classes_;
  at::TensorOptions acc_;
  at::Tensor tensor_;
  bool direct_;
};

// dL/dx from dL/d unit (empty [0, D] when not wanted), in the embeddings' dtype.
at::Tensor embeddings_gradient(at::Tensor& grad_unit, bool wanted, const Rows& unit_rows,
                               const at::Tensor& scale_grad, const MarginOptions& options,
                               at::ScalarType dtype) {
  if (!wanted) {
    return at::empty({0, grad_unit.size(1)}, unit_rows.unit.options().dtype(dtype));
  }
  const at::Tensor unit = unit_rows.unit.to(grad_unit.scalar_type());
  at::Tensor grad = normalize_backward(grad_unit, unit, unit_rows.inverse, unit_rows.norms);
  if (!options.normalize_embeddings) {
    // s_i = scale |x_i| also depends on x_i: d|x_i|/dx_i is the unit direction.
    grad.add_(unit * (scale_grad * options.scale).unsqueeze(1));
  }
  return grad.to(dtype);
}

}  // namespace

ForwardOutputs margin_softmax_forward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginOptions& raw_options, bool labels_in_range, const std::optional<at::Tensor>& rows,
    ForwardEpilogue epilogue) {
  // Dtypes are chosen here (GEMMs in the embeddings' dtype): autocast must not re-cast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Call call = checked_call(embeddings, weight, labels, raw_options, rows, labels_in_range);
  const MarginOptions& options = call.options;
  const Classes& classes = call.classes;
  const c10::DeviceGuard device(embeddings.device());
  const at::ScalarType dtype = embeddings.scalar_type();
  const int64_t n = embeddings.size(0), num_classes = classes.count();
  const Rows unit_rows = prepare_rows(embeddings, options);
  RowState state = initial_state(n, unit_rows.scales.options(), labels);
  const at::Tensor labels_c = labels.contiguous();
  const int64_t columns = std::min(options.chunk_size, num_classes) * options.sub_centers;
  ChunkGemm gemm(unit_rows.unit, at::empty({n * columns}, unit_rows.unit.options()),
                 options.sub_centers);
  at::Tensor z = at::empty({n, 0}, unit_rows.unit.options());
  for (int64_t start = 0; start < num_classes; start += options.chunk_size) {
    const int64_t length = std::min(options.chunk_size, num_classes - start);
    const WeightChunk chunk = weight_chunk(classes, start, length, dtype, options);
    z = gemm(chunk.rows);
    epilogue(z, chunk.epilogue_inverse(options.sub_centers), start, labels_c, unit_rows.scales,
             options, state);
  }
  return {state.row_max, state.row_sum.log(), state.target_logit, state.best_cosine,
          state.predicted, z};
}

Gradients margin_softmax_backward_impl(
    const at::Tensor& grad_log_sum, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_max,
    const at::Tensor& log_sum, const MarginOptions& raw_options, bool embeddings_grad,
    bool weight_grad, bool margins_grad, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& last_logits, BackwardEpilogue epilogue) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Call call = checked_call(embeddings, weight, labels, raw_options, rows,
                                 /*labels_in_range=*/false);
  const MarginOptions& options = call.options;
  const Classes& classes = call.classes;
  // These reach the kernels as raw pointers: on the embeddings' device, or an error.
  const auto check_row_vector = [&](const char* name, const at::Tensor& t) {
    check_defined_floating(kOp, name, t);
    check_same_device(kOp, name, t, embeddings);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == embeddings.size(0), kOp, ": ", name,
                      " must have shape [", embeddings.size(0), "], got ", t.sizes());
  };
  check_row_vector("grad_log_sum", grad_log_sum);
  check_row_vector("grad_target", grad_target);
  check_row_vector("row_max", row_max);
  check_row_vector("log_sum", log_sum);
  const c10::DeviceGuard device(embeddings.device());
  const at::ScalarType dtype = embeddings.scalar_type();
  const int64_t n = embeddings.size(0), num_classes = classes.count();
  // The classes of the last chunk, whose z the forward returned.
  const int64_t last_start =
      num_classes == 0 ? 0 : (num_classes - 1) / options.chunk_size * options.chunk_size;
  if (last_logits) {
    const at::Tensor& z = *last_logits;
    check_same_device(kOp, "last_logits", z, embeddings);
    const int64_t columns = (num_classes - last_start) * options.sub_centers;
    TORCH_CHECK_VALUE(z.scalar_type() == dtype && z.dim() == 2 && z.size(0) == n &&
                          z.size(1) == columns,
                      kOp, ": last_logits must be the forward's, ", dtype, " of shape [", n, ", ",
                      columns, "], got ", z.scalar_type(), " of shape ", z.sizes());
  }
  const Rows unit_rows = prepare_rows(embeddings, options);
  const auto acc = unit_rows.scales.options();
  RowGrads grads{row_max.to(acc).contiguous(), log_sum.to(acc).contiguous(),
                 grad_log_sum.to(acc).contiguous(), grad_target.to(acc).contiguous(),
                 at::zeros({n}, acc), margin_sums(margins_grad, options.row_m2, n, acc),
                 margin_sums(margins_grad, options.row_m3, n, acc)};
  const at::Tensor labels_c = labels.contiguous();
  at::Tensor grad_unit = at::zeros({n, embeddings.size(1)}, acc);
  WeightGradient weight_gradient(weight, weight_grad, classes, dtype, acc);
  const int64_t k = options.sub_centers;
  ChunkGemm gemm(unit_rows.unit,
                 backward_buffer(n * std::min(options.chunk_size, num_classes) * k,
                                 unit_rows.unit.options()),
                 k);
  for (int64_t start = 0; start < num_classes; start += options.chunk_size) {
    const int64_t length = std::min(options.chunk_size, num_classes - start);
    const WeightChunk chunk = weight_chunk(classes, start, length, dtype, options);
    at::Tensor dz = last_logits && start == last_start ? gemm.saved(*last_logits) : gemm(chunk.rows);
    epilogue(dz, chunk.epilogue_inverse(k), start, labels_c, unit_rows.scales, options, grads);
    if (embeddings_grad) {
      add_embedding_sums(grad_unit, dz, chunk.rows, k);
    }
    if (weight_grad) {
      at::Tensor sums = weight_gradient.sums(start, length);
      add_weight_sums(sums, dz, unit_rows.unit, k, /*first=*/true);
      weight_gradient.finish(sums, chunk, start, length, options);
    }
  }
  return {embeddings_gradient(grad_unit, embeddings_grad, unit_rows, grads.scale, options, dtype),
          weight_gradient.tensor(), margin_output(grads.m2, acc), margin_output(grads.m3, acc)};
}

GradOutputs margin_softmax_forward_backward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginOptions& raw_options, bool labels_in_range, const std::optional<at::Tensor>& rows,
    int64_t block_rows, double grad_scale, bool embeddings_grad, bool weight_grad,
    bool margins_grad, StepEpilogue epilogue) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK_VALUE(block_rows > 0, kOp, ": block_rows must be positive, got ", block_rows);
  const Call call = checked_call(embeddings, weight, labels, raw_options, rows, labels_in_range);
  const MarginOptions& options = call.options;
  const Classes& classes = call.classes;
  const c10::DeviceGuard device(embeddings.device());
  const at::ScalarType dtype = embeddings.scalar_type();
  const int64_t n = embeddings.size(0), num_classes = classes.count(), k = options.sub_centers;
  const Rows unit_rows = prepare_rows(embeddings, options);
  const auto acc = unit_rows.scales.options();
  RowState state = initial_state(n, acc, labels);
  // The gradient of grad_scale * sum_i loss_i, loss_i = log_sum_i + row_max_i - target_i.
  RowGrads grads{state.row_max,
                 at::empty({n}, acc),
                 at::full({n}, grad_scale, acc),
                 at::full({n}, -grad_scale, acc),
                 at::zeros({n}, acc),
                 margin_sums(margins_grad, options.row_m2, n, acc),
                 margin_sums(margins_grad, options.row_m3, n, acc)};
  const at::Tensor labels_c = labels.contiguous();
  at::Tensor grad_unit = at::zeros({n, embeddings.size(1)}, acc);
  WeightGradient weight_gradient(weight, weight_grad, classes, dtype, acc);
  at::Tensor weight_sums = weight_grad ? weight_gradient.sums(0, num_classes) : at::Tensor();
  // Every class is one chunk: its weight norms are taken once for all the blocks.
  const WeightChunk chunk = weight_chunk(classes, 0, num_classes, dtype, options);
  const at::Tensor inverse = chunk.epilogue_inverse(k);
  const at::Tensor buffer =
      backward_buffer(std::min(block_rows, n) * num_classes * k, unit_rows.unit.options());
  for (int64_t first = 0; first < n; first += block_rows) {
    const int64_t count = std::min(block_rows, n - first);
    // One block of all rows (at N = 256: up to 16K classes at D = 128, 262K at D >= 256)
    // takes the tensors as they are: twenty narrow calls were 0.08 ms of a 2.7 ms step.
    const auto block = [&](const at::Tensor& t) {
      return t.defined() && count < n ? t.narrow(0, first, count) : t;
    };
    const at::Tensor unit = block(unit_rows.unit), labels_b = block(labels_c);
    const at::Tensor scales = block(unit_rows.scales);
    MarginOptions options_b = options;
    for (at::Tensor* t : {&options_b.row_m2, &options_b.row_m3, &options_b.row_hard,
                          &options_b.row_hard_t}) {
      *t = block(*t);
    }
    RowState state_b{block(state.row_max), block(state.row_sum), block(state.target_logit),
                     block(state.best_cosine), block(state.predicted)};
    RowGrads grads_b{block(grads.row_max),     block(grads.log_sum), block(grads.grad_log_sum),
                     block(grads.grad_target), block(grads.scale),   block(grads.m2),
                     block(grads.m3)};
    ChunkGemm gemm(unit, buffer, k);
    at::Tensor z = gemm(chunk.rows);
    epilogue(z, inverse, labels_b, scales, options_b, state_b, grads_b);
    if (embeddings_grad) {
      at::Tensor grad_unit_b = block(grad_unit);
      add_embedding_sums(grad_unit_b, z, chunk.rows, k);
    }
    if (weight_grad) {
      add_weight_sums(weight_sums, z, unit, k, /*first=*/first == 0);
    }
  }
  if (weight_grad) {
    weight_gradient.finish(weight_sums, chunk, 0, num_classes, options);
  }
  return {state.row_max,
          grads.log_sum,
          state.target_logit,
          state.best_cosine,
          state.predicted,
          embeddings_gradient(grad_unit, embeddings_grad, unit_rows, grads.scale, options, dtype),
          weight_gradient.tensor(),
          margin_output(grads.m2, acc),
          margin_output(grads.m3, acc)};
}

}  // namespace facekernels
