// C++ CPU (OpenMP via at::parallel_for) kernel of pluglm::_C_mips_topk: exact top-k inner
// product that reads each key once and never materialises the [B, M] score matrix.
//
// Design. The key rows are split into one contiguous partition per thread. A thread walks
// its partition in blocks of keys (converted to float32 in a small per-thread buffer for
// f16/bf16/int8), scores each block against every query with a register-blocked
// micro-kernel (queries along the SIMD lanes, keys broadcast; SIMD along d when B <= 4),
// and keeps a bounded min-heap of the best k (score, index) pairs per query. The micro-kernel also compares its scores
// with each query's current k-th best, so almost every tile is discarded without leaving
// registers. At the end the per-thread heaps are merged and sorted by (score desc, index
// asc). Extra memory: per thread one key block (<= ~256 KB) + heaps [B, k]; never O(M).
// B = 1 on AVX-512 skips the block buffer: scan_b1_avx512 widens each key row in registers
// and scores 16 rows per step: a search that reads every key once is bandwidth-bound only
// if a row's work (~7 ns per thread for 128 int8 columns here) stays below the ~11 ns a
// 132-byte row takes to arrive at ~12 GB/s. B = 1 over int8 keys on a CPU with AVX-512 VNNI
// goes further: integer dots against the query quantised to 30 bits (scan_b1_i8_vnni), 3
// instructions per 32 columns instead of 3 per 16.
//
// Determinism. Every score is the same sequence of fused multiply-adds over c = 0..d-1 (for
// B <= 4, 16 strided chains and a fixed horizontal sum) whatever the partition, block or
// thread count: the sequence depends only on the instruction set picked for the call (and,
// for B = 1 over int8 keys, on whether the VNNI path runs: PLUGLM_CPU_VNNI=0 turns it off)
// and on B, which picks the kernel. The heaps and the merge use the total order (score desc, index
// asc). So results do not depend on the number of threads, and copies of a key tie exactly
// and come out lower index first. A NaN score (NaN in a key row) is never selected.
//
// Some B go instead through the BLAS GEMM that torch links, then a SIMD selection
// (search_gemm below: per thread a key block times a query chunk into an L2-sized score
// block; the dispatch rule and its measurements are there).
//
// Instruction sets: AVX-512F and AVX2+FMA+F16C kernels are compiled with target attributes
// and picked per call by isa.h (PLUGLM_CPU_ISA=avx512|avx2|scalar caps the choice; tests
// use it to exercise each path); a portable scalar kernel covers everything else.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "../kernel_limits.h"
#include "isa.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define PLUGLM_X86 1
#endif

namespace {

using pluglm::kMaxK;
using pluglm::cpu::Isa;
using pluglm::cpu::active_isa;

// Keys per block: about this many bytes of float32 rows, so a block stays in L2 while
// every query chunk sweeps it.
constexpr int64_t kBlockBytes = 192 * 1024;

enum class KeyType { F32, F16, BF16, I8 };

// ------------------------------------------------------------------------ micro-kernels
//
// A kernel scores NR key rows (float32, row r at rows + r * ld, d columns) against one
// query chunk of CW queries packed as qt [d][CW] (zero in padded lanes), into
// tile [NR][CW]. It returns whether any score is >= the query's threshold thr [CW]
// (padded lanes hold +inf), and only then writes the tile: the common case touches no
// memory but the inputs.
using KernelFn = bool (*)(const float* qt, const float* rows, int64_t ld, int64_t d,
                          const float* thr, float* tile);
// Converts n values of one key row into float32, times `scale` (int8 only; 1 otherwise).
using ConvertFn = void (*)(const void* src, KeyType kt, float scale, float* dst, int64_t n);

struct Impl {
  KernelFn kernel;
  int cw;  // queries per chunk (SIMD lanes x vectors)
  int nr;  // keys per kernel call
  ConvertFn convert;
  bool q_rows = false;  // queries packed [CW][d] (dot-product kernels), not [d][CW]
  bool scan_b1 = false;  // B = 1 on AVX-512: scan_b1_avx512 reads the key rows in place
};

template <int CW, int NR>
bool kernel_scalar(const float* qt, const float* rows, int64_t ld, int64_t d,
                   const float* thr, float* tile) {
  float acc[NR][CW];
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < CW; ++l) acc[r][l] = 0.f;
  for (int64_t c = 0; c < d; ++c) {
    const float* q = qt + c * CW;
    for (int r = 0; r < NR; ++r) {
      const float kv = rows[r * ld + c];
      for (int l = 0; l < CW; ++l) acc[r][l] = std::fma(q[l], kv, acc[r][l]);
    }
  }
  bool any = false;
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < CW; ++l) any |= acc[r][l] >= thr[l];
  if (any) std::memcpy(tile, acc, sizeof(acc));
  return any;
}

void convert_scalar(const void* src, KeyType kt, float scale, float* dst, int64_t n) {
  switch (kt) {
    case KeyType::F32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case KeyType::F16: {
      const c10::Half* s = static_cast<const c10::Half*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      break;
    }
    case KeyType::BF16: {
      const c10::BFloat16* s = static_cast<const c10::BFloat16*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      break;
    }
    case KeyType::I8: {
      const int8_t* s = static_cast<const int8_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * scale;
      break;
    }
  }
}

#ifdef PLUGLM_X86

// NV vectors of 16 queries x NR keys: NV * NR accumulators (24 of the 32 zmm registers);
// the key value is an embedded-broadcast memory operand of the FMA.
template <int NV, int NR>
__attribute__((target("avx512f"))) bool kernel_avx512(const float* qt, const float* rows,
                                                      int64_t ld, int64_t d, const float* thr,
                                                      float* tile) {
  constexpr int CW = 16 * NV;
  __m512 acc[NR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m512 q[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) q[v] = _mm512_loadu_ps(qt + c * CW + 16 * v);
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) {
      const __m512 kv = _mm512_set1_ps(rows[r * ld + c]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(q[v], kv, acc[r][v]);
    }
  }
  __mmask16 hit = 0;
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512 t = _mm512_loadu_ps(thr + 16 * v);
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) hit |= _mm512_cmp_ps_mask(acc[r][v], t, _CMP_GE_OQ);
  }
  if (!hit) return false;
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(tile + r * CW + 16 * v, acc[r][v]);
  return true;
}

