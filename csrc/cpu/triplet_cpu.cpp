#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
  for (int64_t k = row.lo; k < row.hi; ++k) {
    const int64_t p = row.order[k];
    if (p == row.self) {
      continue;
    }
    const acc_t d_ap = static_cast<acc_t>(row.dist[p]);
    if (rule.mining == kMineFacenet) {
      ArgMax<acc_t> farther, farthest;
      facenet_scan(row, d_ap, 0, 1, farther, farthest);
      const int64_t n = facenet_pick(farther, farthest);
      if (n >= 0) {
        visit(p, n);
      }
      continue;
    }
    for (int64_t n = 0; n < row.m; ++n) {
      if (row.negative(n) && rule.selects(d_ap, static_cast<acc_t>(row.dist[n]))) {
        visit(p, n);
      }
    }
  }
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
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        acc_t* g_row = g + a * row.m;
        acc_t sum = 0;
        int64_t nonzero = 0, triplets = 0;
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
    at::parallel_for(0, in.dist.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row = anchor_row<scalar_t>(in, a);
        for_each_triplet(row, rule, [&](int64_t p, int64_t) { ++c[a * row.m + p]; });
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
