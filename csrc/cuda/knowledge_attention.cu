// CUDA knowledge attention (and its top-N-gather variant), forward and backward.
//
// Semantics: pluglm_kernels.reference.knowledge_attention. q [B, T, H, Dh] (pre-scaled),
// k/v [B, N, H, Dh] or tables [M, H, Dh] read through indices [B, N] (int64), bias [B, N]
// f32, beta [H] f32. Forward returns out [B, T, H, Dh] (q's dtype) and lse [B, T, H] f32;
// backward returns dq, dk, dv (inputs' dtypes; dk/dv are per retrieved row [B, N, H, Dh]
// for the gather variant), dbias [B, N] f32 and dbeta [H] f32. Dropout is Philox-4x32-10
// keyed by seed with the flat (b, t, h, j) counter, bit-identical to the reference.
// Out-of-range indices trip a device-side assert (like torch indexing); the Python
// wrapper checks them on the host first in eager mode.
//
// Layout of the work. A "group" of G = Dh/8 adjacent lanes owns one head vector, each
// lane 8 consecutive elements (one 16-byte access in f16/bf16), so dot products are 8
// FMAs plus log2(G) xor-shuffles and every global access is a full 16/32-byte vector.
//  * forward and the dq backward kernel: a CTA handles one (b, h) and a tile of tokens,
//    one token per group; the (b, h)'s k/v rows are staged in shared memory in the input
//    dtype (chunks of rows when N*Dh does not fit) and every token streams over them with
//    an online softmax (N <= 256 needs no logits buffer). HBM traffic: q (+ dO, out) read
//    once, out/dq written once, k/v rows read once per CTA (L2 hits after the first).
//  * dk/dv backward kernel: the transpose. A CTA handles one (b, h), a chunk of rows j
//    and a range of tokens; each group owns one row (k_j, v_j in registers) and a strided
//    subset of the tokens, which are staged in shared memory. lse and D = dO.out make
//    every dS_tj independent of the other rows, so no pass over j is needed here.
//    Per-CTA partial sums go to float32 workspaces [splits, ...] and small finishing
//    kernels add the splits in a fixed order: the backward is deterministic (no atomics).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../philox.h"
#include "ka_vec.cuh"

namespace pluglm {
namespace ka {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements of a head vector per lane
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Shared memory per CTA stays under the 48 KB that needs no opt-in, leaving room for
// several CTAs per SM.
constexpr int kKvSmemBudget = 44 * 1024;
constexpr int kTokSmemBudget = 28 * 1024;  // + 16 KB of reduction buffers in the dkv kernel
constexpr int kMaxN = 256;

struct Params {
  const void* q;     // [B, T, H, Dh]
  const void* k;     // [B, N, H, Dh], or table [M, H, Dh] when idx != nullptr
  const void* v;     // same as k
  const int64_t* idx;  // [B, N] or nullptr
  const float* bias;   // [B, N]
  const float* beta;   // [H]
  const void* dout;  // [B, T, H, Dh] (backward)
  const void* out;   // [B, T, H, Dh] forward output (backward input)
  void* o;           // forward: out; backward: dq
  float* lse;        // [B, T, H]: written by forward, read by backward
  float* dws;        // [B, T, H] D = dO . out, written by the dq kernel
  float* dk_part;    // [nsplit, B, N, H, Dh]
  float* dv_part;    // [nsplit, B, N, H, Dh]
  float* sds_part;   // [nsplit, B, N, H] sum over the split's tokens of dS
  int64_t B, T, H, N, M;
  // token-parallel kernels (forward, dq)
  int64_t tokens_per_tile, ntiles;
  int nc;  // k/v rows per shared-memory chunk
  // row-parallel kernel (dk/dv)
  int nc2, nchunk2, tq;
  int64_t nsplit, tokens_per_split;
  uint64_t seed;
  uint32_t thr;
  float inv_keep;
};

template <int G>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

template <int G>
__device__ __forceinline__ void group_sum2(float& x, float& y) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) {
    x += __shfl_xor_sync(kFull, x, o);
    y += __shfl_xor_sync(kFull, y, o);
  }
}

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// Element offset of row j of (b, head 0) in k/v: direct [B, N, H, Dh] or a table row.
__device__ __forceinline__ int64_t kv_row(const Params& p, int64_t b, int64_t j, int dh) {
  if (p.idx != nullptr) {
    const int64_t r = p.idx[b * p.N + j];
    CUDA_KERNEL_ASSERT(r >= 0 && r < p.M && "gather_knowledge_attention: index out of range");
    return r * p.H * dh;
  }
  return (b * p.N + j) * p.H * dh;
}