// Few queries (B <= 4): SIMD along d instead, so lanes are not wasted on absent queries.
// NR keys x NQ queries accumulate 16-wide partial dot products (a masked load covers the
// tail of d), then each is reduced horizontally. qt holds the queries row-major [NQ][d].
template <int NQ, int NR>
__attribute__((target("avx512f"))) bool kernel_dot_avx512(const float* qt, const float* rows,
                                                          int64_t ld, int64_t d,
                                                          const float* thr, float* tile) {
  __m512 acc[NR][NQ];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NQ; ++b) acc[r][b] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    __m512 q[NQ];
#pragma GCC unroll 4
    for (int b = 0; b < NQ; ++b) q[b] = _mm512_loadu_ps(qt + b * d + c);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512 kv = _mm512_loadu_ps(rows + r * ld + c);
#pragma GCC unroll 4
      for (int b = 0; b < NQ; ++b) acc[r][b] = _mm512_fmadd_ps(q[b], kv, acc[r][b]);
    }
  }
  if (c < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - c)) - 1u);
    __m512 q[NQ];
#pragma GCC unroll 4
    for (int b = 0; b < NQ; ++b) q[b] = _mm512_maskz_loadu_ps(m, qt + b * d + c);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512 kv = _mm512_maskz_loadu_ps(m, rows + r * ld + c);
#pragma GCC unroll 4
      for (int b = 0; b < NQ; ++b) acc[r][b] = _mm512_fmadd_ps(q[b], kv, acc[r][b]);
    }
  }
  float s[NR][NQ];
  bool hit = false;
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NQ; ++b) {
      s[r][b] = _mm512_reduce_add_ps(acc[r][b]);
      hit |= s[r][b] >= thr[b];
    }
  if (hit) std::memcpy(tile, s, sizeof(s));
  return hit;
}

__attribute__((target("avx512f"))) void convert_avx512(const void* src, KeyType kt, float scale,
                                                        float* dst, int64_t n) {
  int64_t i = 0;
  switch (kt) {
    case KeyType::F32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case KeyType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i))));
      break;
    }
    case KeyType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + 16 <= n; i += 16) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      }
      break;
    }
    case KeyType::I8: {
      const int8_t* s = static_cast<const int8_t*>(src);
      const __m512 sc = _mm512_set1_ps(scale);
      for (; i + 16 <= n; i += 16) {
        const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(s + i)));
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(w), sc));
      }
      break;
    }
  }
  if (i < n) {
    const int64_t esz = kt == KeyType::I8 ? 1 : 2;
    convert_scalar(static_cast<const char*>(src) + i * esz, kt, scale, dst + i, n - i);
  }
}

// ------------------------------------------------------- B = 1: keys read in place
//
// One query scans a partition's key rows straight from the table: each 16-column piece of a
// row is widened to float32 in registers (int8: sign-extend + convert; bf16: shift; f16:
// vcvtph2ps) and fused-multiply-added with the query, 16 rows at a time; the 16 partial-sum
// vectors are reduced to one vector of 16 row scores by a transpose-add tree, int8 rows
// take their scales there (one multiply per 16 rows), and one compare against the
// threshold decides whether any of the 16 rows needs the heap. The blocked path above
// instead converted every row into a float32 buffer and reduced each row on its own: at
// B = 1 that store, reload and per-row reduction bound int8 keys to ~1/3 of the read
// bandwidth (benchmarks/NOTES.md, issue 14). A score is sum_c q_c k_c in 16 strided FMA
// chains over c (int8: of the integer values, then times the row's scale) and a fixed
// reduction order, so it depends only on the row: thread-count independence and exact ties
// of copies hold as before.

template <KeyType KT>
struct RowLoad;

