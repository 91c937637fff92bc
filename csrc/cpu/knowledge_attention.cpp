// C++ CPU kernels of knowledge_attention and gather_knowledge_attention, forward and
// backward (OpenMP through at::parallel_for).
//
// Semantics: pluglm_kernels.reference.knowledge_attention. q [B, T, H, Dh] (pre-scaled),
// k/v [B, N, H, Dh] (or tables [M, H, Dh] read through indices [B, N]), bias [B, N] f32,
// beta [H] f32. logits s_j = q.k_j + beta_h bias_j; P = softmax_j(s); optional Philox
// dropout on P (philox.h); out = sum_j P_j v_j in q's dtype, lse = logsumexp_j(s) f32.
// Any Dh, N in [1, 256], f32/f16/bf16 with float32 accumulation.
//
// Forward, Dh in {32, 64, 128}: tasks of (b, chunk of T) with compile-time row loops (see
// forward_kernel_fixed). Backward, Dh in {32, 64, 128}: tasks of (b, group of heads, chunk
// of T) working on blocks of 8 rows of one head, vectorised over the rows (see
// backward_kernel_fixed). Other Dh: tasks of (b, h, chunk of T): the N x Dh keys and values
// of one (b, h) are converted to float once per task and reused by every row of the chunk,
// since N is small and T large. The backwards reduce dk/dv/dbias/dbeta over T through
// per-chunk partials summed in a fixed order, so results do not depend on the thread count
// or scheduling. The chunking depends on shapes only.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "isa.h"

namespace {

using namespace pluglm::cpu;

constexpr int64_t kMaxN = 256;
// Forward: rows of T per task (amortises the per-task conversion of k and v).
constexpr int64_t kFwdRows = 64;
// Backward: each (b, h) gets enough chunks of T that B*H*chunks >= kBwdTasks (parallelism
// when B*H is small), but chunks no shorter than kBwdMinRows (bounds the partials).
constexpr int64_t kBwdTasks = 64;
constexpr int64_t kBwdMinRows = 32;

struct Geometry {
  int64_t B, T, H, Dh, N;
};

// Dropout parameters; `on` is false for p == 0 so that path does no RNG work.
struct Dropout {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  float scale;  // 1 / (1 - p)
};

Dropout make_dropout(double p, int64_t seed) {
  Dropout d;
  d.on = p > 0.0;
  d.seed = static_cast<uint64_t>(seed);
  d.threshold = pluglm::dropout_threshold(p);
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// Inner loops are force-inlined into the task bodies, which run in the clone isa.h picks:
// the forward and the reductions have an AVX2+FMA clone (kFwdIsa), the fixed-Dh backward
// an AVX-512 one too.
constexpr Isa kFwdIsa = Isa::Avx2;

template <typename F>
void parallel_tasks(int64_t n, int64_t grain, const F& f) {
  parallel_for_isa<kFwdIsa>(n, grain, f);
}

// Row of k/v holding entry j of sequence b: b*N + j for dense k/v [B, N, H, Dh], or
// indices[b, j] for tables [M, H, Dh].
PLUGLM_INLINE int64_t kv_row(const int64_t* indices, int64_t b, int64_t j, int64_t N) {
  return indices ? indices[b * N + j] : b * N + j;
}

// kf, vf [N, Dh] float <- k/v rows of (b, h).
template <typename scalar_t>
PLUGLM_INLINE void load_kv(const scalar_t* k, const scalar_t* v, const int64_t* indices, const Geometry& g,
             int64_t b, int64_t h, float* kf, float* vf) {
  for (int64_t j = 0; j < g.N; ++j) {
    const int64_t off = (kv_row(indices, b, j, g.N) * g.H + h) * g.Dh;
    load_row(k + off, kf + j * g.Dh, g.Dh);
    load_row(v + off, vf + j * g.Dh, g.Dh);
  }
}

// 8-float GCC vectors for the fixed-Dh paths (compiled to AVX2 in the AVX2 clone, to
// pairs of SSE registers in the portable build). Every helper taking or returning them is
// force-inlined, so the AVX-vector ABI note GCC emits for the portable build does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
// Unaligned, aliasing view of 8 floats inside a float array.
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));

// t's per forward task of the fast path: 8 * H rows, enough to amortise the per-b
// conversion of half-precision k/v, small enough for load balance.
constexpr int64_t kFastRows = 8;

PLUGLM_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
PLUGLM_INLINE void store8(float* p, v8f x) { *reinterpret_cast<v8f_u*>(p) = x; }
PLUGLM_INLINE v8f splat8(float a) { return v8f{a, a, a, a, a, a, a, a}; }
PLUGLM_INLINE float hsum8(v8f x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// exp on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; within
// ~2 ulp of std::exp). Inputs below -87.3 (results under FLT_MIN, -inf included) give
// 0; NaN propagates. The softmax calls it on 8 logits at once, where std::exp would be
// the largest per-row cost.
PLUGLM_INLINE v8f exp8(v8f x) {
  const v8f lo = splat8(-87.3f), hi = splat8(88.3f);
  v8f xc = x < lo ? lo : x;  // NaN compares false: kept
  xc = xc > hi ? hi : xc;
  const v8f magic = splat8(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f n = (xc * splat8(1.44269504088896341f) + magic) - magic;
  v8f r = xc - n * splat8(0.693359375f);
  r = r - n * splat8(-2.12194440e-4f);
  v8f y = splat8(1.9875691500e-4f);
  y = y * r + splat8(1.3981999507e-3f);
  y = y * r + splat8(8.3334519073e-3f);
  y = y * r + splat8(4.1665795894e-2f);
  y = y * r + splat8(1.6666665459e-1f);
  y = y * r + splat8(5.0000001201e-1f);
  y = y * (r * r) + r + splat8(1.f);
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;  // 2^n, n in [-126, 127]
  y = y * (v8f)e;  // vector cast: reinterprets the bits
  return x < lo ? splat8(0.f) : y;
}

template <int DH>
PLUGLM_INLINE float dot_fixed(const float* a, const float* b) {
  v8f a0 = load8(a) * load8(b), a1 = load8(a + 8) * load8(b + 8);  // two chains: FMA latency
  for (int i = 16; i < DH; i += 16) {
    a0 += load8(a + i) * load8(b + i);
    a1 += load8(a + i + 8) * load8(b + i + 8);
  }
  return hsum8(a0 + a1);
}

// Logit q.k + beta_h bias_j. The forward (lse) and the backward (P = exp(s - lse)) both
// compute it here so that they round identically: with N = 1 the backward then sees P = 1
// exactly and dq = 0.
PLUGLM_INLINE float logit(const float* q, const float* k, int64_t Dh, float beta_h,
                          float bias_j) {
  float d;
  switch (Dh) {
    case 32: d = dot_fixed<32>(q, k); break;
    case 64: d = dot_fixed<64>(q, k); break;
    case 128: d = dot_fixed<128>(q, k); break;
    default: d = dot(q, k, Dh);
  }
  return d + beta_h * bias_j;
}

// One row (b, t, h): qr [DH] in float; kb/vb + koff[j] + hoff is the float key/value row
// of entry j; s [>= N rounded up to 8] holds -inf beyond N (padding lanes of exp8), p is
// scratch of the same size. Writes outr [DH] (float) and returns lse.
template <int DH>
PLUGLM_INLINE float attend_row(const float* qr, const float* kb, const float* vb,
                               const int64_t* koff, int64_t hoff, const float* bias_b,
                               float beta_h, int64_t N, const Dropout& dr, int64_t row,
                               float* s, float* p, float* outr) {
  constexpr int V = DH / 8;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < N; ++j) {
    s[j] = logit(qr, kb + koff[j] + hoff, DH, beta_h, bias_b[j]);
    m = std::max(m, s[j]);
  }
  const v8f mv = splat8(m);
  v8f lv = splat8(0.f);
  for (int64_t j = 0; j < N; j += 8) {
    const v8f e = exp8(load8(s + j) - mv);
    store8(p + j, e);
    lv += e;
  }
  const float l = hsum8(lv);
  const float inv = 1.f / l;
  v8f o[V];
  for (int i = 0; i < V; ++i) o[i] = splat8(0.f);
  for (int64_t j = 0; j < N; ++j) {
    float pj = p[j] * inv;
    if (dr.on) {
      const uint64_t counter = static_cast<uint64_t>(row * N + j);
      pj = pluglm::philox_uint32(dr.seed, counter) >= dr.threshold ? pj * dr.scale : 0.f;
    }
    const v8f pv = splat8(pj);
    const float* vr = vb + koff[j] + hoff;
    for (int i = 0; i < V; ++i) o[i] += pv * load8(vr + 8 * i);
  }
  for (int i = 0; i < V; ++i) store8(outr + 8 * i, o[i]);
  return m + std::log(l);
}

// s [N] <- logits of one row; returns their max.
PLUGLM_INLINE float logits_row(const float* qf, const float* kf, const float* bias_b, float beta_h,
                        const Geometry& g, float* s) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < g.N; ++j) {
    s[j] = logit(qf, kf + j * g.Dh, g.Dh, beta_h, bias_b[j]);
    m = std::max(m, s[j]);
  }
  return m;
}

