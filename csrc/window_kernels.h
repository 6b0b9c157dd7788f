// The per-plane forward window kernels of the fused norm ops: y = relu?(x * alpha + beta)
// over one plane, then a 2x2 max pool with torch's tie/NaN rule and a one-byte window
// index (or no pool). Shared by the BatchNorm and GroupNorm drivers (bn_act.cpp,
// gn_act.cpp: x materialised) and csrc/conv_norm_act.cpp (x computed by a convolution
// into an L1 buffer, plane by plane).
//
// The pooled float32 path is written once over VecF<W> (csrc/vec.h), W windows per step
// (GCC does not vectorise the stride-2 window loops with their mixed float/uint8 lanes);
// the AVX-512 build runs its intrinsics twin instead (below), which gives the same bits.
// float64 and the unpooled path are plain loops for the vectoriser.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vec.h"

namespace scaleinv {

// Geometry of one call: x is [N, C, H, W] (H = 1 for 3-D [N, C, L], H = W = 1 for 2-D).
struct Geo {
  int64_t N, C, H, W, HW, Ho, Wo, HWo;
  int pool;   // 0 or 2
  bool relu;
};

// The intrinsics kernels run where ATen runs its AVX-512 kernels (SCALEINV_NO_AVX512=1
// forces the portable loops, e.g. to test them). Read once per process.
inline bool use_avx512_kernels() {
  static const bool on = isa_level() == 2 && std::getenv("SCALEINV_NO_AVX512") == nullptr;
  return on;
}

// ---- AVX-512 kernels for the 2x2 windows (float32) --------------------------------
// The AVX-512 build's twin of the portable kernels below: 16 windows per step, the two input rows
// loaded as 2 x 16 floats each and split into even/odd columns with permutes; masked
// loads/stores cover the tail (Wo is often < 16, e.g. 14 or 7).
#ifdef SCALEINV_X86_BUILDS
#define NA_HAVE_AVX512_KERNELS 1
#define NA_AVX512_FN SCALEINV_TARGET_AVX512

struct WinMasks {
  __mmask16 out, a, b;  // windows; first and second 16 input columns of a row
};

NA_AVX512_FN static inline WinMasks win_masks(int64_t rem) {  // rem in 1..16 windows
  const int64_t cols = 2 * rem;
  WinMasks m;
  m.out = static_cast<__mmask16>((1u << rem) - 1u);
  m.a = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  m.b = static_cast<__mmask16>(cols <= 16 ? 0u : (1u << (cols - 16)) - 1u);
  return m;
}

NA_AVX512_FN static inline __m512i even_cols() {
  return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}
NA_AVX512_FN static inline __m512i odd_cols() {
  return _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The four corners (row-major: top-left, top-right, bottom-left, bottom-right) of 16
// windows, from their top rows' columns [ta | tb] and bottom rows' [ba | bb] (each pair is
// 32 columns: one row's next 32, or two rows' first 16 for row pairs).
NA_AVX512_FN static inline void window_corners(__m512 ta, __m512 tb, __m512 ba, __m512 bb,
                                               __m512* v) {
  const __m512i ev = even_cols(), od = odd_cols();
  v[0] = _mm512_permutex2var_ps(ta, ev, tb);
  v[1] = _mm512_permutex2var_ps(ta, od, tb);
  v[2] = _mm512_permutex2var_ps(ba, ev, bb);
  v[3] = _mm512_permutex2var_ps(ba, od, bb);
}

// v[kk] per lane (kk in 0..3).
NA_AVX512_FN static inline __m512 corner_at(const __m512* v, __m512i kk) {
  __m512 x = v[0];
  for (int j = 1; j < 4; ++j)
    x = _mm512_mask_mov_ps(x, _mm512_cmpeq_epi32_mask(kk, _mm512_set1_epi32(j)), v[j]);
  return x;
}

// g split by the corner it goes to: c[j] = g where kk == j, 0 elsewhere.
NA_AVX512_FN static inline void split_by_corner(__m512 g, __m512i kk, __m512* c) {
  for (int j = 0; j < 4; ++j)
    c[j] = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(kk, _mm512_set1_epi32(j)), g);
}

// Row pairs for narrow planes (Wo <= 8, e.g. 14x14 -> 7x7): one 16-lane step covers the
// windows of TWO output rows, lanes 0..Wo-1 for row oh and 8..8+Wo-1 for row oh+1 (one row
// at a time would use 7 of 16 lanes). permutex2var(a, even_cols, b) is [even columns of
// a | even columns of b], so pairing input rows (2oh, 2oh+2) and (2oh+1, 2oh+3) gives the
// four window corners of both output rows; compress/expand move the 2*Wo values of two
// consecutive output rows between memory and those lanes.
struct PairMasks {
  __mmask16 in;    // the 2*Wo columns of an input row
  __mmask16 win;   // window lanes: 0..Wo-1 and 8..8+Wo-1
  __mmask16 flat;  // 2*Wo consecutive values (two output rows in memory)
};

NA_AVX512_FN static inline PairMasks pair_masks(int64_t Wo) {  // Wo in 1..8
  const unsigned row = (1u << Wo) - 1u;
  PairMasks m;
  m.in = static_cast<__mmask16>((1u << (2 * Wo)) - 1u);
  m.win = static_cast<__mmask16>(row | (row << 8));
  m.flat = m.in;
  return m;
}

// v: the four window corners x; y = relu?(x * a + b); returns the max of y (torch's rule:
// the first max in row-major order, a NaN replaces the running max) and its index 0..3.
NA_AVX512_FN static inline __m512 window_max_f32(__m512* v, __m512 va, __m512 vb, __m512 z,
                                                 bool relu, __m512i* idx) {
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm512_add_ps(_mm512_mul_ps(v[j], va), vb);
    if (relu) v[j] = _mm512_mask_mov_ps(v[j], _mm512_cmp_ps_mask(v[j], z, _CMP_LT_OQ), z);
  }
  __m512 best = v[0];
  *idx = _mm512_setzero_si512();
  for (int j = 1; j < 4; ++j) {
    const __mmask16 up = _mm512_cmp_ps_mask(v[j], best, _CMP_GT_OQ) |
                         _mm512_cmp_ps_mask(v[j], v[j], _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, up, v[j]);
    *idx = _mm512_mask_mov_epi32(*idx, up, _mm512_set1_epi32(j));
  }
  return best;
}

