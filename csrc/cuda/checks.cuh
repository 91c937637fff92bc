// Host-side argument checks and launch helpers shared by attentive_pool.cu and
// encode_knowledge.cu. They guard the kernels when a torch.ops.pluglm._C_* op is called
// directly (a RuntimeError naming the argument); the public API's own checks live in
// pluglm_kernels/functional.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace pluglm {
namespace enc {

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 (float64 runs through backend='reference'), got ",
              st);
}

inline void check_dev(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(),
              ", got ", t.device());
}

inline at::Tensor small_f32(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t n) {
  check_dev(t, ref, name);
  TORCH_CHECK(t.is_floating_point(), name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got shape ", t.sizes());
  return t.to(at::kFloat).contiguous().reshape({n});
}

inline unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, (items + per_block - 1) / per_block));
}

}  // namespace enc
}  // namespace pluglm
