// Schemas of the native kernels behind the public pluglm ops, and the Python module.
//
// The public ops (torch.ops.pluglm.mips_topk, ...) are defined in Python
// (pluglm_kernels/ops.py) because they dispatch between backends (C++, CUDA, Triton,
// reference) by a `backend` argument. The ops defined here are the native kernels they
// call; CPU implementations live in cpu/, CUDA implementations in cuda/, each file
// registering itself with TORCH_LIBRARY_IMPL(pluglm, <key>, m).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "kernel_limits.h"

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(pluglm, m) {
  // Exact top-k inner product. queries [B, d]; keys [M, d] (f32/f16/bf16 or int8 with
  // key_scales [M] f32); valid [M] bool. Returns scores [B, k] f32 (descending) and
  // indices [B, k] int64, ties towards the lower index.
  m.def("_C_mips_topk(Tensor queries, Tensor keys, int k, Tensor? key_scales, Tensor? valid)"
        " -> (Tensor, Tensor)");
  // Knowledge attention. q [B, T, H, Dh] (pre-scaled), k/v [B, N, H, Dh], bias [B, N],
  // beta [H]. Returns out [B, T, H, Dh] and lse [B, T, H] f32 (log-sum-exp of the logits).
  m.def("_C_knowledge_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor beta,"
        " float dropout_p, int seed) -> (Tensor, Tensor)");
  // Gradients of the above: (dq, dk, dv, dbias, dbeta) in the dtypes of the inputs.
  m.def("_C_knowledge_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor bias,"
        " Tensor beta, Tensor out, Tensor lse, float dropout_p, int seed)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with the top-N gather fused: table_k/table_v [M, H, Dh], indices [B, N] int64.
  m.def("_C_gather_knowledge_attention_fwd(Tensor q, Tensor table_k, Tensor table_v,"
        " Tensor indices, Tensor bias, Tensor beta, float dropout_p, int seed)"
        " -> (Tensor, Tensor)");
  // Gradients: (dq, dk_rows [B, N, H, Dh], dv_rows [B, N, H, Dh], dbias, dbeta); the rows
  // are scattered into the tables' gradients by index in Python (repeats accumulate).
  m.def("_C_gather_knowledge_attention_bwd(Tensor grad_out, Tensor q, Tensor table_k,"
        " Tensor table_v, Tensor indices, Tensor bias, Tensor beta, Tensor out, Tensor lse,"
        " float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // --- attentive pooling and the knowledge encoder (encode_knowledge) ---
  // Fused embedding gather + LayerNorm. token_ids [E, T] (uint8/int16/int32/int64),
  // token_type_ids [E, T] or None (= type 0), tables word [V, D], pos [P, D], type [Tt, D]
  // (one dtype), ln_w/ln_b [D]. Returns h [E, T, D] (tables' dtype), mean and rstd [E, T] f32.
  m.def("_C_embed_layernorm_fwd(Tensor token_ids, Tensor? token_type_ids, Tensor word,"
        " Tensor pos, Tensor type, Tensor ln_w, Tensor ln_b, float eps, int position_offset)"
        " -> (Tensor, Tensor, Tensor)");
  // Gradients of the above from dh [E, T, D]: (dword [V, D], dpos [P, D], dtype [Tt, D] in
  // the tables' dtype, dln_w [D] f32, dln_b [D] f32). Rows are recomputed from the tables.
  m.def("_C_embed_layernorm_bwd(Tensor dh, Tensor token_ids, Tensor? token_type_ids,"
        " Tensor word, Tensor pos, Tensor type, Tensor ln_w, Tensor mean, Tensor rstd,"
        " int position_offset) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same encoder at inference through precomputed pooler tables (no backward):
  // word_u [V, Hp], pos_u [P, Hp], type_u [Tt, Hp] f32 (each table row times ln_w, times
  // W1^T), gamma_u = W1 ln_w and bias_u = W1 ln_b + b1 [Hp], w2 [Hp], b2 [1]. mask [E, T].
  // Returns pooled [E, D] in the tables' dtype.
  m.def("_C_encode_knowledge_factored(Tensor token_ids, Tensor mask, Tensor? token_type_ids,"
        " Tensor word, Tensor pos, Tensor type, Tensor ln_w, Tensor ln_b, Tensor word_u,"
        " Tensor pos_u, Tensor type_u, Tensor gamma_u, Tensor bias_u, Tensor w2, Tensor b2,"
        " float eps, int position_offset) -> Tensor");
  // Attentive pooling around the pooler matmul u = x W1^T + b1: x [B, T, D], mask [B, T],
  // u [B, T, Hp] (x's dtype), w2 [Hp], b2 [1]. Returns pooled [B, D] (x's dtype) and
  // alpha [B, T] f32 (masked softmax of w2.tanh(u) + b2; all zero for an empty row).
  m.def("_C_attentive_pool_fwd(Tensor x, Tensor mask, Tensor u, Tensor w2, Tensor b2)"
        " -> (Tensor, Tensor)");
  // Gradients from grad [B, D]: (dx_direct [B, T, D], du [B, T, Hp] in x's dtype,
  // dw2 [Hp] f32, db2 [1] f32); the caller adds du W1 to dx and forms dW1, db1.
  m.def("_C_attentive_pool_bwd(Tensor grad, Tensor x, Tensor mask, Tensor u, Tensor w2,"
        " Tensor alpha) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

bool cuda_built() {
#ifdef PLUGLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t max_k() { return pluglm::kMaxK; }

// The instruction set the C++ CPU kernels pick for a call made now (PLUGLM_CPU_ISA applied).
std::string cpu_isa() { return pluglm::cpu::isa_name(pluglm::cpu::active_isa()); }

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pluglm native kernels (the ops register themselves in torch.ops.pluglm)";
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled into this build");
  m.def("max_k", &max_k, "largest k of mips_topk (pluglm_kernels.MAX_K states the same)");
  m.def("cpu_isa", &cpu_isa,
        "instruction set the C++ CPU kernels use now: avx512, avx2 or scalar (PLUGLM_CPU_ISA caps it)");
  m.def("openmp_max_threads", &openmp_max_threads,
        "OpenMP threads the C++ kernels use (0 when built without OpenMP)");
}