// Forward for Dh = DH in {32, 64, 128}: the row loops have compile-time trip counts over
// 8-float vectors, so the dot accumulators and the output row stay in registers (one pass
// over k/v per row, no per-row buffers for f32). Tasks are (b, chunk of T) and a task
// visits its rows in memory order (t, then h): q and out are streamed sequentially, and
// the [N, H, Dh] keys/values of b (tens of KB) stay in L1/L2 across the chunk. Each row's
// arithmetic does not depend on the partitioning, so neither do the results.
template <typename scalar_t, int DH>
void forward_kernel_fixed(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                          const int64_t* indices, const float* bias, const float* beta,
                          scalar_t* out, float* lse, const Geometry g, const Dropout dr) {
  constexpr bool is_f32 = std::is_same<scalar_t, float>::value;
  const int64_t chunks = (g.T + kFastRows - 1) / kFastRows;
  const int64_t HD = g.H * DH;
  parallel_tasks(g.B * chunks, 1, [&](int64_t begin, int64_t end) PLUGLM_TASK_INLINE {
    const int64_t npad = (g.N + 7) / 8 * 8;
    std::vector<float> s(npad, -std::numeric_limits<float>::infinity()), p(npad);
    std::vector<int64_t> koff(g.N);  // float offset of entry j's row (all heads) in kb/vb
    // Half precision: k/v of b converted to float [N, H, DH]; q and out rows through qf/of.
    std::vector<float> kf(is_f32 ? 0 : g.N * HD), vf(is_f32 ? 0 : g.N * HD);
    alignas(32) float qf[DH], of[DH];
    const float* kb = nullptr;
    const float* vb = nullptr;
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      if (b != loaded) {
        for (int64_t j = 0; j < g.N; ++j) {
          const int64_t r = kv_row(indices, b, j, g.N);
          if constexpr (is_f32) {
            koff[j] = r * HD;
          } else {
            koff[j] = j * HD;
            load_row(k + r * HD, kf.data() + j * HD, HD);
            load_row(v + r * HD, vf.data() + j * HD, HD);
          }
        }
        if constexpr (is_f32) {
          kb = reinterpret_cast<const float*>(k);
          vb = reinterpret_cast<const float*>(v);
        } else {
          kb = kf.data();
          vb = vf.data();
        }
        loaded = b;
      }
      const float* bias_b = bias + b * g.N;
      const int64_t t1 = std::min(g.T, (c + 1) * kFastRows);
      for (int64_t t = c * kFastRows; t < t1; ++t) {
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t row = (b * g.T + t) * g.H + h;  // flat (b, t, h)
          if constexpr (is_f32) {
            lse[row] = attend_row<DH>(reinterpret_cast<const float*>(q) + row * DH, kb, vb,
                                      koff.data(), h * DH, bias_b, beta[h], g.N, dr, row,
                                      s.data(), p.data(), reinterpret_cast<float*>(out) + row * DH);
          } else {
            load_row(q + row * DH, qf, DH);
            lse[row] = attend_row<DH>(qf, kb, vb, koff.data(), h * DH, bias_b, beta[h], g.N, dr,
                                      row, s.data(), p.data(), of);
            store_row(of, out + row * DH, DH);
          }
        }
      }
    }
  });
}

// Any Dh (the fast path covers Dh in {32, 64, 128}).
template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const int64_t* indices, const float* bias, const float* beta, scalar_t* out,
                    float* lse, const Geometry g, const Dropout dr) {
  const int64_t chunks = (g.T + kFwdRows - 1) / kFwdRows;
  const int64_t tasks = g.B * g.H * chunks;
  parallel_tasks(tasks, 1, [&](int64_t begin, int64_t end) PLUGLM_TASK_INLINE {
    std::vector<float> kf(g.N * g.Dh), vf(g.N * g.Dh);  // [N, Dh] of the current (b, h)
    std::vector<float> qf(g.Dh), of(g.Dh), s(g.N);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, bh = task / chunks;
      const int64_t b = bh / g.H, h = bh % g.H;
      if (bh != loaded) {
        load_kv(k, v, indices, g, b, h, kf.data(), vf.data());
        loaded = bh;
      }
      const float beta_h = beta[h];
      const float* bias_b = bias + b * g.N;
      const int64_t t1 = std::min(g.T, (c + 1) * kFwdRows);
      for (int64_t t = c * kFwdRows; t < t1; ++t) {
        const int64_t row = (b * g.T + t) * g.H + h;  // flat (b, t, h)
        load_row(q + row * g.Dh, qf.data(), g.Dh);
        const float m = logits_row(qf.data(), kf.data(), bias_b, beta_h, g, s.data());
        float l = 0.f;
        for (int64_t j = 0; j < g.N; ++j) {
          s[j] = std::exp(s[j] - m);
          l += s[j];
        }
        lse[row] = m + std::log(l);
        const float inv = 1.f / l;
        std::fill(of.begin(), of.end(), 0.f);
        for (int64_t j = 0; j < g.N; ++j) {
          float p = s[j] * inv;
          if (dr.on) {
            const uint64_t counter = static_cast<uint64_t>(row * g.N + j);
            p = pluglm::philox_uint32(dr.seed, counter) >= dr.threshold ? p * dr.scale : 0.f;
          }
          axpy(p, vf.data() + j * g.Dh, of.data(), g.Dh);
        }
        store_row(of.data(), out + row * g.Dh, g.Dh);
      }
    }
  });
}

