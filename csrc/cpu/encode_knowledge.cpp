// C++ CPU kernels (OpenMP through at::parallel_for) of the knowledge encoder's embedding
// gather + LayerNorm, forward and backward. encode_knowledge runs them, then the attentive
// pooling of attentive_pool.cpp (the composition is in pluglm_kernels/ops.py).
//
// Semantics: pluglm_kernels.reference.embed / encode_knowledge.
//  * _C_embed_layernorm_fwd: h[e, t] = LayerNorm(word[id] + pos[t + offset] + type[tt]),
//    one fused pass per token (gather, sum, two-pass mean/variance, affine) in float32;
//    h in the tables' dtype, mean/rstd [E, T] f32 kept for the backward.
//  * _C_embed_layernorm_bwd: LayerNorm backward on the recomputed normalised rows, then
//    scatter-add into the word / position / token-type tables and the LN weight and bias.
//
// Determinism: every reduction runs in a fixed order that depends on the shapes only. The
// table gradients (repeated ids) are split by columns, not by tokens: each task owns a
// slice of D for every table row and walks the tokens in order, so no two tasks touch
// the same element and no per-thread copies of [V, D] are needed.
//
// Hot loops are plain float loops run in the AVX-512 / AVX2 / baseline clone that isa.h
// picks per call (PLUGLM_CPU_ISA caps it).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "isa.h"
#include "tanh.h"

namespace {

using at::Tensor;
using namespace pluglm::cpu;

// ------------------------------------------------------------------- LayerNorm helpers

PLUGLM_INLINE void add3(const float* a, const float* b, const float* c, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i] + c[i];
}

// Two-pass mean / variance of one row (float accumulation is enough after centring).
PLUGLM_INLINE void row_stats(const float* x, int64_t n, float eps, float* mean_out,
                             float* rstd_out) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const float mean = s / static_cast<float>(n);
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < n; ++i) v += (x[i] - mean) * (x[i] - mean);
  *mean_out = mean;
  *rstd_out = 1.f / std::sqrt(v / static_cast<float>(n) + eps);
}

PLUGLM_INLINE void ln_apply(const float* x, float mean, float rstd, const float* w,
                            const float* b, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

// c1 = mean(w dy), c2 = mean(w dy xhat) of one row (LayerNorm backward).
PLUGLM_INLINE void ln_bwd_stats(const float* x, const float* dy, const float* w, float mean,
                                float rstd, int64_t n, float* c1, float* c2) {
  float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const float wdy = w[i] * dy[i];
    a += wdy;
    b += wdy * (x[i] - mean) * rstd;
  }
  *c1 = a / static_cast<float>(n);
  *c2 = b / static_cast<float>(n);
}

// ------------------------------------------------------------------------------ checks

Tensor ids_long(const Tensor& t, const char* name, int64_t E, int64_t T) {
  check_cpu(t, name);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kLong || st == at::kInt || st == at::kShort || st == at::kByte, name,
              " must be int64, int32, int16 or uint8, got ", st);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == E && t.size(1) == T, name, " must have shape [", E,
              ", ", T, "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

struct EmbedGeom {
  int64_t E, T, D, V, P, Tt, off;
};

struct Tables {
  Tensor ids, tt, word, pos, type;  // ids/tt int64 [E, T] (tt undefined: all zero)
  EmbedGeom g;
};

