// CUDA kernels of the knowledge encoder's embedding gather + LayerNorm, forward and
// backward; encode_knowledge runs them, then the pooling kernels of attentive_pool.cu.
//
// Semantics: pluglm_kernels.reference.embed / encode_knowledge; the same two native ops as
// csrc/cpu/encode_knowledge.cpp (see there and csrc/ops.cpp):
//  * embed_layernorm_fwd: one warp per token gathers word + position + token-type rows,
//    two-pass LayerNorm in float32 (the rows are re-read from L1/L2 instead of held in
//    registers, so any D works), writes h (tables' dtype), mean, rstd.
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

#include "checks.cuh"
#include "reduce.cuh"

namespace pluglm {
namespace enc {
namespace {

using at::Tensor;

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

// ------------------------------------------------------------------------------ host

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

}  // namespace
}  // namespace enc
}  // namespace pluglm

TORCH_LIBRARY_IMPL(pluglm, CUDA, m) {
  m.impl("_C_embed_layernorm_fwd", &pluglm::enc::embed_layernorm_fwd);
  m.impl("_C_embed_layernorm_bwd", &pluglm::enc::embed_layernorm_bwd);
}