// Forward: one plane, y = relu?(x * alpha + beta), 2x2 max with torch's rule, index.
NA_AVX512_FN static inline void pool_plane_f32(const float* x, float* out, uint8_t* ind, int64_t W,
                                 int64_t Ho, int64_t Wo, float alpha, float beta, bool relu) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta), z = _mm512_setzero_ps();
  int64_t oh = 0;
  if (Wo <= 8) {
    const PairMasks pm = pair_masks(Wo);
    for (; oh + 2 <= Ho; oh += 2) {
      const float* r0 = x + 2 * oh * W;
      const __m512 a0 = _mm512_maskz_loadu_ps(pm.in, r0);
      const __m512 a1 = _mm512_maskz_loadu_ps(pm.in, r0 + W);
      const __m512 a2 = _mm512_maskz_loadu_ps(pm.in, r0 + 2 * W);
      const __m512 a3 = _mm512_maskz_loadu_ps(pm.in, r0 + 3 * W);
      __m512 v[4];
      window_corners(a0, a2, a1, a3, v);
      __m512i idx;
      const __m512 best = window_max_f32(v, va, vb, z, relu, &idx);
      _mm512_mask_compressstoreu_ps(out + oh * Wo, pm.win, best);
      _mm512_mask_cvtepi32_storeu_epi8(ind + oh * Wo, pm.flat,
                                       _mm512_maskz_compress_epi32(pm.win, idx));
    }
  }
  for (; oh < Ho; ++oh) {
    const float* r0 = x + 2 * oh * W;
    const float* r1 = r0 + W;
    for (int64_t ow = 0; ow < Wo; ow += 16) {
      const WinMasks m = win_masks(std::min<int64_t>(16, Wo - ow));
      const __m512 a0 = _mm512_maskz_loadu_ps(m.a, r0 + 2 * ow);
      const __m512 b0 = _mm512_maskz_loadu_ps(m.b, r0 + 2 * ow + 16);
      const __m512 a1 = _mm512_maskz_loadu_ps(m.a, r1 + 2 * ow);
      const __m512 b1 = _mm512_maskz_loadu_ps(m.b, r1 + 2 * ow + 16);
      __m512 v[4];
      window_corners(a0, b0, a1, b1, v);
      __m512i idx;
      const __m512 best = window_max_f32(v, va, vb, z, relu, &idx);
      _mm512_mask_storeu_ps(out + oh * Wo + ow, m.out, best);
      _mm512_mask_cvtepi32_storeu_epi8(ind + oh * Wo + ow, m.out, idx);
    }
  }
}
#endif  // SCALEINV_X86_BUILDS