// dq written per row; dk/dv [B, N, H, Dh] and dbias [B, N], dbeta [H] reduced over T.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const int64_t* indices, const float* bias,
                     const float* beta, const float* lse, scalar_t* dq, scalar_t* dk,
                     scalar_t* dv, float* dbias, float* dbeta, const Geometry g,
                     const Dropout dr) {
  const int64_t by_rows = (g.T + kBwdMinRows - 1) / kBwdMinRows;
  const int64_t wanted = (kBwdTasks + g.B * g.H - 1) / std::max<int64_t>(g.B * g.H, 1);
  const int64_t chunks = std::max<int64_t>(1, std::min(by_rows, wanted));
  const int64_t rows = (g.T + chunks - 1) / chunks;
  const int64_t kv_numel = g.B * g.N * g.H * g.Dh;
  // Per-chunk partials [chunks, B, N, H, Dh] only when T is split (small B*H).
  std::vector<float> dk_part(chunks > 1 ? chunks * kv_numel : 0);
  std::vector<float> dv_part(chunks > 1 ? chunks * kv_numel : 0);
  std::vector<double> dbias_part(g.B * g.H * chunks * g.N);  // [B, H, chunks, N]
  std::vector<double> dbeta_part(g.B * g.H * chunks);        // [B, H, chunks]
  const int64_t tasks = g.B * g.H * chunks;

  parallel_tasks(tasks, 1, [&](int64_t begin, int64_t end) PLUGLM_TASK_INLINE {
    const int64_t nd = g.N * g.Dh;
    std::vector<float> kf(nd), vf(nd), dkf(nd), dvf(nd);  // [N, Dh]
    std::vector<float> qf(g.Dh), dof(g.Dh), dqf(g.Dh);
    std::vector<float> p(g.N), dp(g.N), sc(g.N, 1.f);
    std::vector<double> dbias_acc(g.N);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, bh = task / chunks;
      const int64_t b = bh / g.H, h = bh % g.H;
      if (bh != loaded) {
        load_kv(k, v, indices, g, b, h, kf.data(), vf.data());
        loaded = bh;
      }
      std::fill(dkf.begin(), dkf.end(), 0.f);
      std::fill(dvf.begin(), dvf.end(), 0.f);
      std::fill(dbias_acc.begin(), dbias_acc.end(), 0.0);
      double dbeta_acc = 0.0;
      const float beta_h = beta[h];
      const float* bias_b = bias + b * g.N;
      const int64_t t1 = std::min(g.T, (c + 1) * rows);
      for (int64_t t = c * rows; t < t1; ++t) {
        const int64_t row = (b * g.T + t) * g.H + h;
        load_row(q + row * g.Dh, qf.data(), g.Dh);
        load_row(grad_out + row * g.Dh, dof.data(), g.Dh);
        logits_row(qf.data(), kf.data(), bias_b, beta_h, g, p.data());
        const float lse_row = lse[row];
        // D = sum_j P_j dP_j (= rowsum(dO * O) in exact arithmetic; exact in f32 here
        // even when O was rounded to f16/bf16).
        float D = 0.f;
        for (int64_t j = 0; j < g.N; ++j) {
          p[j] = std::exp(p[j] - lse_row);
          if (dr.on) {
            const uint64_t counter = static_cast<uint64_t>(row * g.N + j);
            sc[j] = pluglm::philox_uint32(dr.seed, counter) >= dr.threshold ? dr.scale : 0.f;
          }
          dp[j] = dot(dof.data(), vf.data() + j * g.Dh, g.Dh) * sc[j];
          D += p[j] * dp[j];
        }
        std::fill(dqf.begin(), dqf.end(), 0.f);
        for (int64_t j = 0; j < g.N; ++j) {
          const float ds = p[j] * (dp[j] - D);
          axpy(ds, kf.data() + j * g.Dh, dqf.data(), g.Dh);
          axpy(ds, qf.data(), dkf.data() + j * g.Dh, g.Dh);
          axpy(p[j] * sc[j], dof.data(), dvf.data() + j * g.Dh, g.Dh);
          dbias_acc[j] += static_cast<double>(ds) * beta_h;
          dbeta_acc += static_cast<double>(ds) * bias_b[j];
        }
        store_row(dqf.data(), dq + row * g.Dh, g.Dh);
      }
      for (int64_t j = 0; j < g.N; ++j) {
        const int64_t off = ((b * g.N + j) * g.H + h) * g.Dh;  // [B, N, H, Dh]
        if (chunks == 1) {
          store_row(dkf.data() + j * g.Dh, dk + off, g.Dh);
          store_row(dvf.data() + j * g.Dh, dv + off, g.Dh);
        } else {
          std::copy(dkf.begin() + j * g.Dh, dkf.begin() + (j + 1) * g.Dh,
                    dk_part.begin() + c * kv_numel + off);
          std::copy(dvf.begin() + j * g.Dh, dvf.begin() + (j + 1) * g.Dh,
                    dv_part.begin() + c * kv_numel + off);
        }
        dbias_part[(bh * chunks + c) * g.N + j] = dbias_acc[j];
      }
      dbeta_part[bh * chunks + c] = dbeta_acc;
    }
  });

  if (chunks > 1) {
    const int64_t kv_rows = g.B * g.N * g.H;
    parallel_tasks(kv_rows, 16, [&](int64_t begin, int64_t end) PLUGLM_TASK_INLINE {
      std::vector<float> acc_k(g.Dh), acc_v(g.Dh);
      for (int64_t r = begin; r < end; ++r) {
        std::fill(acc_k.begin(), acc_k.end(), 0.f);
        std::fill(acc_v.begin(), acc_v.end(), 0.f);
        for (int64_t c = 0; c < chunks; ++c) {  // fixed order: deterministic
          axpy(1.f, dk_part.data() + c * kv_numel + r * g.Dh, acc_k.data(), g.Dh);
          axpy(1.f, dv_part.data() + c * kv_numel + r * g.Dh, acc_v.data(), g.Dh);
        }
        store_row(acc_k.data(), dk + r * g.Dh, g.Dh);
        store_row(acc_v.data(), dv + r * g.Dh, g.Dh);
      }
    });
  }
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t j = 0; j < g.N; ++j) {
      double acc = 0.0;
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t c = 0; c < chunks; ++c) acc += dbias_part[((b * g.H + h) * chunks + c) * g.N + j];
      dbias[b * g.N + j] = static_cast<float>(acc);
    }
  }
  for (int64_t h = 0; h < g.H; ++h) {
    double acc = 0.0;
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t c = 0; c < chunks; ++c) acc += dbeta_part[(b * g.H + h) * chunks + c];
    dbeta[h] = static_cast<float>(acc);
  }
}