Tables check_tables(const Tensor& token_ids, const c10::optional<Tensor>& token_type_ids,
                    const Tensor& word, const Tensor& pos, const Tensor& type,
                    int64_t position_offset) {
  TORCH_CHECK(token_ids.dim() == 2, "token_ids must be [E, T], got ", token_ids.sizes());
  check_cpu(word, "word_embeddings");
  check_float(word, "word_embeddings");
  TORCH_CHECK(word.dim() == 2, "word_embeddings must be [V, D], got ", word.sizes());
  const int64_t D = word.size(1);
  TORCH_CHECK(D > 0, "word_embeddings must have D > 0");
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{pos, "position_embeddings"},
                         {type, "token_type_embeddings"}}) {
    check_cpu(t, name);
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D, name, " must be [*, ", D, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == word.scalar_type(), name, " must have the dtype of word_embeddings (",
                word.scalar_type(), "), got ", t.scalar_type());
  }
  TORCH_CHECK(type.size(0) > 0, "token_type_embeddings must have at least one row");
  const int64_t E = token_ids.size(0), T = token_ids.size(1);
  TORCH_CHECK(position_offset >= 0, "position_offset must be >= 0, got ", position_offset);
  TORCH_CHECK(T + position_offset <= pos.size(0), "token_ids has ", T, " positions (+ offset ",
              position_offset, ") but position_embeddings has ", pos.size(0), " rows");
  Tables r;
  r.ids = ids_long(token_ids, "token_ids", E, T);
  if (token_type_ids.has_value() && token_type_ids->defined())
    r.tt = ids_long(*token_type_ids, "token_type_ids", E, T);
  r.word = word.contiguous();
  r.pos = pos.contiguous();
  r.type = type.contiguous();
  r.g = {E, T, D, word.size(0), pos.size(0), type.size(0), position_offset};
  return r;
}

// First out-of-range id seen by any thread (reported after the parallel loop).
struct BadId {
  std::atomic<bool> word{false}, type{false};
  std::atomic<int64_t> word_val{0}, type_val{0};
  void report(const EmbedGeom& g) const {
    TORCH_CHECK(!word.load(), "token_ids must be in [0, ", g.V, ") (rows of word_embeddings), got ",
                word_val.load());
    TORCH_CHECK(!type.load(), "token_type_ids must be in [0, ", g.Tt,
                ") (rows of token_type_embeddings), got ", type_val.load());
  }
};

// Row indices of token n in the three tables; false (and recorded) when out of range.
inline bool token_rows(const int64_t* ids, const int64_t* tt, const EmbedGeom& g, int64_t n,
                       BadId& bad, int64_t& wr, int64_t& pr, int64_t& tr) {
  wr = ids[n];
  tr = tt ? tt[n] : 0;
  pr = n % g.T + g.off;
  bool ok = true;
  if (wr < 0 || wr >= g.V) {
    bad.word_val.store(wr);
    bad.word.store(true);
    ok = false;
  }
  if (tr < 0 || tr >= g.Tt) {
    bad.type_val.store(tr);
    bad.type.store(true);
    ok = false;
  }
  return ok;
}

// ------------------------------------------------------------- embedding + LayerNorm fwd