template <>
struct RowLoad<KeyType::F32> {
  using T = float;
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 full(const T* p) {
    return _mm512_loadu_ps(p);
  }
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 part(const T* p,
                                                                         __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
};

template <>
struct RowLoad<KeyType::BF16> {
  using T = uint16_t;
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 full(const T* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 part(const T* p,
                                                                         __mmask16 m) {
    return widen(_mm256_maskz_loadu_epi16(m, p));
  }
};

template <>
struct RowLoad<KeyType::F16> {
  using T = uint16_t;
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 full(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 part(const T* p,
                                                                         __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};

template <>
struct RowLoad<KeyType::I8> {
  using T = int8_t;
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 full(const T* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 part(const T* p,
                                                                         __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
};

// 16 vectors -> one vector whose lane r is the sum of v[r]'s lanes, for v[] given in the
// order kReduceOrder (the tree below leaves row kReduceOrder[L] in lane L; that order is a
// 4x4 transpose, its own inverse).
constexpr int kReduceOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

__attribute__((target("avx512f"), always_inline)) inline __m512 reduce16(const __m512* acc) {
  __m512 w[8], y[4], u[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m512 a = acc[kReduceOrder[2 * i]], b = acc[kReduceOrder[2 * i + 1]];
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The 16 row pointers of the group at j0 (rows past m_end read zero_row), and a software
// prefetch of the group `ahead` rows further on.
template <typename T>
__attribute__((always_inline)) inline void group_rows(const T* keys, int64_t d, int64_t j0,
                                                      int64_t m_end, int64_t ahead,
                                                      const T* zero_row, const T** row) {
  const int64_t nr = std::min<int64_t>(16, m_end - j0);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) row[r] = r < nr ? keys + (j0 + r) * d : zero_row;
  if (j0 + ahead < m_end) {
    const char* pf = reinterpret_cast<const char*>(keys + (j0 + ahead) * d);
    const int64_t pf_bytes =
        std::min<int64_t>(16, m_end - j0 - ahead) * d * static_cast<int64_t>(sizeof(T));
    for (int64_t off = 0; off < pf_bytes; off += 64) _mm_prefetch(pf + off, _MM_HINT_T0);
  }
}

// The scores s of rows j0 .. j0 + 15 (lanes in `live`) into heap h: one compare against the
// threshold, and only the rows that reach it (and are valid) are pushed.
template <typename Heap>
__attribute__((target("avx512f"), always_inline)) inline void push_hits16(
    __m512 s, __mmask16 live, int64_t j0, const bool* vmask, Heap& h, float& thr) {
  __mmask16 hit = _mm512_mask_cmp_ps_mask(live, s, _mm512_set1_ps(thr), _CMP_GE_OQ);
  if (!hit) return;
  alignas(64) float sv[16];
  _mm512_store_ps(sv, s);
  while (hit) {
    const int r = __builtin_ctz(hit);
    hit &= static_cast<__mmask16>(hit - 1);
    const int64_t j = j0 + r;
    if (vmask && !vmask[j]) continue;
    if (sv[r] >= thr) thr = h.push(sv[r], j);
  }
}

// Scores rows [m_begin, m_end) against the one query q [d] into heap h; thr is the heap's
// threshold (-inf until it holds k rows). zero_row: d zero elements, read in place of the
// rows past m_end in the last group of 16.
template <KeyType KT, typename Heap>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void scan_b1_avx512(
    const void* keys_v, const float* scales, const bool* vmask, int64_t d, int64_t m_begin,
    int64_t m_end, const float* q, const void* zero_row_v, Heap& h, float& thr) {
  using L = RowLoad<KT>;
  using T = typename L::T;
  const T* keys = static_cast<const T*>(keys_v);
  const T* zero_row = static_cast<const T*>(zero_row_v);
  const int64_t d_full = d / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (d - d_full)) - 1u);
  // Software prefetch ~4 KB ahead of the group being read. Measured (1 thread, M = 1e6,
  // d = 128): int8 18.2 -> 13.6 ms, bf16 26.5 -> 22.8 ms; 1 KB or 16 KB ahead: the same.
  const int64_t ahead = std::max<int64_t>(16, 4096 / (d * static_cast<int64_t>(sizeof(T))));
  for (int64_t j0 = m_begin; j0 < m_end; j0 += 16) {
    const int64_t nr = std::min<int64_t>(16, m_end - j0);
    const T* row[16];
    group_rows(keys, d, j0, m_end, ahead, zero_row, row);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c < d_full; c += 16) {
      const __m512 qv = _mm512_loadu_ps(q + c);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(qv, L::full(row[r] + c), acc[r]);
    }
    if (tail) {
      const __m512 qv = _mm512_maskz_loadu_ps(tail, q + c);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r)
        acc[r] = _mm512_fmadd_ps(qv, L::part(row[r] + c, tail), acc[r]);
    }
    const __mmask16 live = static_cast<__mmask16>((1u << nr) - 1u);
    __m512 s = reduce16(acc);
    if constexpr (KT == KeyType::I8) s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(live, scales + j0));
    push_hits16(s, live, j0, vmask, h, thr);
  }
}

// ------------------------------------------- B = 1, int8 keys, AVX-512 VNNI: integer dots
//
// The float path above spends 3 instructions per 16 int8 columns (sign-extend, convert,
// FMA) and cannot keep up with the bus at B = 1 (benchmarks/NOTES.md, issue 14). Here the
// query is quantised once per call to Q_c = round(q_c / s), |Q_c| < 2^30,
// s = max|q| / (2^30 - 2^16) (a grid 2^-30 of max|q| apart: finer than float32 keeps q_c
// to relative to max|q|), and split into two int16 planes Q = Qh 2^15 + Ql, Ql in [0, 2^15).
// Each 32-column piece of a key row is sign-extended to int16 once and fed to two vpdpwssd
// (int16 pairs multiplied and added into int32 lanes, exactly): 3 instructions per 32
// columns. The lane sums are exact integers (|sum| <= 127 * 2^15 * d < 2^31 for d <= 512),
// so a row's score (Sh 2^15 + Sl) * s * scale_j depends only on the row and the query:
// thread-count independence and exact ties of copies hold as in the float path. Scores
// differ from the float path's by float rounding (~1e-7 relative); PLUGLM_CPU_VNNI=0
// selects the float path (tests compare the two).
constexpr int64_t kVnniMaxD = 512;

inline bool vnni_enabled() {
  static const bool hw = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  }();
  const char* env = std::getenv("PLUGLM_CPU_VNNI");
  return hw && !(env != nullptr && std::strcmp(env, "0") == 0);
}

__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i reduce16i(
    const __m512i* acc) {
  // reduce16 on int32 lanes (same tree: the shuffles move bits, the adds are integer)
  __m512i w[8], y[4], u[2];
#define f _mm512_castsi512_ps
#define g _mm512_castps_si512
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m512i a = acc[kReduceOrder[2 * i]], b = acc[kReduceOrder[2 * i + 1]];
    w[i] = _mm512_add_epi32(g(_mm512_shuffle_f32x4(f(a), f(b), _MM_SHUFFLE(1, 0, 1, 0))),
                            g(_mm512_shuffle_f32x4(f(a), f(b), _MM_SHUFFLE(3, 2, 3, 2))));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_epi32(
        g(_mm512_shuffle_f32x4(f(w[2 * i]), f(w[2 * i + 1]), _MM_SHUFFLE(2, 0, 2, 0))),
        g(_mm512_shuffle_f32x4(f(w[2 * i]), f(w[2 * i + 1]), _MM_SHUFFLE(3, 1, 3, 1))));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_epi32(
        g(_mm512_shuffle_ps(f(y[2 * i]), f(y[2 * i + 1]), _MM_SHUFFLE(1, 0, 1, 0))),
        g(_mm512_shuffle_ps(f(y[2 * i]), f(y[2 * i + 1]), _MM_SHUFFLE(3, 2, 3, 2))));
  return _mm512_add_epi32(g(_mm512_shuffle_ps(f(u[0]), f(u[1]), _MM_SHUFFLE(2, 0, 2, 0))),
                          g(_mm512_shuffle_ps(f(u[0]), f(u[1]), _MM_SHUFFLE(3, 1, 3, 1))));
#undef f
#undef g
}

// One query's int16 planes for scan_b1_i8_vnni: qh, ql [ceil(d / 32) * 32] (zero padded)
// and the scale s. A zero query gives s = 0 (every score 0).
struct QueryPlanes {
  std::vector<int16_t> qh, ql;
  float scale = 0.f;
};

// The planes of q [d], or null where s would not be a normal float32 (max|q| below ~1e-29
// or above ~1e47): such queries take the float path.
inline std::unique_ptr<QueryPlanes> quantise_query(const float* q, int64_t d) {
  auto p = std::make_unique<QueryPlanes>();
  const int64_t dp = (d + 31) / 32 * 32;
  p->qh.assign(static_cast<size_t>(dp), 0);
  p->ql.assign(static_cast<size_t>(dp), 0);
  double qmax = 0.0;
  for (int64_t c = 0; c < d; ++c) qmax = std::max(qmax, std::fabs(static_cast<double>(q[c])));
  if (qmax == 0.0) return p;
  const double s = qmax / static_cast<double>((int64_t{1} << 30) - (int64_t{1} << 16));
  if (!std::isnormal(static_cast<float>(s))) return nullptr;
  for (int64_t c = 0; c < d; ++c) {
    const int64_t Q = std::llrint(static_cast<double>(q[c]) / s);  // |Q| <= 2^30 - 2^16
    const int64_t hi = Q >> 15;                                      // floor(Q / 2^15)
    p->qh[c] = static_cast<int16_t>(hi);
    p->ql[c] = static_cast<int16_t>(Q - (hi << 15));                 // in [0, 2^15)
  }
  p->scale = static_cast<float>(s);
  return p;
}

template <typename Heap>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))) void scan_b1_i8_vnni(
    const int8_t* keys, const float* scales, const bool* vmask, int64_t d, int64_t m_begin,
    int64_t m_end, const QueryPlanes& qp, const int8_t* zero_row, Heap& h, float& thr) {
  const int64_t d_full = d / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (d - d_full)) - 1u);
  const int16_t* qh = qp.qh.data();
  const int16_t* ql = qp.ql.data();
  const __m512 qs = _mm512_set1_ps(qp.scale);
  const __m512 two15 = _mm512_set1_ps(32768.f);
  // lanes 2r (plane h) and 2r + 1 (plane l) of the two 8-row halves -> rows 0..15
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const int64_t ahead = std::max<int64_t>(16, 4096 / d);  // prefetch ~4 KB ahead (as above)
  for (int64_t j0 = m_begin; j0 < m_end; j0 += 16) {
    const int64_t nr = std::min<int64_t>(16, m_end - j0);
    const int8_t* row[16];
    group_rows(keys, d, j0, m_end, ahead, zero_row, row);
    __m512i half[2];
#pragma GCC unroll 2
    for (int hf = 0; hf < 2; ++hf) {
      __m512i acc[16];  // acc[2r] plane h, acc[2r + 1] plane l of row 8 hf + r
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
      int64_t c = 0;
      for (; c < d_full; c += 32) {
        const __m512i vh = _mm512_loadu_si512(qh + c), vl = _mm512_loadu_si512(ql + c);
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
          const __m512i k16 = _mm512_cvtepi8_epi16(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[8 * hf + r] + c)));
          acc[2 * r] = _mm512_dpwssd_epi32(acc[2 * r], k16, vh);
          acc[2 * r + 1] = _mm512_dpwssd_epi32(acc[2 * r + 1], k16, vl);
        }
      }
      if (tail) {
        const __m512i vh = _mm512_loadu_si512(qh + c), vl = _mm512_loadu_si512(ql + c);
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
          const __m512i k16 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(tail, row[8 * hf + r] + c));
          acc[2 * r] = _mm512_dpwssd_epi32(acc[2 * r], k16, vh);
          acc[2 * r + 1] = _mm512_dpwssd_epi32(acc[2 * r + 1], k16, vl);
        }
      }
      half[hf] = reduce16i(acc);
    }
    const __m512 sh = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(half[0], even, half[1]));
    const __m512 sl = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(half[0], odd, half[1]));
    const __mmask16 live = static_cast<__mmask16>((1u << nr) - 1u);
    __m512 s = _mm512_fmadd_ps(sh, two15, sl);
    s = _mm512_mul_ps(_mm512_mul_ps(s, qs), _mm512_maskz_loadu_ps(live, scales + j0));
    push_hits16(s, live, j0, vmask, h, thr);
  }
}