// Backward for Dh = DH in {32, 64, 128}, in blocks of 8 rows (b, t..t+7, h) of one head.
// The 8 rows are the lanes of the vectors of logits, P, dP and ds (one vector per entry j),
// so the softmax backward is vectorised over rows, the 8 dot products of a (block, j) are
// reduced together (hsum8x8, in hsum8's order: the logits round exactly as the forward's),
// and each key/value row and dk/dv accumulator row is read once per block, not per row:
//   1. s_j, dP_j [8 rows] for every j: dot products q_r . k_j and dO_r . v_j.
//   2. P = exp(s - lse), dropout, D = sum_j P_j dP_j, ds_j = P_j (dP_j - D).
//   3. dq_r = sum_j ds_rj k_j, row by row (accumulators in registers).
//   4. dk_j += sum_r ds_rj q_r, dv_j += sum_r Pdrop_rj dO_r, entry by entry, rows in order.
// The loops along Dh use W-float vectors: W = 8 in the AVX2+FMA clone, W = 16 in an AVX-512
// clone (run_avx512) where the CPU has it, W = 4 in the portable build (SSE2 has 16 128-bit
// registers). Each element goes through the same operations in the same order for any W,
// so the AVX2 and AVX-512 clones give the same bits (checked); the portable build, without
// FMA like its forward, rounds otherwise.
// Tasks are (b, group of heads, chunk of T): heads are split first (their dk/dv are
// disjoint), T only while B * H is small. A task walks its chunk in slabs of kBwdSlab t's,
// head by head, so the keys/values and dk/dv accumulators of one head (4 N DH floats) stay
// in L1 across a slab. dk/dv accumulate in float buffers [N, H, DH] per task, the sums of ds
// per (h, j) in double. When T is split the per-chunk partials are summed afterwards in chunk
// order. The chunking depends on the shapes only, so the results do not depend on the thread
// count.
constexpr int64_t kBwdFastTasks = 32;    // B * groups * chunks >= this where H and T allow
constexpr int64_t kBwdFastMinRows = 32;  // t's per chunk at least (bounds the partials)
constexpr int64_t kBwdSlab = 32;         // t's per slab, a multiple of 8

// Lanes i0..i7 of the 16 lanes of a then b.
#if defined(__clang__)
#define PLUGLM_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define PLUGLM_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, v8i{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// [a0+a4, a1+a5, a2+a6, a3+a7, b0+b4, b1+b5, b2+b6, b3+b7]
PLUGLM_INLINE v8f add_halves(v8f a, v8f b) {
  return PLUGLM_SHUFFLE8(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
         PLUGLM_SHUFFLE8(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
PLUGLM_INLINE v8f add_neighbours(v8f a, v8f b) {
  return PLUGLM_SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         PLUGLM_SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// Lane r: hsum8(x_r), with hsum8's additions ((x0+x4) + (x1+x5)) + ((x2+x6) + (x3+x7)),
// given h04 = add_halves(x_0, x_4), h15 = add_halves(x_1, x_5), and so on.
PLUGLM_INLINE v8f hsum8x8(v8f h04, v8f h15, v8f h26, v8f h37) {
  return add_neighbours(add_neighbours(h04, h15), add_neighbours(h26, h37));
}

// x_r = a0 + a1 of dot_fixed<DH>(p_r, y) for 4 rows p_r (the same operations, so hsum8(x_r)
// is that dot product bit for bit); y's vectors are loaded once for the 4 rows.
template <int DH>
PLUGLM_INLINE void dot4_fixed(const float* p0, const float* p1, const float* p2,
                              const float* p3, const float* y, v8f& x0, v8f& x1, v8f& x2,
                              v8f& x3) {
  v8f y0 = load8(y), y1 = load8(y + 8);
  v8f a0 = load8(p0) * y0, b0 = load8(p0 + 8) * y1;
  v8f a1 = load8(p1) * y0, b1 = load8(p1 + 8) * y1;
  v8f a2 = load8(p2) * y0, b2 = load8(p2 + 8) * y1;
  v8f a3 = load8(p3) * y0, b3 = load8(p3 + 8) * y1;
  for (int i = 16; i < DH; i += 16) {
    y0 = load8(y + i);
    y1 = load8(y + i + 8);
    a0 += load8(p0 + i) * y0;
    b0 += load8(p0 + i + 8) * y1;
    a1 += load8(p1 + i) * y0;
    b1 += load8(p1 + i + 8) * y1;
    a2 += load8(p2 + i) * y0;
    b2 += load8(p2 + i + 8) * y1;
    a3 += load8(p3 + i) * y0;
    b3 += load8(p3 + i + 8) * y1;
  }
  x0 = a0 + b0;
  x1 = a1 + b1;
  x2 = a2 + b2;
  x3 = a3 + b3;
}

// As dot4_fixed for 2 rows (fewer registers: 16 with SSE, where a v8f takes two).
template <int DH>
PLUGLM_INLINE void dot2_fixed(const float* p0, const float* p1, const float* y, v8f& x0,
                              v8f& x1) {
  v8f y0 = load8(y), y1 = load8(y + 8);
  v8f a0 = load8(p0) * y0, b0 = load8(p0 + 8) * y1;
  v8f a1 = load8(p1) * y0, b1 = load8(p1 + 8) * y1;
  for (int i = 16; i < DH; i += 16) {
    y0 = load8(y + i);
    y1 = load8(y + i + 8);
    a0 += load8(p0 + i) * y0;
    b0 += load8(p0 + i + 8) * y1;
    a1 += load8(p1 + i) * y0;
    b1 += load8(p1 + i + 8) * y1;
  }
  x0 = a0 + b0;
  x1 = a1 + b1;
}

// dot8_fixed, 2 rows at a time.
template <int DH>
PLUGLM_INLINE v8f dot8_fixed2(const float* const* p, const float* y) {
  v8f h[4];
  for (int r = 0; r < 4; ++r) {
    v8f x0, x1;
    dot2_fixed<DH>(p[r], p[r + 4], y, x0, x1);
    h[r] = add_halves(x0, x1);
  }
  return hsum8x8(h[0], h[1], h[2], h[3]);
}

// Lane r: dot_fixed<DH>(p[r], y), for the 8 rows p[0..7].
template <int DH>
PLUGLM_INLINE v8f dot8_fixed(const float* const* p, const float* y) {
  v8f x0, x1, x2, x3, x4, x5, x6, x7;
  dot4_fixed<DH>(p[0], p[1], p[4], p[5], y, x0, x1, x4, x5);
  const v8f h04 = add_halves(x0, x4), h15 = add_halves(x1, x5);
  dot4_fixed<DH>(p[2], p[3], p[6], p[7], y, x2, x3, x6, x7);
  return hsum8x8(h04, h15, add_halves(x2, x6), add_halves(x3, x7));
}

// 4- and 16-float vectors, for the backward's portable build and AVX-512 clone.
typedef float v4f __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4), may_alias));
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));

