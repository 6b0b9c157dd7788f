// A fixed-width float32/int32/float64 vector type for the CPU kernels, over the GCC/Clang
// vector extensions (__attribute__((vector_size))): one kernel source, lowered by the
// compiler to SSE2, AVX2 or AVX-512 inside the target-attributed clones of cpu_isa.h
// (SCALEINV_ISA_CLONES_W), and to NEON on aarch64.
//
// Why not at::vec::Vectorized: ATen picks Vectorized's implementation per translation unit
// from preprocessor macros (CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512, plus an inline
// namespace per capability), so each kernel file would have to be compiled once per ISA
// with different flags; a CppExtension has one flag set for all its files. Vector
// extensions are typed by width only, and the target attribute of the enclosing function
// decides the instructions, so the existing clones (one source, three builds, picked at run
// time) carry them unchanged.
//
// The lane count W is a template parameter: kLanesDefault (4: SSE2 / NEON, 128 bits) in
// the portable build, kLanesAvx2 (8) and kLanesAvx512 (16) in the others. Everything is
// always_inline, so it is compiled inside each clone with that clone's target; a vector
// wider than the clone's registers would still be correct (the compiler splits it), only
// slower.
//
// Arithmetic: + - * round separately (the files are compiled with -ffp-contract=off, so
// nothing fuses implicitly); fmadd(a, b, c) = a * b + c with ONE rounding in every build
// (vfmadd where the clone has FMA, std::fma per lane otherwise).
// Comparisons give lane masks (VecI lanes of -1 / 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_isa.h"

// GCC notes that passing a vector wider than the enclosing target's registers by value
// changes the ABI; every function here is always_inline into its clone, so no such call
// exists.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace scaleinv {

constexpr int kLanesDefault = 4;  // SSE2 / NEON
constexpr int kLanesAvx2 = 8;
constexpr int kLanesAvx512 = 16;

// The vector types of each width, spelled out per width: GCC drops a vector_size that
// depends on a template parameter.
template <int W>
struct VecTypes;
#define SCALEINV_VEC_TYPES(W)                                   \
  template <>                                                   \
  struct VecTypes<W> {                                          \
    typedef float F __attribute__((vector_size(4 * W)));        \
    typedef int32_t I __attribute__((vector_size(4 * W)));      \
    typedef uint8_t U8 __attribute__((vector_size(W)));         \
    typedef double D __attribute__((vector_size(8 * W)));       \
  };
SCALEINV_VEC_TYPES(4)
SCALEINV_VEC_TYPES(8)
SCALEINV_VEC_TYPES(16)
#undef SCALEINV_VEC_TYPES

// W lanes of int32: window indices 0..3 and lane masks (-1 true, 0 false).
template <int W>
struct VecI {
  static_assert(W == 4 || W == 8 || W == 16, "lanes: 4, 8 or 16");
  using V = typename VecTypes<W>::I;
  using U8 = typename VecTypes<W>::U8;
  V v;

  static SCALEINV_INLINE VecI broadcast(int32_t s) {
    VecI r;
    r.v = V{} + s;
    return r;
  }
  static SCALEINV_INLINE VecI zero() { return VecI{V{}}; }
  // Lane i holds i.
  static SCALEINV_INLINE VecI iota() {
    VecI r;
    for (int i = 0; i < W; ++i) r.v[i] = i;
    return r;
  }
  // mask ? a : b per lane.
  static SCALEINV_INLINE VecI select(VecI m, VecI a, VecI b) { return VecI{m.v ? a.v : b.v}; }
  // Lanes 0..n-1 of uint8 p, widened; lanes >= n are 0 (n in 0..W).
  static SCALEINV_INLINE VecI load_u8_n(const uint8_t* p, int n) {
    uint8_t buf[W] = {};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    U8 b;
    std::memcpy(&b, buf, W);
    return VecI{__builtin_convertvector(b, V)};
  }
  static SCALEINV_INLINE VecI load_u8(const uint8_t* p) {
    U8 b;
    std::memcpy(&b, p, W);
    return VecI{__builtin_convertvector(b, V)};
  }
  // Lanes 0..n-1 narrowed to uint8 (values 0..255, e.g. window indices) into p.
  SCALEINV_INLINE void store_u8_n(uint8_t* p, int n) const {
    const U8 b = __builtin_convertvector(v, U8);
    if (n == W) {
      std::memcpy(p, &b, W);
      return;
    }
    for (int i = 0; i < n; ++i) p[i] = b[i];
  }
  SCALEINV_INLINE void store_u8(uint8_t* p) const { store_u8_n(p, W); }

