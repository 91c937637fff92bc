// The branch-free float tanh shared by the C++ CPU kernels of attentive pooling
// (attentive_pool.cpp) and the factored knowledge encoder (encode_knowledge.cpp): it
// vectorises inside `#pragma omp simd` loops, |error| within a few ulp of float, relative
// accuracy kept for small arguments.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "isa.h"

namespace pluglm {
namespace cpu {

// expm1(y) for y in [-40, 0], branch-free: y = n ln2 + r, |r| <= ln2 / 2;
// expm1(y) = 2^n (1 + q(r)) - 1 with q = expm1 on the reduced range (degree-7 Taylor,
// truncation < 1e-8). n = 0 for |y| < ln2 / 2 gives q(r) itself: no cancellation near 0.
PLUGLM_INLINE float expm1_neg(float y) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  y = std::max(y, -40.f);
  const float n = (y * kLog2e + kRound) - kRound;
  const float r = (y - n * kLn2Hi) - n * kLn2Lo;
  float q = 1.f / 5040.f;
  q = q * r + 1.f / 720.f;
  q = q * r + 1.f / 120.f;
  q = q * r + 1.f / 24.f;
  q = q * r + 1.f / 6.f;
  q = q * r + 0.5f;
  q = q * r + 1.f;
  q = q * r;  // expm1(r)
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);  // 2^n, n in [-58, 0]
  return scale * q + (scale - 1.f);
}

// tanh(x) = sign(x) * (-m) / (2 + m), m = expm1(-2|x|) in (-1, 0].
PLUGLM_INLINE float tanh_f(float x) {
  const float m = expm1_neg(-2.f * std::fabs(x));
  const float t = -m / (2.f + m);
  return std::copysign(t, x);
}

// w2 . tanh(u) over one row.
PLUGLM_INLINE float tanh_dot(const float* u, const float* w2, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += w2[i] * tanh_f(u[i]);
  return acc;
}

}  // namespace cpu
}  // namespace pluglm