template <typename T>
void embed_ln_fwd_kernel(const Tables& tb, const float* w, const float* b, float eps, T* h,
                         float* mean, float* rstd, BadId& bad) {
  const EmbedGeom g = tb.g;
  const int64_t* ids = tb.ids.data_ptr<int64_t>();
  const int64_t* tt = tb.tt.defined() ? tb.tt.data_ptr<int64_t>() : nullptr;
  const T* word = tb.word.data_ptr<T>();
  const T* pos = tb.pos.data_ptr<T>();
  const T* type = tb.type.data_ptr<T>();
  const int64_t D = g.D;
  parallel_for_isa(g.E * g.T, 8, [&](int64_t n0, int64_t n1) PLUGLM_TASK_INLINE {
    std::vector<float> bw(D), bp(D), bt(D), x(D), y(D);
    for (int64_t n = n0; n < n1; ++n) {
      int64_t wr, pr, tr;
      if (!token_rows(ids, tt, g, n, bad, wr, pr, tr)) continue;
      add3(as_float(word + wr * D, bw.data(), D), as_float(pos + pr * D, bp.data(), D),
           as_float(type + tr * D, bt.data(), D), x.data(), D);
      row_stats(x.data(), D, eps, mean + n, rstd + n);
      ln_apply(x.data(), mean[n], rstd[n], w, b, y.data(), D);
      store_row(y.data(), h + n * D, D);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> embed_layernorm_fwd(
    const Tensor& token_ids, const c10::optional<Tensor>& token_type_ids, const Tensor& word,
    const Tensor& pos, const Tensor& type, const Tensor& ln_w, const Tensor& ln_b, double eps,
    int64_t position_offset) {
  Tables tb = check_tables(token_ids, token_type_ids, word, pos, type, position_offset);
  const EmbedGeom g = tb.g;
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  Tensor w = small_f32(ln_w, "ln_weight", g.D), b = small_f32(ln_b, "ln_bias", g.D);
  Tensor h = at::empty({g.E, g.T, g.D}, word.options());        // [E, T, D]
  Tensor mean = at::empty({g.E, g.T}, word.options().dtype(at::kFloat));  // [E, T]
  Tensor rstd = at::empty({g.E, g.T}, word.options().dtype(at::kFloat));  // [E, T]
  BadId bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "embed_ln_fwd", [&] {
    embed_ln_fwd_kernel<scalar_t>(tb, w.data_ptr<float>(), b.data_ptr<float>(),
                                  static_cast<float>(eps), h.data_ptr<scalar_t>(),
                                  mean.data_ptr<float>(), rstd.data_ptr<float>(), bad);
  });
  bad.report(g);
  return {h, mean, rstd};
}

// ------------------------------------------------------------- embedding + LayerNorm bwd

// Columns per task of the column-split scatter: a multiple of 16 floats, and enough tasks
// to keep every thread busy.
int64_t column_chunk(int64_t D) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t c = (D + 2 * threads - 1) / (2 * threads);
  c = ((c + 15) / 16) * 16;
  return std::max<int64_t>(16, std::min<int64_t>(c, 256));
}

template <typename T>
void embed_ln_bwd_kernel(const Tables& tb, const T* dh, const float* w, const float* mean,
                         const float* rstd, T* dword, T* dpos, T* dtype, float* dlnw,
                         float* dlnb, BadId& bad) {
  const EmbedGeom g = tb.g;
  const int64_t* ids = tb.ids.data_ptr<int64_t>();
  const int64_t* tt = tb.tt.defined() ? tb.tt.data_ptr<int64_t>() : nullptr;
  const T* word = tb.word.data_ptr<T>();
  const T* pos = tb.pos.data_ptr<T>();
  const T* type = tb.type.data_ptr<T>();
  const int64_t D = g.D, N = g.E * g.T;

  // Pass 1 (over tokens): the two row reductions of the LayerNorm backward.
  std::vector<float> c1(N), c2(N);
  parallel_for_isa(N, 8, [&](int64_t n0, int64_t n1) PLUGLM_TASK_INLINE {
    std::vector<float> bw(D), bp(D), bt(D), x(D), dy(D);
    for (int64_t n = n0; n < n1; ++n) {
      int64_t wr, pr, tr;
      if (!token_rows(ids, tt, g, n, bad, wr, pr, tr)) continue;
      add3(as_float(word + wr * D, bw.data(), D), as_float(pos + pr * D, bp.data(), D),
           as_float(type + tr * D, bt.data(), D), x.data(), D);
      const float* dyf = as_float(dh + n * D, dy.data(), D);
      ln_bwd_stats(x.data(), dyf, w, mean[n], rstd[n], D, &c1[n], &c2[n]);
    }
  });
  bad.report(g);

  // Pass 2 (over column slices): every task owns columns [c0, c0 + cw) of every table row
  // and of dln_w/dln_b, and adds the tokens in order (deterministic, no races).
  const int64_t cw = column_chunk(D);
  const int64_t nchunks = (D + cw - 1) / cw;
  const bool f32 = std::is_same<T, float>::value;
  parallel_for_isa(nchunks, 1, [&](int64_t k0, int64_t k1) PLUGLM_TASK_INLINE {
    std::vector<float> acc_w, acc_p, acc_t;  // float accumulators for half tables
    std::vector<float> bw(cw), bp(cw), bt(cw), bdy(cw), gx(cw);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * cw, n_c = std::min(cw, D - c0);
      // [rows, n_c] accumulators: the output slice itself for float32 tables.
      auto slice_acc = [&](T* out, int64_t rows, std::vector<float>& buf) -> float* {
        if (f32) {
          for (int64_t r = 0; r < rows; ++r)
            std::memset(reinterpret_cast<float*>(out) + r * D + c0, 0, n_c * sizeof(float));
          return reinterpret_cast<float*>(out) + c0;
        }
        buf.assign(rows * n_c, 0.f);
        return buf.data();
      };
      const int64_t ld = f32 ? D : n_c;  // row stride of the accumulators
      float* aw = slice_acc(dword, g.V, acc_w);
      float* ap = slice_acc(dpos, g.P, acc_p);
      float* at_ = slice_acc(dtype, g.Tt, acc_t);
      float* lw = dlnw + c0;
      float* lb = dlnb + c0;
      std::fill(lw, lw + n_c, 0.f);
      std::fill(lb, lb + n_c, 0.f);
      for (int64_t n = 0; n < N; ++n) {
        int64_t wr, pr, tr;
        token_rows(ids, tt, g, n, bad, wr, pr, tr);
        const float* xw = as_float(word + wr * D + c0, bw.data(), n_c);
        const float* xp = as_float(pos + pr * D + c0, bp.data(), n_c);
        const float* xt = as_float(type + tr * D + c0, bt.data(), n_c);
        const float* dy = as_float(dh + n * D + c0, bdy.data(), n_c);
        const float mu = mean[n], rs = rstd[n], a1 = c1[n], a2 = c2[n];
        const float* wc = w + c0;
        float* rw = aw + wr * ld;
        float* rp = ap + pr * ld;
        float* rt = at_ + tr * ld;
#pragma omp simd
        for (int64_t i = 0; i < n_c; ++i) {
          const float xh = (xw[i] + xp[i] + xt[i] - mu) * rs;
          const float gi = rs * (wc[i] * dy[i] - a1 - xh * a2);
          rw[i] += gi;
          rp[i] += gi;
          rt[i] += gi;
          lw[i] += dy[i] * xh;
          lb[i] += dy[i];
        }
      }
      if (!f32) {
        for (int64_t r = 0; r < g.V; ++r) store_row(aw + r * n_c, dword + r * D + c0, n_c);
        for (int64_t r = 0; r < g.P; ++r) store_row(ap + r * n_c, dpos + r * D + c0, n_c);
        for (int64_t r = 0; r < g.Tt; ++r) store_row(at_ + r * n_c, dtype + r * D + c0, n_c);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> embed_layernorm_bwd(
    const Tensor& dh, const Tensor& token_ids, const c10::optional<Tensor>& token_type_ids,
    const Tensor& word, const Tensor& pos, const Tensor& type, const Tensor& ln_w,
    const Tensor& mean, const Tensor& rstd, int64_t position_offset) {
  Tables tb = check_tables(token_ids, token_type_ids, word, pos, type, position_offset);
  const EmbedGeom g = tb.g;
  check_cpu(dh, "dh");
  TORCH_CHECK(dh.dim() == 3 && dh.size(0) == g.E && dh.size(1) == g.T && dh.size(2) == g.D,
              "dh must have shape [", g.E, ", ", g.T, ", ", g.D, "], got ", dh.sizes());
  TORCH_CHECK(dh.scalar_type() == word.scalar_type(), "dh must have the dtype of the tables (",
              word.scalar_type(), "), got ", dh.scalar_type());
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    check_cpu(t, name);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == g.E &&
                    t.size(1) == g.T,
                name, " must be float32 [", g.E, ", ", g.T, "], got ", t.scalar_type(), " ",
                t.sizes());
  }
  Tensor w = small_f32(ln_w, "ln_weight", g.D);
  Tensor dhc = dh.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  Tensor dword = at::empty_like(tb.word);  // [V, D]; every element written
  Tensor dpos = at::empty_like(tb.pos);    // [P, D]
  Tensor dtype = at::empty_like(tb.type);  // [Tt, D]
  Tensor dlnw = at::empty({g.D}, word.options().dtype(at::kFloat));
  Tensor dlnb = at::empty({g.D}, word.options().dtype(at::kFloat));
  BadId bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "embed_ln_bwd", [&] {
    embed_ln_bwd_kernel<scalar_t>(tb, dhc.data_ptr<scalar_t>(), w.data_ptr<float>(),
                                  mc.data_ptr<float>(), rc.data_ptr<float>(),
                                  dword.data_ptr<scalar_t>(), dpos.data_ptr<scalar_t>(),
                                  dtype.data_ptr<scalar_t>(), dlnw.data_ptr<float>(),
                                  dlnb.data_ptr<float>(), bad);
  });
  return {dword, dpos, dtype, dlnw, dlnb};
}

// ------------------------------------------------ factored encoder (inference only)
//
// The pooler's u_t = W1 x_t + b1 with x_t = LayerNorm(z_t), z_t = word[id] + pos[p] + type[tt]
// is linear in z_t once the LayerNorm statistics are known:
//   u_t = (word_u[id] + pos_u[p] + type_u[tt] - mean_t * gamma_u) * rstd_t + bias_u
// with word_u = (word * ln_w) W1^T, pos_u, type_u likewise, gamma_u = W1 ln_w and
// bias_u = W1 ln_b + b1, precomputed once per weight version (functional.encoder_tables).
// That turns the O(D Hp) matmul per token into O(D + Hp) work, and the pooled row is
// sum_t alpha_t x_t = ln_w * sum_t alpha_t (z_t - mean_t) rstd_t + ln_b: one pass per entry
// over its tokens, nothing [E, T, D]-sized allocated. Semantics otherwise those of
// encode_knowledge (masked, max-subtracted softmax; an entry with no token pools to zero).

template <typename T>
void encode_factored_kernel(const Tables& tb, const bool* mask, const float* lnw,
                            const float* lnb, const float* word_u, const float* pos_u,
                            const float* type_u, const float* gamma_u, const float* bias_u,
                            const float* w2, float b2, int64_t Hp, float eps, T* pooled,
                            BadId& bad) {
  const EmbedGeom g = tb.g;
  const int64_t* ids = tb.ids.data_ptr<int64_t>();
  const int64_t* tt = tb.tt.defined() ? tb.tt.data_ptr<int64_t>() : nullptr;
  const T* word = tb.word.data_ptr<T>();
  const T* pos = tb.pos.data_ptr<T>();
  const T* type = tb.type.data_ptr<T>();
  const int64_t D = g.D, Tn = g.T;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  parallel_for_isa(g.E, 1, [&](int64_t e0, int64_t e1) PLUGLM_TASK_INLINE {
    // xhat rows of one entry (T x D floats, L2-sized for 128-token entries) and its scores
    std::vector<float> bw(D), bp(D), bt(D), z(D), acc(D), xhat(Tn * D), s(Tn), u(Hp);
    for (int64_t e = e0; e < e1; ++e) {
      bool any = false;
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t n = e * Tn + t;
        s[t] = kNegInf;
        if (!mask[n]) continue;
        any = true;
        int64_t wr, pr, tr;
        if (!token_rows(ids, tt, g, n, bad, wr, pr, tr)) continue;
        add3(as_float(word + wr * D, bw.data(), D), as_float(pos + pr * D, bp.data(), D),
             as_float(type + tr * D, bt.data(), D), z.data(), D);
        float mu, rs;
        row_stats(z.data(), D, eps, &mu, &rs);
        float* xh = xhat.data() + t * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) xh[i] = (z[i] - mu) * rs;
        const float* a = word_u + wr * Hp;
        const float* p = pos_u + pr * Hp;
        const float* c = type_u + tr * Hp;
        float* ur = u.data();
#pragma omp simd
        for (int64_t i = 0; i < Hp; ++i) ur[i] = (a[i] + p[i] + c[i] - mu * gamma_u[i]) * rs + bias_u[i];
        s[t] = tanh_dot(ur, w2, Hp) + b2;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      if (any) {  // the same softmax as attentive_pool_fwd (all-NaN scores stay NaN)
        float m = kNegInf;
        for (int64_t t = 0; t < Tn; ++t) m = std::max(m, s[t]);
        const float mm = (m == kNegInf) ? 0.f : m;
        float l = 0.f;
        for (int64_t t = 0; t < Tn; ++t) {
          s[t] = std::exp(s[t] - mm);
          l += s[t];
        }
        const float inv = 1.f / l;
        for (int64_t t = 0; t < Tn; ++t) {
          const float al = s[t] * inv;
          if (al != 0.f) axpy(al, xhat.data() + t * D, acc.data(), D);
        }
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) acc[i] = acc[i] * lnw[i] + lnb[i];
      }
      store_row(acc.data(), pooled + e * D, D);
    }
  });
}

Tensor f32_table(const Tensor& t, const char* name, int64_t rows, int64_t Hp) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == Hp, name, " must be [", rows,
              ", ", Hp, "], got ", t.sizes());
  return t.contiguous();
}

