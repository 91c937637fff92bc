// Exact MIPS with a fused streaming top-k on CUDA: pluglm::_C_mips_topk for CUDA tensors.
//
// queries [B, d] (f32, or f16/bf16 matching the keys; any of them with int8 keys);
// keys [M, d] row-major f32/f16/bf16, or int8 with key_scales [M] f32 (score = scale * q.k);
// valid [M] bool (False rows never returned). Returns scores [B, k] f32 descending and
// indices [B, k] int64; equal scores ordered by lower index; missing rows -> (-inf, -1).
//
// Design (one pass over the keys, the [B, M] score matrix never exists):
// * A (score, index) pair is packed into one int64 whose signed order is "higher score,
//   then lower index" (mips_pack.cuh), so selection is integer comparison and ties are
//   deterministic without special cases.
// * Stage 1: grid (key splits, query tiles). A 256-thread block holds QT = 16*NQF queries
//   and streams its split in tiles of 64 keys x 64 dims: each thread keeps its share of the
//   NEXT chunk in flight in registers (16-byte loads when the row pitch allows) while the
//   block computes the current one from shared memory. fp16/bf16 (and int8 keys converted
//   exactly to the queries' 16-bit type) use the tensor cores through WMMA with fp32
//   accumulation; fp32 uses CUDA-core FMAs (TF32 would break exactness).
// * Selection: one warp per query keeps a queue of 2*QK packed values: QK sorted best and
//   a QK-slot staging area. A tile's candidates are filtered against the query's current
//   k-th best (a ballot; after warm-up almost nothing passes), appended with warp-aggregated
//   offsets, and when staging would overflow the warp bitonic-sorts the queue and raises the
//   threshold. Queues live in shared memory for k <= 64, else in a global scratch buffer.
// * Stage 2: at::topk over the [B, splits * k] packed candidates, then an unpack kernel.
// Extra memory: B*splits*k*8 bytes of candidates (+ the scratch for large k), both capped
// near 48 MB by the choice of splits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../kernel_limits.h"
#include "mips_pack.cuh"

namespace pluglm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTN = 64;  // keys per tile
constexpr int kDK = 64;  // dims per chunk
constexpr int kElemsPerThread = kTN * kDK / kThreads;  // 16
constexpr int64_t kScratchCap = 48ll << 20;

template <class T>
__device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class CT>
struct Layout {
  // Row pitches (elements). 16-bit: +8 keeps WMMA's 32-byte alignment and spreads banks;
  // f32 (FMA path): +1 makes the 16 key rows a half-warp reads hit distinct banks.
  static constexpr bool kTensorCore = sizeof(CT) == 2;
  static constexpr int kLdk = kDK + (kTensorCore ? 8 : 1);
  static constexpr int kLds = kTN + 4;
};

__host__ __device__ constexpr int64_t align128(int64_t x) { return (x + 127) / 128 * 128; }

struct SmemPlan {
  int64_t ks, qs, ss, queue, cnt, thr, total;
};

template <class CT>
__host__ __device__ SmemPlan smem_plan(int qt, int qk, bool queue_in_smem) {
  SmemPlan p;
  p.ks = 0;
  p.qs = p.ks + align128(int64_t(kTN) * Layout<CT>::kLdk * sizeof(CT));
  p.ss = p.qs + align128(int64_t(qt) * Layout<CT>::kLdk * sizeof(CT));
  p.queue = p.ss + align128(int64_t(qt) * Layout<CT>::kLds * sizeof(float));
  p.cnt = p.queue + (queue_in_smem ? align128(int64_t(qt) * 2 * qk * sizeof(long long)) : 0);
  p.thr = p.cnt + align128(int64_t(qt) * sizeof(int));
  p.total = p.thr + align128(int64_t(qt) * sizeof(long long));
  return p;
}

