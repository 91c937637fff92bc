// Instruction-set selection and the float-row helpers shared by the C++ CPU kernels.
//
// One binary runs on any x86-64 CPU and is fast on current ones: a kernel's hot task body
// is compiled once per instruction set through target attributes (the portable baseline,
// AVX2 + FMA + F16C, AVX-512 F/VL/DQ/BW) and the clone is picked at each call:
//
//   active_isa(kMax) = min(what this CPU has, PLUGLM_CPU_ISA, kMax)
//
// PLUGLM_CPU_ISA=scalar|avx2|avx512 caps the choice and is read at every call, so tests
// run every path on one machine (unset, or any other value: no cap). kMax is the widest
// clone a kernel has. Every kernel file picks its path through this header only.
//
// How a kernel uses it: write the task body as a lambda marked PLUGLM_TASK_INLINE that
// calls PLUGLM_INLINE helpers only, and run it with parallel_for_isa<kMax>(n, grain, f)
// (or run_in(isa, f, begin, end)). The body is force-inlined into run_avx2 / run_avx512,
// so GCC compiles all of it, helpers and `#pragma omp simd` loops included, for that ISA.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PLUGLM_HAVE_ISA_CLONES 1
#define PLUGLM_INLINE inline __attribute__((always_inline))
#define PLUGLM_TASK_INLINE __attribute__((always_inline))
#define PLUGLM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PLUGLM_TARGET_AVX512 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512dq,avx512bw")))
#else
#define PLUGLM_HAVE_ISA_CLONES 0
#define PLUGLM_INLINE inline
#define PLUGLM_TASK_INLINE
#endif

namespace pluglm {
namespace cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best clone this CPU can run (detected once).
inline Isa hardware_isa() {
  static const Isa isa = [] {
#if PLUGLM_HAVE_ISA_CLONES
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    return avx512 ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Scalar;
#else
    return Isa::Scalar;
#endif
  }();
  return isa;
}

// The cap PLUGLM_CPU_ISA sets, read now (not cached: tests change it between calls).
inline Isa env_isa_cap() {
  const char* env = std::getenv("PLUGLM_CPU_ISA");
  if (env == nullptr) return Isa::Avx512;
  if (std::strcmp(env, "scalar") == 0) return Isa::Scalar;
  if (std::strcmp(env, "avx2") == 0) return Isa::Avx2;
  return Isa::Avx512;
}

template <Isa kMax = Isa::Avx512>
inline Isa active_isa() {
  return std::min({hardware_isa(), env_isa_cap(), kMax});
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

#if PLUGLM_HAVE_ISA_CLONES
template <typename F>
PLUGLM_TARGET_AVX2 void run_avx2(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}

template <typename F>
PLUGLM_TARGET_AVX512 void run_avx512(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
#endif

// f(begin, end) in the clone compiled for `isa` (no wider than kMax: only the clones up to
// kMax are instantiated).
template <Isa kMax = Isa::Avx512, typename F>
inline void run_in(Isa isa, const F& f, int64_t begin, int64_t end) {
#if PLUGLM_HAVE_ISA_CLONES
  if constexpr (kMax >= Isa::Avx512) {
    if (isa >= Isa::Avx512) return run_avx512(f, begin, end);
  }
  if constexpr (kMax >= Isa::Avx2) {
    if (isa >= Isa::Avx2) return run_avx2(f, begin, end);
  }
#else
  (void)isa;
#endif
  f(begin, end);
}

// at::parallel_for over [0, n), every chunk run in the clone for active_isa<kMax>() (picked
// once per call, so all threads use the same instruction set and the results do not depend
// on the thread count).
template <Isa kMax = Isa::Avx512, typename F>
void parallel_for_isa(int64_t n, int64_t grain, const F& f) {
  const Isa isa = active_isa<kMax>();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { run_in<kMax>(isa, f, begin, end); });
}

// ------------------------------------------------------------------ float-row helpers
//
// Force-inlined so that each clone gets its own vector width.

PLUGLM_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// y += a x
PLUGLM_INLINE void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
PLUGLM_INLINE void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
PLUGLM_INLINE void load_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

template <typename T>
PLUGLM_INLINE void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <>
PLUGLM_INLINE void store_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

// A row as float32: the row itself for float32 tensors, else converted into `buf`.
template <typename T>
PLUGLM_INLINE const float* as_float(const T* src, float* buf, int64_t n) {
  load_row(src, buf, n);
  return buf;
}
template <>
PLUGLM_INLINE const float* as_float<float>(const float* src, float*, int64_t) {
  return src;
}

}  // namespace cpu
}  // namespace pluglm
