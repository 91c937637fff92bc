// CUDA kernels of attentive pooling and the knowledge encoder, forward and backward.
//
// Semantics: pluglm_kernels.reference.embed / attentive_pool / encode_knowledge; the same
// four native ops as csrc/cpu/encode_knowledge.cpp (see there and csrc/ops.cpp):
//  * embed_layernorm_fwd: one warp per token gathers word + position + token-type rows,
//    two-pass LayerNorm in float32 (the rows are re-read from L1/L2 instead of held in
//    registers, so any D works), writes h (tables' dtype), mean, rstd.
//  * attentive_pool_fwd: scores kernel (one warp per token: w2 . tanh(u) + b2, masked ->
//    -inf), then per (row, 256 columns of D) a block computes the masked max and sum of
//    the softmax and the weighted sum of x; block column 0 writes alpha.
//  * attentive_pool_bwd: per row, g.x_t by warps and ds = alpha (g.x - g.pooled); dx_direct
//    elementwise; du and per-split dw2 partials (summed by at::sum: deterministic); db2 is
//    identically zero (softmax shift invariance).
//  * embed_layernorm_bwd: one warp per token recomputes the normalised row and adds its
//    gradient into float32 copies of the three tables with atomicAdd (repeated ids: the
//    order of the adds, hence the last bits, can vary run to run); dln_w/dln_b are
//    per-split partials over tokens summed by at::sum (deterministic).
// Out-of-range ids trip a device-side assert (like torch indexing); the Python wrapper
// checks them on the host first in eager mode.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace pluglm {
namespace enc {
namespace {

using at::Tensor;

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

struct EmbedArgs {
  const int64_t* ids;  // [E, T]
  const int64_t* tt;   // [E, T] or nullptr
  int64_t N, T, D, V, Tt, off;
};

__device__ __forceinline__ void token_rows(const EmbedArgs& a, int64_t n, int64_t& wr,
                                           int64_t& pr, int64_t& tr) {
  wr = a.ids[n];
  tr = a.tt ? a.tt[n] : 0;
  pr = n % a.T + a.off;
  CUDA_KERNEL_ASSERT(wr >= 0 && wr < a.V && "encode_knowledge: token id out of range");
  CUDA_KERNEL_ASSERT(tr >= 0 && tr < a.Tt && "encode_knowledge: token type id out of range");
}

template <typename T>
__device__ __forceinline__ float row_x(const T* word, const T* pos, const T* type, int64_t wr,
                                       int64_t pr, int64_t tr, int64_t D, int64_t i) {
  return static_cast<float>(word[wr * D + i]) + static_cast<float>(pos[pr * D + i]) +
         static_cast<float>(type[tr * D + i]);
}

template <typename T>
__global__ void embed_fwd_kernel(EmbedArgs a, const T* __restrict__ word,
                                 const T* __restrict__ pos, const T* __restrict__ type,
                                 const float* __restrict__ lnw, const float* __restrict__ lnb,
                                 float eps, T* __restrict__ h, float* __restrict__ mean_out,
                                 float* __restrict__ rstd_out) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= a.N) return;
  int64_t wr, pr, tr;
  token_rows(a, n, wr, pr, tr);
  float s = 0.f;
  for (int64_t i = lane; i < a.D; i += 32) s += row_x(word, pos, type, wr, pr, tr, a.D, i);
  const float mean = warp_sum(s) / static_cast<float>(a.D);
  float v = 0.f;
  for (int64_t i = lane; i < a.D; i += 32) {
    const float c = row_x(word, pos, type, wr, pr, tr, a.D, i) - mean;
    v += c * c;
  }
  const float rstd = rsqrtf(warp_sum(v) / static_cast<float>(a.D) + eps);
  for (int64_t i = lane; i < a.D; i += 32) {
    const float y = (row_x(word, pos, type, wr, pr, tr, a.D, i) - mean) * rstd * lnw[i] + lnb[i];
    h[n * a.D + i] = static_cast<T>(y);
  }
  if (lane == 0) {
    mean_out[n] = mean;
    rstd_out[n] = rstd;
  }
}

