// C++ CPU kernels of knowledge_attention and gather_knowledge_attention, forward and
// backward (OpenMP through at::parallel_for).
//
// Semantics: pluglm_kernels.reference.knowledge_attention. q [B, T, H, Dh] (pre-scaled),
// k/v [B, N, H, Dh] (or tables [M, H, Dh] read through indices [B, N]), bias [B, N] f32,
// beta [H] f32. logits s_j = q.k_j + beta_h bias_j; P = softmax_j(s); optional Philox
// dropout on P (philox.h); out = sum_j P_j v_j in q's dtype, lse = logsumexp_j(s) f32.
// Any Dh, N in [1, 256], f32/f16/bf16 with float32 accumulation.
//
// Work is split into tasks of (b, h, chunk of T): the N x Dh keys and values of one
// (b, h) are converted to float once per task and reused by every row of the chunk,
// since N is small and T large. The backward reduces dk/dv/dbias/dbeta over T through
// per-chunk partials summed in a fixed order, so results do not depend on the thread
// count or scheduling. The chunking depends on shapes only.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "philox.h"

namespace {

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

// Inner loops are force-inlined into the task bodies, which are compiled twice: for the
// portable baseline and for AVX2+FMA (picked at run time), so one binary is fast on
// current x86 CPUs and still runs on older ones.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PLUGLM_INLINE inline __attribute__((always_inline))
#define PLUGLM_TASK_INLINE __attribute__((always_inline))
#define PLUGLM_HAVE_AVX2_CLONE 1
#else
#define PLUGLM_INLINE inline
#define PLUGLM_TASK_INLINE
#define PLUGLM_HAVE_AVX2_CLONE 0
#endif

#if PLUGLM_HAVE_AVX2_CLONE
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}

bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// at::parallel_for over [0, n) running `f(begin, end)` in its AVX2 clone where supported.
template <typename F>
void parallel_tasks(int64_t n, int64_t grain, const F& f) {
#if PLUGLM_HAVE_AVX2_CLONE
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      run_avx2(f, begin, end);
    } else {
      f(begin, end);
    }
  });
#else
  at::parallel_for(0, n, grain, f);
#endif
}

PLUGLM_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

PLUGLM_INLINE void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename scalar_t>
PLUGLM_INLINE void load_row(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <typename scalar_t>
PLUGLM_INLINE void store_row(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
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

// s [N] <- logits of one row; returns their max.
PLUGLM_INLINE float logits_row(const float* qf, const float* kf, const float* bias_b, float beta_h,
                        const Geometry& g, float* s) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < g.N; ++j) {
    s[j] = dot(qf, kf + j * g.Dh, g.Dh) + beta_h * bias_b[j];
    m = std::max(m, s[j]);
  }
  return m;
}

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
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), idx, bias.data_ptr<float>(),
                             beta.data_ptr<float>(), out.data_ptr<scalar_t>(),
                             lse.data_ptr<float>(), g, dr);
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
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), idx,
                              bias.data_ptr<float>(), beta.data_ptr<float>(),
                              lse.data_ptr<float>(), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                              dbias.data_ptr<float>(), dbeta.data_ptr<float>(), g, dr);
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