template <int NV, int NR>
__attribute__((target("avx2,fma"))) bool kernel_avx2(const float* qt, const float* rows,
                                                     int64_t ld, int64_t d, const float* thr,
                                                     float* tile) {
  constexpr int CW = 8 * NV;
  __m256 acc[NR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m256 q[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) q[v] = _mm256_loadu_ps(qt + c * CW + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m256 kv = _mm256_broadcast_ss(rows + r * ld + c);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(q[v], kv, acc[r][v]);
    }
  }
  int hit = 0;
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m256 t = _mm256_loadu_ps(thr + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) hit |= _mm256_movemask_ps(_mm256_cmp_ps(acc[r][v], t, _CMP_GE_OQ));
  }
  if (!hit) return false;
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(tile + r * CW + 8 * v, acc[r][v]);
  return true;
}

__attribute__((target("avx2,f16c"))) void convert_avx2(const void* src, KeyType kt, float scale,
                                                        float* dst, int64_t n) {
  int64_t i = 0;
  switch (kt) {
    case KeyType::F32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case KeyType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
      break;
    }
    case KeyType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(s + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
      break;
    }
    case KeyType::I8: {
      const int8_t* s = static_cast<const int8_t*>(src);
      const __m256 sc = _mm256_set1_ps(scale);
      for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(s + i)));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(w), sc));
      }
      break;
    }
  }
  if (i < n) {
    const int64_t esz = kt == KeyType::I8 ? 1 : 2;
    convert_scalar(static_cast<const char*>(src) + i * esz, kt, scale, dst + i, n - i);
  }
}

#endif  // PLUGLM_X86

// The chunk width depends only on B (and the ISA), so the FMA chain of a score, hence the
// result, is the same for every thread count and blocking.
Impl pick_impl(int64_t B) {
  const Isa isa = active_isa();
#ifdef PLUGLM_X86
  if (isa == Isa::Avx512) {
    if (B == 1) return {&kernel_dot_avx512<1, 8>, 1, 8, &convert_avx512, true, true};
    if (B == 2) return {&kernel_dot_avx512<2, 8>, 2, 8, &convert_avx512, true};
    if (B <= 4) return {&kernel_dot_avx512<4, 4>, 4, 4, &convert_avx512, true};
    if (B <= 16) return {&kernel_avx512<1, 24>, 16, 24, &convert_avx512};
    return {&kernel_avx512<2, 12>, 32, 12, &convert_avx512};
  }
  if (isa == Isa::Avx2) {
    if (B <= 8) return {&kernel_avx2<1, 12>, 8, 12, &convert_avx2};
    return {&kernel_avx2<2, 6>, 16, 6, &convert_avx2};
  }
#endif
  (void)B;
  return {&kernel_scalar<8, 4>, 8, 4, &convert_scalar};
}

// ----------------------------------------------------------------------- top-k selection