struct Params {
  const void* q;           // [B, d]
  const void* keys;        // [M, d]
  const float* scales;     // [M] or null
  const uint8_t* valid;    // [M] or null
  long long* cand;         // [B, splits, k]
  long long* scratch;      // per-block queues when they do not fit in shared memory
  int64_t B, M, d, rows_per_split;
  int k, qk, splits, qtile_offset;
  bool vec_ok;             // 16-byte key loads legal (aligned base and row pitch)
  bool queue_in_smem;
};

// Bitonic sort, descending, of n (power of two) packed values by one warp.
__device__ __forceinline__ void warp_sort_desc(long long* a, int n, int lane) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = lane; i < (n >> 1); i += 32) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const long long x = a[lo], y = a[hi];
        if ((x < y) == desc) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncwarp();
    }
  }
}

// Sorts queue[0, 2qk) so the best qk come first, empties the staging half, and returns the
// new k-th best (the sentinel while fewer than k candidates were seen).
__device__ __forceinline__ long long warp_merge(long long* queue, int qk, int k, int lane) {
  __syncwarp();
  warp_sort_desc(queue, 2 * qk, lane);
  for (int i = lane; i < qk; i += 32) queue[qk + i] = kMipsSentinel;
  __syncwarp();
  return queue[k - 1];
}

// One 16-byte vector of keys, viewed as elements without going through local memory.
template <class KT>
union KeyVec {
  uint4 raw;
  KT e[16 / sizeof(KT)];
};

template <class KT>
struct KeyRegs {
  static constexpr int kVec = 16 / int(sizeof(KT));
  static constexpr int kNv = kElemsPerThread / kVec;
  KeyVec<KT> v[kNv];
};

// This thread's share of a [kTN, kDK] key chunk: vector j covers row (tid + 256 j) * kVec / kDK.
template <class KT>
__device__ __forceinline__ void load_chunk(const KT* __restrict__ keys, int64_t dim, bool vec_ok,
                                           int64_t tile_row0, int64_t row_end, int64_t d0,
                                           KeyRegs<KT>& regs) {
  constexpr int kVec = KeyRegs<KT>::kVec;
#pragma unroll
  for (int j = 0; j < KeyRegs<KT>::kNv; ++j) {
    const int v = threadIdx.x + kThreads * j;
    const int row = (v * kVec) / kDK;
    const int col = (v * kVec) % kDK;
    const int64_t grow = tile_row0 + row;
    const int64_t gcol = d0 + col;
    if (vec_ok) {
      // d is a multiple of kVec here, so a vector is wholly inside or outside the row
      regs.v[j].raw = (grow < row_end && gcol < dim)
                          ? __ldg(reinterpret_cast<const uint4*>(keys + grow * dim + gcol))
                          : make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
      for (int t = 0; t < kVec; ++t) {
        regs.v[j].e[t] = (grow < row_end && gcol + t < dim) ? keys[grow * dim + gcol + t]
                                                            : from_f32<KT>(0.f);
      }
    }
  }
}

template <class KT, class CT>
__device__ __forceinline__ void store_chunk(const KeyRegs<KT>& regs, CT* ks) {
  constexpr int kVec = KeyRegs<KT>::kVec;
#pragma unroll
  for (int j = 0; j < KeyRegs<KT>::kNv; ++j) {
    const int v = threadIdx.x + kThreads * j;
    const int row = (v * kVec) / kDK;
    const int col = (v * kVec) % kDK;
#pragma unroll
    for (int t = 0; t < kVec; ++t)
      ks[row * Layout<CT>::kLdk + col + t] = from_f32<CT>(to_f32(regs.v[j].e[t]));
  }
}