template <int W>
struct VecW;
template <>
struct VecW<4> {
  typedef v4f type;
  static PLUGLM_INLINE v4f load(const float* p) { return *reinterpret_cast<const v4f_u*>(p); }
  static PLUGLM_INLINE void store(float* p, v4f x) { *reinterpret_cast<v4f_u*>(p) = x; }
};
template <>
struct VecW<8> {
  typedef v8f type;
  static PLUGLM_INLINE v8f load(const float* p) { return load8(p); }
  static PLUGLM_INLINE void store(float* p, v8f x) { store8(p, x); }
};
template <>
struct VecW<16> {
  typedef v16f type;
  static PLUGLM_INLINE v16f load(const float* p) { return *reinterpret_cast<const v16f_u*>(p); }
  static PLUGLM_INLINE void store(float* p, v16f x) { *reinterpret_cast<v16f_u*>(p) = x; }
};

// As dot8_fixed with 16-float vectors: lanes 0-7 of an accumulator are dot_fixed's first
// chain (even 8-float vectors), lanes 8-15 its second, with the same operations per lane.
template <int DH>
PLUGLM_INLINE v8f dot8_fixed16(const float* const* p, const float* y) {
  v16f a[8];
  v16f y0 = VecW<16>::load(y);
  for (int r = 0; r < 8; ++r) a[r] = VecW<16>::load(p[r]) * y0;
  for (int i = 16; i < DH; i += 16) {
    y0 = VecW<16>::load(y + i);
    for (int r = 0; r < 8; ++r) a[r] += VecW<16>::load(p[r] + i) * y0;
  }
  v8f x[8];
  for (int r = 0; r < 8; ++r) {
    const float* ar = reinterpret_cast<const float*>(&a[r]);
    x[r] = load8(ar) + load8(ar + 8);  // first chain + second chain
  }
  return hsum8x8(add_halves(x[0], x[4]), add_halves(x[1], x[5]), add_halves(x[2], x[6]),
                 add_halves(x[3], x[7]));
}

// One block: rows r < nr of head h at (b, t0 + r), flat index row8[r]; rows r >= nr repeat
// row nr - 1 and are masked out. qp/dop [8] float rows of q and dO; dqp [8] the float rows
// receiving dq. kb/vb + koff[j] + hoff: key/value row of entry j; dkh/dvh + j * HD: its dk/dv
// accumulators. S, DP, PD: scratch [N, 8]. Adds the block's sums of ds_j to sh[j].
template <int DH, int W>
PLUGLM_INLINE void backward_block(const float* const* qp, const float* const* dop,
                                  float* const* dqp, int nr, const int64_t* row8,
                                  const float* lse8, const float* kb, const float* vb,
                                  const int64_t* koff, int64_t hoff, float* dkh, float* dvh,
                                  int64_t HD, const float* bias_b, float beta_h, int64_t N,
                                  const Dropout& dr, float* S, float* DP, float* PD,
                                  double* sh) {
  typedef VecW<W> VW;
  typedef typename VW::type vec;
  constexpr int V = DH / W;
  constexpr int CH = V < 8 ? V : 8;  // vectors per register-resident slice of a row
  // 1. Logits (logit()'s rounding: the dot, then + beta_h bias_j, fused or not as there)
  //    and dP before dropout.
  const v8f betav = splat8(beta_h);
  for (int64_t j = 0; j < N; ++j) {
    const float* kr = kb + koff[j] + hoff;
    const float* vr = vb + koff[j] + hoff;
    if constexpr (W == 16) {
      store8(S + 8 * j, dot8_fixed16<DH>(qp, kr) + betav * bias_b[j]);
      store8(DP + 8 * j, dot8_fixed16<DH>(dop, vr));
    } else if constexpr (W == 4) {
      store8(S + 8 * j, dot8_fixed2<DH>(qp, kr) + betav * bias_b[j]);
      store8(DP + 8 * j, dot8_fixed2<DH>(dop, vr));
    } else {
      store8(S + 8 * j, dot8_fixed<DH>(qp, kr) + betav * bias_b[j]);
      store8(DP + 8 * j, dot8_fixed<DH>(dop, vr));
    }
  }
  // 2. P = exp(s - lse) (S <- P), dropout scale (dP and PD), D; then S <- ds.
  const v8f lsev = load8(lse8);
  v8f D = splat8(0.f);
  for (int64_t j = 0; j < N; ++j) {
    const v8f p = exp8(load8(S + 8 * j) - lsev);
    v8f dp = load8(DP + 8 * j);
    if (dr.on) {
      v8f sc;
      for (int r = 0; r < 8; ++r) {
        const uint64_t counter = static_cast<uint64_t>(row8[r] * N + j);
        sc[r] = pluglm::philox_uint32(dr.seed, counter) >= dr.threshold ? dr.scale : 0.f;
      }
      dp *= sc;
      store8(DP + 8 * j, dp);
      store8(PD + 8 * j, p * sc);
    } else {
      store8(PD + 8 * j, p);
    }
    store8(S + 8 * j, p);
    D += p * dp;
  }
  const v8i live = v8i{0, 1, 2, 3, 4, 5, 6, 7} < nr;
  for (int64_t j = 0; j < N; ++j) {
    v8f ds = load8(S + 8 * j) * (load8(DP + 8 * j) - D);
    if (nr < 8) {
      ds = (v8f)((v8i)ds & live);
      store8(PD + 8 * j, (v8f)((v8i)load8(PD + 8 * j) & live));
    }
    store8(S + 8 * j, ds);
    sh[j] += static_cast<double>(hsum8(ds));
  }
  // 3. dq.
  for (int r = 0; r < nr; ++r) {
    for (int c = 0; c < V; c += CH) {
      vec acc[CH];
      for (int i = 0; i < CH; ++i) acc[i] = vec{};
      for (int64_t j = 0; j < N; ++j) {
        const float d = S[8 * j + r];
        const float* kr = kb + koff[j] + hoff + W * c;
        for (int i = 0; i < CH; ++i) acc[i] += d * VW::load(kr + W * i);
      }
      for (int i = 0; i < CH; ++i) VW::store(dqp[r] + W * (c + i), acc[i]);
    }
  }
  // 4. dk, dv.
  for (int64_t j = 0; j < N; ++j) {
    float* dkr = dkh + j * HD;
    float* dvr = dvh + j * HD;
    for (int c = 0; c < V; c += CH) {
      vec ak[CH], av[CH];
      for (int i = 0; i < CH; ++i) ak[i] = VW::load(dkr + W * (c + i));
      for (int r = 0; r < nr; ++r) {
        const float d = S[8 * j + r];
        for (int i = 0; i < CH; ++i) ak[i] += d * VW::load(qp[r] + W * (c + i));
      }
      for (int i = 0; i < CH; ++i) VW::store(dkr + W * (c + i), ak[i]);
      for (int i = 0; i < CH; ++i) av[i] = VW::load(dvr + W * (c + i));
      for (int r = 0; r < nr; ++r) {
        const float d = PD[8 * j + r];
        for (int i = 0; i < CH; ++i) av[i] += d * VW::load(dop[r] + W * (c + i));
      }
      for (int i = 0; i < CH; ++i) VW::store(dvr + W * (c + i), av[i]);
    }
  }
}