// (score desc, index asc): a is strictly better than b.
inline bool better(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// Bounded min-heap of one query's k best (score, index) pairs; the root is the worst, so
// its score is the threshold a new key must reach once the heap is full.
struct HeapRef {
  float* s;    // [k]
  int64_t* i;  // [k]
  int64_t* n;  // current size
  int64_t k;

  void sift_down(int64_t pos, int64_t size) {
    const float sv = s[pos];
    const int64_t iv = i[pos];
    while (true) {
      int64_t child = 2 * pos + 1;
      if (child >= size) break;
      // descend towards the worse child: the heap keeps the worst on top
      if (child + 1 < size && better(s[child], i[child], s[child + 1], i[child + 1])) ++child;
      if (!better(sv, iv, s[child], i[child])) break;
      s[pos] = s[child];
      i[pos] = i[child];
      pos = child;
    }
    s[pos] = sv;
    i[pos] = iv;
  }

  // Returns the new threshold (the root's score once full, -inf before).
  float push(float sv, int64_t iv) {
    int64_t size = *n;
    if (size < k) {
      int64_t pos = size;
      while (pos > 0) {
        const int64_t parent = (pos - 1) / 2;
        if (!better(s[parent], i[parent], sv, iv)) break;
        s[pos] = s[parent];
        i[pos] = i[parent];
        pos = parent;
      }
      s[pos] = sv;
      i[pos] = iv;
      *n = ++size;
      return size == k ? s[0] : -std::numeric_limits<float>::infinity();
    }
    if (better(sv, iv, s[0], i[0])) {
      s[0] = sv;
      i[0] = iv;
      sift_down(0, size);
    }
    return s[0];
  }
};

// One thread's running top-k of every query.
struct Partition {
  std::vector<float> hs;    // [B, k]
  std::vector<int64_t> hi;  // [B, k]
  std::vector<int64_t> hn;  // [B]
  std::vector<float> thr;   // [n_chunks * cw]; +inf in padded lanes so they never hit

  // Empty heaps for B queries, thresholds -inf for the real lanes of `lanes` (padded: +inf).
  void reset(int64_t B, int64_t k, int64_t lanes) {
    const float inf = std::numeric_limits<float>::infinity();
    hs.assign(static_cast<size_t>(B * k), 0.f);
    hi.assign(static_cast<size_t>(B * k), 0);
    hn.assign(static_cast<size_t>(B), 0);
    thr.assign(static_cast<size_t>(lanes), inf);
    std::fill(thr.begin(), thr.begin() + B, -inf);
  }
};

// ------------------------------------------- large B: the BLAS GEMM, then a SIMD selection
//
// At large B the search is compute-bound. This path lets the BLAS do the FLOPs (the
// micro-kernel broadcasts keys from the row-major table; MKL packs both operands, and was
// expected to run ~20% faster than it, benchmarks/NOTES.md, issue 14): per key block, S [mb][bc] = keys_block [mb][d] @ Q_chunk^T [d][bc] into a per-thread
// buffer (at::mm_out, so MKL's sgemm where torch links it), then each key row's bc scores
// are compared with the bc thresholds by a few vector compares; only a row with a hit
// touches the heaps. Selection is ~bc/16 compares per row against ~bc*d/16 FMAs of GEMM.
//
// Determinism with a BLAS we do not control: block boundaries are global (multiples of mb
// from row 0, not of the thread partition), every GEMM call of a search has the same shape
// and strides (the last, short block is copied into a zero-padded block), K = d is never
// split by us, and each call runs on one thread (mkl_set_num_threads_local(1) where torch
// links MKL; otherwise the call sits inside the OpenMP region, where BLASes run serially).
// So a key's score is the same arithmetic wherever the key sits and however many threads
// run: results do not depend on the thread count and copies tie exactly (tested, odd d
// and odd M included). The scores differ from the micro-kernel's in the last bits (another
// summation order); which path runs depends only on B and the ISA, so a call is
// reproducible.
//
// Dispatch (measured on the 2-core Xeon, benchmarks/NOTES.md "GEMM path", d = 128, each
// case interleaved with the probe): MKL's sgemm at these shapes (K = d = 128, blocks of
// ~1024 keys) runs at ~85-90% of its own 2048^3 rate, and the whole path at 0.76-0.83 of it
// at B = 256 and 0.78-0.92 at B = 1024, where the AVX-512 micro-kernel reaches 0.86-0.94
// and 0.82-0.99 (higher in every paired run, bf16 and int8 keys too). The GEMM path wins where the micro-kernel wastes SIMD lanes (it pads B to
// 32-query chunks, the GEMM to 16) and at B = 32 (one chunk; +5-10% at M = 1e6), so
// 17 <= B <= 127 on AVX-512 (M = 1e6, B = 32 / 48 / 80: 0.53 / 0.66 / 0.75 of the probe
// vs 0.48 / 0.50 / 0.62; ties at 16, 64, 96 and 112; mixed at 128). Under the AVX2 cap the
// AVX2 micro-kernel beats the GEMM at every B measured (MKL itself capped to AVX2); under
// the scalar cap the GEMM is 4-100x faster at every B (the scalar kernel is portable C++).
// The rule depends on B and the ISA only, never on the key dtype (bf16/int8 blocks are
// converted to float32 for both paths and measured alike) or the thread count.
// PLUGLM_CPU_MIPS_GEMM=0 / =1 forces the micro-kernel / the GEMM path at any B, read per
// call (tests run both paths at every size; benchmarks/bench_mips_gemm.py compares them).
constexpr int64_t kGemmMinB = 17;   // AVX-512: GEMM for kGemmMinB <= B <= kGemmMaxB
constexpr int64_t kGemmMaxB = 127;
// Queries per GEMM call (B is split evenly into chunks of at most this many). 128 measured
// 0-10% faster than 256 with MKL at d = 128 (fewer scores per key block, same FLOPs).
constexpr int64_t kGemmMaxChunk = 128;
// Per thread: one key block (<= kGemmKeyBytes of float32 rows) and one score block
// (<= kGemmScoreBytes), both L2-sized, so the key block is read from L2 by every chunk
// and the scores are re-read from L2 by the selection.
constexpr int64_t kGemmKeyBytes = 512 * 1024;
constexpr int64_t kGemmScoreBytes = 512 * 1024;
constexpr int64_t kGemmRowAlign = 64;  // mb is a multiple: whole micro-tiles in the BLAS

int gemm_switch() {  // -1 auto, 0 never, 1 always
  const char* env = std::getenv("PLUGLM_CPU_MIPS_GEMM");
  if (env == nullptr) return -1;
  if (std::strcmp(env, "0") == 0) return 0;
  if (std::strcmp(env, "1") == 0) return 1;
  return -1;
}

bool use_gemm(int64_t B) {
  const int sw = gemm_switch();
  if (sw != -1) return sw == 1;
  const Isa isa = active_isa();
  if (isa == Isa::Scalar) return true;
  return isa == Isa::Avx512 && B >= kGemmMinB && B <= kGemmMaxB;
}

}  // namespace

// Thread-local MKL thread count (MKL service C interface, exported by torch's MKL build;
// mkl_set_num_threads_local is a macro for it in mkl_service.h); weak, so the extension
// still loads against a torch without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