// Copies rows [cs, cs + rows) of the (b, h) keys and values into shared memory (16-byte
// pieces) and beta_h * bias[b, j] into sb.
template <typename T, int DH>
__device__ void stage_kv(const Params& p, int64_t b, int64_t h, float beta_h, int cs, int rows,
                         T* sk, T* sv, float* sb) {
  constexpr int P = DH * static_cast<int>(sizeof(T)) / 16;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int i = threadIdx.x; i < rows * P; i += kThreads) {
    const int r = i / P, piece = i % P;
    const int64_t off = kv_row(p, b, cs + r, DH) + h * DH;
    reinterpret_cast<uint4*>(sk + r * DH)[piece] = reinterpret_cast<const uint4*>(k + off)[piece];
    reinterpret_cast<uint4*>(sv + r * DH)[piece] = reinterpret_cast<const uint4*>(v + off)[piece];
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) sb[r] = beta_h * p.bias[b * p.N + cs + r];
}

// Keep bits of G consecutive items, computed one per lane and shared with a ballot: bit i
// of the result (group-relative) is the keep flag lane i of the group computed.
template <int G>
__device__ __forceinline__ uint32_t group_keep_bits(const Params& p, bool have, uint64_t ctr) {
  bool keep = true;
  if (have) keep = philox_uint32(p.seed, ctr) >= p.thr;
  const int gl0 = (threadIdx.x & 31) & ~(G - 1);
  return __ballot_sync(kFull, keep) >> gl0;
}

// ------------------------------------------------------------------------------ forward

template <typename T, int DH, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) ka_fwd_kernel(Params p) {
  constexpr int G = DH / kVec;
  constexpr int GROUPS = kThreads / G;  // tokens per pass
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem);          // [nc, DH]
  T* sv = sk + static_cast<size_t>(p.nc) * DH;  // [nc, DH]
  float* sb = reinterpret_cast<float*>(sv + static_cast<size_t>(p.nc) * DH);  // [nc]

  int64_t blk = blockIdx.x;
  const int64_t h = blk % p.H;
  blk /= p.H;
  const int64_t tile = blk % p.ntiles;
  const int64_t b = blk / p.ntiles;
  const int r = threadIdx.x % G;
  const int grp = threadIdx.x / G;
  const float beta_h = p.beta[h];
  const int N = static_cast<int>(p.N);
  const int nchunks = (N + p.nc - 1) / p.nc;
  const int64_t t_begin = tile * p.tokens_per_tile;
  const int64_t t_end = min(p.T, t_begin + p.tokens_per_tile);
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.o);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += GROUPS) {
    const int64_t t = t0 + grp;
    const bool valid = t < t_end;
    const int64_t th = (b * p.T + t) * p.H + h;  // flat (b, t, h)
    float qv[kVec];
    if (valid) {
      load8(q + th * DH + r * kVec, qv);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) qv[e] = 0.f;
    }
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
    float m2 = -INFINITY;  // running max of the logits, log2 units
    float l = 0.f;         // running sum of exp2(logit2 - m2), before dropout

    for (int c = 0; c < nchunks; ++c) {
      const int cs = c * p.nc;
      const int rows = min(p.nc, N - cs);
      if (nchunks > 1 || t0 == t_begin) {  // block-uniform
        __syncthreads();
        stage_kv<T, DH>(p, b, h, beta_h, cs, rows, sk, sv, sb);
        __syncthreads();
      }
      for (int jg = 0; jg < rows; jg += G) {
        uint32_t keep_bits = kFull;
        if constexpr (DROPOUT) {
          keep_bits = group_keep_bits<G>(
              p, jg + r < rows, static_cast<uint64_t>(th * p.N + cs + jg + r));
        }
        const int jn = min(G, rows - jg);
        for (int jj = 0; jj < jn; ++jj) {
          const int jl = jg + jj;
          float kv[kVec];
          load8(sk + jl * DH + r * kVec, kv);
          const float s = group_sum<G>(dot8(qv, kv));
          const float s2 = (s + sb[jl]) * kLog2e;
          if (s2 > m2) {  // rare after the first few rows: rescale lazily
            const float alpha = exp2f(m2 - s2);
            l *= alpha;
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[e] *= alpha;
            m2 = s2;
          }
          const float pe = exp2f(s2 - m2);
          l += pe;
          float w = pe;
          if constexpr (DROPOUT) w = ((keep_bits >> jj) & 1u) ? pe * p.inv_keep : 0.f;
          float vv[kVec];
          load8(sv + jl * DH + r * kVec, vv);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] = fmaf(w, vv[e], acc[e]);
        }
      }
    }
    if (valid) {
      const float inv_l = 1.f / l;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] *= inv_l;
      store8(out + th * DH + r * kVec, acc);
      if (r == 0) p.lse[th] = m2 * kLn2 + logf(l);
    }
  }
}

