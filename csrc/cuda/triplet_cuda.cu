#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/runtime.cuh"
#include "triplet.h"

namespace facekernels {
namespace {

constexpr int kThreads = 256;

// Raw pointers of TripletInputs, passed by value to the kernels.
template <typename scalar_t>
struct TripletView {
  const scalar_t* dist;
  const int64_t* labels;
  const int64_t* ref_labels;
  const int64_t* sorted_ref;
  const int64_t* order;
  int64_t n, m;
  bool self_ref;

  __device__ AnchorRow<scalar_t> row(int64_t a) const {
    AnchorRow<scalar_t> r{dist + a * m, ref_labels, order, labels[a], self_ref ? a : -1, m, 0, 0};
    label_run(sorted_ref, m, r.label, r.lo, r.hi);
    return r;
  }
};

template <typename scalar_t>
TripletView<scalar_t> view(const TripletInputs& in) {
  return {in.dist.const_data_ptr<scalar_t>(),       in.labels.const_data_ptr<int64_t>(),
          in.ref_labels.const_data_ptr<int64_t>(),  in.sorted_ref.const_data_ptr<int64_t>(),
          in.ref_order.const_data_ptr<int64_t>(),   in.dist.size(0),
          in.dist.size(1),                          in.self_ref};
}

template <typename acc_t>
struct ArgMaxPair {
  ArgMax<acc_t> first, second;
};

struct MergePairs {
  template <typename acc_t>
  __device__ ArgMaxPair<acc_t> operator()(ArgMaxPair<acc_t> x, const ArgMaxPair<acc_t>& y) const {
    x.first.merge(y.first);
    x.second.merge(y.second);
    return x;
  }
};

// Per-anchor sums of the loss, the non-zero terms and the triplets, reduced over the block.
template <typename acc_t>
__device__ void write_partials(acc_t loss, int64_t active, int64_t count, acc_t* loss_out,
                               int64_t* active_out, int64_t* count_out) {
  using ReduceAcc = cub::BlockReduce<acc_t, kThreads>;
  using ReduceInt = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename ReduceAcc::TempStorage acc_storage;
  __shared__ typename ReduceInt::TempStorage int_storage;
  loss = ReduceAcc(acc_storage).Sum(loss);
  active = ReduceInt(int_storage).Sum(active);
  __syncthreads();
  count = ReduceInt(int_storage).Sum(count);
  if (threadIdx.x == 0) {
    *loss_out = loss;
    *active_out = active;
    *count_out = count;
  }
}

// Threshold mining (all / hard / semihard / easy). One block per anchor. Pass 1: for each
// positive p in ascending order, the block's threads split the negatives and the slopes
// are tree-reduced into grad[a, p]. Pass 2: each thread owns some negatives n and sums
// their slopes over the positives in ascending order into grad[a, n].
template <typename scalar_t, typename acc_t>
__global__ void threshold_forward_kernel(TripletView<scalar_t> v, TripletRule<acc_t> rule,
                                         acc_t* __restrict__ grad, acc_t* __restrict__ loss_out,
                                         int64_t* __restrict__ active_out,
                                         int64_t* __restrict__ count_out) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int64_t a = blockIdx.x;
  const AnchorRow<scalar_t> row = v.row(a);
  acc_t* g_row = grad + a * v.m;
  acc_t loss = 0;
  int64_t active = 0, count = 0;
  for (int64_t k = row.lo; k < row.hi; ++k) {
    const int64_t p = row.order[k];
    if (p == row.self) {
      continue;
    }
    const acc_t d_ap = static_cast<acc_t>(row.dist[p]);
    acc_t slopes = 0;
    for (int64_t n = threadIdx.x; n < v.m; n += blockDim.x) {
      const acc_t d_an = static_cast<acc_t>(row.dist[n]);
      if (row.negative(n) && rule.selects(d_ap, d_an)) {
        acc_t slope;
        const acc_t term = rule.term(d_ap, d_an, slope);
        loss += term;
        active += term > acc_t(0);
        ++count;
        slopes += slope;
      }
    }
    const acc_t total = Reduce(storage).Sum(slopes);
    if (threadIdx.x == 0) {
      g_row[p] = total;
    }
    __syncthreads();
  }
  for (int64_t n = threadIdx.x; n < v.m; n += blockDim.x) {
    if (!row.negative(n)) {
      continue;
    }
    const acc_t d_an = static_cast<acc_t>(row.dist[n]);
    acc_t slopes = 0;
    for (int64_t k = row.lo; k < row.hi; ++k) {
      const int64_t p = row.order[k];
      const acc_t d_ap = static_cast<acc_t>(row.dist[p]);
      if (p != row.self && rule.selects(d_ap, d_an)) {
        acc_t slope;
        rule.term(d_ap, d_an, slope);
        slopes += slope;
      }
    }
    g_row[n] = acc_t(0) - slopes;  // +0, not -0, as on the CPU
  }
  write_partials(loss, active, count, loss_out + a, active_out + a, count_out + a);
}

// The block's batch-hard pair for anchor a: (farthest positive, nearest negative).
template <typename scalar_t, typename acc_t>
__device__ ArgMaxPair<acc_t> block_hardest(const AnchorRow<scalar_t>& row) {
  using Reduce = cub::BlockReduce<ArgMaxPair<acc_t>, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  ArgMaxPair<acc_t> mine;
  hardest_scan(row, threadIdx.x, blockDim.x, mine.first, mine.second);
  return Reduce(storage).Reduce(mine, MergePairs());  // valid in thread 0
}

template <typename scalar_t, typename acc_t>
__global__ void batch_hard_forward_kernel(TripletView<scalar_t> v, TripletRule<acc_t> rule,
                                          acc_t* __restrict__ grad, acc_t* __restrict__ loss_out,
                                          int64_t* __restrict__ active_out,
                                          int64_t* __restrict__ count_out) {
  const int64_t a = blockIdx.x;
  const AnchorRow<scalar_t> row = v.row(a);
  const ArgMaxPair<acc_t> hardest = block_hardest<scalar_t, acc_t>(row);
  if (threadIdx.x != 0) {
    return;
  }
  const int64_t p = hardest.first.index, n = hardest.second.index;
  acc_t loss = 0, slope = 0;
  const bool found = p >= 0 && n >= 0;
  if (found) {
    loss = rule.term(static_cast<acc_t>(row.dist[p]), static_cast<acc_t>(row.dist[n]), slope);
    grad[a * v.m + p] = slope;
    grad[a * v.m + n] = acc_t(0) - slope;
  }
  loss_out[a] = loss;
  active_out[a] = loss > acc_t(0);
  count_out[a] = found;
}

template <typename scalar_t, typename acc_t>
__global__ void hardest_kernel(TripletView<scalar_t> v, int64_t* __restrict__ positive,
                               int64_t* __restrict__ negative) {
  const int64_t a = blockIdx.x;
  const ArgMaxPair<acc_t> hardest = block_hardest<scalar_t, acc_t>(v.row(a));
  if (threadIdx.x == 0) {
    positive[a] = hardest.first.index;
    negative[a] = hardest.second.index;
  }
}

// FaceNet: for each positive p the block picks the negative, thread 0 scores the triplet
// and records grad[a, p] and the choice; then each thread sums, for its negatives, the
// slopes of the pairs that chose them (positives in ascending order).
template <typename scalar_t, typename acc_t>
__global__ void facenet_forward_kernel(TripletView<scalar_t> v, TripletRule<acc_t> rule,
                                       int64_t* __restrict__ choice, acc_t* __restrict__ grad,
                                       acc_t* __restrict__ loss_out,
                                       int64_t* __restrict__ active_out,
                                       int64_t* __restrict__ count_out) {
  using Reduce = cub::BlockReduce<ArgMaxPair<acc_t>, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int64_t a = blockIdx.x;
  const AnchorRow<scalar_t> row = v.row(a);
  acc_t* g_row = grad + a * v.m;
  int64_t* c_row = choice + a * v.m;
  acc_t loss = 0;
  int64_t active = 0, count = 0;
  for (int64_t k = row.lo; k < row.hi; ++k) {
    const int64_t p = row.order[k];
    if (p == row.self) {
      continue;
    }
    const acc_t d_ap = static_cast<acc_t>(row.dist[p]);
    ArgMaxPair<acc_t> mine;
    facenet_scan(row, d_ap, threadIdx.x, blockDim.x, mine.first, mine.second);
    const ArgMaxPair<acc_t> best = Reduce(storage).Reduce(mine, MergePairs());
    if (threadIdx.x == 0) {
      const int64_t n = facenet_pick(best.first, best.second);
      c_row[p] = n;
      if (n >= 0) {
        acc_t slope;
        const acc_t term = rule.term(d_ap, static_cast<acc_t>(row.dist[n]), slope);
        loss += term;
        active += term > acc_t(0);
        ++count;
        g_row[p] = slope;
      }
    }
    __syncthreads();
  }
  for (int64_t n = threadIdx.x; n < v.m; n += blockDim.x) {
    if (!row.negative(n)) {
      continue;
    }
    acc_t slopes = 0;
    for (int64_t k = row.lo; k < row.hi; ++k) {
      const int64_t p = row.order[k];
      if (p != row.self && c_row[p] == n) {
        slopes += g_row[p];
      }
    }
    g_row[n] = acc_t(0) - slopes;  // +0, not -0, as on the CPU
  }
  write_partials(loss, active, count, loss_out + a, active_out + a, count_out + a);
}

// FaceNet choices for the miner: one thread per (anchor, column); -1 unless a positive
// with at least one negative.
template <typename scalar_t, typename acc_t>
__global__ void facenet_choice_kernel(TripletView<scalar_t> v, int64_t* __restrict__ choice) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= v.n * v.m) {
    return;
  }
  const int64_t a = index / v.m, p = index % v.m;
  const AnchorRow<scalar_t> row = v.row(a);
  if (row.negative(p) || p == row.self) {
    return;
  }
  ArgMax<acc_t> farther, farthest;
  facenet_scan(row, static_cast<acc_t>(row.dist[p]), 0, 1, farther, farthest);
  choice[index] = facenet_pick(farther, farthest);
}

