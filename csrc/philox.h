// Philox-4x32-10, the counter-based RNG behind attention dropout in every backend.
//
// Host/device-agnostic (plain integer arithmetic, no intrinsics): C++ CPU kernels and
// CUDA kernels include the same header so their dropout masks agree bit for bit with
// pluglm_kernels.reference.philox_uint32. Contract (reference.py):
//   key     = (seed lo32, seed hi32)
//   counter = (offset lo32, offset hi32, 0, 0), offset = flat (b, t, h, j) index into
//             the [B, T, H, N] attention probabilities
//   keep    iff first output word >= floor(p * 2^32) (dropout_threshold), kept
//             probabilities scaled by 1 / (1 - p).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PLUGLM_HD __host__ __device__ __forceinline__
#else
#define PLUGLM_HD inline
#endif

namespace pluglm {

// First 32-bit word of Philox-4x32-10(key = seed, counter = (offset lo, offset hi, 0, 0)).
PLUGLM_HD uint32_t philox_uint32(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// floor(p * 2^32) clamped to 2^32 - 1, as reference.dropout_threshold (p in [0, 1)).
PLUGLM_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace pluglm
