// The backward window kernels of the fused norm ops (float32), per plane: the routed
// gradient (grad_out masked by out > 0 with relu, sent to each window's argmax), the
// per-channel sums over a plane (sum(g) and sum(g * (v - shift)), fp64) and dx of a plane
// (k0 + k2 * (x - mean) plus scale * g at each argmax). Served to scaleinv::bn_act_pool
// and scaleinv::gn_act_pool's backward (bn_act.cpp, gn_act.cpp) through norm_common.h.
//
// Written once over VecF<W> (csrc/vec.h); the AVX-512 build runs the intrinsics twins
// (first half of the file) instead, unless SCALEINV_NO_AVX512=1. The twins give the same
// bits for dx from the same coefficients; the fp64 sums add in another order (W lanes
// plus a horizontal sum), so they agree to the rounding of an fp64 sum.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vec.h"
#include "window_kernels.h"

namespace scaleinv {

// ---- AVX-512 kernels of the backward windows (float32) ------------------------------
#ifdef NA_HAVE_AVX512_KERNELS
// g = grad_out (masked by out > 0 with relu) and the input value at the argmax.
NA_AVX512_FN static inline void routed(const float* r0, const float* r1, const float* go,
                                       const float* o, const uint8_t* k, int64_t ow,
                                       const WinMasks& m, bool relu, __m512* g, __m512* xs,
                                       __m512i* kk) {
  *g = _mm512_maskz_loadu_ps(m.out, go + ow);
  if (relu) {
    const __m512 ov = _mm512_maskz_loadu_ps(m.out, o + ow);
    *g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ov, _mm512_setzero_ps(), _CMP_GT_OQ), *g);
  }
  *kk = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m.out, k + ow));
  if (xs) {
    __m512 v[4];
    window_corners(_mm512_maskz_loadu_ps(m.a, r0 + 2 * ow),
                   _mm512_maskz_loadu_ps(m.b, r0 + 2 * ow + 16),
                   _mm512_maskz_loadu_ps(m.a, r1 + 2 * ow),
                   _mm512_maskz_loadu_ps(m.b, r1 + 2 * ow + 16), v);
    *xs = corner_at(v, *kk);
  }
}

// routed() for the row pair (oh, oh+1) of a narrow plane (see PairMasks): go, o and k
// point at output row oh (2*Wo consecutive values), r0 at input row 2*oh; lanes off the
// windows get g = 0.
NA_AVX512_FN static inline void routed_pair(const float* r0, int64_t W, const float* go,
                                            const float* o, const uint8_t* k,
                                            const PairMasks& pm, bool relu, __m512* g,
                                            __m512* xs, __m512i* kk) {
  *g = _mm512_maskz_expandloadu_ps(pm.win, go);
  if (relu) {
    const __m512 ov = _mm512_maskz_expandloadu_ps(pm.win, o);
    *g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ov, _mm512_setzero_ps(), _CMP_GT_OQ), *g);
  }
  *kk = _mm512_maskz_expand_epi32(pm.win,
                                  _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(pm.flat, k)));
  if (xs) {
    __m512 v[4];  // rows 2oh, 2oh+2 are the tops, 2oh+1, 2oh+3 the bottoms
    window_corners(_mm512_maskz_loadu_ps(pm.in, r0), _mm512_maskz_loadu_ps(pm.in, r0 + 2 * W),
                   _mm512_maskz_loadu_ps(pm.in, r0 + W),
                   _mm512_maskz_loadu_ps(pm.in, r0 + 3 * W), v);
    *xs = corner_at(v, *kk);
  }
}

