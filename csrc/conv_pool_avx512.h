// The AVX-512 float32 plane kernels of scaleinv::conv_bn_act_pool (conv_norm_act.cpp):
// forward at the pooled windows and the backward's routed sums, 16 windows per step. They
// run only in the AVX-512 build (use_avx512_kernels()); conv_pool_kernels.h has their
// portable twins over VecF<W>, which compute the same bits lane by lane (the forward and
// the recomputed y; the sums too where W = 16) and run everywhere else.
#pragma once

#include <algorithm>
#include <cstdint>

#include "conv_patch.h"

namespace scaleinv {
namespace cna {

#ifdef NA_HAVE_AVX512_KERNELS
// The value at column 2*ow + e (+ 2 per lane) of padded row `row` (E/O rows of Ls floats).
NA_AVX512_FN static inline __m512 cand(const float* eo_row, int64_t Ls, int64_t ow, int64_t e) {
  return _mm512_loadu_ps(eo_row + (e & 1) * Ls + ow + (e >> 1));
}

// Forward of NCH (sample, channel) planes of one group (channels c0, c0+1, ...): the four
// window corners of 16 windows are y = sum_t w[t] * x[patch tap t at the corner], then
// relu?(y * alpha + beta), max, index. CI/KH/KW > 0 fix the tap geometry at compile time
// (the loops unroll and the broadcast weights stay in registers); 0 reads it from g. NCH = 2 shares every candidate load between two
// channels: half of the loads are misaligned by one float and split across cache lines,
// so with one channel the loads, not the FMAs, bound the loop. Each channel's arithmetic
// is the same for NCH = 1 and 2 (same bits).
template <int CI, int KH, int KW, int NCH>
NA_AVX512_FN static void conv_pool_planes_f32(const float* eo, const float* wc,
                                              const float* alpha, const float* beta,
                                              float* out, uint8_t* ind, int64_t plane_stride,
                                              const CbGeo& g) {
  const int64_t Ci = CI ? CI : g.Ci, kh = KH ? KH : g.KH, kw = KW ? KW : g.KW;
  const int64_t K = Ci * kh * kw;
  const __m512 z = _mm512_setzero_ps();
  const int64_t Ho = g.pool.Ho, Wo = g.pool.Wo, Ls = g.Ls, rs = 2 * Ls;
  __m512 wv[NCH][kMaxTaps], va[NCH], vb[NCH];
  for (int c = 0; c < NCH; ++c) {
    for (int64_t t = 0; t < K; ++t) wv[c][t] = _mm512_set1_ps(wc[c * K + t]);
    va[c] = _mm512_set1_ps(alpha[c]);
    vb[c] = _mm512_set1_ps(beta[c]);
  }
  for (int64_t oh = 0; oh < Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ow += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, Wo - ow)) - 1u);
      __m512 v[NCH][4];
      for (int c = 0; c < NCH; ++c) v[c][0] = v[c][1] = v[c][2] = v[c][3] = z;
      for (int64_t ci = 0; ci < Ci; ++ci)
        for (int64_t ky = 0; ky < kh; ++ky) {
          const float* r0 = eo + (ci * g.Hp + 2 * oh + ky) * rs;
          const float* r1 = r0 + rs;
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t t = (ci * kh + ky) * kw + kx;
            const __m512 x00 = cand(r0, Ls, ow, kx), x01 = cand(r0, Ls, ow, kx + 1);
            const __m512 x10 = cand(r1, Ls, ow, kx), x11 = cand(r1, Ls, ow, kx + 1);
            for (int c = 0; c < NCH; ++c) {
              v[c][0] = _mm512_fmadd_ps(wv[c][t], x00, v[c][0]);
              v[c][1] = _mm512_fmadd_ps(wv[c][t], x01, v[c][1]);
              v[c][2] = _mm512_fmadd_ps(wv[c][t], x10, v[c][2]);
              v[c][3] = _mm512_fmadd_ps(wv[c][t], x11, v[c][3]);
            }
          }
        }
      for (int c = 0; c < NCH; ++c) {
        __m512i idx;
        const __m512 best = window_max_f32(v[c], va[c], vb[c], z, g.pool.relu, &idx);
        _mm512_mask_storeu_ps(out + c * plane_stride + oh * Wo + ow, m, best);
        _mm512_mask_cvtepi32_storeu_epi8(ind + c * plane_stride + oh * Wo + ow, m, idx);
      }
    }
  }
}

using ConvPoolPlanesFn = void (*)(const float*, const float*, const float*, const float*,
                                  float*, uint8_t*, int64_t, const CbGeo&);