// ---- portable kernels for the 2x2 windows (float32, W lanes) ------------------------
// A step covers up to W windows of one output row: the two input rows' next 2W columns
// are loaded as two W-vectors each and split into even/odd columns (the four corners).
// Loads and stores are whole vectors wherever they stay inside the plane: lanes past the
// step's windows then hold neighbouring values, which are never used, and stores that
// spill past the step land on windows of the plane that are written later (row-major
// order); only at the plane's end are they counted (load_n/store_n).

// Loads W values at p where that stays before end, else the first n (n <= W, the rest 0).
template <int W>
SCALEINV_INLINE VecF<W> load_in(const float* p, int n, const float* end) {
  return p + W <= end ? VecF<W>::load(p) : VecF<W>::load_n(p, n);
}
template <int W>
SCALEINV_INLINE void store_in(const VecF<W>& v, float* p, int n, const float* end) {
  if (p + W <= end)
    v.store(p);
  else
    v.store_n(p, n);
}

// The four corners (top-left, top-right, bottom-left, bottom-right) of the windows whose
// top-left columns are c, c+2, ..., c+2(rem-1) of rows r0 (top) and r1 (bottom).
template <int W>
SCALEINV_INLINE void window_corners_vec(const float* r0, const float* r1, int rem,
                                        const float* end, VecF<W>* v) {
  const int na = std::min(2 * rem, W), nb = std::max(0, 2 * rem - W);
  const VecF<W> a0 = load_in<W>(r0, na, end), b0 = load_in<W>(r0 + W, nb, end);
  const VecF<W> a1 = load_in<W>(r1, na, end), b1 = load_in<W>(r1 + W, nb, end);
  v[0] = even(a0, b0);
  v[1] = odd(a0, b0);
  v[2] = even(a1, b1);
  v[3] = odd(a1, b1);
}

// The corner indices 0..3 as vectors, built once per plane: GCC may lower a W-lane
// constant in a helper compiled for the baseline target lane by lane, so the kernels
// keep such constants out of their loops.
template <int W>
struct CornerIds {
  VecI<W> k[4];
  SCALEINV_INLINE CornerIds() {
    for (int j = 0; j < 4; ++j) k[j] = VecI<W>::broadcast(j);
  }
};

// v: the four window corners x; y = relu?(x * a + b) (unfused, like the scalar loop);
// returns the max of y with torch's rule (the first max in row-major order, a NaN
// replaces the running max) and its index 0..3.
template <int W>
SCALEINV_INLINE VecF<W> window_max_vec(VecF<W>* v, VecF<W> va, VecF<W> vb, bool relu,
                                       const CornerIds<W>& ids, VecI<W>* idx) {
  const VecF<W> z = VecF<W>::zero();
  for (int j = 0; j < 4; ++j) {
    v[j] = v[j] * va + vb;
    if (relu) v[j] = VecF<W>::select(lt(v[j], z), z, v[j]);
  }
  VecF<W> best = v[0];
  *idx = VecI<W>::zero();
  for (int j = 1; j < 4; ++j) {
    const VecI<W> up = gt(v[j], best) | unord(v[j], v[j]);
    best = VecF<W>::select(up, v[j], best);
    *idx = VecI<W>::select(up, ids.k[j], *idx);
  }
  return best;
}

