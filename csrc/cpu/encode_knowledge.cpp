// C++ CPU kernels (OpenMP through at::parallel_for) of attentive pooling and the knowledge
// encoder, forward and backward.
//
// Semantics: pluglm_kernels.reference.embed / attentive_pool / encode_knowledge.
//  * _C_embed_layernorm_fwd: h[e, t] = LayerNorm(word[id] + pos[t + offset] + type[tt]),
//    one fused pass per token (gather, sum, two-pass mean/variance, affine) in float32;
//    h in the tables' dtype, mean/rstd [E, T] f32 kept for the backward.
//  * _C_attentive_pool_fwd: s_t = w2 . tanh(u_t) + b2 with u = x W1^T + b1 computed by a
//    matmul outside; masked max-subtracted softmax; pooled = sum_t alpha_t x_t. A row with
//    no token gives alpha = 0 and pooled = 0 (never NaN).
//  * _C_attentive_pool_bwd: dx_direct = alpha g, ds = alpha (g.x_t - g.pooled),
//    du = ds w2 (1 - tanh^2 u), dw2 = sum ds tanh(u); db2 = sum ds is exactly zero (the
//    softmax is shift invariant), so it is returned as zero. The caller finishes
//    dW1 = du^T x, db1 = sum du and dx = dx_direct + du W1 with matmuls.
//  * _C_embed_layernorm_bwd: LayerNorm backward on the recomputed normalised rows, then
//    scatter-add into the word / position / token-type tables and the LN weight and bias.
//
// Determinism: every reduction runs in a fixed order that depends on the shapes only. The
// table gradients (repeated ids) are split by columns, not by tokens: each task owns a
// slice of D for every table row and walks the tokens in order, so no two tasks touch
// the same element and no per-thread copies of [V, D] are needed.
//
// Hot loops are plain float loops compiled for AVX-512 / AVX2 / baseline and picked at
// load time (target_clones); tanh is a branch-free expm1-based version that vectorises
// (|error| < 2 ulp-ish of float, relative accuracy kept for small arguments).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PLUGLM_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define PLUGLM_CLONES
#endif

// ------------------------------------------------------------------------ float helpers

// expm1(y) for y in [-40, 0], branch-free: y = n ln2 + r, |r| <= ln2 / 2;
// expm1(y) = 2^n (1 + q(r)) - 1 with q = expm1 on the reduced range (degree-7 Taylor,
// truncation < 1e-8). n = 0 for |y| < ln2 / 2 gives q(r) itself: no cancellation near 0.
inline float expm1_neg(float y) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  y = std::max(y, -40.f);
  const float n = (y * kLog2e + kRound) - kRound;
  const float r = (y - n * kLn2Hi) - n * kLn2Lo;
  float q = 1.f / 5040.f;
  q = q * r + 1.f / 720.f;
  q = q * r + 1.f / 120.f;
  q = q * r + 1.f / 24.f;
  q = q * r + 1.f / 6.f;
  q = q * r + 0.5f;
  q = q * r + 1.f;
  q = q * r;  // expm1(r)
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);  // 2^n, n in [-58, 0]
  return scale * q + (scale - 1.f);
}

// tanh(x) = sign(x) * (-m) / (2 + m), m = expm1(-2|x|) in (-1, 0].
inline float tanh_f(float x) {
  const float m = expm1_neg(-2.f * std::fabs(x));
  const float t = -m / (2.f + m);
  return std::copysign(t, x);
}

PLUGLM_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

PLUGLM_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// w2 . tanh(u) over one row.
PLUGLM_CLONES float tanh_dot(const float* u, const float* w2, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += w2[i] * tanh_f(u[i]);
  return acc;
}

// du = ds w2 (1 - tanh^2 u) into du; dw2 += ds tanh(u).
PLUGLM_CLONES void tanh_bwd_row(const float* u, const float* w2, float ds, float* du,
                                float* dw2, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float t = tanh_f(u[i]);
    du[i] = ds * w2[i] * (1.f - t * t);
    dw2[i] += ds * t;
  }
}

PLUGLM_CLONES void add3(const float* a, const float* b, const float* c, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i] + c[i];
}