template <typename scalar_t, int DH>
void backward_kernel_fixed(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k,
                           const scalar_t* v, const int64_t* indices, const float* bias,
                           const float* beta, const float* lse, scalar_t* dq, scalar_t* dk,
                           scalar_t* dv, float* dbias, float* dbeta, const Geometry g,
                           const Dropout dr) {
  constexpr bool is_f32 = std::is_same<scalar_t, float>::value;
  const int64_t HD = g.H * DH;
  const int64_t kv_b = g.N * HD;  // dk/dv elements of one b
  if (g.B == 0 || g.T == 0) {  // no rows: zero gradients for k, v, bias and beta
    std::fill(dk, dk + g.B * kv_b, scalar_t(0));
    std::fill(dv, dv + g.B * kv_b, scalar_t(0));
    std::fill(dbias, dbias + g.B * g.N, 0.f);
    std::fill(dbeta, dbeta + g.H, 0.f);
    return;
  }
  // Tasks (b, head group, chunk of T). Heads are split first (their dk/dv are disjoint),
  // T only when B * H is still below kBwdFastTasks, into chunks of a multiple of 8 t's.
  const int64_t want_groups = std::min(g.H, (kBwdFastTasks + g.B - 1) / g.B);
  const int64_t hg = (g.H + want_groups - 1) / want_groups;  // heads per group
  const int64_t groups = (g.H + hg - 1) / hg;
  const int64_t by_rows = (g.T + kBwdFastMinRows - 1) / kBwdFastMinRows;
  const int64_t wanted = (kBwdFastTasks + g.B * groups - 1) / (g.B * groups);
  const int64_t split = std::max<int64_t>(1, std::min(by_rows, wanted));
  const int64_t rows = ((g.T + split - 1) / split + 7) / 8 * 8;  // t's per chunk
  const int64_t chunks = (g.T + rows - 1) / rows;
  const int64_t tasks = g.B * groups * chunks;
  // Per-chunk partials [chunks, B, N, H, DH] only when T is split (B * H small); every
  // element is written by one task.
  std::unique_ptr<float[]> dk_part(chunks > 1 ? new float[chunks * g.B * kv_b] : nullptr);
  std::unique_ptr<float[]> dv_part(chunks > 1 ? new float[chunks * g.B * kv_b] : nullptr);
  std::vector<double> ssum(g.B * chunks * g.H * g.N, 0.0);  // [B, chunks, H, N]: sum of ds

  auto body = [&](auto wtag, int64_t begin, int64_t end) PLUGLM_TASK_INLINE {
    constexpr int W = decltype(wtag)::value;
    // The task's float buffers, in one arena: S, DP, PD [N, 8] of a block; dk/dv
    // accumulators [N, H, DH]; half precision: k/v of b [N, H, DH] and the block's q, dO and
    // dq rows [8, DH] each. Each starts at a 4 KiB boundary plus its own multiple of 320
    // bytes (and the dO and dq rows are skewed too): equal offsets into different buffers
    // (dk and dv, q and dq rows) then do not alias modulo 4 KiB, where a load can falsely
    // wait on an unrelated store (measured: -25% time for bf16 at N = 32).
    constexpr int64_t kPage = 1024, kSkew = 80;  // floats
    const int64_t sizes[8] = {8 * g.N, 8 * g.N, 8 * g.N, kv_b, kv_b, is_f32 ? 0 : kv_b,
                              is_f32 ? 0 : kv_b, is_f32 ? 0 : 3 * 8 * DH + 3 * kSkew};
    int64_t total = kPage;
    for (int i = 0; i < 8; ++i) total += (sizes[i] + kPage - 1) / kPage * kPage + kPage;
    std::unique_ptr<float[]> arena(new float[total]);
    float* bufs[8];
    {
      const uintptr_t base = reinterpret_cast<uintptr_t>(arena.get());
      float* p = arena.get() + ((4096 - base % 4096) % 4096) / sizeof(float);
      for (int i = 0; i < 8; ++i) {
        bufs[i] = p + i * kSkew;
        p += (sizes[i] + kPage - 1) / kPage * kPage + kPage;
      }
    }
    float* const S = bufs[0];
    float* const DP = bufs[1];
    float* const PD = bufs[2];
    float* const dkf = bufs[3];
    float* const dvf = bufs[4];
    float* const kf = bufs[5];
    float* const vf = bufs[6];
    float* const rowbuf = bufs[7];
    std::vector<int64_t> koff(g.N);
    const float* kb = nullptr;
    const float* vb = nullptr;
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, bg = task / chunks;
      const int64_t b = bg / groups, h0 = bg % groups * hg, h1 = std::min(g.H, h0 + hg);
      const int64_t gw = (h1 - h0) * DH;  // floats of the group in a row of all heads
      if (bg != loaded) {
        for (int64_t j = 0; j < g.N; ++j) {
          const int64_t r = kv_row(indices, b, j, g.N);
          if constexpr (is_f32) {
            koff[j] = r * HD;
          } else {
            koff[j] = j * HD;
            load_row(k + r * HD + h0 * DH, kf + j * HD + h0 * DH, gw);
            load_row(v + r * HD + h0 * DH, vf + j * HD + h0 * DH, gw);
          }
        }
        if constexpr (is_f32) {
          kb = reinterpret_cast<const float*>(k);
          vb = reinterpret_cast<const float*>(v);
        } else {
          kb = kf;
          vb = vf;
        }
        loaded = bg;
      }
      for (int64_t j = 0; j < g.N; ++j) {
        std::fill(dkf + j * HD + h0 * DH, dkf + j * HD + h0 * DH + gw, 0.f);
        std::fill(dvf + j * HD + h0 * DH, dvf + j * HD + h0 * DH + gw, 0.f);
      }
      double* sb = ssum.data() + (b * chunks + c) * g.H * g.N;
      const float* bias_b = bias + b * g.N;
      const int64_t t1 = std::min(g.T, (c + 1) * rows);
      for (int64_t ts = c * rows; ts < t1; ts += kBwdSlab) {
        const int64_t ts1 = std::min(t1, ts + kBwdSlab);
        // The slab's blocks read its q/dO rows head by head (strided); prefetch the q, dO
        // and dq rows of the group for the task's next kBwdSlab t's (at its end, the next
        // chunk or b in memory order), spread over the blocks, so that they arrive from
        // DRAM ahead of use.
        const int64_t pf_t0 = b * g.T + ts1;
        const int64_t pf_nt = std::max<int64_t>(0, std::min(g.B * g.T, pf_t0 + kBwdSlab) - pf_t0);
        const int64_t pf_row_lines = (gw * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64;
        const int64_t pf_lines = pf_nt * pf_row_lines;
        const int64_t pf_blocks = (h1 - h0) * ((ts1 - ts + 7) / 8);
        const int64_t pf_per = (pf_lines + pf_blocks - 1) / pf_blocks;
        int64_t pf_next = 0;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t t0 = ts; t0 < ts1; t0 += 8) {
            const int nr = static_cast<int>(std::min<int64_t>(8, ts1 - t0));
            for (const int64_t pf_end = std::min(pf_lines, pf_next + pf_per); pf_next < pf_end;
                 ++pf_next) {
              const int64_t off = (pf_t0 + pf_next / pf_row_lines) * HD + h0 * DH;
              const int64_t line = 64 * (pf_next % pf_row_lines);
              __builtin_prefetch(reinterpret_cast<const char*>(q + off) + line);
              __builtin_prefetch(reinterpret_cast<const char*>(grad_out + off) + line);
              __builtin_prefetch(reinterpret_cast<const char*>(dq + off) + line, 1);
            }
            const float* qp[8];
            const float* dop[8];
            float* dqp[8];
            int64_t row8[8];
            alignas(32) float lse8[8];
            for (int r = 0; r < 8; ++r) {
              const int rr = std::min(r, nr - 1);
              const int64_t row = (b * g.T + t0 + rr) * g.H + h;  // flat (b, t, h)
              row8[r] = row;
              lse8[r] = lse[row];
              if constexpr (is_f32) {
                qp[r] = reinterpret_cast<const float*>(q) + row * DH;
                dop[r] = reinterpret_cast<const float*>(grad_out) + row * DH;
                dqp[r] = reinterpret_cast<float*>(dq) + row * DH;
              } else {
                float* qb = rowbuf + rr * DH;
                float* db = rowbuf + (8 + rr) * DH + 2 * kSkew;
                if (r == rr) {
                  load_row(q + row * DH, qb, DH);
                  load_row(grad_out + row * DH, db, DH);
                }
                qp[r] = qb;
                dop[r] = db;
                dqp[r] = rowbuf + (16 + rr) * DH + 3 * kSkew;
              }
            }
            backward_block<DH, W>(qp, dop, dqp, nr, row8, lse8, kb, vb, koff.data(), h * DH,
                               dkf + h * DH, dvf + h * DH, HD, bias_b, beta[h], g.N, dr, S, DP,
                               PD, sb + h * g.N);
            if constexpr (!is_f32) {
              for (int r = 0; r < nr; ++r) store_row(dqp[r], dq + row8[r] * DH, DH);
            }
          }
        }
      }
      for (int64_t j = 0; j < g.N; ++j) {
        const int64_t off = j * HD + h0 * DH;
        if (chunks == 1) {
          store_row(dkf + off, dk + b * kv_b + off, gw);
          store_row(dvf + off, dv + b * kv_b + off, gw);
        } else {
          std::copy(dkf + off, dkf + off + gw, dk_part.get() + (c * g.B + b) * kv_b + off);
          std::copy(dvf + off, dvf + off + gw, dv_part.get() + (c * g.B + b) * kv_b + off);
        }
      }
    }
  };
  // 16-float vectors in the AVX-512 clone, 8 in the AVX2 one, 4 in the portable build
  // (SSE2 or other 128-bit vectors: wider ones would not fit its registers).
  const Isa isa = active_isa<Isa::Avx512>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