// acc1 += g, acc2 += g * d, in fp64 (two 8-lane halves).
NA_AVX512_FN static inline void accumulate_sums(__m512 g, __m512 d, __m512d* acc1,
                                                __m512d* acc2) {
  const __m512d glo = _mm512_cvtps_pd(_mm512_castps512_ps256(g));
  const __m512d ghi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(g, 1));
  *acc1 = _mm512_add_pd(*acc1, _mm512_add_pd(glo, ghi));
  *acc2 = _mm512_fmadd_pd(glo, _mm512_cvtps_pd(_mm512_castps512_ps256(d)), *acc2);
  *acc2 = _mm512_fmadd_pd(ghi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1)), *acc2);
}

// Backward sums over one plane's windows: s1 += g, s2 += g * (v - shift), fp64, where v is
// the window's output (from_out: x̂ is recovered from it, see XhatSource; x is not read)
// or x at the argmax (shift = mean).
NA_AVX512_FN inline void pool_sums_plane_f32(const float* x, const float* go, const float* o,
                                      const uint8_t* k, int64_t W, int64_t Ho, int64_t Wo,
                                      float shift, bool from_out, bool relu, double* s1,
                                      double* s2) {
  __m512d acc1 = _mm512_setzero_pd(), acc2 = _mm512_setzero_pd();
  const __m512 vm = _mm512_set1_ps(shift);
  int64_t oh = 0;
  if (Wo <= 8) {
    const PairMasks pm = pair_masks(Wo);
    for (; oh + 2 <= Ho; oh += 2) {
      __m512 g, v;
      __m512i kk;
      if (from_out) {
        routed_pair(nullptr, W, go + oh * Wo, o + oh * Wo, k + oh * Wo, pm, relu, &g, nullptr,
                    &kk);
        v = _mm512_maskz_expandloadu_ps(pm.win, o + oh * Wo);
      } else {
        routed_pair(x + 2 * oh * W, W, go + oh * Wo, o + oh * Wo, k + oh * Wo, pm, relu, &g, &v,
                    &kk);
      }
      accumulate_sums(g, _mm512_sub_ps(v, vm), &acc1, &acc2);
    }
  }
  for (; oh < Ho; ++oh) {
    const float* r0 = x + 2 * oh * W;
    for (int64_t ow = 0; ow < Wo; ow += 16) {
      const WinMasks m = win_masks(std::min<int64_t>(16, Wo - ow));
      __m512 g, v;
      __m512i kk;
      if (from_out) {
        routed(nullptr, nullptr, go + oh * Wo, o + oh * Wo, k + oh * Wo, ow, m, relu, &g,
               nullptr, &kk);
        v = _mm512_maskz_loadu_ps(m.out, o + oh * Wo + ow);
      } else {
        routed(r0, r0 + W, go + oh * Wo, o + oh * Wo, k + oh * Wo, ow, m, relu, &g, &v, &kk);
      }
      accumulate_sums(g, _mm512_sub_ps(v, vm), &acc1, &acc2);
    }
  }
  *s1 += _mm512_reduce_add_pd(acc1);
  *s2 += _mm512_reduce_add_pd(acc2);
}

// Backward sums over one plane without pooling (GCC leaves the masked fp64 reduction of
// a plain loop scalar): s1 += g, s2 += g * (v - shift),
// v = x or out (see pool_sums_plane_f32).
NA_AVX512_FN inline void plain_sums_plane_f32(const float* x, const float* go, const float* o,
                                       int64_t HW, float shift, bool relu, double* s1,
                                       double* s2) {
  __m512d acc1 = _mm512_setzero_pd(), acc2 = _mm512_setzero_pd();
  const __m512 vm = _mm512_set1_ps(shift);
  for (int64_t i = 0; i < HW; i += 16) {
    const int64_t rem = std::min<int64_t>(16, HW - i);
    const __mmask16 m = static_cast<__mmask16>(rem == 16 ? 0xFFFFu : (1u << rem) - 1u);
    __m512 g = _mm512_maskz_loadu_ps(m, go + i);
    if (relu) {
      const __m512 ov = _mm512_maskz_loadu_ps(m, o + i);
      g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ov, _mm512_setzero_ps(), _CMP_GT_OQ), g);
    }
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm);  // g = 0 off the mask
    const __m512d glo = _mm512_cvtps_pd(_mm512_castps512_ps256(g));
    const __m512d ghi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(g, 1));
    acc1 = _mm512_add_pd(acc1, _mm512_add_pd(glo, ghi));
    acc2 = _mm512_fmadd_pd(glo, _mm512_cvtps_pd(_mm512_castps512_ps256(d)), acc2);
    acc2 = _mm512_fmadd_pd(ghi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1)), acc2);
  }
  *s1 += _mm512_reduce_add_pd(acc1);
  *s2 += _mm512_reduce_add_pd(acc2);
}

