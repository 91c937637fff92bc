// Warp / block reductions and launch constants shared by the CUDA kernels of attentive
// pooling (attentive_pool.cu) and the encoder's embedding LayerNorm (encode_knowledge.cu).
#pragma once

#include <cstdint>

namespace pluglm {
namespace enc {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// Token splits of the dw2 / dln reductions (partials [splits, ...] summed by at::sum).
constexpr int64_t kSplits = 128;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// Block-wide sum / max through shared memory (kWarps partials); every thread gets it.
template <bool kMax>
__device__ float block_reduce(float x, float* smem) {
  x = kMax ? warp_max(x) : warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  float r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, smem[w]) : r + smem[w];
  return r;
}

}  // namespace enc
}  // namespace pluglm