#if PLUGLM_HAVE_ISA_CLONES
    if (isa == Isa::Avx512) {
      return run_avx512([&](int64_t b0, int64_t b1) PLUGLM_TASK_INLINE {
        body(std::integral_constant<int, 16>{}, b0, b1);
      }, begin, end);
    }
    if (isa == Isa::Avx2) {
      return run_avx2([&](int64_t b0, int64_t b1) PLUGLM_TASK_INLINE {
        body(std::integral_constant<int, 8>{}, b0, b1);
      }, begin, end);
    }
#endif
    body(std::integral_constant<int, 4>{}, begin, end);
  });

  if (chunks > 1) {
    // dk/dv = sum of the partials in chunk order, in blocks of kBlock elements.
    const int64_t n = g.B * kv_b;
    constexpr int64_t kBlock = 512;
    parallel_tasks((n + kBlock - 1) / kBlock, 4, [&](int64_t begin, int64_t end) PLUGLM_TASK_INLINE {
      alignas(32) float acc_k[kBlock], acc_v[kBlock];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t e0 = blk * kBlock, len = std::min(kBlock, n - e0);
        std::fill(acc_k, acc_k + len, 0.f);
        std::fill(acc_v, acc_v + len, 0.f);
        for (int64_t c = 0; c < chunks; ++c) {  // fixed order: deterministic
          axpy(1.f, dk_part.get() + c * n + e0, acc_k, len);
          axpy(1.f, dv_part.get() + c * n + e0, acc_v, len);
        }
        store_row(acc_k, dk + e0, len);
        store_row(acc_v, dv + e0, len);
      }
    });
  }
  // dbias_j = sum_h beta_h sum ds, dbeta_h = sum_j bias_j sum ds (double, fixed order).
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t j = 0; j < g.N; ++j) {
      double acc = 0.0;
      for (int64_t h = 0; h < g.H; ++h) {
        double sj = 0.0;
        for (int64_t c = 0; c < chunks; ++c) sj += ssum[((b * chunks + c) * g.H + h) * g.N + j];
        acc += sj * beta[h];
      }
      dbias[b * g.N + j] = static_cast<float>(acc);
    }
  }
  for (int64_t h = 0; h < g.H; ++h) {
    double acc = 0.0;
    for (int64_t b = 0; b < g.B; ++b) {
      for (int64_t j = 0; j < g.N; ++j) {
        double sj = 0.0;
        for (int64_t c = 0; c < chunks; ++c) sj += ssum[((b * chunks + c) * g.H + h) * g.N + j];
        acc += sj * bias[b * g.N + j];
      }
    }
    dbeta[h] = static_cast<float>(acc);
  }
}

// ------------------------------------------------------------------------------ checks