// The kernel for g's tap geometry, NCH = 1 (pairs = false) or 2.
NA_AVX512_FN static inline ConvPoolPlanesFn conv_pool_planes_for(const CbGeo& g, bool pairs) {
  static const ConvPoolPlanesFn one[] = {
      &conv_pool_planes_f32<1, 3, 3, 1>, &conv_pool_planes_f32<3, 3, 3, 1>,
      &conv_pool_planes_f32<1, 5, 5, 1>, &conv_pool_planes_f32<0, 0, 0, 1>};
  static const ConvPoolPlanesFn two[] = {
      &conv_pool_planes_f32<1, 3, 3, 2>, &conv_pool_planes_f32<3, 3, 3, 2>,
      &conv_pool_planes_f32<1, 5, 5, 2>, &conv_pool_planes_f32<0, 0, 0, 2>};
  return (pairs ? two : one)[tap_variant(g)];
}
#endif

#ifdef NA_HAVE_AVX512_KERNELS
NA_AVX512_FN static inline double hsum(__m512 v) {
  return _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v))) +
         _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
}

// One (sample, channel) plane: per 16 windows, g (masked by out > 0 with relu), the patch
// at each window's argmax (the corner candidates selected by the index), y recomputed
// there (the forward's operations), and the sums. Partial sums stay in float32 vectors
// over the plane and are added to s [K + 2] in float64. CI/KH/KW as in the forward.
template <int CI, int KH, int KW>
NA_AVX512_FN static void sums_plane_f32(const float* eo, const float* wc, float mean,
                                        float invstd, const float* go, const float* o,
                                        const uint8_t* k, const CbGeo& g, double* s) {
  const int64_t Ci = CI ? CI : g.Ci, kh = KH ? KH : g.KH, kw = KW ? KW : g.KW;
  const int64_t Ho = g.pool.Ho, Wo = g.pool.Wo, Ls = g.Ls, rs = 2 * Ls, K = Ci * kh * kw;
  const __m512 vm = _mm512_set1_ps(mean), vi = _mm512_set1_ps(invstd), z = _mm512_setzero_ps();
  __m512 acc[kMaxTaps], wv[kMaxTaps], a1 = z, a2 = z;
  for (int64_t t = 0; t < K; ++t) {
    acc[t] = z;
    wv[t] = _mm512_set1_ps(wc[t]);
  }
  for (int64_t oh = 0; oh < Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ow += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, Wo - ow)) - 1u);
      __m512 gv = _mm512_maskz_loadu_ps(m, go + oh * Wo + ow);
      if (g.pool.relu) {
        const __m512 ov = _mm512_maskz_loadu_ps(m, o + oh * Wo + ow);
        gv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ov, z, _CMP_GT_OQ), gv);
      }
      const __m512i kk = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, k + oh * Wo + ow));
      // the argmax corner k: column 2*ow + (k & 1), row 2*oh + (k >> 1) of the window
      const __m512i one = _mm512_set1_epi32(1);
      const __mmask16 kodd = _mm512_test_epi32_mask(kk, one);
      const __mmask16 klow = _mm512_test_epi32_mask(kk, _mm512_set1_epi32(2));
      __m512 p[kMaxTaps];
      __m512 y = z;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        // column-selected candidates of padded rows ky and ky + 1 (kw each): every row's
        // selection is made once and used by two tap rows (21 instead of 27 blends for
        // 1x3x3; the same values are selected)
        __m512 up[kMaxTaps], dn[kMaxTaps];
        const float* row = eo + (ci * g.Hp + 2 * oh) * rs;
        for (int64_t kx = 0; kx < kw; ++kx)
          up[kx] = _mm512_mask_mov_ps(cand(row, Ls, ow, kx), kodd, cand(row, Ls, ow, kx + 1));
        for (int64_t ky = 0; ky < kh; ++ky) {
          row += rs;
          for (int64_t kx = 0; kx < kw; ++kx)
            dn[kx] = _mm512_mask_mov_ps(cand(row, Ls, ow, kx), kodd, cand(row, Ls, ow, kx + 1));
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t t = (ci * kh + ky) * kw + kx;
            p[t] = _mm512_mask_mov_ps(up[kx], klow, dn[kx]);
            y = _mm512_fmadd_ps(wv[t], p[t], y);
            up[kx] = dn[kx];
          }
        }
      }
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(y, vm), vi);
      a1 = _mm512_add_ps(a1, gv);
      a2 = _mm512_fmadd_ps(gv, xh, a2);
      for (int64_t q = 0; q < K; ++q) acc[q] = _mm512_fmadd_ps(gv, p[q], acc[q]);
    }
  }
  for (int64_t q = 0; q < K; ++q) s[q] += hsum(acc[q]);
  s[K] += hsum(a1);
  s[K + 1] += hsum(a2);
}

using SumsPlaneFn = void (*)(const float*, const float*, float, float, const float*,
                             const float*, const uint8_t*, const CbGeo&, double*);

NA_AVX512_FN static inline SumsPlaneFn sums_plane_for(const CbGeo& g) {
  static const SumsPlaneFn fns[] = {&sums_plane_f32<1, 3, 3>, &sums_plane_f32<3, 3, 3>,
                                &sums_plane_f32<1, 5, 5>, &sums_plane_f32<0, 0, 0>};
  return fns[tap_variant(g)];
}
#endif

}  // namespace cna
}  // namespace scaleinv
