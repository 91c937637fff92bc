// C++ CPU kernels (OpenMP through at::parallel_for) of attentive pooling, forward and
// backward; the encoder (encode_knowledge.cpp) runs them after its embedding LayerNorm.
//
// Semantics: pluglm_kernels.reference.attentive_pool.
//  * _C_attentive_pool_fwd: s_t = w2 . tanh(u_t) + b2 with u = x W1^T + b1 computed by a
//    matmul outside; masked max-subtracted softmax; pooled = sum_t alpha_t x_t. A row with
//    no token gives alpha = 0 and pooled = 0 (never NaN).
//  * _C_attentive_pool_bwd: dx_direct = alpha g, ds = alpha (g.x_t - g.pooled),
//    du = ds w2 (1 - tanh^2 u), dw2 = sum ds tanh(u); db2 = sum ds is exactly zero (the
//    softmax is shift invariant), so it is returned as zero. The caller finishes
//    dW1 = du^T x, db1 = sum du and dx = dx_direct + du W1 with matmuls.
//
// Determinism: every reduction runs in a fixed order that depends on the shapes only (dw2
// through per-row partials summed in row order).
//
// Hot loops are plain float loops run in the AVX-512 / AVX2 / baseline clone that isa.h
// picks per call (PLUGLM_CPU_ISA caps it); tanh is a branch-free expm1-based version that
// vectorises (|error| < 2 ulp-ish of float, relative accuracy kept for small arguments).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "isa.h"
#include "tanh.h"

namespace {

using at::Tensor;
using namespace pluglm::cpu;

// du = ds w2 (1 - tanh^2 u) into du; dw2 += ds tanh(u).
PLUGLM_INLINE void tanh_bwd_row(const float* u, const float* w2, float ds, float* du,
                                float* dw2, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float t = tanh_f(u[i]);
    du[i] = ds * w2[i] * (1.f - t * t);
    dw2[i] += ds * t;
  }
}

// ------------------------------------------------------------------------------ checks

Tensor mask_bool(const Tensor& mask, int64_t B, int64_t T) {
  check_cpu(mask, "mask");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
              "mask must have shape [", B, ", ", T, "], got ", mask.sizes());
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

// ---------------------------------------------------------------------------- kernels

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
  parallel_for_isa(g.B * g.T, std::max<int64_t>(1, 8192 / g.Hp), [&](int64_t n0, int64_t n1) PLUGLM_TASK_INLINE {
    std::vector<float> buf(g.Hp);
    for (int64_t n = n0; n < n1; ++n)
      alpha[n] = mask[n] ? tanh_dot(as_float(u + n * g.Hp, buf.data(), g.Hp), w2, g.Hp) + b2
                         : kNegInf;
  });
  parallel_for_isa(g.B, 1, [&](int64_t b0, int64_t b1) PLUGLM_TASK_INLINE {
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
  parallel_for_isa(g.B, 1, [&](int64_t b0, int64_t b1) PLUGLM_TASK_INLINE {
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
  m.impl("_C_attentive_pool_fwd", &attentive_pool_fwd);
  m.impl("_C_attentive_pool_bwd", &attentive_pool_bwd);
}