void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_dropout(double p) {
  TORCH_CHECK(std::isfinite(p) && p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
}

// q, bias, beta and the key/value tensors. Dense: kv [B, N, H, Dh]; gather: kv are tables
// [M, H, Dh] and indices [B, N] int64 in [0, M). Returns the geometry.
Geometry check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& indices, const at::Tensor& bias,
                      const at::Tensor& beta, double dropout_p) {
  check_cpu_contig(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dh], got shape ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "q must be float32, float16 or bfloat16, got ", dt);
  Geometry g{q.size(0), q.size(1), q.size(2), q.size(3), 0};
  TORCH_CHECK(g.H >= 1 && g.Dh >= 1, "q must have H >= 1 and Dh >= 1, got shape ", q.sizes());
  const bool gather = indices.has_value();
  const char* kname = gather ? "table_k" : "k";
  const char* vname = gather ? "table_v" : "v";
  check_cpu_contig(k, kname);
  check_cpu_contig(v, vname);
  TORCH_CHECK(k.scalar_type() == dt, kname, " must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, vname, " must have q's dtype ", dt, ", got ", v.scalar_type());
  if (gather) {
    const at::Tensor& idx = *indices;
    check_cpu_contig(idx, "indices");
    TORCH_CHECK(idx.scalar_type() == at::kLong, "indices must be int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == g.B,
                "indices must be [B=", g.B, ", N], got shape ", idx.sizes());
    g.N = idx.size(1);
    TORCH_CHECK(k.dim() == 3 && k.size(1) == g.H && k.size(2) == g.Dh,
                "table_k must be [M, H=", g.H, ", Dh=", g.Dh, "], got shape ", k.sizes());
    TORCH_CHECK(v.sizes() == k.sizes(), "table_v must have table_k's shape ", k.sizes(),
                ", got ", v.sizes());
    const int64_t M = k.size(0);
    if (idx.numel() > 0) {
      const int64_t* p = idx.data_ptr<int64_t>();
      const auto mm = std::minmax_element(p, p + idx.numel());
      TORCH_CHECK(*mm.first >= 0 && *mm.second < M, "indices must be in [0, ", M,
                  ") (rows of table_k), got values in [", *mm.first, ", ", *mm.second, "]");
    }
  } else {
    TORCH_CHECK(k.dim() == 4 && k.size(0) == g.B && k.size(2) == g.H && k.size(3) == g.Dh,
                "k must be [B=", g.B, ", N, H=", g.H, ", Dh=", g.Dh, "], got shape ", k.sizes());
    g.N = k.size(1);
    TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  }
  TORCH_CHECK(g.N >= 1 && g.N <= kMaxN, "N (number of retrieved entries) must be in [1, ", kMaxN,
              "], got ", g.N);
  check_cpu_contig(bias, "bias");
  check_cpu_contig(beta, "beta");
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "bias must be float32, got ", bias.scalar_type());
  TORCH_CHECK(beta.scalar_type() == at::kFloat, "beta must be float32, got ", beta.scalar_type());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == g.B && bias.size(1) == g.N,
              "bias must be [B=", g.B, ", N=", g.N, "], got shape ", bias.sizes());
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == g.H, "beta must be [H=", g.H, "], got shape ",
              beta.sizes());
  check_dropout(dropout_p);
  return g;
}

void check_backward_extras(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                           const at::Tensor& lse) {
  check_cpu_contig(grad_out, "grad_out");
  check_cpu_contig(out, "out");
  check_cpu_contig(lse, "lse");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "grad_out must match q (", q.sizes(), " ", q.scalar_type(), "), got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "out must match q (", q.sizes(), " ", q.scalar_type(), "), got ", out.sizes(), " ",
              out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must be float32 [B, T, H] = [", q.size(0), ", ", q.size(1), ", ", q.size(2),
              "], got ", lse.scalar_type(), " ", lse.sizes());
}

// ------------------------------------------------------------------------------- entry

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v,
                                           const c10::optional<at::Tensor>& indices,
                                           const at::Tensor& bias, const at::Tensor& beta,
                                           double dropout_p, int64_t seed) {
  const Geometry g = check_inputs(q, k, v, indices, bias, beta, dropout_p);
  at::Tensor out = at::empty_like(q);                                 // [B, T, H, Dh]
  at::Tensor lse = at::empty({g.B, g.T, g.H}, q.options().dtype(at::kFloat));  // [B, T, H]
  const Dropout dr = make_dropout(dropout_p, seed);
  const int64_t* idx = indices.has_value() ? indices->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ka_fwd_cpu", [&] {
    const auto args = std::make_tuple(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                      v.data_ptr<scalar_t>(), idx, bias.data_ptr<float>(),
                                      beta.data_ptr<float>(), out.data_ptr<scalar_t>(),
                                      lse.data_ptr<float>(), g, dr);
    switch (g.Dh) {
      case 32: std::apply(forward_kernel_fixed<scalar_t, 32>, args); break;
      case 64: std::apply(forward_kernel_fixed<scalar_t, 64>, args); break;
      case 128: std::apply(forward_kernel_fixed<scalar_t, 128>, args); break;
      default: std::apply(forward_kernel<scalar_t>, args);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& indices, const at::Tensor& bias, const at::Tensor& beta,
    const at::Tensor& out, const at::Tensor& lse, double dropout_p, int64_t seed) {
  const Geometry g = check_inputs(q, k, v, indices, bias, beta, dropout_p);
  check_backward_extras(grad_out, q, out, lse);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty({g.B, g.N, g.H, g.Dh}, q.options());  // rows, also for the gather
  at::Tensor dv = at::empty({g.B, g.N, g.H, g.Dh}, q.options());
  at::Tensor dbias = at::empty({g.B, g.N}, bias.options());
  at::Tensor dbeta = at::empty({g.H}, beta.options());
  const Dropout dr = make_dropout(dropout_p, seed);
  const int64_t* idx = indices.has_value() ? indices->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ka_bwd_cpu", [&] {
    const auto args = std::make_tuple(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), idx, bias.data_ptr<float>(), beta.data_ptr<float>(),
        lse.data_ptr<float>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
        dv.data_ptr<scalar_t>(), dbias.data_ptr<float>(), dbeta.data_ptr<float>(), g, dr);
    switch (g.Dh) {
      case 32: std::apply(backward_kernel_fixed<scalar_t, 32>, args); break;
      case 64: std::apply(backward_kernel_fixed<scalar_t, 64>, args); break;
      case 128: std::apply(backward_kernel_fixed<scalar_t, 128>, args); break;
      default: std::apply(backward_kernel<scalar_t>, args);
    }
  });
  return {dq, dk, dv, dbias, dbeta};
}

std::tuple<at::Tensor, at::Tensor> ka_fwd(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& bias,
                                          const at::Tensor& beta, double dropout_p, int64_t seed) {
  return forward(q, k, v, c10::nullopt, bias, beta, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ka_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias, const at::Tensor& beta, const at::Tensor& out, const at::Tensor& lse,
    double dropout_p, int64_t seed) {
  return backward(grad_out, q, k, v, c10::nullopt, bias, beta, out, lse, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor> gka_fwd(const at::Tensor& q, const at::Tensor& table_k,
                                           const at::Tensor& table_v, const at::Tensor& indices,
                                           const at::Tensor& bias, const at::Tensor& beta,
                                           double dropout_p, int64_t seed) {
  return forward(q, table_k, table_v, indices, bias, beta, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gka_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& table_k,
    const at::Tensor& table_v, const at::Tensor& indices, const at::Tensor& bias,
    const at::Tensor& beta, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t seed) {
  return backward(grad_out, q, table_k, table_v, indices, bias, beta, out, lse, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(pluglm, CPU, m) {
  m.impl("_C_knowledge_attention_fwd", &ka_fwd);
  m.impl("_C_knowledge_attention_bwd", &ka_bwd);
  m.impl("_C_gather_knowledge_attention_fwd", &gka_fwd);
  m.impl("_C_gather_knowledge_attention_bwd", &gka_bwd);
}