struct SerialBlas {
  int prev = 0;
  bool set = false;
  SerialBlas() {
    if (&MKL_Set_Num_Threads_Local != nullptr) {
      prev = MKL_Set_Num_Threads_Local(1);
      set = true;
    }
  }
  ~SerialBlas() {
    if (set) MKL_Set_Num_Threads_Local(prev);
  }
};

// Pushes the scores of rows [0, nb) of S [.][bc] (key j0 + r, queries b0 + l, l < nq) that
// reach their query's threshold thr [bc] (+inf in padded lanes). NaN never compares >=.
inline void push_row(const float* row, int64_t nq, int64_t j, int64_t b0, float* thr,
                     Partition& P, int64_t k) {
  for (int64_t l = 0; l < nq; ++l) {
    if (!(row[l] >= thr[l])) continue;
    const int64_t b = b0 + l;
    HeapRef h{P.hs.data() + b * k, P.hi.data() + b * k, P.hn.data() + b, k};
    thr[l] = h.push(row[l], j);
  }
}

void select_scalar(const float* S, int64_t bc, int64_t nb, int64_t j0, int64_t b0, int64_t nq,
                   float* thr, const bool* vmask, Partition& P, int64_t k) {
  for (int64_t r = 0; r < nb; ++r) {
    const float* row = S + r * bc;
    bool hit = false;
    for (int64_t l = 0; l < bc; ++l) hit |= row[l] >= thr[l];
    if (!hit || (vmask && !vmask[j0 + r])) continue;
    push_row(row, nq, j0 + r, b0, thr, P, k);
  }
}

#ifdef PLUGLM_X86
__attribute__((target("avx512f"))) void select_avx512(const float* S, int64_t bc, int64_t nb,
                                                      int64_t j0, int64_t b0, int64_t nq,
                                                      float* thr, const bool* vmask,
                                                      Partition& P, int64_t k) {
  for (int64_t r = 0; r < nb; ++r) {
    const float* row = S + r * bc;
    __mmask16 hit = 0;
    for (int64_t l = 0; l < bc; l += 16)
      hit |= _mm512_cmp_ps_mask(_mm512_loadu_ps(row + l), _mm512_loadu_ps(thr + l), _CMP_GE_OQ);
    if (!hit || (vmask && !vmask[j0 + r])) continue;
    push_row(row, nq, j0 + r, b0, thr, P, k);
  }
}

__attribute__((target("avx2"))) void select_avx2(const float* S, int64_t bc, int64_t nb,
                                                 int64_t j0, int64_t b0, int64_t nq, float* thr,
                                                 const bool* vmask, Partition& P, int64_t k) {
  for (int64_t r = 0; r < nb; ++r) {
    const float* row = S + r * bc;
    __m256 hit = _mm256_setzero_ps();
    for (int64_t l = 0; l < bc; l += 8)
      hit = _mm256_or_ps(hit, _mm256_cmp_ps(_mm256_loadu_ps(row + l), _mm256_loadu_ps(thr + l),
                                            _CMP_GE_OQ));
    if (!_mm256_movemask_ps(hit) || (vmask && !vmask[j0 + r])) continue;
    push_row(row, nq, j0 + r, b0, thr, P, k);
  }
}
#endif

using SelectFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                          const bool*, Partition&, int64_t);

// Searches every key with the GEMM path; returns one Partition (heaps) per thread.
std::vector<Partition> search_gemm(const float* qp, int64_t B, int64_t d, int64_t M, int64_t k,
                                   KeyType kt, const char* kbase, int64_t esz,
                                   const float* scales, const bool* vmask) {
  const Isa isa = active_isa();
  ConvertFn convert = &convert_scalar;
  SelectFn select = &select_scalar;
#ifdef PLUGLM_X86
  if (isa == Isa::Avx512) convert = &convert_avx512, select = &select_avx512;
  if (isa == Isa::Avx2) convert = &convert_avx2, select = &select_avx2;
#endif
  // Query chunks of equal width bc (a multiple of 16), zero-padded: Q [n_chunks * bc][d].
  const int64_t n_chunks = (B + kGemmMaxChunk - 1) / kGemmMaxChunk;
  const int64_t bc = ((B + n_chunks - 1) / n_chunks + 15) / 16 * 16;
  // The finiteness check rides on the copy (as on the blocked path's packing pass).
  at::Tensor q = at::zeros({n_chunks * bc, d}, at::kFloat);
  {
    float* dst = q.data_ptr<float>();
    bool finite = true;
    for (int64_t t = 0; t < B * d; ++t) {
      finite &= std::isfinite(qp[t]);
      dst[t] = qp[t];
    }
    TORCH_CHECK(finite, "_C_mips_topk: queries must be finite (found NaN or Inf)");
  }
  // Key rows per block: a function of d and bc only, so block boundaries are global.
  int64_t mb = std::min(kGemmKeyBytes / (4 * d), kGemmScoreBytes / (4 * bc));
  mb = std::max<int64_t>(kGemmRowAlign, mb / kGemmRowAlign * kGemmRowAlign);
  const int64_t n_blocks = (M + mb - 1) / mb;
  const int64_t n_threads = std::max<int>(1, at::get_num_threads());
  const int64_t n_parts = std::max<int64_t>(1, std::min(n_threads, n_blocks));
  const int64_t blocks_per_part = (n_blocks + n_parts - 1) / n_parts;
  std::vector<Partition> parts(static_cast<size_t>(n_parts));

  at::parallel_for(0, n_parts, 1, [&](int64_t p_begin, int64_t p_end) {
    SerialBlas serial;
    for (int64_t p = p_begin; p < p_end; ++p) {
      Partition& P = parts[p];
      P.reset(B, k, n_chunks * bc);
      at::Tensor sbuf = at::empty({mb, bc}, at::kFloat);
      at::Tensor kbuf;  // float32 rows of a converted or short block
      const float* S = sbuf.data_ptr<float>();
      const int64_t blk_end = std::min(n_blocks, (p + 1) * blocks_per_part);
      for (int64_t blk = p * blocks_per_part; blk < blk_end; ++blk) {
        const int64_t j0 = blk * mb;
        const int64_t nb = std::min(mb, M - j0);
        at::Tensor a;
        if (kt == KeyType::F32 && nb == mb) {
          a = at::from_blob(const_cast<char*>(kbase) + j0 * d * esz, {mb, d}, at::kFloat);
        } else {
          if (!kbuf.defined()) kbuf = at::empty({mb, d}, at::kFloat);
          float* kb = kbuf.data_ptr<float>();
          for (int64_t r = 0; r < nb; ++r)
            convert(kbase + (j0 + r) * d * esz, kt, scales ? scales[j0 + r] : 1.f, kb + r * d, d);
          std::fill(kb + nb * d, kb + mb * d, 0.f);
          a = kbuf;
        }
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          at::mm_out(sbuf, a, q.narrow(0, ch * bc, bc).t());
          const int64_t b0 = ch * bc;
          select(S, bc, nb, j0, b0, std::min(bc, B - b0), P.thr.data() + b0, vmask, P, k);
        }
      }
    }
  });
  return parts;
}

