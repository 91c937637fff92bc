// Philox-4x32-10 for the knowledge-attention dropout, callable from host and device so
// the exact words can be checked on a machine without a GPU. Bit-identical to
// pluglm_kernels.reference.philox_uint32: key = (seed lo32, seed hi32), counter =
// (offset lo32, offset hi32, 0, 0), 10 rounds, the first output word is returned.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PLUGLM_KA_HD __host__ __device__ __forceinline__
#else
#define PLUGLM_KA_HD inline
#endif

namespace pluglm {
namespace ka {

PLUGLM_KA_HD uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    // A 64-bit product compiles to one wide multiply on the GPU and is exact on the host.
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Elements are kept iff the word is >= this threshold: min(floor(p * 2^32), 2^32 - 1).
inline uint32_t dropout_threshold(double p) {
  const double x = p * 4294967296.0;
  if (x >= 4294967295.0) return 0xFFFFFFFFu;
  return static_cast<uint32_t>(static_cast<uint64_t>(x));
}

}  // namespace ka
}  // namespace pluglm
