// Schemas of the native kernels behind the public pluglm ops, and the Python module.
//
// The public ops (torch.ops.pluglm.mips_topk, ...) are defined in Python
// (pluglm_kernels/ops.py) because they dispatch between backends (C++, CUDA, Triton,
// reference) by a `backend` argument. The ops defined here are the native kernels they
// call; CPU implementations live in cpu/, CUDA implementations in cuda/, each file
// registering itself with TORCH_LIBRARY_IMPL(pluglm, <key>, m).
#include <torch/extension.h>
#include <torch/library.h>

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
}

namespace {

bool cuda_built() {
#ifdef PLUGLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

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
  m.def("openmp_max_threads", &openmp_max_threads,
        "OpenMP threads the C++ kernels use (0 when built without OpenMP)");
}