template <typename T>
__global__ void embed_bwd_kernel(EmbedArgs a, const T* __restrict__ dh, const T* __restrict__ word,
                                 const T* __restrict__ pos, const T* __restrict__ type,
                                 const float* __restrict__ lnw, const float* __restrict__ mean_in,
                                 const float* __restrict__ rstd_in, float* dword, float* dpos,
                                 float* dtype) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= a.N) return;
  int64_t wr, pr, tr;
  token_rows(a, n, wr, pr, tr);
  const float mean = mean_in[n], rstd = rstd_in[n];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t i = lane; i < a.D; i += 32) {
    const float xh = (row_x(word, pos, type, wr, pr, tr, a.D, i) - mean) * rstd;
    const float wdy = lnw[i] * static_cast<float>(dh[n * a.D + i]);
    s1 += wdy;
    s2 += wdy * xh;
  }
  const float c1 = warp_sum(s1) / static_cast<float>(a.D);
  const float c2 = warp_sum(s2) / static_cast<float>(a.D);
  for (int64_t i = lane; i < a.D; i += 32) {
    const float xh = (row_x(word, pos, type, wr, pr, tr, a.D, i) - mean) * rstd;
    const float wdy = lnw[i] * static_cast<float>(dh[n * a.D + i]);
    const float g = rstd * (wdy - c1 - xh * c2);
    atomicAdd(dword + wr * a.D + i, g);
    atomicAdd(dpos + pr * a.D + i, g);
    atomicAdd(dtype + tr * a.D + i, g);
  }
}

// dln partials [splits, 2, D]: thread per column, tokens of one split in order.
template <typename T>
__global__ void embed_bwd_ln_kernel(EmbedArgs a, const T* __restrict__ dh,
                                    const T* __restrict__ word, const T* __restrict__ pos,
                                    const T* __restrict__ type, const float* __restrict__ mean_in,
                                    const float* __restrict__ rstd_in, int64_t per_split,
                                    float* __restrict__ part) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t split = blockIdx.y;
  if (i >= a.D) return;
  const int64_t n0 = split * per_split, n1 = min(a.N, n0 + per_split);
  float aw = 0.f, ab = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t wr, pr, tr;
    token_rows(a, n, wr, pr, tr);
    const float xh = (row_x(word, pos, type, wr, pr, tr, a.D, i) - mean_in[n]) * rstd_in[n];
    const float dy = static_cast<float>(dh[n * a.D + i]);
    aw += dy * xh;
    ab += dy;
  }
  part[(split * 2) * a.D + i] = aw;
  part[(split * 2 + 1) * a.D + i] = ab;
}

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

void check_float(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 (float64 runs through backend='reference'), got ",
              st);
}

void check_dev(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(),
              ", got ", t.device());
}

Tensor small_f32(const Tensor& t, const Tensor& ref, const char* name, int64_t n) {
  check_dev(t, ref, name);
  TORCH_CHECK(t.is_floating_point(), name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got shape ", t.sizes());
  return t.to(at::kFloat).contiguous().reshape({n});
}

Tensor ids_long(const Tensor& t, const Tensor& ref, const char* name, int64_t E, int64_t T) {
  check_dev(t, ref, name);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kLong || st == at::kInt || st == at::kShort || st == at::kByte, name,
              " must be int64, int32, int16 or uint8, got ", st);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == E && t.size(1) == T, name, " must have shape [", E,
              ", ", T, "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

struct Tables {
  Tensor ids, tt, word, pos, type;
  EmbedArgs a;
  int64_t E;
};

Tables check_tables(const Tensor& token_ids, const c10::optional<Tensor>& token_type_ids,
                    const Tensor& word, const Tensor& pos, const Tensor& type,
                    int64_t position_offset) {
  TORCH_CHECK(word.is_cuda(), "word_embeddings must be a CUDA tensor");
  check_float(word, "word_embeddings");
  TORCH_CHECK(word.dim() == 2 && word.size(1) > 0, "word_embeddings must be [V, D], got ",
              word.sizes());
  const int64_t D = word.size(1);
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{pos, "position_embeddings"},
                         {type, "token_type_embeddings"}}) {
    check_dev(t, word, name);
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D, name, " must be [*, ", D, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == word.scalar_type(), name,
                " must have the dtype of word_embeddings (", word.scalar_type(), "), got ",
                t.scalar_type());
  }
  TORCH_CHECK(type.size(0) > 0, "token_type_embeddings must have at least one row");
  TORCH_CHECK(token_ids.dim() == 2, "token_ids must be [E, T], got ", token_ids.sizes());
  const int64_t E = token_ids.size(0), T = token_ids.size(1);
  TORCH_CHECK(position_offset >= 0, "position_offset must be >= 0, got ", position_offset);
  TORCH_CHECK(T + position_offset <= pos.size(0), "token_ids has ", T, " positions (+ offset ",
              position_offset, ") but position_embeddings has ", pos.size(0), " rows");
  Tables r;
  r.ids = ids_long(token_ids, word, "token_ids", E, T);
  if (token_type_ids.has_value() && token_type_ids->defined())
    r.tt = ids_long(*token_type_ids, word, "token_type_ids", E, T);
  r.word = word.contiguous();
  r.pos = pos.contiguous();
  r.type = type.contiguous();
  r.a = {r.ids.data_ptr<int64_t>(), r.tt.defined() ? r.tt.data_ptr<int64_t>() : nullptr,
         E * T, T, D, word.size(0), type.size(0), position_offset};
  r.E = E;
  return r;
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, (items + per_block - 1) / per_block));
}

