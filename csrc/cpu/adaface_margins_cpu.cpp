#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "adaface_margins.h"
#include "cpu/row_grain.h"

namespace facekernels {
namespace {

template <typename scalar_t>
double sum_of_squares(const scalar_t* row, int64_t dim) {
  double squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t d = 0; d < dim; ++d) {
    const double v = static_cast<double>(row[d]);
    squares += v * v;
  }
  return squares;
}

// The rows' norms in parallel, then the batch's moments in row order, in one call: the
// forty small tensor ops this replaces took 0.25 ms of a 2.8 ms AdaFace step (N = 256,
// C = 1K, two threads).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaface_margins_cpu(
    const at::Tensor& embeddings, const at::Tensor& mean, const at::Tensor& std_dev, double h,
    double margin, double t_alpha, bool training) {
  AdaFaceMargins a = adaface_margins_setup(embeddings, mean, std_dev, h, margin, t_alpha, training);
  const int64_t n = a.embeddings.size(0);
  std::vector<double> norms(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.embeddings.scalar_type(), "adaface_margins_cpu", [&] {
        const scalar_t* x = a.embeddings.const_data_ptr<scalar_t>();
        for_rows(a.embeddings, [&](int64_t i, int64_t dim) {
          norms[i] = adaface_norm(sum_of_squares(x + i * dim, dim));
        });
      });
  const double* running = a.running.const_data_ptr<double>();
  double new_mean = running[0], new_std = running[1];
  if (training) {
    double count = 0, sum = 0, squares = 0;
    for (const double v : norms) {
      if (v == v) {
        count += 1;
        sum += v;
      }
    }
    const double batch_mean = sum / count;
    for (const double v : norms) {
      if (v == v) {
        squares += (v - batch_mean) * (v - batch_mean);
      }
    }
    new_mean = running_value(running[0], batch_mean, t_alpha);
    new_std = running_value(running[1], unbiased_std(squares, count), t_alpha);
  }
  *a.new_mean.mutable_data_ptr<double>() = new_mean;
  *a.new_std.mutable_data_ptr<double>() = new_std;
  AT_DISPATCH_FLOATING_TYPES(a.row_m2.scalar_type(), "adaface_margins_cpu", [&] {
    scalar_t* m2 = a.row_m2.mutable_data_ptr<scalar_t>();
    scalar_t* m3 = a.row_m3.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      adaface_row_margins(norms[i], new_mean, new_std, h, margin, m2 + i, m3 + i);
    }
  });
  return adaface_margins_finish(a, mean, std_dev);
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) { m.impl("adaface_margins", &adaface_margins_cpu); }

}  // namespace facekernels