// Threshold miner: one thread per (anchor, column); a positive counts, then writes, its
// selected negatives in ascending order at the pair's offset.
template <typename scalar_t, typename acc_t>
__global__ void threshold_mine_kernel(TripletView<scalar_t> v, TripletRule<acc_t> rule,
                                      const int64_t* __restrict__ offsets,
                                      int64_t* __restrict__ counts, int64_t* __restrict__ out_a,
                                      int64_t* __restrict__ out_p, int64_t* __restrict__ out_n) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= v.n * v.m) {
    return;
  }
  const int64_t a = index / v.m, p = index % v.m;
  const AnchorRow<scalar_t> row = v.row(a);
  if (row.negative(p) || p == row.self) {
    return;
  }
  const acc_t d_ap = static_cast<acc_t>(row.dist[p]);
  int64_t at = offsets == nullptr ? 0 : offsets[index];
  for (int64_t n = 0; n < v.m; ++n) {
    if (row.negative(n) && rule.selects(d_ap, static_cast<acc_t>(row.dist[n]))) {
      if (offsets != nullptr) {
        out_a[at] = a;
        out_p[at] = p;
        out_n[at] = n;
      }
      ++at;
    }
  }
  if (counts != nullptr) {
    counts[index] = at;
  }
}

unsigned int pair_blocks(const TripletInputs& in) {
  return element_blocks("triplet_mine", in.dist, kThreads);
}