std::tuple<Tensor, Tensor, Tensor> embed_layernorm_fwd(
    const Tensor& token_ids, const c10::optional<Tensor>& token_type_ids, const Tensor& word,
    const Tensor& pos, const Tensor& type, const Tensor& ln_w, const Tensor& ln_b, double eps,
    int64_t position_offset) {
  c10::cuda::CUDAGuard guard(word.device());
  Tables tb = check_tables(token_ids, token_type_ids, word, pos, type, position_offset);
  const EmbedArgs a = tb.a;
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  Tensor w = small_f32(ln_w, word, "ln_weight", a.D), b = small_f32(ln_b, word, "ln_bias", a.D);
  Tensor h = at::empty({tb.E, a.T, a.D}, word.options());                      // [E, T, D]
  Tensor mean = at::empty({tb.E, a.T}, word.options().dtype(at::kFloat));      // [E, T]
  Tensor rstd = at::empty({tb.E, a.T}, word.options().dtype(at::kFloat));      // [E, T]
  if (a.N == 0) return {h, mean, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "embed_ln_fwd_cuda", [&] {
    embed_fwd_kernel<scalar_t><<<blocks_for(a.N, kWarps), kThreads, 0, stream>>>(
        a, tb.word.data_ptr<scalar_t>(), tb.pos.data_ptr<scalar_t>(), tb.type.data_ptr<scalar_t>(),
        w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps),
        h.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> embed_layernorm_bwd(
    const Tensor& dh, const Tensor& token_ids, const c10::optional<Tensor>& token_type_ids,
    const Tensor& word, const Tensor& pos, const Tensor& type, const Tensor& ln_w,
    const Tensor& mean, const Tensor& rstd, int64_t position_offset) {
  c10::cuda::CUDAGuard guard(word.device());
  Tables tb = check_tables(token_ids, token_type_ids, word, pos, type, position_offset);
  const EmbedArgs a = tb.a;
  check_dev(dh, word, "dh");
  TORCH_CHECK(dh.dim() == 3 && dh.size(0) == tb.E && dh.size(1) == a.T && dh.size(2) == a.D,
              "dh must have shape [", tb.E, ", ", a.T, ", ", a.D, "], got ", dh.sizes());
  TORCH_CHECK(dh.scalar_type() == word.scalar_type(), "dh must have the dtype of the tables (",
              word.scalar_type(), "), got ", dh.scalar_type());
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    check_dev(t, word, name);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == tb.E &&
                    t.size(1) == a.T,
                name, " must be float32 [", tb.E, ", ", a.T, "], got ", t.scalar_type(), " ",
                t.sizes());
  }
  Tensor w = small_f32(ln_w, word, "ln_weight", a.D);
  Tensor dhc = dh.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  auto f32 = word.options().dtype(at::kFloat);
  // float32 accumulators for the atomics
  Tensor dw = at::zeros(tb.word.sizes(), f32), dp = at::zeros(tb.pos.sizes(), f32),
         dt = at::zeros(tb.type.sizes(), f32);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(kSplits, a.N));
  const int64_t per_split = std::max<int64_t>(1, (a.N + splits - 1) / splits);
  Tensor part = at::zeros({splits, 2, a.D}, f32);
  if (a.N > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "embed_ln_bwd_cuda", [&] {
      const scalar_t* wp = tb.word.data_ptr<scalar_t>();
      const scalar_t* pp = tb.pos.data_ptr<scalar_t>();
      const scalar_t* tp = tb.type.data_ptr<scalar_t>();
      embed_bwd_kernel<scalar_t><<<blocks_for(a.N, kWarps), kThreads, 0, stream>>>(
          a, dhc.data_ptr<scalar_t>(), wp, pp, tp, w.data_ptr<float>(), mc.data_ptr<float>(),
          rc.data_ptr<float>(), dw.data_ptr<float>(), dp.data_ptr<float>(), dt.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dim3 grid(blocks_for(a.D, kThreads), static_cast<unsigned>(splits));
      embed_bwd_ln_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          a, dhc.data_ptr<scalar_t>(), wp, pp, tp, mc.data_ptr<float>(), rc.data_ptr<float>(),
          per_split, part.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  Tensor dln = part.sum(0);  // [2, D]
  return {dw.to(word.scalar_type()), dp.to(word.scalar_type()), dt.to(word.scalar_type()),
          dln[0].clone(), dln[1].clone()};
}

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
  m.impl("_C_embed_layernorm_fwd", &pluglm::enc::embed_layernorm_fwd);
  m.impl("_C_embed_layernorm_bwd", &pluglm::enc::embed_layernorm_bwd);
  m.impl("_C_attentive_pool_fwd", &pluglm::enc::attentive_pool_fwd);
  m.impl("_C_attentive_pool_bwd", &pluglm::enc::attentive_pool_bwd);
}
