// Every op schema, in one place: the library facekernels and, for tests, the emulated CUDA
// kernels' facekernels_simt (csrc/simt/) define the same ops.
#pragma once

#include <torch/library.h>

namespace facekernels {

inline void define_ops(torch::Library& m) {
  // AdaFace's per-row margins (Kim et al. 2022) from n_i = clip(|x_i|, 0.001, 100) (NaN for a
  // non-finite norm: it joins no statistic). training: first mean <- t_alpha mean_i n_i +
  // (1 - t_alpha) mean, and std likewise with the unbiased std, over the finite n_i (a value
  // that comes out non-finite keeps the old one); then z_i = clip(h (n_i - mean) /
  // (std + 1e-3), -1, 1), row_m2 = -margin z_i, row_m3 = margin + margin z_i (accumulate
  // type). mean and std (one value each) are read only: the new values are returned in their
  // dtypes, for the caller to write once the loss has accepted the batch.
  m.def(
      "adaface_margins(Tensor embeddings, Tensor mean, Tensor std, float h, float margin, "
      "float t_alpha, bool training) -> (Tensor row_m2, Tensor row_m3, Tensor new_mean, "
      "Tensor new_std)");

  // Center loss (Wen et al. 2016) in one pass: loss = mean_i 1/2 |x_i - c_{y_i}|^2,
  // diff = x - c_y (the backward's input) and, when compute_update, each row's class
  // center moved by Wen's rule (rows of one class hold the same values).
  m.def(
      "center_loss_forward(Tensor embeddings, Tensor labels, Tensor centers, float alpha, "
      "bool compute_update) -> (Tensor loss, Tensor diff, Tensor updated_centers)");
  m.def(
      "center_loss_backward(Tensor grad_loss, Tensor diff, Tensor labels, int num_classes, "
      "bool centers_grad) -> (Tensor grad_embeddings, Tensor grad_centers)");
  // centers[labels[i]] <- updated_centers[i] in place: the forward's moved centers, written
  // once it has accepted the batch (rows of one class hold the same values).
  m.def("center_loss_update_(Tensor(a!) centers, Tensor labels, Tensor updated_centers) -> ()");

  // Margin-softmax cross entropy over classes chunked chunk_size at a time: per row the
  // largest logit and log sum_j exp(logit_j - row_max) (a class shard's part of the
  // log-sum-exp), the target logit, and the argmax of the margin-free cosine. margin_kind 0:
  // target s (cos(m1 theta + m2) - m3); 1: SphereFace, s (psi_m1(theta) + lambda cos) /
  // (1 + lambda). labels_in_range: labels must lie in [0, num_classes) (checked, an error
  // otherwise); false for a class shard, where a label outside means "another shard's
  // class": no target logit (0). rows (int64, strictly increasing, possibly empty): the op sees
  // the classes `rows` only (with their K sub-centers), as PartialFC's sampled classes,
  // without copying them; labels index rows, and the weight gradient is zero outside them. interclass_filtering_threshold
  // > 0: a non-target cosine above it gives logit 0 and no gradient (insightface's
  // PartialFC option against mislabeled classes). margin_kind 2: AdaFace, cosines clamped
  // to +-(1 - 1e-3), target s (cos(clip(theta + m2, 1e-3, pi - 1e-3)) - m3); 3: kind 0 where
  // cos > 0, else s cos (the easy margin, MagFace's default). row_m2, row_m3
  // ([N]): per-row margins in place of m2, m3 (the backward returns d loss / d m per row).
  // sub_centers K: the weight is [C * K, D] class-major and a class's cosine is the max
  // over its K rows (chunk_size counts classes). hard_threshold, hard_t ([N]): CurricularFace's
  // negatives, a non-target cosine c above row i's threshold becomes c (hard_t_i + c).
  // The loss is log_sum + (row_max - target_logit); row_max is a constant for autograd (the
  // loss does not depend on it). last_logits: the last chunk's dot products z [N, len * K]
  // in the GEMM's dtype, which the backward takes back (last_logits) instead of running
  // that chunk's GEMM again: with one chunk, the backward's GEMMs are the floor's two. The
  // backward skips the GEMMs of a gradient that is not wanted and returns it empty ([0, D],
  // or [0] for the margins).
  m.def(
      "margin_softmax_forward(Tensor embeddings, Tensor weight, Tensor labels, float scale, "
      "float m1, float m2, float m3, float sphere_lambda, int margin_kind, bool exact_gradient, "
      "bool normalize_embeddings, bool normalize_weight, int chunk_size, "
      "bool labels_in_range=True, Tensor? rows=None, float interclass_filtering_threshold=0.0, "
      "Tensor? row_m2=None, Tensor? row_m3=None, int sub_centers=1, Tensor? hard_threshold=None, "
      "Tensor? hard_t=None) -> (Tensor row_max, Tensor log_sum, Tensor target_logit, Tensor best_cosine, "
      "Tensor predicted, Tensor last_logits)");
  m.def(
      "margin_softmax_backward(Tensor grad_log_sum, Tensor grad_target, Tensor embeddings, "
      "Tensor weight, Tensor labels, Tensor row_max, Tensor log_sum, float scale, float m1, "
      "float m2, float m3, "
      "float sphere_lambda, int margin_kind, bool exact_gradient, bool normalize_embeddings, "
      "bool normalize_weight, int chunk_size, bool embeddings_grad=True, bool weight_grad=True, "
      "Tensor? rows=None, float interclass_filtering_threshold=0.0, Tensor? row_m2=None, "
      "Tensor? row_m3=None, int sub_centers=1, Tensor? hard_threshold=None, Tensor? hard_t=None, "
      "bool margins_grad=False, Tensor? last_logits=None) -> (Tensor grad_embeddings, "
      "Tensor grad_weight, Tensor grad_m2, Tensor grad_m3)");
  // Both at once, for the gradients of grad_scale * sum_i loss_i (d/d log_sum = grad_scale,
  // d/d target_logit = -grad_scale): the forward's first five outputs, then the backward's
  // four. block_rows rows at a time see every class, so each block's logits feed the
  // backward's GEMMs at once: three GEMMs where the two ops take four, for
  // block_rows x C (x K) logits in place of N x chunk.
  m.def(
      "margin_softmax_forward_backward(Tensor embeddings, Tensor weight, Tensor labels, "
      "float scale, float m1, float m2, float m3, float sphere_lambda, int margin_kind, "
      "bool exact_gradient, bool normalize_embeddings, bool normalize_weight, int block_rows, "
      "bool labels_in_range=True, Tensor? rows=None, float interclass_filtering_threshold=0.0, "
      "Tensor? row_m2=None, Tensor? row_m3=None, int sub_centers=1, Tensor? hard_threshold=None, "
      "Tensor? hard_t=None, float grad_scale=1.0, bool embeddings_grad=True, "
      "bool weight_grad=True, bool margins_grad=False) -> (Tensor row_max, Tensor log_sum, "
      "Tensor target_logit, Tensor best_cosine, Tensor predicted, Tensor grad_embeddings, "
      "Tensor grad_weight, Tensor grad_m2, Tensor grad_m3)");

  // Triplet margin loss over a dissimilarity matrix dist [N, M] (larger = farther), mining
  // 0 all, 1 hard, 2 semihard, 3 easy, 4 batch_hard, 5 facenet, 6 every triplet; positives
  // and negatives index the columns (self_ref: the first N columns are the rows themselves,
  // the batch or a memory that starts with it; p != a). Returns the sum of the mined
  // triplets' losses, how many are > 0, how many were mined, and d loss_sum / d dist.
  // triplet_mine returns the triplets (a, p, n) in lexicographic order.
  m.def(
      "triplet_margin_forward(Tensor dist, Tensor labels, Tensor ref_labels, float margin, "
      "int mining, bool self_ref, bool smooth) -> (Tensor loss_sum, Tensor active, "
      "Tensor count, Tensor grad_dist)");
  m.def(
      "triplet_mine(Tensor dist, Tensor labels, Tensor ref_labels, float margin, int mining, "
      "bool self_ref) -> (Tensor anchors, Tensor positives, Tensor negatives)");

  // Euclidean distances [N, M] between the rows of x and ref (squared: without the square
  // root) from one GEMM, recomputed from differences where the Gram form cancels; self_ref:
  // ref is x, and the diagonal is 0. The backward returns d loss / d x and d loss / d ref
  // (empty [0, D] when not wanted).
  m.def("pairwise_distance(Tensor x, Tensor ref, bool self_ref, bool squared) -> Tensor");
  m.def(
      "pairwise_distance_backward(Tensor grad, Tensor dist, Tensor x, Tensor ref, bool squared, "
      "bool x_grad=True, bool ref_grad=True) -> (Tensor grad_x, Tensor grad_ref)");
}

}  // namespace facekernels
