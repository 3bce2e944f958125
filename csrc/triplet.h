// Triplet mining and the triplet margin loss over a pairwise dissimilarity matrix
// D [N, M] (larger = farther: a distance, or a negated cosine similarity), without any
// N x M x M temporary. Anchors index the rows, positives and negatives the columns.
//
// Positives of anchor a are found through the reference labels sorted once (stably): a
// binary search gives the run of a's label, visited in ascending column order. Every sum
// then runs in a fixed order on both devices (no atomics).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <tuple>

#include "common/reductions.h"

namespace facekernels {

// pytorch-metric-learning's TripletMarginMiner types, then batch-hard and FaceNet's.
enum TripletMining : int64_t {
  kMineAll = 0,       // t <= margin, with t = d_an - d_ap
  kMineHard = 1,      // t <= margin and t <= 0
  kMineSemihard = 2,  // 0 < t <= margin
  kMineEasy = 3,      // t > margin
  kMineBatchHard = 4, // per anchor: the farthest positive, the nearest negative
  kMineFacenet = 5,   // per positive pair: the nearest negative farther than the
                      // positive, else the farthest negative
  kMineEvery = 6,     // no mining: every valid triplet (PML's loss without a miner)
};

// A threshold rule as a window on t = d_an - d_ap: lo < t <= hi, each side present or
// not. Written with & and |, no branches, so that CPU vector loops keep it.
template <typename acc_t>
struct TripletWindow {
  acc_t lo, hi;
  bool has_lo, has_hi;

  C10_HOST_DEVICE bool contains(acc_t t) const {
    return (!has_lo | (t > lo)) & (!has_hi | (t <= hi));  // NaN: only with neither side
  }
};

template <typename acc_t>
struct TripletRule {
  acc_t margin;
  int64_t mining;
  bool smooth;  // softplus instead of relu

  // Threshold rules: kMineAll t <= margin, kMineHard t <= min(margin, 0), kMineSemihard
  // 0 < t <= margin, kMineEasy t > margin, kMineEvery any t.
  C10_HOST_DEVICE TripletWindow<acc_t> window() const {
    switch (mining) {
      case kMineEasy:
        return {margin, acc_t(0), true, false};
      case kMineHard:
        return {acc_t(0), margin < acc_t(0) ? margin : acc_t(0), false, true};
      case kMineSemihard:
        return {acc_t(0), margin, true, true};
      case kMineEvery:
        return {acc_t(0), acc_t(0), false, false};
      default:
        return {acc_t(0), margin, false, true};
    }
  }

  // Does (d_ap, d_an) form a mined triplet under a threshold rule?
  C10_HOST_DEVICE bool selects(acc_t d_ap, acc_t d_an) const {
    return window().contains(d_an - d_ap);
  }

  // The loss of a triplet, relu or softplus of v = d_ap - d_an + margin, and its slope
  // d loss / d d_ap (= -d loss / d d_an). Softplus follows torch (linear past v > 20).
  C10_HOST_DEVICE acc_t term(acc_t d_ap, acc_t d_an, acc_t& slope) const {
    const acc_t v = d_ap - d_an + margin;
    if (!smooth) {
      slope = v > acc_t(0) ? acc_t(1) : acc_t(0);
      return v > acc_t(0) ? v : acc_t(0);
    }
    if (v > acc_t(20)) {
      slope = acc_t(1);
      return v;
    }
    const acc_t e = std::exp(v);
    slope = e / (acc_t(1) + e);
    return std::log1p(e);
  }
};

// One anchor's view: its row of D, the reference labels and where its positives are.
template <typename scalar_t>
struct AnchorRow {
  const scalar_t* dist;       // D[a, :]
  const int64_t* ref_labels;  // [M]
  const int64_t* order;       // column indices sorted stably by label
  int64_t label, self, m;     // self: a when the reference set is the batch itself, else -1
  int64_t lo, hi;             // positives are order[lo..hi), minus self

