// Shared by the CPU kernels: which instruction-set build runs, and the arithmetic helper
// whose fusion depends on it.
//
// Each kernel file compiles its loops three times (portable, AVX2, AVX-512) as whole
// functions with target attributes, so no -march flag is needed and the wheel runs on any
// x86-64; at run time the build matching ATen's CPU capability is picked, so that the
// kernels fuse multiply-adds exactly where ATen's vector kernels do (bitwise equality with
// torch.optim.SGD depends on it).
#pragma once

#include <ATen/Version.h>

#include <cmath>
#include <cstdint>
#include <string>

// always_inline: the loop bodies must be compiled inside the ISA-specific callers.
#define SCALEINV_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SCALEINV_X86_BUILDS 1
#define SCALEINV_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define SCALEINV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SCALEINV_TARGET_AVX512
#define SCALEINV_TARGET_AVX2
#endif

// A kernel's range function BODY(args, lo, hi) compiled as three whole functions,
// NAME_default / NAME_avx2 / NAME_avx512 (the always_inline bodies are compiled into
// each with its target attribute), for pick_build to choose from.
#define SCALEINV_ISA_CLONES(NAME, ARGS, BODY)                                             \
  template <typename T>                                                                  \
  void NAME##_default(const ARGS<T>& a, int64_t lo, int64_t hi) { BODY(a, lo, hi); }     \
  template <typename T>                                                                  \
  SCALEINV_TARGET_AVX2 void NAME##_avx2(const ARGS<T>& a, int64_t lo, int64_t hi) {      \
    BODY(a, lo, hi);                                                                     \
  }                                                                                      \
  template <typename T>                                                                  \
  SCALEINV_TARGET_AVX512 void NAME##_avx512(const ARGS<T>& a, int64_t lo, int64_t hi) {  \
    BODY(a, lo, hi);                                                                     \
  }

// The same with the vector lane count of csrc/vec.h: BODY<T, W>(args, lo, hi) with W = 4
// (portable: SSE2 / NEON), 8 (AVX2) and 16 (AVX-512), the widths of each build's registers.
#define SCALEINV_ISA_CLONES_W(NAME, ARGS, BODY)                                           \
  template <typename T>                                                                  \
  void NAME##_default(const ARGS<T>& a, int64_t lo, int64_t hi) { BODY<T, 4>(a, lo, hi); } \
  template <typename T>                                                                  \
  SCALEINV_TARGET_AVX2 void NAME##_avx2(const ARGS<T>& a, int64_t lo, int64_t hi) {      \
    BODY<T, 8>(a, lo, hi);                                                               \
  }                                                                                      \
  template <typename T>                                                                  \
  SCALEINV_TARGET_AVX512 void NAME##_avx512(const ARGS<T>& a, int64_t lo, int64_t hi) {  \
    BODY<T, 16>(a, lo, hi);                                                              \
  }

namespace scaleinv {

// ATen's CPU capability, read once: 0 default, 1 AVX2, 2 AVX-512.
inline int isa_level() {
  static const int level = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX512" ? 2 : cap == "AVX2" ? 1 : 0;
  }();
  return level;
}

// A kernel's range function over work items [lo, hi), and the build of it to run.
template <typename A>
using RangeFn = void (*)(const A&, int64_t, int64_t);

template <typename A>
RangeFn<A> pick_build(RangeFn<A> portable, RangeFn<A> avx2, RangeFn<A> avx512) {
#ifdef SCALEINV_X86_BUILDS
  const int level = isa_level();
  return level == 2 ? avx512 : level == 1 ? avx2 : portable;
#else
  (void)avx2;
  (void)avx512;
  return portable;
#endif
}

// a * b + c with one rounding (std::fma, which the vectoriser turns into vfmadd in the
// FMA builds; the files are compiled with -ffp-contract=off, so nothing is fused
// implicitly) or two.
template <bool FMA, typename T>
SCALEINV_INLINE T madd(T a, T b, T c) {
  if constexpr (FMA) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

}  // namespace scaleinv