#define FK_DISPATCH(dist, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dist.scalar_type(), name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_margin_forward_cuda(
    const at::Tensor& dist, const at::Tensor& labels, const at::Tensor& ref_labels,
    double margin, int64_t mining, bool self_ref, bool smooth) {
  // Checks first: a CPU tensor among CUDA ones gets our message, not the guard's.
  const TripletInputs in =
      triplet_setup("triplet_margin_loss", dist, labels, ref_labels, mining, self_ref);
  const DeviceGuard guard(dist.device());
  const int64_t n = in.dist.size(0);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "triplet_margin_loss: too many anchors, got ", n);
  const auto acc = in.dist.options().dtype(at::toOpMathType(dist.scalar_type()));
  at::Tensor grad = at::zeros(in.dist.sizes(), acc);
  at::Tensor loss = at::zeros({n}, acc);
  at::Tensor active = at::zeros({n}, labels.options());
  at::Tensor count = at::zeros({n}, labels.options());
  const cudaStream_t stream = current_stream();
  if (n > 0) {
    FK_DISPATCH(in.dist, "triplet_margin_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const TripletRule<acc_t> rule{static_cast<acc_t>(margin), mining, smooth};
      const TripletView<scalar_t> v = view<scalar_t>(in);
      acc_t* g = grad.mutable_data_ptr<acc_t>();
      acc_t* l = loss.mutable_data_ptr<acc_t>();
      int64_t* act = active.mutable_data_ptr<int64_t>();
      int64_t* cnt = count.mutable_data_ptr<int64_t>();
      if (mining == kMineBatchHard) {
        FK_LAUNCH(n, kThreads, stream, batch_hard_forward_kernel<scalar_t, acc_t>)(v, rule, g, l, act, cnt);
      } else if (mining == kMineFacenet) {
        at::Tensor choice = at::full(in.dist.sizes(), -1, labels.options());
        FK_LAUNCH(n, kThreads, stream, facenet_forward_kernel<scalar_t, acc_t>)(
            v, rule, choice.mutable_data_ptr<int64_t>(), g, l, act, cnt);
      } else {
        FK_LAUNCH(n, kThreads, stream, threshold_forward_kernel<scalar_t, acc_t>)(v, rule, g, l, act, cnt);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return triplet_forward_finish(loss, active, count, grad, dist.scalar_type());
}

at::Tensor pair_counts_cuda(const TripletInputs& in, double margin, int64_t mining) {
  at::Tensor counts = at::zeros(in.dist.sizes(), in.labels.options());
  if (in.dist.numel() == 0) {
    return counts;
  }
  FK_DISPATCH(in.dist, "triplet_pair_counts_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FK_LAUNCH(pair_blocks(in), kThreads, current_stream(), threshold_mine_kernel<scalar_t, acc_t>)(
            view<scalar_t>(in), TripletRule<acc_t>{static_cast<acc_t>(margin), mining, false},
            nullptr, counts.mutable_data_ptr<int64_t>(), nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

void fill_cuda(const TripletInputs& in, double margin, int64_t mining, const at::Tensor& offsets,
               at::Tensor& anchors, at::Tensor& positives, at::Tensor& negatives) {
  if (anchors.numel() == 0) {
    return;
  }
  FK_DISPATCH(in.dist, "triplet_fill_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FK_LAUNCH(pair_blocks(in), kThreads, current_stream(), threshold_mine_kernel<scalar_t, acc_t>)(
            view<scalar_t>(in), TripletRule<acc_t>{static_cast<acc_t>(margin), mining, false},
            offsets.const_data_ptr<int64_t>(), nullptr, anchors.mutable_data_ptr<int64_t>(),
            positives.mutable_data_ptr<int64_t>(), negatives.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> hardest_cuda(const TripletInputs& in) {
  const int64_t n = in.dist.size(0);
  at::Tensor positive = at::full({n}, -1, in.labels.options());
  at::Tensor negative = at::full({n}, -1, in.labels.options());
  TORCH_CHECK_VALUE(n <= INT32_MAX, "triplet_mine: too many anchors, got ", n);
  if (n > 0) {
    FK_DISPATCH(in.dist, "triplet_hardest_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      FK_LAUNCH(n, kThreads, current_stream(), hardest_kernel<scalar_t, acc_t>)(
          view<scalar_t>(in), positive.mutable_data_ptr<int64_t>(),
          negative.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {positive, negative};
}

at::Tensor facenet_choices_cuda(const TripletInputs& in) {
  at::Tensor choices = at::full(in.dist.sizes(), -1, in.labels.options());
  if (in.dist.numel() == 0) {
    return choices;
  }
  FK_DISPATCH(in.dist, "triplet_facenet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FK_LAUNCH(pair_blocks(in), kThreads, current_stream(), facenet_choice_kernel<scalar_t, acc_t>)(
            view<scalar_t>(in), choices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return choices;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_mine_cuda(const at::Tensor& dist,
                                                                 const at::Tensor& labels,
                                                                 const at::Tensor& ref_labels,
                                                                 double margin, int64_t mining,
                                                                 bool self_ref) {
  return triplet_mine_impl(dist, labels, ref_labels, margin, mining, self_ref,
                           {&pair_counts_cuda, &fill_cuda, &hardest_cuda, &facenet_choices_cuda});
}

}  // namespace

FK_CUDA_KERNELS(m) {
  m.impl("triplet_margin_forward", &triplet_margin_forward_cuda);
  m.impl("triplet_mine", &triplet_mine_cuda);
}

}  // namespace facekernels