  C10_HOST_DEVICE bool negative(int64_t j) const {
    return ref_labels[j] != label;
  }
};

// [lo, hi): the run of `label` in `sorted` (length m).
C10_HOST_DEVICE inline void label_run(const int64_t* sorted, int64_t m, int64_t label,
                                      int64_t& lo, int64_t& hi) {
  int64_t first = 0, last = m;
  while (first < last) {
    const int64_t mid = first + (last - first) / 2;
    if (sorted[mid] < label) {
      first = mid + 1;
    } else {
      last = mid;
    }
  }
  lo = first;
  last = m;
  while (first < last) {
    const int64_t mid = first + (last - first) / 2;
    if (sorted[mid] <= label) {
      first = mid + 1;
    } else {
      last = mid;
    }
  }
  hi = first;
}

// FaceNet's negative for the pair (a, p) among columns begin, begin + stride, ...:
// `farther` collects negatives with d_an > d_ap (the nearest wins), `farthest` all
// negatives (the farthest wins). Merge partial states, then call facenet_pick.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void facenet_scan(const AnchorRow<scalar_t>& row, acc_t d_ap,
                                         int64_t begin, int64_t stride, ArgMax<acc_t>& farther,
                                         ArgMax<acc_t>& farthest) {
  for (int64_t n = begin; n < row.m; n += stride) {
    if (!row.negative(n)) {
      continue;
    }
    const acc_t d_an = static_cast<acc_t>(row.dist[n]);
    if (d_an > d_ap) {
      farther.push(-d_an, n);
    }
    farthest.push(d_an, n);
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline int64_t facenet_pick(const ArgMax<acc_t>& farther,
                                            const ArgMax<acc_t>& farthest) {
  return farther.index >= 0 ? farther.index : farthest.index;
}

// Batch-hard for one anchor over columns begin, begin + stride, ...: the farthest
// positive and the nearest negative (ties to the lower column).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void hardest_scan(const AnchorRow<scalar_t>& row, int64_t begin,
                                         int64_t stride, ArgMax<acc_t>& positive,
                                         ArgMax<acc_t>& negative) {
  for (int64_t j = begin; j < row.m; j += stride) {
    const acc_t d = static_cast<acc_t>(row.dist[j]);
    if (row.negative(j)) {
      negative.push(-d, j);
    } else if (j != row.self) {
      positive.push(d, j);
    }
  }
}

// Device-neutral parts (triplet.cpp).

struct TripletInputs {
  at::Tensor dist;                   // contiguous [N, M]
  at::Tensor labels, ref_labels;     // contiguous int64
  at::Tensor sorted_ref, ref_order;  // reference labels sorted stably, and their columns
  bool self_ref;
};

TripletInputs triplet_setup(const char* op, const at::Tensor& dist, const at::Tensor& labels,
                            const at::Tensor& ref_labels, int64_t mining, bool self_ref);

// (loss_sum, active, count) from per-anchor partials, with grad_dist: the forward's outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_forward_finish(
    const at::Tensor& loss, const at::Tensor& active, const at::Tensor& count,
    const at::Tensor& grad_dist, at::ScalarType dtype);

// What the per-device miners provide: for threshold types, a count pass then a fill pass
// of each (anchor, positive) pair's negatives in ascending order; for batch-hard and
// FaceNet, one chosen column per anchor / per pair (-1 for none).
struct TripletMinerKernels {
  at::Tensor (*pair_counts)(const TripletInputs&, double margin, int64_t mining);  // [N, M]
  void (*fill)(const TripletInputs&, double margin, int64_t mining, const at::Tensor& offsets,
               at::Tensor& anchors, at::Tensor& positives, at::Tensor& negatives);
  std::tuple<at::Tensor, at::Tensor> (*hardest)(const TripletInputs&);  // ([N], [N])
  at::Tensor (*facenet_choices)(const TripletInputs&);                  // [N, M]
};

// (anchors, positives, negatives), int64, lexicographic in (a, p, n).
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_mine_impl(
    const at::Tensor& dist, const at::Tensor& labels, const at::Tensor& ref_labels,
    double margin, int64_t mining, bool self_ref, const TripletMinerKernels& kernels);

}  // namespace facekernels
