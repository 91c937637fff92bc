// Limits of the native kernels that the Python layer states too.
//
// pluglm_kernels.MAX_K (pluglm_kernels/_validate.py) is the same number; the extension
// exports this one as pluglm_kernels._C.max_k() and tests/kernels/test_ops_registry.py
// checks that the two agree.
#pragma once

#include <cstdint>

namespace pluglm {

// Largest k of mips_topk (every backend keeps k candidates per query in on-chip memory).
constexpr int64_t kMaxK = 2048;

}  // namespace pluglm