NA_AVX512_FN static inline __m512 dx_base(__m512 xv, __m512 vk0, __m512 vk2, __m512 vm,
                                          bool training) {
  return training ? _mm512_add_ps(vk0, _mm512_mul_ps(vk2, _mm512_sub_ps(xv, vm)))
                  : _mm512_setzero_ps();
}

// Backward dx over one plane, written once: dx = k0 + k2 * (x - mean) (training; 0 in
// eval) plus scale * g at each window's argmax.
NA_AVX512_FN inline void pool_dx_plane_f32(const float* x, float* dx, const float* go, const float* o,
                                    const uint8_t* k, int64_t H, int64_t W, int64_t Ho,
                                    int64_t Wo, float mean, float scale, float k0, float k2,
                                    bool relu, bool training) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 vs = _mm512_set1_ps(scale), vk0 = _mm512_set1_ps(k0), vk2 = _mm512_set1_ps(k2),
               vm = _mm512_set1_ps(mean);
  auto base1 = [&](float xv) { return training ? k0 + k2 * (xv - mean) : 0.0f; };
  int64_t oh = 0;
  if (Wo <= 8) {  // row pairs: lanes 0..7 hold output row oh, 8..15 row oh+1
    const PairMasks pm = pair_masks(Wo);
    for (; oh + 2 <= Ho; oh += 2) {
      __m512 g;
      __m512i kk;
      routed_pair(nullptr, W, go + oh * Wo, o + oh * Wo, k + oh * Wo, pm, relu, &g, nullptr,
                  &kk);
      __m512 corner[4];  // g at top-left, top-right, bottom-left, bottom-right
      split_by_corner(_mm512_mul_ps(g, vs), kk, corner);
      const __m512 e0 = corner[0], o0 = corner[1], e1 = corner[2], o1 = corner[3];
      // input rows 2oh .. 2oh+3: tops of row oh's windows, bottoms, then row oh+1's
      const __m512 add[4] = {_mm512_permutex2var_ps(e0, lo, o0), _mm512_permutex2var_ps(e1, lo, o1),
                             _mm512_permutex2var_ps(e0, hi, o0), _mm512_permutex2var_ps(e1, hi, o1)};
      for (int r = 0; r < 4; ++r) {
        const float* xr = x + (2 * oh + r) * W;
        float* dr = dx + (2 * oh + r) * W;
        _mm512_mask_storeu_ps(
            dr, pm.in,
            _mm512_add_ps(dx_base(_mm512_maskz_loadu_ps(pm.in, xr), vk0, vk2, vm, training),
                          add[r]));
        if (W % 2) dr[W - 1] = base1(xr[W - 1]);  // dropped last column: no window
      }
    }
  }
  for (; oh < Ho; ++oh) {
    const float* r0 = x + 2 * oh * W;
    const float* r1 = r0 + W;
    float* d0 = dx + 2 * oh * W;
    float* d1 = d0 + W;
    for (int64_t ow = 0; ow < Wo; ow += 16) {
      const WinMasks m = win_masks(std::min<int64_t>(16, Wo - ow));
      __m512 g;
      __m512i kk;
      routed(nullptr, nullptr, go + oh * Wo, o + oh * Wo, k + oh * Wo, ow, m, relu, &g, nullptr,
             &kk);
      __m512 corner[4];  // g at top-left, top-right, bottom-left, bottom-right
      split_by_corner(_mm512_mul_ps(g, vs), kk, corner);
      const __m512 e0 = corner[0], o0 = corner[1], e1 = corner[2], o1 = corner[3];
      const int64_t c = 2 * ow;
      _mm512_mask_storeu_ps(
          d0 + c, m.a,
          _mm512_add_ps(dx_base(_mm512_maskz_loadu_ps(m.a, r0 + c), vk0, vk2, vm, training),
                        _mm512_permutex2var_ps(e0, lo, o0)));
      _mm512_mask_storeu_ps(
          d0 + c + 16, m.b,
          _mm512_add_ps(dx_base(_mm512_maskz_loadu_ps(m.b, r0 + c + 16), vk0, vk2, vm, training),
                        _mm512_permutex2var_ps(e0, hi, o0)));
      _mm512_mask_storeu_ps(
          d1 + c, m.a,
          _mm512_add_ps(dx_base(_mm512_maskz_loadu_ps(m.a, r1 + c), vk0, vk2, vm, training),
                        _mm512_permutex2var_ps(e1, lo, o1)));
      _mm512_mask_storeu_ps(
          d1 + c + 16, m.b,
          _mm512_add_ps(dx_base(_mm512_maskz_loadu_ps(m.b, r1 + c + 16), vk0, vk2, vm, training),
                        _mm512_permutex2var_ps(e1, hi, o1)));
    }
    if (W % 2) {  // dropped last column: no window
      d0[W - 1] = base1(r0[W - 1]);
      d1[W - 1] = base1(r1[W - 1]);
    }
  }
  if (H % 2) {  // dropped last row
    const float* r = x + (H - 1) * W;
    float* d = dx + (H - 1) * W;
    for (int64_t i = 0; i < W; ++i) d[i] = base1(r[i]);
  }
}
#endif

