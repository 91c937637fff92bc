// Packing of a (score, row index) pair into one int64 whose signed order is
// "higher score first, then lower index first": selection becomes integer comparison and
// ties are deterministic. High word: the float's bits mapped monotonically to a signed int
// (-0.0 folded onto +0.0 so equal scores tie); low word: 2^32 - 1 - index.
#pragma once

#include <cstdint>

namespace pluglm {

constexpr long long kMipsSentinel = -9223372036854775807ll - 1;  // "no candidate"
constexpr int64_t kMipsMaxRows = 4294967294ll;                     // low word holds 2^32-1-index

__device__ __forceinline__ long long mips_pack(float s, int64_t idx) {
  s = (s == 0.f) ? 0.f : s;
  const int b = __float_as_int(s);
  const int o = b >= 0 ? b : (b ^ 0x7fffffff);
  const unsigned long long hi = static_cast<unsigned long long>(static_cast<unsigned>(o)) << 32;
  const unsigned long long lo = 0xffffffffull - static_cast<unsigned long long>(idx);
  return static_cast<long long>(hi | lo);
}

__device__ __forceinline__ float mips_unpack_score(long long v) {
  const int o = static_cast<int>(v >> 32);  // arithmetic shift keeps the sign
  return __int_as_float(o >= 0 ? o : (o ^ 0x7fffffff));
}

__device__ __forceinline__ int64_t mips_unpack_index(long long v) {
  return static_cast<int64_t>(0xffffffffull - (static_cast<unsigned long long>(v) & 0xffffffffull));
}

}  // namespace pluglm