// Two-pass mean / variance of one row (float accumulation is enough after centring).
PLUGLM_CLONES void row_stats(const float* x, int64_t n, float eps, float* mean_out,
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

PLUGLM_CLONES void ln_apply(const float* x, float mean, float rstd, const float* w,
                            const float* b, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

// c1 = mean(w dy), c2 = mean(w dy xhat) of one row (LayerNorm backward).
PLUGLM_CLONES void ln_bwd_stats(const float* x, const float* dy, const float* w, float mean,
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

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

// A row of a float32 tensor without a copy, or converted into `buf`.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  load_row(src, buf, n);
  return buf;
}
template <>
inline const float* as_float<float>(const float* src, float*, int64_t) {
  return src;
}

// ------------------------------------------------------------------------------ checks

bool kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(kernel_float(t.scalar_type()), name,
              " must be float32, float16 or bfloat16 (float64 runs through backend='reference'), got ",
              t.scalar_type());
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// A small float parameter vector of n elements as contiguous float32 [n].
Tensor small_f32(const Tensor& t, const char* name, int64_t n) {
  check_cpu(t, name);
  TORCH_CHECK(t.is_floating_point(), name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got shape ", t.sizes());
  return t.to(at::kFloat).contiguous().reshape({n});
}

Tensor ids_long(const Tensor& t, const char* name, int64_t E, int64_t T) {
  check_cpu(t, name);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kLong || st == at::kInt || st == at::kShort || st == at::kByte, name,
              " must be int64, int32, int16 or uint8, got ", st);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == E && t.size(1) == T, name, " must have shape [", E,
              ", ", T, "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

Tensor mask_bool(const Tensor& mask, int64_t B, int64_t T) {
  check_cpu(mask, "mask");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
              "mask must have shape [", B, ", ", T, "], got ", mask.sizes());
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
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
  at::parallel_for(0, g.E * g.T, 8, [&](int64_t n0, int64_t n1) {
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
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
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
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
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

// ------------------------------------------------------------------ attentive pooling

struct PoolGeom {
  int64_t B, T, D, Hp;
};

struct PoolInputs {
  Tensor x, mask, u, w2, b2;
  PoolGeom g;
};

PoolInputs check_pool(const Tensor& x, const Tensor& mask, const Tensor& u, const Tensor& w2,
                      const Tensor& b2) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be [B, T, D], got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  check_cpu(u, "u");
  TORCH_CHECK(u.dim() == 3 && u.size(0) == B && u.size(1) == T, "u must be [", B, ", ", T,
              ", Hp], got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == x.scalar_type(), "u must have the dtype of x (", x.scalar_type(),
              "), got ", u.scalar_type());
  const int64_t Hp = u.size(2);
  TORCH_CHECK(Hp > 0, "u must have Hp > 0");
  PoolInputs r;
  r.x = x.contiguous();
  r.mask = mask_bool(mask, B, T);
  r.u = u.contiguous();
  r.w2 = small_f32(w2, "w2", Hp);
  r.b2 = small_f32(b2, "b2", 1);
  r.g = {B, T, D, Hp};
  return r;
}

template <typename T>
void pool_fwd_kernel(const PoolInputs& in, T* pooled, float* alpha) {
  const PoolGeom g = in.g;
  const T* x = in.x.data_ptr<T>();
  const T* u = in.u.data_ptr<T>();
  const bool* mask = in.mask.data_ptr<bool>();
  const float* w2 = in.w2.data_ptr<float>();
  const float b2 = in.b2.data_ptr<float>()[0];
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Scores (into alpha) over all tokens: the tanh pass is the expensive part.
  at::parallel_for(0, g.B * g.T, std::max<int64_t>(1, 8192 / g.Hp), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(g.Hp);
    for (int64_t n = n0; n < n1; ++n)
      alpha[n] = mask[n] ? tanh_dot(as_float(u + n * g.Hp, buf.data(), g.Hp), w2, g.Hp) + b2
                         : kNegInf;
  });
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(g.D), xb(g.D);
    for (int64_t b = b0; b < b1; ++b) {
      float* a = alpha + b * g.T;
      float m = kNegInf;
      bool any = false;  // from the mask, not the scores: all-NaN scores must stay NaN
      for (int64_t t = 0; t < g.T; ++t) {
        m = std::max(m, a[t]);
        any |= mask[b * g.T + t] != 0;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      if (!any) {  // no token: alpha = 0, pooled = 0
        std::fill(a, a + g.T, 0.f);
      } else {
        const float mm = (m == kNegInf) ? 0.f : m;  // every score NaN: exp(NaN) propagates
        float l = 0.f;
        for (int64_t t = 0; t < g.T; ++t) {
          a[t] = std::exp(a[t] - mm);  // exp(-inf) = 0 for masked tokens
          l += a[t];
        }
        const float inv = 1.f / l;  // l >= 1 (the max term)
        for (int64_t t = 0; t < g.T; ++t) {
          a[t] *= inv;
          if (a[t] != 0.f) axpy(a[t], as_float(x + (b * g.T + t) * g.D, xb.data(), g.D), acc.data(), g.D);
        }
      }
      store_row(acc.data(), pooled + b * g.D, g.D);
    }
  });
}

std::tuple<Tensor, Tensor> attentive_pool_fwd(const Tensor& x, const Tensor& mask,
                                              const Tensor& u, const Tensor& w2,
                                              const Tensor& b2) {
  PoolInputs in = check_pool(x, mask, u, w2, b2);
  Tensor pooled = at::empty({in.g.B, in.g.D}, x.options());                    // [B, D]
  Tensor alpha = at::empty({in.g.B, in.g.T}, x.options().dtype(at::kFloat));  // [B, T]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attentive_pool_fwd", [&] {
    pool_fwd_kernel<scalar_t>(in, pooled.data_ptr<scalar_t>(), alpha.data_ptr<float>());
  });
  return {pooled, alpha};
}

template <typename T>
void pool_bwd_kernel(const PoolInputs& in, const float* grad, const float* alpha, T* dx,
                     T* du, float* dw2_part) {
  const PoolGeom g = in.g;
  const T* x = in.x.data_ptr<T>();
  const T* u = in.u.data_ptr<T>();
  const bool* mask = in.mask.data_ptr<bool>();
  const float* w2 = in.w2.data_ptr<float>();
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> da(g.T), xb(g.D), row(g.D), ub(g.Hp), dub(g.Hp);
    for (int64_t b = b0; b < b1; ++b) {
      const float* gb = grad + b * g.D;
      const float* ab = alpha + b * g.T;
      // ds_t = alpha_t (g.x_t - sum_t' alpha_t' g.x_t')
      float gp = 0.f;
      for (int64_t t = 0; t < g.T; ++t) {
        const bool on = mask[b * g.T + t] && ab[t] != 0.f;
        da[t] = on ? dot(gb, as_float(x + (b * g.T + t) * g.D, xb.data(), g.D), g.D) : 0.f;
        gp += on ? ab[t] * da[t] : 0.f;
      }
      float* dw2b = dw2_part + b * g.Hp;
      std::fill(dw2b, dw2b + g.Hp, 0.f);
      for (int64_t t = 0; t < g.T; ++t) {
        const int64_t n = b * g.T + t;
        const bool on = mask[n] && ab[t] != 0.f;
        const float a = on ? ab[t] : 0.f;
        const float ds = a * (da[t] - gp);
#pragma omp simd
        for (int64_t i = 0; i < g.D; ++i) row[i] = a * gb[i];
        store_row(row.data(), dx + n * g.D, g.D);
        if (on) {
          tanh_bwd_row(as_float(u + n * g.Hp, ub.data(), g.Hp), w2, ds, dub.data(), dw2b, g.Hp);
        } else {
          std::fill(dub.begin(), dub.end(), 0.f);
        }
        store_row(dub.data(), du + n * g.Hp, g.Hp);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_pool_bwd(
    const Tensor& grad, const Tensor& x, const Tensor& mask, const Tensor& u, const Tensor& w2,
    const Tensor& alpha) {
  PoolInputs in = check_pool(x, mask, u, w2, at::zeros({1}, x.options().dtype(at::kFloat)));
  const PoolGeom g = in.g;
  check_cpu(grad, "grad");
  TORCH_CHECK(grad.is_floating_point() && grad.dim() == 2 && grad.size(0) == g.B &&
                  grad.size(1) == g.D,
              "grad must be a float [", g.B, ", ", g.D, "] tensor, got ", grad.scalar_type(), " ",
              grad.sizes());
  check_cpu(alpha, "alpha");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.dim() == 2 && alpha.size(0) == g.B &&
                  alpha.size(1) == g.T,
              "alpha must be float32 [", g.B, ", ", g.T, "], got ", alpha.scalar_type(), " ",
              alpha.sizes());
  Tensor gf = grad.to(at::kFloat).contiguous(), ac = alpha.contiguous();
  Tensor dx = at::empty_like(in.x);  // [B, T, D]
  Tensor du = at::empty_like(in.u);  // [B, T, Hp]
  Tensor dw2_part = at::empty({g.B, g.Hp}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attentive_pool_bwd", [&] {
    pool_bwd_kernel<scalar_t>(in, gf.data_ptr<float>(), ac.data_ptr<float>(),
                              dx.data_ptr<scalar_t>(), du.data_ptr<scalar_t>(),
                              dw2_part.data_ptr<float>());
  });
  // Sum the per-row partials in row order (deterministic for any thread count).
  Tensor dw2 = at::zeros({g.Hp}, x.options().dtype(at::kFloat));
  float* dw2p = dw2.data_ptr<float>();
  const float* part = dw2_part.data_ptr<float>();
  for (int64_t b = 0; b < g.B; ++b) axpy(1.f, part + b * g.Hp, dw2p, g.Hp);
  return {dx, du, dw2, at::zeros({1}, x.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(pluglm, CPU, m) {
  m.impl("_C_embed_layernorm_fwd", &embed_layernorm_fwd);
  m.impl("_C_embed_layernorm_bwd", &embed_layernorm_bwd);
  m.impl("_C_attentive_pool_fwd", &attentive_pool_fwd);
  m.impl("_C_attentive_pool_bwd", &attentive_pool_bwd);
}