Tensor encode_knowledge_factored(const Tensor& token_ids, const Tensor& mask,
                                 const c10::optional<Tensor>& token_type_ids, const Tensor& word,
                                 const Tensor& pos, const Tensor& type, const Tensor& ln_w,
                                 const Tensor& ln_b, const Tensor& word_u, const Tensor& pos_u,
                                 const Tensor& type_u, const Tensor& gamma_u,
                                 const Tensor& bias_u, const Tensor& w2, const Tensor& b2,
                                 double eps, int64_t position_offset) {
  Tables tb = check_tables(token_ids, token_type_ids, word, pos, type, position_offset);
  const EmbedGeom g = tb.g;
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  check_cpu(mask, "mask");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == g.E && mask.size(1) == g.T,
              "mask must have shape [", g.E, ", ", g.T, "], got ", mask.sizes());
  Tensor m = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
  TORCH_CHECK(word_u.dim() == 2, "word_u must be [V, Hp], got ", word_u.sizes());
  const int64_t Hp = word_u.size(1);
  TORCH_CHECK(Hp > 0, "word_u must have Hp > 0");
  Tensor wu = f32_table(word_u, "word_u", g.V, Hp), pu = f32_table(pos_u, "pos_u", g.P, Hp),
         tu = f32_table(type_u, "type_u", g.Tt, Hp);
  Tensor gu = small_f32(gamma_u, "gamma_u", Hp), bu = small_f32(bias_u, "bias_u", Hp);
  Tensor w = small_f32(ln_w, "ln_weight", g.D), b = small_f32(ln_b, "ln_bias", g.D);
  Tensor w2f = small_f32(w2, "w2", Hp), b2f = small_f32(b2, "b2", 1);
  Tensor pooled = at::empty({g.E, g.D}, word.options());  // [E, D]
  BadId bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "encode_factored", [&] {
    encode_factored_kernel<scalar_t>(
        tb, m.data_ptr<bool>(), w.data_ptr<float>(), b.data_ptr<float>(), wu.data_ptr<float>(),
        pu.data_ptr<float>(), tu.data_ptr<float>(), gu.data_ptr<float>(), bu.data_ptr<float>(),
        w2f.data_ptr<float>(), b2f.data_ptr<float>()[0], Hp, static_cast<float>(eps),
        pooled.data_ptr<scalar_t>(), bad);
  });
  bad.report(g);
  return pooled;
}

}  // namespace

TORCH_LIBRARY_IMPL(pluglm, CPU, m) {
  m.impl("_C_embed_layernorm_fwd", &embed_layernorm_fwd);
  m.impl("_C_embed_layernorm_bwd", &embed_layernorm_bwd);
  m.impl("_C_encode_knowledge_factored", &encode_knowledge_factored);
}