#ifdef NA_HAVE_AVX512_KERNELS
// dst[0..n) = src[0..n) with non-temporal stores for the whole 64-byte lines of dst
// (plain stores for a partial first and last line, which neighbouring runs share).
NA_AVX512_FN inline void stream_copy_f32(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

NA_AVX512_FN inline void store_fence() { _mm_sfence(); }
#endif

// ---- portable kernels of the backward windows (float32, W lanes) ---------------------
// One output row's windows per step, as in pool_plane_vec (window_kernels.h): whole-vector
// loads wherever they stay inside the plane; lanes past the step's windows get g = 0.

// Lanes 0..rem-1 of the last step of each output row (all lanes when Wo is a multiple of
// W), built once per plane (see CornerIds).
template <int W>
SCALEINV_INLINE VecI<W> row_tail_lanes(int64_t Wo) {
  const int rem = static_cast<int>(Wo - (Wo - 1) / W * W);
  return lt(VecI<W>::iota(), VecI<W>::broadcast(rem));
}

// g = grad_out (masked by out > 0 with relu; 0 on lanes >= rem, given by tail) and the
// window index kk of the rem windows at go/o/k, which are followed by left - rem more of
// the plane's.
template <int W>
SCALEINV_INLINE void routed_vec(const float* go, const float* o, const uint8_t* k, int rem,
                                int64_t left, bool relu, const VecI<W>& tail, VecF<W>* g,
                                VecI<W>* kk) {
  const bool whole = left >= W;
  const VecF<W> z = VecF<W>::zero();
  *g = whole ? VecF<W>::load(go) : VecF<W>::load_n(go, rem);
  if (relu) *g = VecF<W>::select(gt(whole ? VecF<W>::load(o) : VecF<W>::load_n(o, rem), z), *g, z);
  if (rem < W) *g = VecF<W>::select(tail, *g, z);
  *kk = whole ? VecI<W>::load_u8(k) : VecI<W>::load_u8_n(k, rem);
}

// v[kk] per lane (kk in 0..3).
template <int W>
SCALEINV_INLINE VecF<W> corner_at_vec(const VecF<W>* v, VecI<W> kk, const CornerIds<W>& ids) {
  VecF<W> x = v[0];
  for (int j = 1; j < 4; ++j) x = VecF<W>::select(eq(kk, ids.k[j]), v[j], x);
  return x;
}

// acc1 += g, acc2 += g * d in fp64 (multiply, then add: the order of the lanes' sums
// differs from the AVX-512 twin's anyway, and a per-lane fma is a library call in the
// portable build).
template <int W>
SCALEINV_INLINE void accumulate_sums_vec(VecF<W> g, VecF<W> d, VecD<W>* acc1, VecD<W>* acc2) {
  const VecD<W> gd = VecD<W>::from(g);
  *acc1 = *acc1 + gd;
  *acc2 = *acc2 + gd * VecD<W>::from(d);
}

// Twin of plain_sums_plane_f32 (no pool): s1 += g, s2 += g * (v - shift), v = x or out.
template <int W>
SCALEINV_INLINE void plain_sums_plane_vec(const float* v, const float* go, const float* o,
                                          int64_t HW, float shift, bool relu, double* s1,
                                          double* s2) {
  VecD<W> acc1 = VecD<W>::zero(), acc2 = VecD<W>::zero();
  const VecF<W> vm = VecF<W>::broadcast(shift), z = VecF<W>::zero();
  for (int64_t i = 0; i < HW; i += W) {
    const int rem = static_cast<int>(std::min<int64_t>(W, HW - i));
    VecF<W> g = VecF<W>::load_n(go + i, rem);  // 0 past the plane, and d = 0 - shift there
    if (relu) g = VecF<W>::select(gt(VecF<W>::load_n(o + i, rem), z), g, z);
    VecF<W> d = VecF<W>::load_n(v + i, rem) - vm;
    if (rem < W) d = VecF<W>::select(lt(VecI<W>::iota(), VecI<W>::broadcast(rem)), d, z);
    accumulate_sums_vec<W>(g, d, &acc1, &acc2);
  }
  *s1 += acc1.hsum();
  *s2 += acc2.hsum();
}

// Twin of pool_sums_plane_f32: s1 += g, s2 += g * (v - shift) over one plane's windows, v
// the window's output (from_out) or x at the argmax.
template <int W>
SCALEINV_INLINE void pool_sums_plane_vec(const float* x, const float* go, const float* o,
                                         const uint8_t* k, int64_t Wd, int64_t Ho,
                                         int64_t Wo, float shift, bool from_out, bool relu,
                                         double* s1, double* s2) {
  // v = out: grad_out and out of the windows are contiguous, no window geometry needed
  if (from_out) return plain_sums_plane_vec<W>(o, go, o, Ho * Wo, shift, relu, s1, s2);
  VecD<W> acc1 = VecD<W>::zero(), acc2 = VecD<W>::zero();
  const VecF<W> vm = VecF<W>::broadcast(shift);
  const CornerIds<W> ids;
  const VecI<W> tail = row_tail_lanes<W>(Wo);
  const float* xend = x + 2 * Ho * Wd;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const float* r0 = x + 2 * oh * Wd;
    for (int64_t ow = 0; ow < Wo; ow += W) {
      const int rem = static_cast<int>(std::min<int64_t>(W, Wo - ow));
      const int64_t j = oh * Wo + ow;
      VecF<W> g;
      VecI<W> kk;
      routed_vec<W>(go + j, o + j, k + j, rem, Ho * Wo - j, relu, tail, &g, &kk);
      VecF<W> c[4];
      window_corners_vec<W>(r0 + 2 * ow, r0 + Wd + 2 * ow, rem, xend, c);
      VecF<W> d = corner_at_vec<W>(c, kk, ids) - vm;
      // lanes past the windows: g = 0, and d = 0 so that 0 * (a neighbour's inf) adds 0
      if (rem < W) d = VecF<W>::select(tail, d, VecF<W>::zero());
      accumulate_sums_vec<W>(g, d, &acc1, &acc2);
    }
  }
  *s1 += acc1.hsum();
  *s2 += acc2.hsum();
}

