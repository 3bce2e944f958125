#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <utility>
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

// A mined triplet's loss and its slope d loss / d d_ap, as selects (0 and 0 when not
// mined): TripletRule::term in the vector loops. The relu as is; the softplus as
// max(v, 0) + log1p(exp(-|v|)) (log1p(exp(v)) to a few epsilons, without overflow; 0
// below the normal range of exp, v < -87 in float) with slope sigmoid(v), linear past
// v > 20 as torch's. The mask goes into the relu's hinge and the softplus's argument:
// applied to the outputs instead, it kept GCC from if-converting the loops.
template <typename acc_t>
struct TermValue {
  acc_t value, slope;
};

template <bool smooth, typename acc_t>
FK_INLINE TermValue<acc_t> vector_term(acc_t v, bool mined) {
  if constexpr (!smooth) {
    const bool hinge = mined & (v > acc_t(0));
    return {hinge ? v : acc_t(0), hinge ? acc_t(1) : acc_t(0)};
  } else {
    // Not mined: v = -inf, whose softplus and slope are 0 (a NaN v is masked too).
    const acc_t x = mined ? v : -std::numeric_limits<acc_t>::infinity();
    const acc_t w = vector_exp(x < acc_t(0) ? x : -x);  // exp(-|x|); NaN stays NaN
    const acc_t inverse = acc_t(1) / (acc_t(1) + w);
    const acc_t value = (x > acc_t(0) ? x : acc_t(0)) + vector_log1p_unit(w);
    const acc_t slope = x >= acc_t(0) ? inverse : w * inverse;
    return {x > acc_t(20) ? x : value, x > acc_t(20) ? acc_t(1) : slope};
  }
}

// Two positive pairs' terms over every column, one read of the columns serving both: their
// sums, and the slopes of the negatives subtracted from g. With the relu the slopes are 0
// or 1, so the gradient sums are exact integers whatever the order; each loss is summed
// lane by lane. Counts are int32 (the columns are fewer than 2^31, triplet_setup checks),
// as wide as the float lanes.
template <typename acc_t>
struct TermSums {
  acc_t loss, slope;
  int32_t active, count;
};

template <typename acc_t>
struct TermPair {
  TermSums<acc_t> first, second;
};

// The rule and the loss compile-time constants, so that the window's open sides fold away.
template <int64_t mining, bool smooth, typename acc_t>
FK_INLINE TermPair<acc_t> triplet_columns_impl(acc_t margin, acc_t d_ap1, acc_t d_ap2,
                                               bool paired, const acc_t* __restrict__ dist,
                                               const acc_t* __restrict__ negative,
                                               acc_t* __restrict__ g, int64_t m) {
  const TripletWindow<acc_t> window = TripletRule<acc_t>{margin, mining, smooth}.window();
  acc_t loss1 = 0, loss2 = 0, slope1 = 0, slope2 = 0;
  int32_t active1 = 0, active2 = 0, count1 = 0, count2 = 0;
#pragma omp simd reduction(+ : loss1, loss2, slope1, slope2, active1, active2, count1, count2)
  for (int64_t n = 0; n < m; ++n) {
    const acc_t d = dist[n];
    const bool is_negative = negative[n] != acc_t(0);
    const bool mined1 = is_negative & window.contains(d - d_ap1);
    const bool mined2 = is_negative & paired & window.contains(d - d_ap2);
    const TermValue<acc_t> t1 = vector_term<smooth>(d_ap1 - d + margin, mined1);
    const TermValue<acc_t> t2 = vector_term<smooth>(d_ap2 - d + margin, mined2);
    loss1 += t1.value;
    loss2 += t2.value;
    slope1 += t1.slope;
    slope2 += t2.slope;
    active1 += t1.value > acc_t(0) ? 1 : 0;
    active2 += t2.value > acc_t(0) ? 1 : 0;
    count1 += mined1 ? 1 : 0;
    count2 += mined2 ? 1 : 0;
    g[n] -= t1.slope + t2.slope;
  }
  return {{loss1, slope1, active1, count1}, {loss2, slope2, active2, count2}};
}

