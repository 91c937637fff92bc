// Argument checks shared by the C++ CPU kernels of attentive pooling and the encoder.
//
// These guard the raw-pointer kernels when a torch.ops.pluglm._C_* op is called directly
// (a RuntimeError naming the argument). They are O(1) metadata tests; the friendly
// TypeError / ValueError checks of the public API live in pluglm_kernels/functional.py.
#pragma once

#include <torch/extension.h>

namespace pluglm {
namespace cpu {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 (float64 runs through backend='reference'), got ",
              st);
}

// A small float parameter vector of n elements as contiguous float32 [n].
inline at::Tensor small_f32(const at::Tensor& t, const char* name, int64_t n) {
  check_cpu(t, name);
  TORCH_CHECK(t.is_floating_point(), name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got shape ", t.sizes());
  return t.to(at::kFloat).contiguous().reshape({n});
}

}  // namespace cpu
}  // namespace pluglm