// Twin of pool_dx_plane_f32: dx = k0 + k2 * (x - mean) (training; 0 in eval) plus
// scale * g at each window's argmax (+0 elsewhere, as the AVX-512 kernel adds).
template <int W>
SCALEINV_INLINE void pool_dx_plane_vec(const float* x, float* dx, const float* go,
                                       const float* o, const uint8_t* k, int64_t H, int64_t Wd,
                                       int64_t Ho, int64_t Wo, float mean, float scale,
                                       float k0, float k2, bool relu, bool training) {
  const VecF<W> vs = VecF<W>::broadcast(scale), vk0 = VecF<W>::broadcast(k0),
                vk2 = VecF<W>::broadcast(k2), vm = VecF<W>::broadcast(mean),
                z = VecF<W>::zero();
  const CornerIds<W> ids;
  const VecI<W> tail = row_tail_lanes<W>(Wo);
  auto base = [&](VecF<W> xv) { return training ? vk0 + vk2 * (xv - vm) : z; };
  auto base1 = [&](float xv) { return training ? k0 + k2 * (xv - mean) : 0.0f; };
  const float* xend = x + H * Wd;
  const float* dend = dx + H * Wd;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const float* r0 = x + 2 * oh * Wd;
    const float* r1 = r0 + Wd;
    float* d0 = dx + 2 * oh * Wd;
    float* d1 = d0 + Wd;
    for (int64_t ow = 0; ow < Wo; ow += W) {
      const int rem = static_cast<int>(std::min<int64_t>(W, Wo - ow));
      const int64_t j = oh * Wo + ow;
      VecF<W> g;
      VecI<W> kk;
      routed_vec<W>(go + j, o + j, k + j, rem, Ho * Wo - j, relu, tail, &g, &kk);
      const VecF<W> sg = g * vs;
      VecF<W> c[4];  // scale * g at top-left, top-right, bottom-left, bottom-right
      for (int q = 0; q < 4; ++q) c[q] = VecF<W>::select(eq(kk, ids.k[q]), sg, z);
      const int64_t col = 2 * ow;
      const int na = std::min(2 * rem, W), nb = std::max(0, 2 * rem - W);
      // A whole-vector store past the step's columns lands on the row's dropped last
      // column and the next row, written after it: the top row's only when this is the
      // row's first step (a later step would overwrite the bottom row's first columns).
      const float* top_end = ow == 0 ? dend : d0 + col + 2 * rem;
      store_in<W>(base(load_in<W>(r0 + col, na, xend)) + zip_lo(c[0], c[1]), d0 + col, na,
                  top_end);
      store_in<W>(base(load_in<W>(r0 + col + W, nb, xend)) + zip_hi(c[0], c[1]),
                  d0 + col + W, nb, top_end);
      store_in<W>(base(load_in<W>(r1 + col, na, xend)) + zip_lo(c[2], c[3]), d1 + col, na,
                  dend);
      store_in<W>(base(load_in<W>(r1 + col + W, nb, xend)) + zip_hi(c[2], c[3]),
                  d1 + col + W, nb, dend);
    }
    if (Wd % 2) {  // dropped last column: no window
      d0[Wd - 1] = base1(r0[Wd - 1]);
      d1[Wd - 1] = base1(r1[Wd - 1]);
    }
  }
  if (H % 2) {  // dropped last row
    const float* r = x + (H - 1) * Wd;
    float* d = dx + (H - 1) * Wd;
    for (int64_t i = 0; i < Wd; ++i) d[i] = base1(r[i]);
  }
}

}  // namespace scaleinv