// ------------------------------------------------------------------------ backward: dq

// dq_t = sum_j dS_tj k_j with dS_tj = P_tj (dP_tj - D_t), P = exp(logit - lse),
// dP = keep/(1-p) * dO.v_j, D = dO.out. Also writes D for the dk/dv kernel.
template <typename T, int DH, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) ka_bwd_dq_kernel(Params p) {
  constexpr int G = DH / kVec;
  constexpr int GROUPS = kThreads / G;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = sk + static_cast<size_t>(p.nc) * DH;
  float* sb = reinterpret_cast<float*>(sv + static_cast<size_t>(p.nc) * DH);

  int64_t blk = blockIdx.x;
  const int64_t h = blk % p.H;
  blk /= p.H;
  const int64_t tile = blk % p.ntiles;
  const int64_t b = blk / p.ntiles;
  const int r = threadIdx.x % G;
  const int grp = threadIdx.x / G;
  const float beta_h = p.beta[h];
  const int N = static_cast<int>(p.N);
  const int nchunks = (N + p.nc - 1) / p.nc;
  const int64_t t_begin = tile * p.tokens_per_tile;
  const int64_t t_end = min(p.T, t_begin + p.tokens_per_tile);
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* outp = static_cast<const T*>(p.out);
  T* dq = static_cast<T*>(p.o);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += GROUPS) {
    const int64_t t = t0 + grp;
    const bool valid = t < t_end;
    const int64_t th = (b * p.T + t) * p.H + h;
    float qv[kVec], gv[kVec], ov[kVec];
    if (valid) {
      load8(q + th * DH + r * kVec, qv);
      load8(dout + th * DH + r * kVec, gv);
      load8(outp + th * DH + r * kVec, ov);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) qv[e] = gv[e] = ov[e] = 0.f;
    }
    const float D = group_sum<G>(dot8(gv, ov));
    const float lse = valid ? p.lse[th] : 0.f;
    float dqv[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) dqv[e] = 0.f;

    for (int c = 0; c < nchunks; ++c) {
      const int cs = c * p.nc;
      const int rows = min(p.nc, N - cs);
      if (nchunks > 1 || t0 == t_begin) {
        __syncthreads();
        stage_kv<T, DH>(p, b, h, beta_h, cs, rows, sk, sv, sb);
        __syncthreads();
      }
      for (int jg = 0; jg < rows; jg += G) {
        uint32_t keep_bits = kFull;
        if constexpr (DROPOUT) {
          keep_bits = group_keep_bits<G>(
              p, jg + r < rows, static_cast<uint64_t>(th * p.N + cs + jg + r));
        }
        const int jn = min(G, rows - jg);
        for (int jj = 0; jj < jn; ++jj) {
          const int jl = jg + jj;
          float kv[kVec], vv[kVec];
          load8(sk + jl * DH + r * kVec, kv);
          load8(sv + jl * DH + r * kVec, vv);
          float s = dot8(qv, kv), dp = dot8(gv, vv);
          group_sum2<G>(s, dp);
          const float P = exp2f((s + sb[jl] - lse) * kLog2e);
          if constexpr (DROPOUT) dp = ((keep_bits >> jj) & 1u) ? dp * p.inv_keep : 0.f;
          const float ds = P * (dp - D);
#pragma unroll
          for (int e = 0; e < kVec; ++e) dqv[e] = fmaf(ds, kv[e], dqv[e]);
        }
      }
    }
    if (valid) {
      store8(dq + th * DH + r * kVec, dqv);
      if (r == 0) p.dws[th] = D;
    }
  }
}

// --------------------------------------------------------------------- backward: dk, dv

