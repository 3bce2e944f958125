// Element math for loops the compiler vectorizes (no calls, no branches, no tables), and
// the attribute that compiles such loops once per x86 vector width.
#pragma once

#include <cstdint>
#include <limits>

namespace facekernels {

// Hot loops marked FK_VECTOR_CLONES are compiled for AVX-512, AVX2 + FMA and the baseline
// ISA; the loader runs the widest the CPU has (GCC's function multiversioning). Sums over a
// row are reproducible on one machine; another vector width may round them differently.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FK_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FK_VECTOR_CLONES
#endif
#define FK_INLINE inline __attribute__((always_inline))

// std::bit_cast, which is C++20: torch 2.11 and older build extensions as C++17.
template <typename To, typename From>
FK_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  return __builtin_bit_cast(To, from);
}

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using bits_t = int32_t;
  static constexpr int mantissa = 23, bias = 127;
  static constexpr float low = -87.33654f, high = 88.72284f;  // the normal range of exp
  static constexpr float ln2_high = 0.693359375f, ln2_low = -2.12194440e-4f;  // Cephes
};

template <>
struct ExpConstants<double> {
  using bits_t = int64_t;
  static constexpr int mantissa = 52, bias = 1023;
  static constexpr double low = -708.3964185322641, high = 709.782712893384;
  static constexpr double ln2_high = 6.93147180369123816490e-01;  // fdlibm's split
  static constexpr double ln2_low = 1.90821492927058770002e-10;
};

// exp(x) = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2]
// (ln 2 in two parts, so n ln 2 is exact), e^r by its Taylor polynomial to degree 7 (float)
// or 13 (double), whose truncation errors are below 2^-27 resp. 2^-57 relative, and 2^n
// written into the exponent bits. Measured against std::exp at 4M points spread over the
// normal range: at most 1.0 epsilon relative, float and double. Below the normal range it
// returns 0 where std::exp gives a subnormal (< 1.2e-38 resp. 2.3e-308); exp(-inf) = 0,
// exp(+inf) = inf and NaN stays NaN, as std::exp.
template <typename T>
FK_INLINE T vector_exp(T x) {
  using C = ExpConstants<T>;
  using bits_t = typename C::bits_t;
  // Adding 1.5 * 2^mantissa rounds to an integer, which lands in the low bits.
  constexpr T magic = T(1.5) * T(bits_t(1) << C::mantissa);
  const T clamped = x < C::low ? C::low : (x > C::high ? C::high : x);
  const T shifted = clamped * T(1.4426950408889634) + magic;
  const T n = shifted - magic;
  const T r = (clamped - n * C::ln2_high) - n * C::ln2_low;
  constexpr int degree = sizeof(T) == 4 ? 7 : 13;
  T p = T(1);
  for (int k = degree; k >= 1; --k) {
    p = T(1) + r * (T(1) / T(k)) * p;  // Horner on sum r^k / k!, with 1 / k folded
  }
  const bits_t n_bits = bit_cast<bits_t>(shifted) - bit_cast<bits_t>(magic);
  const T power = bit_cast<T>((n_bits + C::bias) << C::mantissa);
  const T y = x < C::low ? T(0) : (x > C::high ? std::numeric_limits<T>::infinity() : p * power);
  return x != x ? x : y;
}

// log1p(w) for w in [0, 1]: 2 atanh(s) with s = w / (2 + w) in [0, 1/3], that is
// 2 s sum_k s^2k / (2k + 1), to k = 7 (float) or 16 (double), whose truncation errors are
// below 2^-28 resp. 2^-59 relative; the division's rounding leaves about 1.5 epsilon.
// log1p(0) = 0, NaN stays NaN.
template <typename T>
FK_INLINE T vector_log1p_unit(T w) {
  const T s = w / (T(2) + w);
  const T s2 = s * s;
  constexpr int terms = sizeof(T) == 4 ? 7 : 16;
  T p = T(1) / T(2 * terms + 1);
  for (int k = terms - 1; k >= 0; --k) {
    p = T(1) / T(2 * k + 1) + s2 * p;
  }
  return T(2) * s * p;
}

}  // namespace facekernels