// Forward: one plane, y = relu?(x * alpha + beta), 2x2 max with torch's rule, index.
template <int W>
SCALEINV_INLINE void pool_plane_vec(const float* x, float* out, uint8_t* ind, int64_t Wd,
                                    int64_t Ho, int64_t Wo, float alpha, float beta,
                                    bool relu) {
  const VecF<W> va = VecF<W>::broadcast(alpha), vb = VecF<W>::broadcast(beta);
  const CornerIds<W> ids;
  const float* xend = x + 2 * Ho * Wd;  // the rows the windows read
  const float* oend = out + Ho * Wo;
  const uint8_t* kend = ind + Ho * Wo;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const float* r0 = x + 2 * oh * Wd;
    for (int64_t ow = 0; ow < Wo; ow += W) {
      const int rem = static_cast<int>(std::min<int64_t>(W, Wo - ow));
      VecF<W> v[4];
      window_corners_vec<W>(r0 + 2 * ow, r0 + Wd + 2 * ow, rem, xend, v);
      VecI<W> idx;
      const VecF<W> best = window_max_vec<W>(v, va, vb, relu, ids, &idx);
      float* o = out + oh * Wo + ow;
      uint8_t* k = ind + oh * Wo + ow;
      store_in<W>(best, o, rem, oend);
      if (k + W <= kend)
        idx.store_u8(k);
      else
        idx.store_u8_n(k, rem);
    }
  }
}

template <typename T>
SCALEINV_INLINE T relu_keep_nan(T v) {
  return v < T(0) ? T(0) : v;  // NaN and -0.0 pass unchanged, like torch.relu
}

// y = relu?(x * alpha + beta), then 2x2 max pool with torch's tie/NaN rule (first max in
// row-major window order wins; a NaN replaces the running max), over one plane: the
// float64 path, and the per-element definition the float32 kernels above reproduce.
template <typename T, bool RELU>
SCALEINV_INLINE void plane_pool(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ ind,
                          const Geo& g, T alpha, T beta) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* __restrict__ r0 = x + 2 * oh * g.W;
    const T* __restrict__ r1 = r0 + g.W;
    T* __restrict__ o = out + oh * g.Wo;
    uint8_t* __restrict__ k = ind + oh * g.Wo;
#pragma omp simd
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      T v0 = r0[2 * ow] * alpha + beta, v1 = r0[2 * ow + 1] * alpha + beta;
      T v2 = r1[2 * ow] * alpha + beta, v3 = r1[2 * ow + 1] * alpha + beta;
      if constexpr (RELU) {
        v0 = relu_keep_nan(v0);
        v1 = relu_keep_nan(v1);
        v2 = relu_keep_nan(v2);
        v3 = relu_keep_nan(v3);
      }
      T best = v0;
      uint8_t idx = 0;
      bool up = (v1 > best) | (v1 != v1);
      best = up ? v1 : best;
      idx = up ? uint8_t(1) : idx;
      up = (v2 > best) | (v2 != v2);
      best = up ? v2 : best;
      idx = up ? uint8_t(2) : idx;
      up = (v3 > best) | (v3 != v3);
      best = up ? v3 : best;
      idx = up ? uint8_t(3) : idx;
      o[ow] = best;
      k[ow] = idx;
    }
  }
}

template <typename T, bool RELU>
SCALEINV_INLINE void plane_nopool(const T* __restrict__ x, T* __restrict__ out, const Geo& g, T alpha,
                            T beta) {
#pragma omp simd
  for (int64_t i = 0; i < g.HW; ++i) {
    T v = x[i] * alpha + beta;
    if constexpr (RELU) v = relu_keep_nan(v);
    out[i] = v;
  }
}

// One plane: x [H, W] (row stride W) -> out [Ho, Wo] and ind [Ho, Wo] (pool == 2) or
// out [H, W] (pool == 0), with the geometry and flags of g. W: the vector lanes of the
// calling build (kLanesDefault works in every build, only narrower).
template <int W = kLanesDefault, typename T>
SCALEINV_INLINE void plane_forward_at(const T* x, T* out, uint8_t* ind, const Geo& g, T alpha,
                                      T beta) {
  if constexpr (std::is_same_v<T, float>) {
    if (g.pool == 2) {
#ifdef NA_HAVE_AVX512_KERNELS
      if (use_avx512_kernels())
        return pool_plane_f32(x, out, ind, g.W, g.Ho, g.Wo, alpha, beta, g.relu);
#endif
      return pool_plane_vec<W>(x, out, ind, g.W, g.Ho, g.Wo, alpha, beta, g.relu);
    }
  }
  if (g.pool == 2) {
    if (g.relu)
      plane_pool<T, true>(x, out, ind, g, alpha, beta);
    else
      plane_pool<T, false>(x, out, ind, g, alpha, beta);
  } else {
    if (g.relu)
      plane_nopool<T, true>(x, out, g, alpha, beta);
    else
      plane_nopool<T, false>(x, out, g, alpha, beta);
  }
}

}  // namespace scaleinv