// dk_j = sum_t dS_tj q_t, dv_j = sum_t keep/(1-p) P_tj dO_t, and sum_t dS_tj (for dbias,
// dbeta), over the CTA's token range; written as partials per split.
template <typename T, int DH, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) ka_bwd_dkv_kernel(Params p) {
  constexpr int G = DH / kVec;
  constexpr int GROUPS = kThreads / G;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tq = p.tq;
  T* sq = reinterpret_cast<T*>(smem);                  // [tq, DH]
  T* sdo = sq + static_cast<size_t>(tq) * DH;           // [tq, DH]
  float* slse = reinterpret_cast<float*>(sdo + static_cast<size_t>(tq) * DH);  // [tq]
  float* sD = slse + tq;                                // [tq]
  float* redk = sD + tq;                                // [GROUPS, DH]
  float* redv = redk + GROUPS * DH;                     // [GROUPS, DH]
  float* reds = redv + GROUPS * DH;                     // [GROUPS]

  int64_t blk = blockIdx.x;
  const int64_t h = blk % p.H;
  blk /= p.H;
  const int chunk = static_cast<int>(blk % p.nchunk2);
  blk /= p.nchunk2;
  const int64_t split = blk % p.nsplit;
  const int64_t b = blk / p.nsplit;
  const int r = threadIdx.x % G;
  const int grp = threadIdx.x / G;
  const int N = static_cast<int>(p.N);
  const int cs = chunk * p.nc2;
  const int R = min(p.nc2, N - cs);  // rows of this CTA, <= GROUPS
  const int S = GROUPS / R;          // token subsets per row
  const int row = grp % R;
  const int sub = grp / R;
  const bool active = sub < S;
  const int64_t j = cs + row;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);

  float kv[kVec], vv[kVec];
  {
    const int64_t off = kv_row(p, b, j, DH) + h * DH + r * kVec;
    load8(k + off, kv);
    load8(v + off, vv);
  }
  const float sbj = p.beta[h] * p.bias[b * p.N + j];
  float dk[kVec], dv[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) dk[e] = dv[e] = 0.f;
  float sds = 0.f;

  const int64_t ts = split * p.tokens_per_split;
  const int64_t te = min(p.T, ts + p.tokens_per_split);
  constexpr int P16 = DH * static_cast<int>(sizeof(T)) / 16;
  for (int64_t tile0 = ts; tile0 < te; tile0 += tq) {
    const int tile_len = static_cast<int>(min(static_cast<int64_t>(tq), te - tile0));
    __syncthreads();
    for (int i = threadIdx.x; i < tile_len * P16; i += kThreads) {
      const int tl = i / P16, piece = i % P16;
      const int64_t off = ((b * p.T + tile0 + tl) * p.H + h) * DH;
      reinterpret_cast<uint4*>(sq + tl * DH)[piece] = reinterpret_cast<const uint4*>(q + off)[piece];
      reinterpret_cast<uint4*>(sdo + tl * DH)[piece] =
          reinterpret_cast<const uint4*>(dout + off)[piece];
    }
    for (int tl = threadIdx.x; tl < tile_len; tl += kThreads) {
      const int64_t th = (b * p.T + tile0 + tl) * p.H + h;
      slse[tl] = p.lse[th];
      sD[tl] = p.dws[th];
    }
    __syncthreads();

    const int iters = (tile_len + S - 1) / S;  // block-uniform trip count
    for (int ib = 0; ib < iters; ib += G) {
      uint32_t keep_bits = kFull;
      if constexpr (DROPOUT) {
        const int tl = sub + (ib + r) * S;
        const bool have = active && tl < tile_len;
        const int64_t th = (b * p.T + tile0 + tl) * p.H + h;
        keep_bits = group_keep_bits<G>(p, have, static_cast<uint64_t>(th * p.N + j));
      }
      const int jn = min(G, iters - ib);
      for (int ii = 0; ii < jn; ++ii) {
        const int tl = sub + (ib + ii) * S;
        const bool valid = active && tl < tile_len;
        const int tls = valid ? tl : 0;  // in-range dummy for lanes without a token
        float qv[kVec], gv[kVec];
        load8(sq + tls * DH + r * kVec, qv);
        load8(sdo + tls * DH + r * kVec, gv);
        float s = dot8(qv, kv), dp = dot8(gv, vv);
        group_sum2<G>(s, dp);
        const float P = valid ? exp2f((s + sbj - slse[tls]) * kLog2e) : 0.f;
        float pd = P;
        if constexpr (DROPOUT) {
          const bool keep = (keep_bits >> ii) & 1u;
          dp = keep ? dp * p.inv_keep : 0.f;
          pd = keep ? P * p.inv_keep : 0.f;
        }
        const float ds = P * (dp - sD[tls]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          dk[e] = fmaf(ds, qv[e], dk[e]);
          dv[e] = fmaf(pd, gv[e], dv[e]);
        }
        sds += ds;
      }
    }
  }

  // Sum the token subsets of each row in a fixed order.
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    redk[grp * DH + r * kVec + e] = dk[e];
    redv[grp * DH + r * kVec + e] = dv[e];
  }
  if (r == 0) reds[grp] = sds;
  __syncthreads();
  const int64_t part_rows = p.B * p.N * p.H;
  for (int i = threadIdx.x; i < R * DH; i += kThreads) {
    const int rr = i / DH, d = i % DH;
    float ak = 0.f, av = 0.f;
    for (int s2 = 0; s2 < S; ++s2) {
      ak += redk[(s2 * R + rr) * DH + d];
      av += redv[(s2 * R + rr) * DH + d];
    }
    const int64_t o = (split * part_rows + (b * p.N + cs + rr) * p.H + h) * DH + d;
    p.dk_part[o] = ak;
    p.dv_part[o] = av;
  }
  for (int rr = threadIdx.x; rr < R; rr += kThreads) {
    float a = 0.f;
    for (int s2 = 0; s2 < S; ++s2) a += reds[s2 * R + rr];
    p.sds_part[split * part_rows + (b * p.N + cs + rr) * p.H + h] = a;
  }
}