// How many columns a threshold rule mines for one positive pair.
template <typename acc_t>
FK_INLINE int32_t mined_columns_impl(const TripletWindow<acc_t> window, acc_t d_ap,
                                     const acc_t* __restrict__ dist,
                                     const acc_t* __restrict__ negative, int64_t m) {
  int32_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t n = 0; n < m; ++n) {
    count += ((negative[n] != acc_t(0)) & window.contains(dist[n] - d_ap)) ? 1 : 0;
  }
  return count;
}

template <bool smooth, typename acc_t>
FK_INLINE TermPair<acc_t> triplet_columns_by_rule(int64_t mining, acc_t margin, acc_t d_ap1,
                                                  acc_t d_ap2, bool paired, const acc_t* dist,
                                                  const acc_t* negative, acc_t* g, int64_t m) {
#define FK_COLUMNS(rule) \
  triplet_columns_impl<rule, smooth>(margin, d_ap1, d_ap2, paired, dist, negative, g, m)
  switch (mining) {
    case kMineHard:
      return FK_COLUMNS(kMineHard);
    case kMineSemihard:
      return FK_COLUMNS(kMineSemihard);
    case kMineEasy:
      return FK_COLUMNS(kMineEasy);
    case kMineEvery:
      return FK_COLUMNS(kMineEvery);
    default:
      return FK_COLUMNS(kMineAll);
  }
#undef FK_COLUMNS
}

// The vector loops, one instance per accumulate type and loss, compiled per vector width.
#define FK_TRIPLET_COLUMNS(name, smooth, T)                                                  \
  FK_VECTOR_CLONES TermPair<T> name(int64_t mining, T margin, T d_ap1, T d_ap2, bool paired, \
                                    const T* dist, const T* negative, T* g, int64_t m) {     \
    return triplet_columns_by_rule<smooth>(mining, margin, d_ap1, d_ap2, paired, dist,      \
                                           negative, g, m);                                  \
  }
FK_TRIPLET_COLUMNS(hinge_columns, false, float)
FK_TRIPLET_COLUMNS(hinge_columns, false, double)
FK_TRIPLET_COLUMNS(softplus_columns, true, float)
FK_TRIPLET_COLUMNS(softplus_columns, true, double)
#undef FK_TRIPLET_COLUMNS
FK_VECTOR_CLONES int32_t mined_columns(const TripletWindow<float>& window, float d_ap,
                                       const float* dist, const float* negative, int64_t m) {
  return mined_columns_impl(window, d_ap, dist, negative, m);
}
FK_VECTOR_CLONES int32_t mined_columns(const TripletWindow<double>& window, double d_ap,
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
      std::vector<std::pair<int64_t, acc_t>> positives;  // (p, d_ap)
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        acc_t* g_row = g + a * row.m;
        acc_t sum = 0;
        int64_t nonzero = 0, triplets = 0;
        if (vector_mining(mining)) {
          columns.load(row);
          positives.clear();
          for_each_positive<scalar_t, acc_t>(
              row, [&](int64_t p, acc_t d_ap) { positives.emplace_back(p, d_ap); });
          const auto add = [&](const TermSums<acc_t>& s, int64_t p) {
            sum += s.loss;
            nonzero += s.active;
            triplets += s.count;
            g_row[p] += s.slope;
          };
          // In pairs; an odd last positive goes alone (paired false: the second mines
          // nothing).
          for (size_t k = 0; k < positives.size(); k += 2) {
            const bool paired = k + 1 < positives.size();
            const acc_t d_ap1 = positives[k].second;
            const acc_t d_ap2 = positives[paired ? k + 1 : k].second;
            const TermPair<acc_t> s =
                smooth ? softplus_columns(mining, rule.margin, d_ap1, d_ap2, paired,
                                          columns.dist, columns.negative, g_row, row.m)
                       : hinge_columns(mining, rule.margin, d_ap1, d_ap2, paired, columns.dist,
                                       columns.negative, g_row, row.m);
            add(s.first, positives[k].first);
            if (paired) {
              add(s.second, positives[k + 1].first);
            }
          }
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