void check_args(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                const c10::optional<at::Tensor>& key_scales, const c10::optional<at::Tensor>& valid) {
  TORCH_CHECK(queries.device().is_cpu(), "_C_mips_topk (cpu): queries must be a CPU tensor, got ",
              queries.device());
  TORCH_CHECK(keys.device().is_cpu(), "_C_mips_topk (cpu): keys must be a CPU tensor, got ",
              keys.device());
  TORCH_CHECK(queries.dim() == 2, "_C_mips_topk: queries must be 2-D [B, d], got shape ",
              queries.sizes());
  TORCH_CHECK(keys.dim() == 2, "_C_mips_topk: keys must be 2-D [M, d], got shape ", keys.sizes());
  const auto qt = queries.scalar_type();
  const auto kt = keys.scalar_type();
  const bool q_float = qt == at::kFloat || qt == at::kHalf || qt == at::kBFloat16;
  TORCH_CHECK(q_float, "_C_mips_topk: queries must be float32, float16 or bfloat16, got ", qt);
  TORCH_CHECK(kt == at::kFloat || kt == at::kHalf || kt == at::kBFloat16 || kt == at::kChar,
              "_C_mips_topk: keys must be float32, float16, bfloat16 or int8, got ", kt);
  if (kt != at::kChar)
    TORCH_CHECK(qt == at::kFloat || qt == kt,
                "_C_mips_topk: queries must be float32 or the keys' dtype ", kt, ", got ", qt);
  const int64_t B = queries.size(0), d = queries.size(1), M = keys.size(0);
  TORCH_CHECK(B >= 1 && d >= 1, "_C_mips_topk: queries must be non-empty, got shape ",
              queries.sizes());
  TORCH_CHECK(M >= 1, "_C_mips_topk: keys must have at least one row");
  TORCH_CHECK(keys.size(1) == d, "_C_mips_topk: keys must have ", d,
              " columns to match queries [B, ", d, "], got shape ", keys.sizes());
  TORCH_CHECK(queries.is_contiguous(), "_C_mips_topk: queries must be contiguous");
  TORCH_CHECK(keys.is_contiguous(), "_C_mips_topk: keys must be contiguous row-major [M, d]");
  TORCH_CHECK(k >= 1 && k <= kMaxK, "_C_mips_topk: k must be in [1, ", kMaxK, "], got ", k);
  TORCH_CHECK(k <= M, "_C_mips_topk: k=", k, " is larger than the number of keys M=", M);
  if (kt == at::kChar) {
    TORCH_CHECK(key_scales.has_value(),
                "_C_mips_topk: key_scales [M] float32 is required with int8 keys");
  } else {
    TORCH_CHECK(!key_scales.has_value(), "_C_mips_topk: key_scales is only for int8 keys; keys are ",
                kt);
  }
  if (key_scales.has_value()) {
    const at::Tensor& s = *key_scales;
    TORCH_CHECK(s.device().is_cpu(), "_C_mips_topk (cpu): key_scales must be a CPU tensor, got ",
                s.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat, "_C_mips_topk: key_scales must be float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.dim() == 1 && s.size(0) == M, "_C_mips_topk: key_scales must have shape [",
                M, "] (one scale per key row), got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), "_C_mips_topk: key_scales must be contiguous");
  }
  if (valid.has_value()) {
    const at::Tensor& v = *valid;
    TORCH_CHECK(v.device().is_cpu(), "_C_mips_topk (cpu): valid must be a CPU tensor, got ",
                v.device());
    TORCH_CHECK(v.scalar_type() == at::kBool, "_C_mips_topk: valid must be bool, got ",
                v.scalar_type());
    TORCH_CHECK(v.dim() == 1 && v.size(0) == M, "_C_mips_topk: valid must have shape [", M,
                "] (one flag per key row), got ", v.sizes());
    TORCH_CHECK(v.is_contiguous(), "_C_mips_topk: valid must be contiguous");
  }
}

// Merges the per-thread heaps: the best k of each query by (score desc, index asc), the
// tail (fewer valid rows than k) filled with (-inf, -1).
std::tuple<at::Tensor, at::Tensor> merge_parts(const std::vector<Partition>& parts, int64_t B,
                                               int64_t k) {
  const int64_t n_parts = static_cast<int64_t>(parts.size());
  const float inf = std::numeric_limits<float>::infinity();
  at::Tensor out_s = at::empty({B, k}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor out_i = at::empty({B, k}, at::TensorOptions().dtype(at::kLong));
  float* os = out_s.data_ptr<float>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t b_begin, int64_t b_end) {
    std::vector<std::pair<float, int64_t>> cand;
    cand.reserve(static_cast<size_t>(n_parts * k));
    for (int64_t b = b_begin; b < b_end; ++b) {
      cand.clear();
      for (const Partition& P : parts)
        for (int64_t t = 0; t < P.hn[b]; ++t) cand.emplace_back(P.hs[b * k + t], P.hi[b * k + t]);
      const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(),
                        [](const auto& a, const auto& c) { return better(a.first, a.second, c.first, c.second); });
      for (int64_t t = 0; t < k; ++t) {
        os[b * k + t] = t < take ? cand[t].first : -inf;
        oi[b * k + t] = t < take ? cand[t].second : -1;
      }
    }
  });
  return {out_s, out_i};
}