// ---------------------------------------------------------------- backward: finishing

// dk/dv [B, N, H, Dh] = sum over splits of the partials, in the inputs' dtype.
template <typename T>
__global__ void ka_sum_splits_kernel(const float* __restrict__ part_k,
                                     const float* __restrict__ part_v, T* __restrict__ dk,
                                     T* __restrict__ dv, int64_t n, int64_t nsplit) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float ak = 0.f, av = 0.f;
    for (int64_t s = 0; s < nsplit; ++s) {
      ak += part_k[s * n + i];
      av += part_v[s * n + i];
    }
    from_float(ak, dk + i);
    from_float(av, dv + i);
  }
}

// dbias[b, j] = sum_h beta_h sum_t dS[b, t, h, j].
__global__ void ka_dbias_kernel(const float* __restrict__ sds_part, const float* __restrict__ beta,
                                float* __restrict__ dbias, int64_t BN, int64_t H, int64_t nsplit) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < BN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a = 0.f;
    for (int64_t h = 0; h < H; ++h) {
      float s = 0.f;
      for (int64_t sp = 0; sp < nsplit; ++sp) s += sds_part[(sp * BN + i) * H + h];
      a = fmaf(beta[h], s, a);
    }
    dbias[i] = a;
  }
}

// dbeta[h] = sum_{b, j} bias[b, j] sum_t dS[b, t, h, j]; one CTA per head, fixed order.
__global__ void ka_dbeta_kernel(const float* __restrict__ sds_part, const float* __restrict__ bias,
                                float* __restrict__ dbeta, int64_t BN, int64_t H, int64_t nsplit) {
  const int64_t h = blockIdx.x;
  float a = 0.f;
  for (int64_t i = threadIdx.x; i < BN; i += blockDim.x) {
    float s = 0.f;
    for (int64_t sp = 0; sp < nsplit; ++sp) s += sds_part[(sp * BN + i) * H + h];
    a = fmaf(bias[i], s, a);
  }
  __shared__ float red[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(kFull, a, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) t += red[w];
    dbeta[h] = t;
  }
}

// ------------------------------------------------------------------------------ host side

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>, integral_constant<DH>, bool_constant<DROPOUT>) for the run-time
// dtype / head size / dropout switch.
template <typename F>
void dispatch(at::ScalarType st, int64_t dh, bool dropout, F&& f) {
  auto with_type = [&](auto tag) {
    auto with_dh = [&](auto dhc) {
      if (dropout) {
        f(tag, dhc, std::true_type{});
      } else {
        f(tag, dhc, std::false_type{});
      }
    };
    switch (dh) {
      case 32: with_dh(std::integral_constant<int, 32>{}); break;
      case 64: with_dh(std::integral_constant<int, 64>{}); break;
      case 128: with_dh(std::integral_constant<int, 128>{}); break;
      default: TORCH_CHECK(false, "knowledge_attention (CUDA): head size Dh must be 32, 64 or 128, got ", dh);
    }
  };
  switch (st) {
    case at::kFloat: with_type(TypeTag<float>{}); break;
    case at::kHalf: with_type(TypeTag<__half>{}); break;
    case at::kBFloat16: with_type(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "knowledge_attention (CUDA): q must be float32, float16 or bfloat16, got ", st);
  }
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The kernels use 16-byte vector accesses; a contiguous view with an odd storage offset is
// copied once (this never happens for tensors the ops allocate themselves).
at::Tensor aligned(const at::Tensor& t) { return aligned16(t) ? t : t.clone(); }

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "knowledge_attention (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), "knowledge_attention (CUDA): ", name,
              " must be on the same device as q (", q.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "knowledge_attention (CUDA): ", name, " must be contiguous");
}

