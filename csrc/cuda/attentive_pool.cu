// CUDA kernels of attentive pooling, forward and backward.
//
// Semantics: pluglm_kernels.reference.attentive_pool; the same two native ops as
// csrc/cpu/attentive_pool.cpp (see there and csrc/ops.cpp):
//  * attentive_pool_fwd: scores kernel (one warp per token: w2 . tanh(u) + b2, masked ->
//    -inf), then per (row, 256 columns of D) a block computes the masked max and sum of
//    the softmax and the weighted sum of x; block column 0 writes alpha.
//  * attentive_pool_bwd: per row, g.x_t by warps and ds = alpha (g.x - g.pooled); dx_direct
//    elementwise; du and per-split dw2 partials (summed by at::sum: deterministic); db2 is
//    identically zero (softmax shift invariance).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "checks.cuh"
#include "reduce.cuh"

namespace pluglm {
namespace enc {
namespace {

using at::Tensor;

struct PoolArgs {
  const bool* mask;  // [B, T]
  const float* w2;   // [Hp]
  const float* b2;   // [1] (read on the device: no host sync)
  int64_t B, T, D, Hp;
};

template <typename T>
__global__ void scores_kernel(PoolArgs p, const T* __restrict__ u, float* __restrict__ s) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= p.B * p.T) return;
  float acc = 0.f;
  for (int64_t i = lane; i < p.Hp; i += 32) acc += p.w2[i] * tanhf(static_cast<float>(u[n * p.Hp + i]));
  acc = warp_sum(acc);
  if (lane == 0) s[n] = p.mask[n] ? acc + p.b2[0] : -INFINITY;
}

// grid (B, ceil(D / kThreads)); alpha written by blockIdx.y == 0.
template <typename T>
__global__ void pool_kernel(PoolArgs p, const T* __restrict__ x, const float* __restrict__ s,
                            float* __restrict__ alpha, T* __restrict__ out) {
  __shared__ float red[kWarps];
  const int64_t b = blockIdx.x;
  const float* sb = s + b * p.T;
  float m = -INFINITY;
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) m = fmaxf(m, sb[t]);
  m = block_reduce<true>(m, red);
  if (m == -INFINITY) m = 0.f;  // empty row: every exp is 0
  float l = 0.f;
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) l += __expf(sb[t] - m);
  l = block_reduce<false>(l, red);
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (blockIdx.y == 0)
    for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) alpha[b * p.T + t] = __expf(sb[t] - m) * inv;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= p.D) return;
  float acc = 0.f;
  for (int64_t t = 0; t < p.T; ++t) {
    const float a = __expf(sb[t] - m) * inv;  // sb[t] is a broadcast (cached) load
    if (a != 0.f) acc += a * static_cast<float>(x[(b * p.T + t) * p.D + i]);
  }
  out[b * p.D + i] = static_cast<T>(acc);
}

// One block per row: ds_t = alpha_t (g.x_t - sum alpha g.x); ds holds g.x_t in between.
template <typename T>
__global__ void pool_ds_kernel(PoolArgs p, const float* __restrict__ g, const T* __restrict__ x,
                               const float* __restrict__ alpha, float* __restrict__ ds) {
  __shared__ float red[kWarps];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float gp = 0.f;
  for (int64_t t = warp; t < p.T; t += kWarps) {
    const int64_t n = b * p.T + t;
    float d = 0.f;
    for (int64_t i = lane; i < p.D; i += 32) d += g[b * p.D + i] * static_cast<float>(x[n * p.D + i]);
    d = warp_sum(d);
    const float a = p.mask[n] ? alpha[n] : 0.f;
    if (lane == 0) {
      ds[n] = d;
      gp += a * d;
    }
  }
  gp = block_reduce<false>(gp, red);  // also orders the ds writes before the reads below
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
    const int64_t n = b * p.T + t;
    const float a = p.mask[n] ? alpha[n] : 0.f;
    ds[n] = a * (ds[n] - gp);
  }
}

template <typename T>
__global__ void pool_dx_kernel(PoolArgs p, const float* __restrict__ g,
                               const float* __restrict__ alpha, T* __restrict__ dx) {
  const int64_t total = p.B * p.T * p.D;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = k / p.D, i = k - n * p.D;
    const float a = p.mask[n] ? alpha[n] : 0.f;
    dx[k] = static_cast<T>(a * g[(n / p.T) * p.D + i]);
  }
}

// grid (ceil(Hp / 32), splits), block (32, kWarps): column h per lane, tokens strided by
// warp within the split; partial dw2 per split.
template <typename T>
__global__ void pool_du_kernel(PoolArgs p, const T* __restrict__ u, const float* __restrict__ ds,
                               T* __restrict__ du, int64_t per_split, float* __restrict__ part) {
  __shared__ float red[kWarps][32];
  const int64_t h = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t N = p.B * p.T;
  const int64_t n0 = split * per_split, n1 = min(N, n0 + per_split);
  float acc = 0.f;
  if (h < p.Hp) {
    const float w2 = p.w2[h];
    for (int64_t n = n0 + threadIdx.y; n < n1; n += kWarps) {
      const float th = tanhf(static_cast<float>(u[n * p.Hp + h]));
      const float d = ds[n];
      du[n * p.Hp + h] = static_cast<T>(d * w2 * (1.f - th * th));
      acc += d * th;
    }
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && h < p.Hp) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
    part[split * p.Hp + h] = s;
  }
}

// ------------------------------------------------------------------------------ host