// At least 2 resident blocks per SM: the register cap is then 128, which every variant
// fits without spills (ptxas -v, sm_90, CUDA 13.0), and shared memory allows no more than
// 2 blocks of the largest variants anyway. With no minimum, ptxas capped registers near
// 80 and spilled up to 348 B per thread (benchmarks/NOTES.md, issue 13).
template <class KT, class QT_, class CT, int NQF>
__global__ void __launch_bounds__(kThreads, 2) mips_stage1_kernel(Params p) {
  using L = Layout<CT>;
  constexpr int QT = 16 * NQF;
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemPlan plan = smem_plan<CT>(QT, p.qk, p.queue_in_smem);
  CT* ks = reinterpret_cast<CT*>(smem + plan.ks);        // [kTN][kLdk]
  CT* qs = reinterpret_cast<CT*>(smem + plan.qs);        // [QT][kLdk]
  float* ss = reinterpret_cast<float*>(smem + plan.ss);  // [QT][kLds] scores of a tile
  int* cnt_s = reinterpret_cast<int*>(smem + plan.cnt);  // [QT] staging fill
  long long* thr_s = reinterpret_cast<long long*>(smem + plan.thr);  // [QT] k-th best
  const int qtile = blockIdx.y + p.qtile_offset;
  long long* queues = p.queue_in_smem
      ? reinterpret_cast<long long*>(smem + plan.queue)
      : p.scratch + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * QT * 2 * p.qk;  // [QT][2qk]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t q0 = int64_t(qtile) * QT;
  const int64_t row_lo = int64_t(blockIdx.x) * p.rows_per_split;
  const int64_t row_hi = min(row_lo + p.rows_per_split, p.M);
  const QT_* qg = static_cast<const QT_*>(p.q);

  for (int i = tid; i < QT * 2 * p.qk; i += kThreads) queues[i] = kMipsSentinel;
  for (int i = tid; i < QT; i += kThreads) {
    cnt_s[i] = 0;
    thr_s[i] = kMipsSentinel;
  }

  const int nchunks = int((p.d + kDK - 1) / kDK);
  const int64_t ntiles = row_hi > row_lo ? (row_hi - row_lo + kTN - 1) / kTN : 0;
  const int64_t nsteps = ntiles * nchunks;

  // Per-thread accumulators: WMMA fragments (tensor cores) or a NQF x 4 micro-tile (FMA).
  constexpr int kPairs = NQF * (kTN / 16);                 // (query frag, key frag) pairs
  constexpr int kPairsPerWarp = (kPairs + kWarps - 1) / kWarps;
  using namespace nvcuda;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  AccFrag acc_frag[L::kTensorCore ? kPairsPerWarp : 1];
  float acc[L::kTensorCore ? 1 : NQF][L::kTensorCore ? 1 : kTN / 16];
  const int tq = tid / 16, tk = tid % 16;  // FMA path: queries tq+16i, keys tk+16j

  KeyRegs<KT> reg;
  const KT* kg = static_cast<const KT*>(p.keys);
  const int64_t dim = p.d;
  const bool vec_ok = p.vec_ok;
  if (nsteps > 0) load_chunk<KT>(kg, dim, vec_ok, row_lo, row_hi, 0, reg);

  // (tile, chunk) of a step are counted, not divided out of it: a 64-bit division is a
  // called subroutine on the GPU (two CALLs per step in the SASS, registers saved around
  // each).
  int64_t tile = 0;
  int c = 0;
  for (int64_t step = 0; step < nsteps; ++step) {
    int next_c = c + 1;
    int64_t next_tile = tile;
    if (next_c == nchunks) {
      next_c = 0;
      ++next_tile;
    }
    const int64_t tile_row0 = row_lo + tile * kTN;
    const int64_t d0 = int64_t(c) * kDK;
    __syncthreads();  // the previous chunk's readers are done with ks / qs
    store_chunk<KT, CT>(reg, ks);
    for (int i = tid; i < QT * kDK; i += kThreads) {
      const int r = i / kDK, col = i % kDK;
      const int64_t gq = q0 + r, gd = d0 + col;
      qs[r * L::kLdk + col] =
          from_f32<CT>((gq < p.B && gd < p.d) ? to_f32(qg[gq * p.d + gd]) : 0.f);
    }
    __syncthreads();
    if (step + 1 < nsteps) {  // next chunk in flight while this one is multiplied
      load_chunk<KT>(kg, dim, vec_ok, row_lo + next_tile * kTN, row_hi, int64_t(next_c) * kDK,
                     reg);
    }

    if constexpr (L::kTensorCore) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
      __trap();  // bf16 WMMA needs sm_80+; the extension is built for sm_80 and newer
#else
      if (c == 0) {
#pragma unroll
        for (int pp = 0; pp < kPairsPerWarp; ++pp) wmma::fill_fragment(acc_frag[pp], 0.f);
      }
#pragma unroll
      for (int kk = 0; kk < kDK / 16; ++kk) {
#pragma unroll
        for (int pp = 0; pp < kPairsPerWarp; ++pp) {
          const int pr = warp + kWarps * pp;
          if (pr < kPairs) {
            const int qf = pr / (kTN / 16), nf = pr % (kTN / 16);
            wmma::fragment<wmma::matrix_a, 16, 16, 16, CT, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, CT, wmma::col_major> b;
            wmma::load_matrix_sync(a, qs + qf * 16 * L::kLdk + kk * 16, L::kLdk);
            wmma::load_matrix_sync(b, ks + nf * 16 * L::kLdk + kk * 16, L::kLdk);
            wmma::mma_sync(acc_frag[pp], a, b, acc_frag[pp]);
          }
        }
      }
      if (c == nchunks - 1) {
#pragma unroll
        for (int pp = 0; pp < kPairsPerWarp; ++pp) {
          const int pr = warp + kWarps * pp;
          if (pr < kPairs) {
            const int qf = pr / (kTN / 16), nf = pr % (kTN / 16);
            wmma::store_matrix_sync(ss + qf * 16 * L::kLds + nf * 16, acc_frag[pp], L::kLds,
                                    wmma::mem_row_major);
          }
        }
      }
#endif
    } else {
      if (c == 0) {
#pragma unroll
        for (int i = 0; i < NQF; ++i)
#pragma unroll
          for (int j = 0; j < kTN / 16; ++j) acc[i][j] = 0.f;
      }
#pragma unroll 4
      for (int dd = 0; dd < kDK; ++dd) {
        float kv[kTN / 16];
#pragma unroll
        for (int j = 0; j < kTN / 16; ++j) kv[j] = to_f32(ks[(tk + 16 * j) * L::kLdk + dd]);
#pragma unroll
        for (int i = 0; i < NQF; ++i) {
          const float qv = to_f32(qs[(tq + 16 * i) * L::kLdk + dd]);
#pragma unroll
          for (int j = 0; j < kTN / 16; ++j) acc[i][j] = fmaf(qv, kv[j], acc[i][j]);
        }
      }
      if (c == nchunks - 1) {
#pragma unroll
        for (int i = 0; i < NQF; ++i)
#pragma unroll
          for (int j = 0; j < kTN / 16; ++j) ss[(tq + 16 * i) * L::kLds + tk + 16 * j] = acc[i][j];
      }
    }

    if (c == nchunks - 1) {
      __syncthreads();  // the tile's scores are in ss
      for (int qi = warp; qi < QT; qi += kWarps) {
        if (q0 + qi >= p.B) break;
        long long* queue = queues + int64_t(qi) * 2 * p.qk;
        int cnt = cnt_s[qi];
        long long thr = thr_s[qi];
        for (int base = 0; base < kTN; base += 32) {
          const int n = base + lane;
          const int64_t row = tile_row0 + n;
          bool ok = row < row_hi;
          if (ok && p.valid != nullptr) ok = p.valid[row] != 0;
          long long packed = kMipsSentinel;
          if (ok) {
            float s = ss[qi * L::kLds + n];
            if (p.scales != nullptr) s *= p.scales[row];
            // NaN (a NaN key row or scale) packs above +inf (sign bit clear): never a
            // candidate, as on the CPU kernel and the reference. Tested after the scale.
            if (s != s) ok = false;
            else packed = mips_pack(s, row);
          }
          bool take = ok && packed > thr;
          unsigned ballot = __ballot_sync(0xffffffffu, take);
          if (ballot == 0u) continue;
          if (cnt + __popc(ballot) > p.qk) {  // staging would overflow: merge first
            thr = warp_merge(queue, p.qk, p.k, lane);
            cnt = 0;
            take = ok && packed > thr;
            ballot = __ballot_sync(0xffffffffu, take);
          }
          if (take) queue[p.qk + cnt + __popc(ballot & ((1u << lane) - 1u))] = packed;
          cnt += __popc(ballot);
        }
        __syncwarp();
        if (lane == 0) {
          cnt_s[qi] = cnt;
          thr_s[qi] = thr;
        }
      }
    }
    c = next_c;
    tile = next_tile;
  }

  __syncthreads();
  for (int qi = warp; qi < QT; qi += kWarps) {
    const int64_t gq = q0 + qi;
    if (gq >= p.B) break;
    long long* queue = queues + int64_t(qi) * 2 * p.qk;
    if (cnt_s[qi] > 0) warp_merge(queue, p.qk, p.k, lane);
    long long* out = p.cand + (gq * p.splits + blockIdx.x) * p.k;
    for (int j = lane; j < p.k; j += 32) out[j] = queue[j];
  }
}