void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_cuda(t, name, q);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "knowledge_attention (CUDA): ", name,
              " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
}

// Checks every argument; returns N. kv_rows: [B, N, H, Dh] tensors, or tables [M, H, Dh]
// with indices [B, N].
int64_t check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor* indices, const at::Tensor& bias, const at::Tensor& beta,
                     double dropout_p) {
  TORCH_CHECK(q.is_cuda(), "knowledge_attention (CUDA): q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 4, "knowledge_attention (CUDA): q must be [B, T, H, Dh], got ", q.sizes());
  check_cuda(q, "q", q);
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "knowledge_attention (CUDA): q must be float32, float16 or bfloat16, got ", st);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  TORCH_CHECK(B >= 1 && T >= 1 && H >= 1, "knowledge_attention (CUDA): q must be non-empty, got ",
              q.sizes());
  TORCH_CHECK(Dh == 32 || Dh == 64 || Dh == 128,
              "knowledge_attention (CUDA): head size Dh must be 32, 64 or 128, got ", Dh);
  int64_t N;
  if (indices == nullptr) {
    TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(2) == H && k.size(3) == Dh,
                "knowledge_attention (CUDA): k must be [B, N, H, Dh] = [", B, ", N, ", H, ", ", Dh,
                "], got ", k.sizes());
    N = k.size(1);
    TORCH_CHECK(v.sizes() == k.sizes(), "knowledge_attention (CUDA): v must have k's shape ",
                k.sizes(), ", got ", v.sizes());
  } else {
    const at::Tensor& idx = *indices;
    check_cuda(idx, "indices", q);
    TORCH_CHECK(idx.scalar_type() == at::kLong, "knowledge_attention (CUDA): indices must be int64, got ",
                idx.scalar_type());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B, "knowledge_attention (CUDA): indices must be [B=", B,
                ", N], got ", idx.sizes());
    N = idx.size(1);
    TORCH_CHECK(k.dim() == 3 && k.size(0) >= 1 && k.size(1) == H && k.size(2) == Dh,
                "knowledge_attention (CUDA): table_k must be [M, H, Dh] with H=", H, ", Dh=", Dh,
                " and M >= 1, got ", k.sizes());
    TORCH_CHECK(v.sizes() == k.sizes(), "knowledge_attention (CUDA): table_v must have table_k's shape ",
                k.sizes(), ", got ", v.sizes());
    TORCH_CHECK(aligned16(k) && aligned16(v),
                "knowledge_attention (CUDA): table_k and table_v must be 16-byte aligned (a copy "
                "would cost O(M*H*Dh) memory)");
  }
  TORCH_CHECK(N >= 1 && N <= kMaxN, "knowledge_attention (CUDA): N (rows per sequence) must be in [1, ",
              kMaxN, "], got ", N);
  check_like_q(k, indices ? "table_k" : "k", q);
  check_like_q(v, indices ? "table_v" : "v", q);
  check_cuda(bias, "bias", q);
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "knowledge_attention (CUDA): bias must be float32, got ",
              bias.scalar_type());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == B && bias.size(1) == N,
              "knowledge_attention (CUDA): bias must be [B, N] = [", B, ", ", N, "], got ", bias.sizes());
  check_cuda(beta, "beta", q);
  TORCH_CHECK(beta.scalar_type() == at::kFloat, "knowledge_attention (CUDA): beta must be float32, got ",
              beta.scalar_type());
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == H, "knowledge_attention (CUDA): beta must be [H] = [", H,
              "], got ", beta.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "knowledge_attention (CUDA): dropout_p must be in [0, 1), got ", dropout_p);
  return N;
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Common geometry of the token-parallel kernels (forward, dq).
void plan_token_kernel(Params& p, int64_t dh, int64_t elem) {
  const int64_t groups = kThreads / (dh / kVec);
  const int64_t row_bytes = 2 * dh * elem + 4;
  p.nc = static_cast<int>(std::min<int64_t>(p.N, kKvSmemBudget / row_bytes));
  const int64_t passes = ceil_div(p.T, groups);
  const int64_t target = 8 * static_cast<int64_t>(num_sms());  // CTAs for a few full waves
  const int64_t per_cta = std::max<int64_t>(1, (p.B * p.H * passes) / target);
  p.tokens_per_tile = std::min(passes, per_cta) * groups;
  p.ntiles = ceil_div(p.T, p.tokens_per_tile);
  TORCH_CHECK(p.B * p.ntiles * p.H <= INT32_MAX, "knowledge_attention (CUDA): too many CTAs (B*H too large)");
}