  friend SCALEINV_INLINE VecI operator|(VecI a, VecI b) { return VecI{a.v | b.v}; }
  friend SCALEINV_INLINE VecI operator&(VecI a, VecI b) { return VecI{a.v & b.v}; }
  friend SCALEINV_INLINE VecI operator~(VecI a) { return VecI{~a.v}; }
  friend SCALEINV_INLINE VecI eq(VecI a, VecI b) { return VecI{a.v == b.v}; }
  friend SCALEINV_INLINE VecI lt(VecI a, VecI b) { return VecI{a.v < b.v}; }
  friend SCALEINV_INLINE VecI gt(VecI a, VecI b) { return VecI{a.v > b.v}; }
};

// W lanes of float32.
template <int W>
struct VecF {
  static_assert(W == 4 || W == 8 || W == 16, "lanes: 4, 8 or 16");
  using V = typename VecTypes<W>::F;
  using M = typename VecI<W>::V;
  static constexpr int kLanes = W;
  V v;

  static SCALEINV_INLINE VecF load(const float* p) {
    VecF r;
    std::memcpy(&r.v, p, sizeof(V));  // unaligned
    return r;
  }
  // Lanes 0..n-1 from p, lanes >= n are 0 (n in 0..W); reads only p[0..n).
  static SCALEINV_INLINE VecF load_n(const float* p, int n) {
    if (n >= W) return load(p);
    float buf[W] = {};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    return load(buf);
  }
  SCALEINV_INLINE void store(float* p) const { std::memcpy(p, &v, sizeof(V)); }
  // Lanes 0..n-1 into p[0..n) (n in 0..W); writes nothing else.
  SCALEINV_INLINE void store_n(float* p, int n) const {
    if (n >= W) return store(p);
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  static SCALEINV_INLINE VecF broadcast(float s) {
    VecF r;
    // s - 0 is s for every s, -0.0 included (0 + s would turn -0.0 into +0.0 and break
    // the bitwise match with the scalar reference where a result is a signed zero)
    r.v = s - V{};
    return r;
  }
  static SCALEINV_INLINE VecF zero() { return VecF{V{}}; }

  friend SCALEINV_INLINE VecF operator+(VecF a, VecF b) { return VecF{a.v + b.v}; }
  friend SCALEINV_INLINE VecF operator-(VecF a, VecF b) { return VecF{a.v - b.v}; }
  friend SCALEINV_INLINE VecF operator*(VecF a, VecF b) { return VecF{a.v * b.v}; }
  // a * b + c, one rounding.
  friend SCALEINV_INLINE VecF fmadd(VecF a, VecF b, VecF c) {
    // through arrays: the loop vectoriser turns it into vfmadd (FMA builds), which the
    // straight-line SLP vectoriser does not do for lane-wise std::fma calls
    float x[W], y[W], z[W], r[W];
    std::memcpy(x, &a.v, sizeof(V));
    std::memcpy(y, &b.v, sizeof(V));
    std::memcpy(z, &c.v, sizeof(V));
#pragma omp simd
    for (int i = 0; i < W; ++i) r[i] = std::fma(x[i], y[i], z[i]);
    return load(r);
  }
  // Ordered comparisons (false where either lane is NaN) and the unordered test.
  friend SCALEINV_INLINE VecI<W> gt(VecF a, VecF b) { return VecI<W>{a.v > b.v}; }
  friend SCALEINV_INLINE VecI<W> lt(VecF a, VecF b) { return VecI<W>{a.v < b.v}; }
  friend SCALEINV_INLINE VecI<W> eq(VecF a, VecF b) { return VecI<W>{a.v == b.v}; }
  // True where a or b is NaN.
  friend SCALEINV_INLINE VecI<W> unord(VecF a, VecF b) {
    return VecI<W>{(a.v != a.v) | (b.v != b.v)};
  }
  // mask ? a : b per lane.
  static SCALEINV_INLINE VecF select(VecI<W> m, VecF a, VecF b) { return VecF{m.v ? a.v : b.v}; }
  // Sum of the lanes in float64, lane 0 first (a fixed order for every W).
  SCALEINV_INLINE double hsum_double() const {
    double s = 0.0;
    for (int i = 0; i < W; ++i) s += static_cast<double>(v[i]);
    return s;
  }
};

namespace vec_detail {
// Shuffle masks as constant vectors (the compiler needs them constant to pick permutes).
template <int W, int... I>
SCALEINV_INLINE typename VecI<W>::V stride2(int first, std::integer_sequence<int, I...>) {
  return typename VecI<W>::V{(first + 2 * I)...};
}
template <int W, int... I>
SCALEINV_INLINE typename VecI<W>::V zip(int half, std::integer_sequence<int, I...>) {
  // lane 2i: a[half * W/2 + i], lane 2i+1: b[half * W/2 + i] (b's lanes are W..2W-1)
  return typename VecI<W>::V{((I % 2 ? W : 0) + half * (W / 2) + I / 2)...};
}

#if defined(__clang__)
template <int W, int... I>
SCALEINV_INLINE typename VecF<W>::V shuffle_even(typename VecF<W>::V a, typename VecF<W>::V b,
                                                 std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, (2 * I)...);
}
template <int W, int... I>
SCALEINV_INLINE typename VecF<W>::V shuffle_odd(typename VecF<W>::V a, typename VecF<W>::V b,
                                                std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, (2 * I + 1)...);
}
template <int W, int H, int... I>
SCALEINV_INLINE typename VecF<W>::V shuffle_zip(typename VecF<W>::V a, typename VecF<W>::V b,
                                                std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, ((I % 2 ? W : 0) + H * (W / 2) + I / 2)...);
}
#endif
}  // namespace vec_detail