__global__ void mips_unpack_kernel(const long long* __restrict__ packed, float* __restrict__ scores,
                                   int64_t* __restrict__ indices, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long v = packed[i];
  if (v == kMipsSentinel) {
    scores[i] = -INFINITY;
    indices[i] = -1;
  } else {
    scores[i] = mips_unpack_score(v);
    indices[i] = mips_unpack_index(v);
  }
}

int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Runs stage 1 and returns the candidates [B, splits, k] (packed int64).
template <class KT, class QT_, class CT, int NQF>
at::Tensor launch_stage1(Params p, const at::Tensor& queries) {
  constexpr int QT = 16 * NQF;
  auto kernel = mips_stage1_kernel<KT, QT_, CT, NQF>;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t optin = prop->sharedMemPerBlockOptin;
  const int64_t n_qtiles = (p.B + QT - 1) / QT;

  p.queue_in_smem = p.qk <= 64 && smem_plan<CT>(QT, p.qk, true).total <= optin;
  const int64_t smem = smem_plan<CT>(QT, p.qk, p.queue_in_smem).total;
  TORCH_CHECK(smem <= optin, "mips_topk: needs ", smem, " bytes of shared memory, the device has ",
              optin);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
  }
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads,
                                                                size_t(smem)));
  blocks_per_sm = std::max(blocks_per_sm, 1);
  // One resident wave of long-running blocks streams the keys; splits shrink when the
  // candidates or the scratch queues would pass the memory budget.
  const int64_t wave = int64_t(prop->multiProcessorCount) * blocks_per_sm;
  int64_t splits = std::max<int64_t>(1, wave / n_qtiles);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (p.M + 8 * kTN - 1) / (8 * kTN)));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, kScratchCap / (p.B * p.k * 8)));
  const int64_t per_block_scratch = p.queue_in_smem ? 0 : int64_t(QT) * 2 * p.qk * 8;
  if (per_block_scratch > 0)
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, kScratchCap / per_block_scratch));
  int64_t rows_per_split = (p.M + splits - 1) / splits;
  rows_per_split = (rows_per_split + kTN - 1) / kTN * kTN;
  splits = (p.M + rows_per_split - 1) / rows_per_split;
  p.rows_per_split = rows_per_split;
  p.splits = int(splits);
  TORCH_CHECK(splits <= INT32_MAX, "mips_topk: too many key splits");

  int64_t qtiles_per_launch = std::min<int64_t>(n_qtiles, 65535);
  at::Tensor scratch;  // [qtiles_per_launch, splits, QT, 2 * qk] when queues are global
  if (per_block_scratch > 0) {
    qtiles_per_launch = std::max<int64_t>(1, std::min<int64_t>(
        qtiles_per_launch, kScratchCap / (per_block_scratch * splits)));
    scratch = at::empty({qtiles_per_launch * splits * QT * 2 * p.qk},
                        queries.options().dtype(at::kLong));
    p.scratch = reinterpret_cast<long long*>(scratch.data_ptr<int64_t>());
  }
  at::Tensor cand = at::empty({p.B, splits, p.k}, queries.options().dtype(at::kLong));
  p.cand = reinterpret_cast<long long*>(cand.data_ptr<int64_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  // Launches on one stream run in order, so waves of query tiles can share the scratch;
  // the caching allocator keeps it alive for work already queued on this stream.
  for (int64_t t0 = 0; t0 < n_qtiles; t0 += qtiles_per_launch) {
    const int64_t nt = std::min(qtiles_per_launch, n_qtiles - t0);
    p.qtile_offset = int(t0);
    const dim3 grid{unsigned(splits), unsigned(nt), 1u};
    kernel<<<grid, kThreads, size_t(smem), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cand;
}

template <class KT, class QT_, class CT>
at::Tensor dispatch_nqf(const Params& p, const at::Tensor& queries) {
  // Queries per block: enough to reuse each key read across the batch, few enough that
  // large-k queues (global scratch) stay bounded.
  if (p.qk > 64 || p.B <= 16) return launch_stage1<KT, QT_, CT, 1>(p, queries);
  if (p.B <= 32) return launch_stage1<KT, QT_, CT, 2>(p, queries);
  return launch_stage1<KT, QT_, CT, 4>(p, queries);
}

std::tuple<at::Tensor, at::Tensor> mips_topk_cuda(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  const std::optional<at::Tensor>& key_scales,
                                                  const std::optional<at::Tensor>& valid) {
  TORCH_CHECK(queries.is_cuda() && keys.is_cuda(), "mips_topk (cuda): queries and keys must be CUDA tensors");
  TORCH_CHECK(queries.dim() == 2, "mips_topk: queries must be [B, d], got ", queries.sizes());
  TORCH_CHECK(keys.dim() == 2, "mips_topk: keys must be [M, d], got ", keys.sizes());
  TORCH_CHECK(queries.device() == keys.device(), "mips_topk: keys must be on ", queries.device());
  const int64_t B = queries.size(0), d = queries.size(1), M = keys.size(0);
  TORCH_CHECK(B >= 1 && d >= 1, "mips_topk: queries must be non-empty, got ", queries.sizes());
  TORCH_CHECK(M >= 1, "mips_topk: keys must have at least one row");
  TORCH_CHECK(keys.size(1) == d, "mips_topk: keys must have ", d, " columns, got ", keys.sizes());
  TORCH_CHECK(k >= 1 && k <= pluglm::kMaxK && k <= M, "mips_topk: k must be in [1, min(",
              pluglm::kMaxK, ", M=", M, ")], got ", k);
  TORCH_CHECK(M <= kMipsMaxRows, "mips_topk: keys has ", M, " rows; at most ", kMipsMaxRows);
  // torch's rule, as the Python wrapper and the CPU kernel apply it: a dimension of size 1
  // may have any stride (an [1, d] row view of a wider table is contiguous). The kernel
  // only forms row * d + col, so a stride that is never stepped over is never read.
  TORCH_CHECK(keys.is_contiguous(), "mips_topk: keys must be contiguous row-major [M, d], got strides ",
              keys.strides());
  const auto kdt = keys.scalar_type(), qdt = queries.scalar_type();
  TORCH_CHECK(kdt == at::kFloat || kdt == at::kHalf || kdt == at::kBFloat16 || kdt == at::kChar,
              "mips_topk: keys must be float32, float16, bfloat16 or int8, got ", kdt);
  TORCH_CHECK(qdt == at::kFloat || qdt == at::kHalf || qdt == at::kBFloat16,
              "mips_topk: queries must be float32, float16 or bfloat16, got ", qdt);
  const bool is_int8 = kdt == at::kChar;
  at::Tensor scales;
  if (is_int8) {
    TORCH_CHECK(key_scales.has_value(), "mips_topk: int8 keys need key_scales [M] float32");
    scales = key_scales->contiguous();
    TORCH_CHECK(scales.is_cuda() && scales.device() == keys.device(),
                "mips_topk: key_scales must be on ", keys.device());
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == M,
                "mips_topk: key_scales must be float32 [M=", M, "], got ", scales.scalar_type(),
                " ", scales.sizes());
  } else {
    TORCH_CHECK(!key_scales.has_value(), "mips_topk: key_scales is only for int8 keys");
    TORCH_CHECK(qdt == at::kFloat || qdt == kdt, "mips_topk: queries must be float32 or the keys' dtype ",
                kdt, ", got ", qdt);
  }
  at::Tensor vmask;
  if (valid.has_value()) {
    vmask = valid->contiguous();
    TORCH_CHECK(vmask.is_cuda() && vmask.device() == keys.device(), "mips_topk: valid must be on ",
                keys.device());
    TORCH_CHECK(vmask.scalar_type() == at::kBool && vmask.dim() == 1 && vmask.size(0) == M,
                "mips_topk: valid must be bool [M=", M, "], got ", vmask.scalar_type(), " ",
                vmask.sizes());
  }
  c10::cuda::CUDAGuard guard(queries.device());
  const at::Tensor q = queries.contiguous();

  Params p{};
  p.q = q.data_ptr();
  p.keys = keys.data_ptr();
  p.scales = is_int8 ? scales.data_ptr<float>() : nullptr;
  p.valid = valid.has_value() ? reinterpret_cast<const uint8_t*>(vmask.data_ptr<bool>()) : nullptr;
  p.B = B;
  p.M = M;
  p.d = d;
  p.k = int(k);
  p.qk = std::max(32, next_pow2(int(k)));
  p.vec_ok = (reinterpret_cast<uintptr_t>(keys.data_ptr()) % 16 == 0) &&
             ((d * int64_t(keys.element_size())) % 16 == 0);

  at::Tensor cand;
  if (kdt == at::kFloat) {
    cand = dispatch_nqf<float, float, float>(p, q);
  } else if (kdt == at::kHalf) {
    cand = qdt == at::kHalf ? dispatch_nqf<__half, __half, __half>(p, q)
                            : dispatch_nqf<__half, float, float>(p, q);
  } else if (kdt == at::kBFloat16) {
    cand = qdt == at::kBFloat16 ? dispatch_nqf<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(p, q)
                                : dispatch_nqf<__nv_bfloat16, float, float>(p, q);
  } else if (qdt == at::kHalf) {  // int8 keys: exact in the queries' 16-bit type
    cand = dispatch_nqf<int8_t, __half, __half>(p, q);
  } else if (qdt == at::kBFloat16) {
    cand = dispatch_nqf<int8_t, __nv_bfloat16, __nv_bfloat16>(p, q);
  } else {
    cand = dispatch_nqf<int8_t, float, float>(p, q);
  }

  const int64_t splits = cand.size(1);
  at::Tensor top = splits == 1 ? cand.view({B, k})
                               : std::get<0>(at::topk(cand.view({B, splits * k}), k, 1,
                                                      /*largest=*/true, /*sorted=*/true));
  top = top.contiguous();
  at::Tensor scores = at::empty({B, k}, q.options().dtype(at::kFloat));   // [B, k]
  at::Tensor indices = at::empty({B, k}, q.options().dtype(at::kLong));   // [B, k]
  const int64_t n = B * k;
  const int threads = 256;
  mips_unpack_kernel<<<unsigned((n + threads - 1) / threads), threads, 0,
                       at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const long long*>(top.data_ptr<int64_t>()), scores.data_ptr<float>(),
      indices.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, indices};
}

}  // namespace
}  // namespace pluglm

TORCH_LIBRARY_IMPL(pluglm, CUDA, m) { m.impl("_C_mips_topk", &pluglm::mips_topk_cuda); }