std::tuple<at::Tensor, at::Tensor> mips_topk_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                 int64_t k,
                                                 const c10::optional<at::Tensor>& key_scales,
                                                 const c10::optional<at::Tensor>& valid) {
  check_args(queries, keys, k, key_scales, valid);
  const int64_t B = queries.size(0), d = queries.size(1), M = keys.size(0);
  const at::Tensor q32 = queries.to(at::kFloat).contiguous();  // [B, d]

  const KeyType kt = keys.scalar_type() == at::kFloat  ? KeyType::F32
                     : keys.scalar_type() == at::kHalf ? KeyType::F16
                     : keys.scalar_type() == at::kBFloat16 ? KeyType::BF16
                                                           : KeyType::I8;
  const int64_t esz = keys.element_size();
  if (use_gemm(B)) {
    return merge_parts(
        search_gemm(q32.data_ptr<float>(), B, d, M, k, kt, static_cast<const char*>(keys.data_ptr()), esz,
                    key_scales.has_value() ? key_scales->data_ptr<float>() : nullptr,
                    valid.has_value() ? valid->data_ptr<bool>() : nullptr),
        B, k);
  }
  const Impl impl = pick_impl(B);
  const int64_t CW = impl.cw, NR = impl.nr;
  const int64_t n_chunks = (B + CW - 1) / CW;

  // Queries per chunk, zero-padded to CW: transposed qt [n_chunks][d][CW] for the
  // broadcast kernels, row-major [n_chunks][CW][d] for the dot-product ones.
  // The finiteness check rides on this pass over the queries (no extra pass or sync).
  std::vector<float> qt(static_cast<size_t>(n_chunks * d * CW), 0.f);
  {
    const float* qp = q32.data_ptr<float>();
    bool finite = true;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < d; ++c) {
        const int64_t at = impl.q_rows ? (b % CW) * d + c : c * CW + b % CW;
        const float v = qp[b * d + c];
        finite &= std::isfinite(v);
        qt[(b / CW) * d * CW + at] = v;
      }
    TORCH_CHECK(finite, "_C_mips_topk: queries must be finite (found NaN or Inf)");
  }

#ifdef PLUGLM_X86
  // B = 1 over int8 keys on a VNNI CPU: integer dots against the quantised query
  std::unique_ptr<QueryPlanes> planes;
  if (impl.scan_b1 && kt == KeyType::I8 && d <= kVnniMaxD && vnni_enabled())
    planes = quantise_query(qt.data(), d);
#endif

  // Keys per block: a multiple of NR near kBlockBytes of float32 rows.
  int64_t kb = std::max<int64_t>(1, kBlockBytes / (d * 4) / NR) * NR;
  const int64_t n_threads = std::max<int>(1, at::get_num_threads());
  // At least a few blocks per partition, so tiny M does not pay for idle heaps.
  const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(n_threads, M / (4 * kb)));
  const int64_t part_len = (M + n_parts - 1) / n_parts;
  std::vector<Partition> parts(static_cast<size_t>(n_parts));

  const char* kbase = static_cast<const char*>(keys.data_ptr());
  const float* scales = key_scales.has_value() ? key_scales->data_ptr<float>() : nullptr;
  const bool* vmask = valid.has_value() ? valid->data_ptr<bool>() : nullptr;

  at::parallel_for(0, n_parts, 1, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      Partition& P = parts[p];
      P.reset(B, k, n_chunks * CW);
      // Float32 rows of the current block ([kb][d]). f32 keys are read in place (measured:
      // copying blocks into this buffer first costs ~20% more CPU time), except a
      // partition's last block when it needs zero rows up to a whole group.
      std::vector<float> buf(static_cast<size_t>(kt == KeyType::F32 ? 0 : kb * d));
      std::vector<float> tile(static_cast<size_t>(NR * CW));

      const int64_t m_begin = std::min(M, p * part_len);
      const int64_t m_end = std::min(M, m_begin + part_len);
#ifdef PLUGLM_X86
      if (impl.scan_b1) {
        HeapRef h{P.hs.data(), P.hi.data(), P.hn.data(), k};
        float t = P.thr[0];
        const std::vector<char> zero_row(static_cast<size_t>(d * esz), 0);
        if (planes) {
          scan_b1_i8_vnni(reinterpret_cast<const int8_t*>(kbase), scales, vmask, d, m_begin,
                          m_end, *planes, reinterpret_cast<const int8_t*>(zero_row.data()), h, t);
          P.thr[0] = t;
          continue;
        }
        const auto scan = kt == KeyType::F32    ? &scan_b1_avx512<KeyType::F32, HeapRef>
                          : kt == KeyType::F16  ? &scan_b1_avx512<KeyType::F16, HeapRef>
                          : kt == KeyType::BF16 ? &scan_b1_avx512<KeyType::BF16, HeapRef>
                                                : &scan_b1_avx512<KeyType::I8, HeapRef>;
        scan(kbase, scales, vmask, d, m_begin, m_end, qt.data(), zero_row.data(), h, t);
        P.thr[0] = t;
        continue;
      }
#endif
      for (int64_t j0 = m_begin; j0 < m_end; j0 += kb) {
        const int64_t nb = std::min(kb, m_end - j0);
        const int64_t nb_pad = (nb + NR - 1) / NR * NR;
        const float* rows;  // [nb_pad][d]
        if (kt == KeyType::F32 && nb == nb_pad) {
          rows = reinterpret_cast<const float*>(kbase) + j0 * d;
        } else if (kt == KeyType::F32) {
          // a partition's last block, when not a whole number of groups: copy it (one
          // block, <= kBlockBytes) with zero rows up to the group size
          buf.resize(static_cast<size_t>(nb_pad * d));
          std::memcpy(buf.data(), kbase + j0 * d * esz, static_cast<size_t>(nb * d) * esz);
          std::fill(buf.begin() + nb * d, buf.begin() + nb_pad * d, 0.f);
          rows = buf.data();
        } else {
          if (static_cast<int64_t>(buf.size()) < nb_pad * d) buf.resize(nb_pad * d);
          for (int64_t r = 0; r < nb; ++r) {
            const int64_t j = j0 + r;
            impl.convert(kbase + j * d * esz, kt, scales ? scales[j] : 1.f, buf.data() + r * d, d);
          }
          std::fill(buf.begin() + nb * d, buf.begin() + nb_pad * d, 0.f);
          rows = buf.data();
        }
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const float* qc = qt.data() + ch * d * CW;
          float* thr = P.thr.data() + ch * CW;
          const int64_t b0 = ch * CW;
          const int64_t nq = std::min(CW, B - b0);
          for (int64_t g = 0; g < nb_pad; g += NR) {
            if (!impl.kernel(qc, rows + g * d, d, d, thr, tile.data())) continue;
            const int64_t nr_real = std::min(NR, nb - g);
            for (int64_t r = 0; r < nr_real; ++r) {
              const int64_t j = j0 + g + r;
              if (vmask && !vmask[j]) continue;
              const float* ts = tile.data() + r * CW;
              for (int64_t l = 0; l < nq; ++l) {
                if (!(ts[l] >= thr[l])) continue;
                const int64_t b = b0 + l;
                HeapRef h{P.hs.data() + b * k, P.hi.data() + b * k, P.hn.data() + b, k};
                thr[l] = h.push(ts[l], j);
              }
            }
          }
        }
      }
    }
  });

  return merge_parts(parts, B, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(pluglm, CPU, m) {
  m.impl("_C_mips_topk", &mips_topk_cpu);
}