size_t token_kernel_smem(const Params& p, int64_t dh, int64_t elem) {
  return static_cast<size_t>(p.nc) * (2 * dh * elem + 4);
}

void fill_common(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor* indices, const at::Tensor& bias, const at::Tensor& beta,
                 int64_t N, double dropout_p, int64_t seed) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.idx = indices ? indices->data_ptr<int64_t>() : nullptr;
  p.bias = bias.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.B = q.size(0);
  p.T = q.size(1);
  p.H = q.size(2);
  p.N = N;
  p.M = indices ? k.size(0) : 0;
  p.seed = static_cast<uint64_t>(seed);
  p.thr = dropout_threshold(dropout_p);
  p.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
}

std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                            const at::Tensor& v_in, const at::Tensor* indices,
                                            const at::Tensor& bias, const at::Tensor& beta,
                                            double dropout_p, int64_t seed) {
  const int64_t N = check_inputs(q_in, k_in, v_in, indices, bias, beta, dropout_p);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in);
  const at::Tensor k = indices ? k_in : aligned(k_in);
  const at::Tensor v = indices ? v_in : aligned(v_in);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  at::Tensor out = at::empty_like(q);                            // [B, T, H, Dh]
  at::Tensor lse = at::empty({B, T, H}, q.options().dtype(at::kFloat));  // [B, T, H]
  Params p{};
  fill_common(p, q, k, v, indices, bias, beta, N, dropout_p, seed);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int64_t elem = q.element_size();
  plan_token_kernel(p, Dh, elem);
  const size_t smem = token_kernel_smem(p, Dh, elem);
  const dim3 grid(static_cast<unsigned>(B * p.ntiles * H));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), Dh, dropout_p > 0.0, [&](auto tag, auto dhc, auto drop) {
    using T_ = typename decltype(tag)::type;
    ka_fwd_kernel<T_, decltype(dhc)::value, decltype(drop)::value><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor* indices, const at::Tensor& bias,
    const at::Tensor& beta, const at::Tensor& out_in, const at::Tensor& lse, double dropout_p,
    int64_t seed) {
  const int64_t N = check_inputs(q_in, k_in, v_in, indices, bias, beta, dropout_p);
  check_like_q(grad_out_in, "grad_out", q_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "knowledge_attention (CUDA): grad_out must have q's shape ",
              q_in.sizes(), ", got ", grad_out_in.sizes());
  check_like_q(out_in, "out", q_in);
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "knowledge_attention (CUDA): out must have q's shape ",
              q_in.sizes(), ", got ", out_in.sizes());
  check_cuda(lse, "lse", q_in);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "knowledge_attention (CUDA): lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q_in.size(0) && lse.size(1) == q_in.size(1) &&
                  lse.size(2) == q_in.size(2),
              "knowledge_attention (CUDA): lse must be [B, T, H], got ", lse.sizes());
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in);
  const at::Tensor k = indices ? k_in : aligned(k_in);
  const at::Tensor v = indices ? v_in : aligned(v_in);
  const at::Tensor grad_out = aligned(grad_out_in);
  const at::Tensor out = aligned(out_in);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const int64_t elem = q.element_size();
  const auto f32 = q.options().dtype(at::kFloat);

  at::Tensor dq = at::empty_like(q);                                   // [B, T, H, Dh]
  at::Tensor dk = at::empty({B, N, H, Dh}, q.options());               // per row (gather: rows)
  at::Tensor dv = at::empty({B, N, H, Dh}, q.options());
  at::Tensor dbias = at::empty({B, N}, f32);
  at::Tensor dbeta = at::empty({H}, f32);
  at::Tensor dws = at::empty({B, T, H}, f32);                          // D = dO . out

  Params p{};
  fill_common(p, q, k, v, indices, bias, beta, N, dropout_p, seed);
  p.dout = grad_out.data_ptr();
  p.out = out.data_ptr();
  p.o = dq.data_ptr();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dws = dws.data_ptr<float>();

  // dk/dv kernel geometry: rows per CTA (<= groups, balanced), token splits for enough CTAs.
  const int64_t groups = kThreads / (Dh / kVec);
  const int64_t nchunk2 = ceil_div(N, groups);
  p.nc2 = static_cast<int>(ceil_div(N, nchunk2));
  p.nchunk2 = static_cast<int>(ceil_div(N, p.nc2));
  const int64_t tok_bytes = 2 * Dh * elem + 8;
  p.tq = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(4, (kTokSmemBudget / tok_bytes) / 4 * 4)));
  const int64_t target = 8 * static_cast<int64_t>(num_sms());
  const int64_t base = B * H * p.nchunk2;
  int64_t nsplit = std::min(ceil_div(T, 64), std::max<int64_t>(1, ceil_div(target, base)));
  p.tokens_per_split = ceil_div(T, nsplit);
  p.nsplit = ceil_div(T, p.tokens_per_split);
  TORCH_CHECK(base * p.nsplit <= INT32_MAX, "knowledge_attention (CUDA): too many CTAs (B*H too large)");
  at::Tensor dk_part = at::empty({p.nsplit, B, N, H, Dh}, f32);
  at::Tensor dv_part = at::empty({p.nsplit, B, N, H, Dh}, f32);
  at::Tensor sds_part = at::empty({p.nsplit, B, N, H}, f32);
  p.dk_part = dk_part.data_ptr<float>();
  p.dv_part = dv_part.data_ptr<float>();
  p.sds_part = sds_part.data_ptr<float>();

  plan_token_kernel(p, Dh, elem);
  const size_t smem1 = token_kernel_smem(p, Dh, elem);
  const size_t smem2 = static_cast<size_t>(p.tq) * tok_bytes +
                       static_cast<size_t>(groups) * (2 * Dh + 1) * sizeof(float);
  const dim3 grid1(static_cast<unsigned>(B * p.ntiles * H));
  const dim3 grid2(static_cast<unsigned>(base * p.nsplit));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), Dh, dropout_p > 0.0, [&](auto tag, auto dhc, auto drop) {
    using T_ = typename decltype(tag)::type;
    constexpr int DH = decltype(dhc)::value;
    constexpr bool DROP = decltype(drop)::value;
    ka_bwd_dq_kernel<T_, DH, DROP><<<grid1, kThreads, smem1, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ka_bwd_dkv_kernel<T_, DH, DROP><<<grid2, kThreads, smem2, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = B * N * H * Dh;
    const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), 16 * static_cast<int64_t>(num_sms()));
    ka_sum_splits_kernel<T_><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.dk_part, p.dv_part, static_cast<T_*>(dk.data_ptr()), static_cast<T_*>(dv.data_ptr()), n,
        p.nsplit);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t BN = B * N;
  const int64_t bblocks = std::min<int64_t>(ceil_div(BN, kThreads), 4 * static_cast<int64_t>(num_sms()));
  ka_dbias_kernel<<<static_cast<unsigned>(bblocks), kThreads, 0, stream>>>(
      p.sds_part, p.beta, dbias.data_ptr<float>(), BN, H, p.nsplit);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(H <= INT32_MAX, "knowledge_attention (CUDA): too many heads");
  ka_dbeta_kernel<<<static_cast<unsigned>(H), kThreads, 0, stream>>>(
      p.sds_part, p.bias, dbeta.data_ptr<float>(), BN, H, p.nsplit);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dbias, dbeta};
}

