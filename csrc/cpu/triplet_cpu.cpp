#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/vector_math.h"
#include "triplet.h"

namespace facekernels {
namespace {

template <typename scalar_t>
AnchorRow<scalar_t> anchor_row(const TripletInputs& in, int64_t a) {
  const int64_t m = in.dist.size(1);
  AnchorRow<scalar_t> row{in.dist.const_data_ptr<scalar_t>() + a * m,
                          in.ref_labels.const_data_ptr<int64_t>(),
                          in.ref_order.const_data_ptr<int64_t>(),
                          in.labels.const_data_ptr<int64_t>()[a],
                          in.self_ref ? a : -1,
                          m,
                          0,
                          0};
  label_run(in.sorted_ref.const_data_ptr<int64_t>(), m, row.label, row.lo, row.hi);
  return row;
}

// One anchor's columns in the accumulate type: its distances, and 1 where the column is
// one of its negatives, else 0. The vector loops below read these two arrays.
template <typename scalar_t, typename acc_t>
class AnchorColumns {
 public:
  explicit AnchorColumns(int64_t m) : negative_(m), converted_(kConverts ? m : 0) {}

  void load(const AnchorRow<scalar_t>& row) {
    if constexpr (kConverts) {
      for (int64_t j = 0; j < row.m; ++j) {
        converted_[j] = static_cast<acc_t>(row.dist[j]);
      }
      dist = converted_.data();
    } else {
      dist = row.dist;
    }
    for (int64_t j = 0; j < row.m; ++j) {
      negative_[j] = row.negative(j) ? acc_t(1) : acc_t(0);
    }
    negative = negative_.data();
  }

  const acc_t* dist = nullptr;
  const acc_t* negative = nullptr;