struct PoolInputs {
  Tensor x, mask, u, w2, b2;
  PoolArgs p;
};

PoolInputs check_pool(const Tensor& x, const Tensor& mask, const Tensor& u, const Tensor& w2,
                      const Tensor& b2) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be [B, T, D], got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  check_dev(u, x, "u");
  TORCH_CHECK(u.dim() == 3 && u.size(0) == B && u.size(1) == T && u.size(2) > 0, "u must be [",
              B, ", ", T, ", Hp], got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == x.scalar_type(), "u must have the dtype of x (", x.scalar_type(),
              "), got ", u.scalar_type());
  check_dev(mask, x, "mask");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
              "mask must have shape [", B, ", ", T, "], got ", mask.sizes());
  PoolInputs r;
  r.x = x.contiguous();
  r.u = u.contiguous();
  r.mask = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
  r.w2 = small_f32(w2, x, "w2", u.size(2));
  r.b2 = small_f32(b2, x, "b2", 1);
  r.p = {r.mask.data_ptr<bool>(), r.w2.data_ptr<float>(), r.b2.data_ptr<float>(), B, T, D,
         u.size(2)};
  return r;
}

std::tuple<Tensor, Tensor> attentive_pool_fwd(const Tensor& x, const Tensor& mask,
                                              const Tensor& u, const Tensor& w2,
                                              const Tensor& b2) {
  c10::cuda::CUDAGuard guard(x.device());
  PoolInputs in = check_pool(x, mask, u, w2, b2);
  const PoolArgs p = in.p;
  Tensor pooled = at::empty({p.B, p.D}, x.options());                    // [B, D]
  Tensor alpha = at::empty({p.B, p.T}, x.options().dtype(at::kFloat));  // [B, T]
  Tensor s = at::empty({p.B, p.T}, x.options().dtype(at::kFloat));      // scores [B, T]
  if (p.B == 0) return {pooled, alpha};
  if (p.T == 0 || p.D == 0) return {pooled.zero_(), alpha};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attentive_pool_fwd_cuda", [&] {
    scores_kernel<scalar_t><<<blocks_for(p.B * p.T, kWarps), kThreads, 0, stream>>>(
        p, in.u.data_ptr<scalar_t>(), s.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dim3 grid(static_cast<unsigned>(p.B), blocks_for(p.D, kThreads));
    pool_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        p, in.x.data_ptr<scalar_t>(), s.data_ptr<float>(), alpha.data_ptr<float>(),
        pooled.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pooled, alpha};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_pool_bwd(
    const Tensor& grad, const Tensor& x, const Tensor& mask, const Tensor& u, const Tensor& w2,
    const Tensor& alpha) {
  c10::cuda::CUDAGuard guard(x.device());
  PoolInputs in = check_pool(x, mask, u, w2, at::zeros({1}, x.options().dtype(at::kFloat)));
  const PoolArgs p = in.p;
  check_dev(grad, x, "grad");
  TORCH_CHECK(grad.is_floating_point() && grad.dim() == 2 && grad.size(0) == p.B &&
                  grad.size(1) == p.D,
              "grad must be a float [", p.B, ", ", p.D, "] tensor, got ", grad.scalar_type(), " ",
              grad.sizes());
  check_dev(alpha, x, "alpha");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.dim() == 2 && alpha.size(0) == p.B &&
                  alpha.size(1) == p.T,
              "alpha must be float32 [", p.B, ", ", p.T, "], got ", alpha.scalar_type(), " ",
              alpha.sizes());
  Tensor gf = grad.to(at::kFloat).contiguous(), ac = alpha.contiguous();
  Tensor dx = at::empty_like(in.x);  // [B, T, D]
  Tensor du = at::empty_like(in.u);  // [B, T, Hp]
  auto f32 = x.options().dtype(at::kFloat);
  const int64_t N = p.B * p.T;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(kSplits, N));
  const int64_t per_split = std::max<int64_t>(1, (N + splits - 1) / splits);
  Tensor part = at::zeros({splits, p.Hp}, f32);
  Tensor ds = at::empty({p.B, p.T}, f32);
  if (N > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attentive_pool_bwd_cuda", [&] {
      pool_ds_kernel<scalar_t><<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(
          p, gf.data_ptr<float>(), in.x.data_ptr<scalar_t>(), ac.data_ptr<float>(),
          ds.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t total = N * p.D;
      const unsigned eb = static_cast<unsigned>(std::min<int64_t>(blocks_for(total, kThreads), 65535));
      pool_dx_kernel<scalar_t><<<eb, kThreads, 0, stream>>>(p, gf.data_ptr<float>(),
                                                            ac.data_ptr<float>(),
                                                            dx.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dim3 grid(blocks_for(p.Hp, 32), static_cast<unsigned>(splits));
      dim3 block(32, kWarps);
      pool_du_kernel<scalar_t><<<grid, block, 0, stream>>>(p, in.u.data_ptr<scalar_t>(),
                                                           ds.data_ptr<float>(),
                                                           du.data_ptr<scalar_t>(), per_split,
                                                           part.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, du, part.sum(0), at::zeros({1}, f32)};
}

}  // namespace
}  // namespace enc
}  // namespace pluglm

TORCH_LIBRARY_IMPL(pluglm, CUDA, m) {
  m.impl("_C_attentive_pool_fwd", &pluglm::enc::attentive_pool_fwd);
  m.impl("_C_attentive_pool_bwd", &pluglm::enc::attentive_pool_bwd);
}