// ------------------------------------------------------------------------- op entry points

std::tuple<at::Tensor, at::Tensor> knowledge_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& beta, double dropout_p, int64_t seed) {
  return fwd_impl(q, k, v, nullptr, bias, beta, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> knowledge_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias, const at::Tensor& beta, const at::Tensor& out, const at::Tensor& lse,
    double dropout_p, int64_t seed) {
  return bwd_impl(grad_out, q, k, v, nullptr, bias, beta, out, lse, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor> gather_knowledge_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& table_k, const at::Tensor& table_v,
    const at::Tensor& indices, const at::Tensor& bias, const at::Tensor& beta, double dropout_p,
    int64_t seed) {
  return fwd_impl(q, table_k, table_v, &indices, bias, beta, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gather_knowledge_attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                    const at::Tensor& table_k, const at::Tensor& table_v,
                                    const at::Tensor& indices, const at::Tensor& bias,
                                    const at::Tensor& beta, const at::Tensor& out,
                                    const at::Tensor& lse, double dropout_p, int64_t seed) {
  return bwd_impl(grad_out, q, table_k, table_v, &indices, bias, beta, out, lse, dropout_p, seed);
}

}  // namespace
}  // namespace ka
}  // namespace pluglm

TORCH_LIBRARY_IMPL(pluglm, CUDA, m) {
  m.impl("_C_knowledge_attention_fwd", &pluglm::ka::knowledge_attention_fwd_cuda);
  m.impl("_C_knowledge_attention_bwd", &pluglm::ka::knowledge_attention_bwd_cuda);
  m.impl("_C_gather_knowledge_attention_fwd", &pluglm::ka::gather_knowledge_attention_fwd_cuda);
  m.impl("_C_gather_knowledge_attention_bwd", &pluglm::ka::gather_knowledge_attention_bwd_cuda);
}