 private:
  static constexpr bool kConverts = !std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> negative_, converted_;
};

// One positive pair's hinge terms over every column: the sums, and the slopes of the
// negatives subtracted from g. The slopes are 0 or 1, so the gradient sums are exact
// integers whatever the order; the loss is summed lane by lane.
template <typename acc_t>
struct HingeSums {
  acc_t loss = 0, slope = 0;
  int64_t active = 0, count = 0;
};

template <typename acc_t>
FK_INLINE HingeSums<acc_t> hinge_columns_impl(const TripletWindow<acc_t> window, acc_t margin,
                                              acc_t d_ap, const acc_t* __restrict__ dist,
                                              const acc_t* __restrict__ negative,
                                              acc_t* __restrict__ g, int64_t m) {
  acc_t loss = 0, slope_sum = 0;
  int64_t active = 0, count = 0;
#pragma omp simd reduction(+ : loss, slope_sum, active, count)
  for (int64_t n = 0; n < m; ++n) {
    const bool mined = (negative[n] != acc_t(0)) & window.contains(dist[n] - d_ap);
    const acc_t v = d_ap - dist[n] + margin;  // TripletRule::term's relu, as a select
    const bool hinge = mined & (v > acc_t(0));
    const acc_t slope = hinge ? acc_t(1) : acc_t(0);
    loss += hinge ? v : acc_t(0);
    slope_sum += slope;
    active += hinge ? 1 : 0;
    count += mined ? 1 : 0;
    g[n] -= slope;
  }
  return {loss, slope_sum, active, count};
}

// How many columns a threshold rule mines for one positive pair.
template <typename acc_t>
FK_INLINE int64_t mined_columns_impl(const TripletWindow<acc_t> window, acc_t d_ap,
                                     const acc_t* __restrict__ dist,
                                     const acc_t* __restrict__ negative, int64_t m) {
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t n = 0; n < m; ++n) {
    count += ((negative[n] != acc_t(0)) & window.contains(dist[n] - d_ap)) ? 1 : 0;
  }
  return count;
}

// The vector loops, one instance per accumulate type, compiled per vector width.
FK_VECTOR_CLONES HingeSums<float> hinge_columns(const TripletWindow<float>& window,
                                                float margin, float d_ap, const float* dist,
                                                const float* negative, float* g, int64_t m) {
  return hinge_columns_impl(window, margin, d_ap, dist, negative, g, m);
}
FK_VECTOR_CLONES HingeSums<double> hinge_columns(const TripletWindow<double>& window,
                                                 double margin, double d_ap, const double* dist,
                                                 const double* negative, double* g, int64_t m) {
  return hinge_columns_impl(window, margin, d_ap, dist, negative, g, m);
}
FK_VECTOR_CLONES int64_t mined_columns(const TripletWindow<float>& window, float d_ap,
                                       const float* dist, const float* negative, int64_t m) {
  return mined_columns_impl(window, d_ap, dist, negative, m);
}
FK_VECTOR_CLONES int64_t mined_columns(const TripletWindow<double>& window, double d_ap,
                                       const double* dist, const double* negative, int64_t m) {
  return mined_columns_impl(window, d_ap, dist, negative, m);
}

// The threshold minings' positives of an anchor: calls pair(p, d_ap) in ascending p.
template <typename scalar_t, typename acc_t, typename Pair>
void for_each_positive(const AnchorRow<scalar_t>& row, Pair pair) {
  for (int64_t k = row.lo; k < row.hi; ++k) {
    const int64_t p = row.order[k];
    if (p != row.self) {
      pair(p, static_cast<acc_t>(row.dist[p]));
    }
  }
}

bool vector_mining(int64_t mining) {
  return mining != kMineBatchHard && mining != kMineFacenet;
}

// Calls visit(p, n) for each triplet of anchor `row`, in ascending (p, n).
template <typename scalar_t, typename acc_t, typename Visit>
void for_each_triplet(const AnchorRow<scalar_t>& row, const TripletRule<acc_t>& rule,
                      Visit visit) {
  if (rule.mining == kMineBatchHard) {
    ArgMax<acc_t> positive, negative;
    hardest_scan(row, 0, 1, positive, negative);
    if (positive.index >= 0 && negative.index >= 0) {
      visit(positive.index, negative.index);
    }
    return;
  }
  for_each_positive<scalar_t, acc_t>(row, [&](int64_t p, acc_t d_ap) {
    if (rule.mining == kMineFacenet) {
      ArgMax<acc_t> farther, farthest;
      facenet_scan(row, d_ap, 0, 1, farther, farthest);
      const int64_t n = facenet_pick(farther, farthest);
      if (n >= 0) {
        visit(p, n);
      }
      return;
    }
    for (int64_t n = 0; n < row.m; ++n) {
      if (row.negative(n) && rule.selects(d_ap, static_cast<acc_t>(row.dist[n]))) {
        visit(p, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_margin_forward_cpu(
    const at::Tensor& dist, const at::Tensor& labels, const at::Tensor& ref_labels,
    double margin, int64_t mining, bool self_ref, bool smooth) {
  const TripletInputs in =
      triplet_setup("triplet_margin_loss", dist, labels, ref_labels, mining, self_ref);
  const int64_t n = in.dist.size(0);
  const auto acc = in.dist.options().dtype(at::toOpMathType(dist.scalar_type()));
  at::Tensor grad = at::zeros(in.dist.sizes(), acc);
  at::Tensor loss = at::zeros({n}, acc);
  at::Tensor active = at::zeros({n}, labels.options());
  at::Tensor count = at::zeros({n}, labels.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dist.scalar_type(), "triplet_margin_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TripletRule<acc_t> rule{static_cast<acc_t>(margin), mining, smooth};
    acc_t* g = grad.mutable_data_ptr<acc_t>();
    acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
    int64_t* active_p = active.mutable_data_ptr<int64_t>();
    int64_t* count_p = count.mutable_data_ptr<int64_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      AnchorColumns<scalar_t, acc_t> columns(in.dist.size(1));
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        acc_t* g_row = g + a * row.m;
        acc_t sum = 0;
        int64_t nonzero = 0, triplets = 0;
        if (!smooth && vector_mining(mining)) {
          columns.load(row);
          const TripletWindow<acc_t> window = rule.window();
          for_each_positive<scalar_t, acc_t>(row, [&](int64_t p, acc_t d_ap) {
            const HingeSums<acc_t> s = hinge_columns(window, rule.margin, d_ap, columns.dist,
                                                     columns.negative, g_row, row.m);
            sum += s.loss;
            nonzero += s.active;
            triplets += s.count;
            g_row[p] += s.slope;
          });
        } else {
          // Each grad entry sums its slopes in the order of visits, (p, n) ascending.
          for_each_triplet(row, rule, [&](int64_t p, int64_t neg) {
            acc_t slope;
            const acc_t term = rule.term(static_cast<acc_t>(row.dist[p]),
                                         static_cast<acc_t>(row.dist[neg]), slope);
            sum += term;
            nonzero += term > acc_t(0);
            ++triplets;
            g_row[p] += slope;
            g_row[neg] -= slope;
          });
        }
        loss_p[a] = sum;
        active_p[a] = nonzero;
        count_p[a] = triplets;
      }
    });
  });
  return triplet_forward_finish(loss, active, count, grad, dist.scalar_type());
}

at::Tensor pair_counts_cpu(const TripletInputs& in, double margin, int64_t mining) {
  at::Tensor counts = at::zeros(in.dist.sizes(), in.labels.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dist.scalar_type(), "triplet_pair_counts_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TripletRule<acc_t> rule{static_cast<acc_t>(margin), mining, false};
    int64_t* c = counts.mutable_data_ptr<int64_t>();
    const TripletWindow<acc_t> window = rule.window();
    at::parallel_for(0, in.dist.size(0), 1, [&](int64_t begin, int64_t end) {
      AnchorColumns<scalar_t, acc_t> columns(in.dist.size(1));
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        columns.load(row);
        for_each_positive<scalar_t, acc_t>(row, [&](int64_t p, acc_t d_ap) {
          c[a * row.m + p] = mined_columns(window, d_ap, columns.dist, columns.negative, row.m);
        });
      }
    });
  });
  return counts;
}

void fill_cpu(const TripletInputs& in, double margin, int64_t mining, const at::Tensor& offsets,
              at::Tensor& anchors, at::Tensor& positives, at::Tensor& negatives) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dist.scalar_type(), "triplet_fill_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TripletRule<acc_t> rule{static_cast<acc_t>(margin), mining, false};
    const int64_t* offset = offsets.const_data_ptr<int64_t>();
    int64_t* out_a = anchors.mutable_data_ptr<int64_t>();
    int64_t* out_p = positives.mutable_data_ptr<int64_t>();
    int64_t* out_n = negatives.mutable_data_ptr<int64_t>();
    at::parallel_for(0, in.dist.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        int64_t at = row.m > 0 ? offset[a * row.m] : 0;  // the anchor's first slot
        for_each_triplet(row, rule, [&](int64_t p, int64_t n) {
          out_a[at] = a;
          out_p[at] = p;
          out_n[at] = n;
          ++at;
        });
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> hardest_cpu(const TripletInputs& in) {
  const int64_t n = in.dist.size(0);
  at::Tensor positive = at::empty({n}, in.labels.options());
  at::Tensor negative = at::empty({n}, in.labels.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dist.scalar_type(), "triplet_hardest_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t* pos = positive.mutable_data_ptr<int64_t>();
    int64_t* neg = negative.mutable_data_ptr<int64_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        ArgMax<acc_t> p, q;
        hardest_scan(anchor_row<scalar_t>(in, a), 0, 1, p, q);
        pos[a] = p.index;
        neg[a] = q.index;
      }
    });
  });
  return {positive, negative};
}

at::Tensor facenet_choices_cpu(const TripletInputs& in) {
  at::Tensor choices = at::full(in.dist.sizes(), -1, in.labels.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dist.scalar_type(), "triplet_facenet_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TripletRule<acc_t> rule{acc_t(0), kMineFacenet, false};
    int64_t* c = choices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, in.dist.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        for_each_triplet(row, rule, [&](int64_t p, int64_t n) { c[a * row.m + p] = n; });
      }
    });
  });
  return choices;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_mine_cpu(const at::Tensor& dist,
                                                                const at::Tensor& labels,
                                                                const at::Tensor& ref_labels,
                                                                double margin, int64_t mining,
                                                                bool self_ref) {
  return triplet_mine_impl(dist, labels, ref_labels, margin, mining, self_ref,
                           {&pair_counts_cpu, &fill_cpu, &hardest_cpu, &facenet_choices_cpu});
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("triplet_margin_forward", &triplet_margin_forward_cpu);
  m.impl("triplet_mine", &triplet_mine_cpu);
}

}  // namespace facekernels