// Deinterleave 2W consecutive values [a | b]: columns 0, 2, 4, ... and 1, 3, 5, ...
template <int W>
SCALEINV_INLINE VecF<W> even(VecF<W> a, VecF<W> b) {
#if defined(__clang__)
  return VecF<W>{vec_detail::shuffle_even<W>(a.v, b.v, std::make_integer_sequence<int, W>{})};
#else
  return VecF<W>{__builtin_shuffle(
      a.v, b.v, vec_detail::stride2<W>(0, std::make_integer_sequence<int, W>{}))};
#endif
}
template <int W>
SCALEINV_INLINE VecF<W> odd(VecF<W> a, VecF<W> b) {
#if defined(__clang__)
  return VecF<W>{vec_detail::shuffle_odd<W>(a.v, b.v, std::make_integer_sequence<int, W>{})};
#else
  return VecF<W>{__builtin_shuffle(
      a.v, b.v, vec_detail::stride2<W>(1, std::make_integer_sequence<int, W>{}))};
#endif
}
// Interleave (the inverse of even/odd): zip_lo(e, o) = e0 o0 e1 o1 ... of the first W/2
// lanes, zip_hi of the last W/2; [zip_lo | zip_hi] are the 2W values in column order.
template <int W>
SCALEINV_INLINE VecF<W> zip_lo(VecF<W> e, VecF<W> o) {
#if defined(__clang__)
  return VecF<W>{vec_detail::shuffle_zip<W, 0>(e.v, o.v, std::make_integer_sequence<int, W>{})};
#else
  return VecF<W>{
      __builtin_shuffle(e.v, o.v, vec_detail::zip<W>(0, std::make_integer_sequence<int, W>{}))};
#endif
}
template <int W>
SCALEINV_INLINE VecF<W> zip_hi(VecF<W> e, VecF<W> o) {
#if defined(__clang__)
  return VecF<W>{vec_detail::shuffle_zip<W, 1>(e.v, o.v, std::make_integer_sequence<int, W>{})};
#else
  return VecF<W>{
      __builtin_shuffle(e.v, o.v, vec_detail::zip<W>(1, std::make_integer_sequence<int, W>{}))};
#endif
}

// W lanes of float64 (accumulators of float32 values: exact widening).
template <int W>
struct VecD {
  using V = typename VecTypes<W>::D;
  V v;
  static SCALEINV_INLINE VecD zero() { return VecD{V{}}; }
  static SCALEINV_INLINE VecD from(VecF<W> f) { return VecD{__builtin_convertvector(f.v, V)}; }
  friend SCALEINV_INLINE VecD operator+(VecD a, VecD b) { return VecD{a.v + b.v}; }
  friend SCALEINV_INLINE VecD operator*(VecD a, VecD b) { return VecD{a.v * b.v}; }
  // a * b + c, one rounding.
  friend SCALEINV_INLINE VecD fmadd(VecD a, VecD b, VecD c) {
    double x[W], y[W], z[W], r[W];  // see VecF's fmadd
    std::memcpy(x, &a.v, sizeof(V));
    std::memcpy(y, &b.v, sizeof(V));
    std::memcpy(z, &c.v, sizeof(V));
#pragma omp simd
    for (int i = 0; i < W; ++i) r[i] = std::fma(x[i], y[i], z[i]);
    VecD o;
    std::memcpy(&o.v, r, sizeof(V));
    return o;
  }
  // Sum of the lanes, lane 0 first.
  SCALEINV_INLINE double hsum() const {
    double s = 0.0;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
};

}  // namespace scaleinv
