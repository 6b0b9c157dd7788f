// The plane kernels of scaleinv::conv_bn_act_pool (conv_norm_act.cpp) that every build
// runs: the convolution computed only at the 2x2 windows it pools, then BatchNorm's affine,
// ReLU, max and window index (forward); y recomputed at each window's argmax and the routed
// sums of the weight gradient (backward).
//
// float32: written once over VecF<W> (vec.h), W windows per step, so the portable (W = 4),
// AVX2 (8) and AVX-512 (16) builds are all vectorised. The design is that of the AVX-512
// intrinsics kernels (conv_pool_avx512.h, which the AVX-512 build keeps): the padded input
// planes split into even and odd columns (E/O rows of Ls floats, conv_patch.h), so the
// candidate values of W windows for one tap are ONE contiguous load (column 2*ow + e of the
// padded plane is E[ow + e/2] for even e, O[ow + (e-1)/2] for odd e), and each tap is one
// fmadd per window corner. Compile-time tap geometries (tap_variant) unroll the tap loops.
//
// Bits: y is sum_t w[t] * x[t] by fused multiply-adds in tap order from 0, the same
// operations as the intrinsics kernels, the row loops for float64 (conv_rows) and the
// backward's recomputation, so forward outputs, indices and the recomputed y are the same
// bits in every build and for every W (lane by lane, nothing depends on W). The backward's
// partial sums are W-lane float32 vectors reduced by a float64 halving tree per block of 8
// lanes: at W = 16 the same additions in the same order as the intrinsics kernel.
//
// float64: the plane's conv rows into an L1 buffer and the shared window kernel
// (window_kernels.h); the backward window by window. Plain loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "conv_patch.h"
#include "vec.h"

namespace scaleinv {
namespace cna {

// ---- float32 over VecF<W> ----------------------------------------------------------

// The value at column 2*ow + e (+ 2 per lane) of padded row `row` (E/O rows of Ls floats).
// Always a full load: Ls leaves room for the last step's lanes past Wo (check_conv).
template <int W>
CN_INLINE VecF<W> cand_v(const float* eo_row, int64_t Ls, int64_t ow, int64_t e) {
  return VecF<W>::load(eo_row + (e & 1) * Ls + ow + (e >> 1));
}

// v: the four window corners (row-major) of W windows; y = relu?(v * a + b) (multiply and
// add rounded separately, as ATen's batch norm does); returns the max of y with torch's
// rule (the first max in row-major order; a NaN replaces the running max) and its index.
template <int W>
CN_INLINE VecF<W> window_max_v(VecF<W>* v, VecF<W> va, VecF<W> vb, bool relu, VecI<W>* idx) {
  using F = VecF<W>;
  const F z = F::zero();
  for (int j = 0; j < 4; ++j) {
    v[j] = v[j] * va + vb;
    if (relu) v[j] = F::select(lt(v[j], z), z, v[j]);  // NaN and -0.0 pass, like torch.relu
  }
  F best = v[0];
  *idx = VecI<W>::zero();
  for (int j = 1; j < 4; ++j) {
    const VecI<W> up = gt(v[j], best) | unord(v[j], v[j]);
    best = F::select(up, v[j], best);
    *idx = VecI<W>::select(up, VecI<W>::broadcast(j), *idx);
  }
  return best;
}

// Forward of NCH (sample, channel) planes of one group (channels c0, c0+1, ...; their
// outputs plane_stride apart): W windows per step, the four corners of each accumulated
// tap by tap. CI/KH/KW > 0 fix the tap geometry at compile time; 0 reads it from g. NCH = 2
// shares every candidate load between two channels (half of the loads straddle a vector
// boundary, so with one channel the loads, not the FMAs, bound the loop); each channel's
// arithmetic is the same for NCH = 1 and 2.
template <int W, int CI, int KH, int KW, int NCH>
CN_INLINE void conv_pool_planes_v(const float* eo, const float* wc, const float* alpha,
                                  const float* beta, float* out, uint8_t* ind,
                                  int64_t plane_stride, const CbGeo& g) {
  using F = VecF<W>;
  const int64_t Ci = CI ? CI : g.Ci, kh = KH ? KH : g.KH, kw = KW ? KW : g.KW;
  const int64_t K = Ci * kh * kw;
  const int64_t Ho = g.pool.Ho, Wo = g.pool.Wo, Ls = g.Ls, rs = 2 * Ls;
  F va[NCH], vb[NCH];
  for (int c = 0; c < NCH; ++c) {
    va[c] = F::broadcast(alpha[c]);
    vb[c] = F::broadcast(beta[c]);
  }
  for (int64_t oh = 0; oh < Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ow += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, Wo - ow));
      F v[NCH][4];
      for (int c = 0; c < NCH; ++c) v[c][0] = v[c][1] = v[c][2] = v[c][3] = F::zero();
      // unrolled (fully for the compile-time geometries): the accumulators and broadcast
      // weights must stay in registers, not in the arrays' stack slots
#pragma GCC unroll 4
      for (int64_t ci = 0; ci < Ci; ++ci)
#pragma GCC unroll 8
        for (int64_t ky = 0; ky < kh; ++ky) {
          const float* r0 = eo + (ci * g.Hp + 2 * oh + ky) * rs;
          const float* r1 = r0 + rs;
#pragma GCC unroll 8
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t t = (ci * kh + ky) * kw + kx;
            const F x00 = cand_v<W>(r0, Ls, ow, kx), x01 = cand_v<W>(r0, Ls, ow, kx + 1);
            const F x10 = cand_v<W>(r1, Ls, ow, kx), x11 = cand_v<W>(r1, Ls, ow, kx + 1);
#pragma GCC unroll 2
            for (int c = 0; c < NCH; ++c) {
              const F w = F::broadcast(wc[c * K + t]);
              v[c][0] = fmadd(w, x00, v[c][0]);
              v[c][1] = fmadd(w, x01, v[c][1]);
              v[c][2] = fmadd(w, x10, v[c][2]);
              v[c][3] = fmadd(w, x11, v[c][3]);
            }
          }
        }
#pragma GCC unroll 2
      for (int c = 0; c < NCH; ++c) {
        VecI<W> idx;
        const F best = window_max_v<W>(v[c], va[c], vb[c], g.pool.relu, &idx);
        best.store_n(out + c * plane_stride + oh * Wo + ow, n);
        idx.store_u8_n(ind + c * plane_stride + oh * Wo + ow, n);
      }
    }
  }
}

// The forward kernel for g's tap geometry, NCH = 1 (pair = false) or 2.
template <int W>
CN_INLINE void conv_pool_planes_f32(int variant, bool pair, const float* eo, const float* wc,
                                    const float* alpha, const float* beta, float* out,
                                    uint8_t* ind, int64_t plane_stride, const CbGeo& g) {
#define CN_FWD(CI, KH, KW)                                                                \
  return pair ? conv_pool_planes_v<W, CI, KH, KW, 2>(eo, wc, alpha, beta, out, ind,      \
                                                      plane_stride, g)                   \
              : conv_pool_planes_v<W, CI, KH, KW, 1>(eo, wc, alpha, beta, out, ind,      \
                                                      plane_stride, g)
  switch (variant) {
    case 0: CN_FWD(1, 3, 3);
    case 1: CN_FWD(3, 3, 3);
    case 2: CN_FWD(1, 5, 5);
    default: CN_FWD(0, 0, 0);
  }
#undef CN_FWD
}

// Sum of the lanes in float64: a halving tree per block of 8 lanes (lane i + lane i + h,
// h = 4, 2, 1), the blocks added in order; at W = 16 the additions of the AVX-512 kernel's
// hsum (two _mm512_reduce_add_pd).
template <int W>
CN_INLINE double hsum_tree(VecF<W> v) {
  constexpr int B = W < 8 ? W : 8;
  double d[W];
  for (int i = 0; i < W; ++i) d[i] = static_cast<double>(v.v[i]);
  double total = 0.0;
  for (int b = 0; b < W; b += B) {
    for (int h = B / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) d[b + i] = d[b + i] + d[b + i + h];
    total = b == 0 ? d[0] : total + d[b];
  }
  return total;
}

// Backward of one (sample, channel) plane: per W windows, g (zero where relu and out <= 0
// or NaN), the patch at each window's argmax (the corner candidates selected by the
// index), y recomputed there (the forward's operations), and the sums: s[t] += g * p[t]
// (t < K), s[K] += g, s[K + 1] += g * xhat. Partial sums stay in float32 vectors over the
// plane and are added to s in float64.
template <int W, int CI, int KH, int KW>
CN_INLINE void sums_plane_v(const float* eo, const float* wc, float mean, float invstd,
                            const float* go, const float* o, const uint8_t* k, const CbGeo& g,
                            double* s) {
  using F = VecF<W>;
  using I = VecI<W>;
  const int64_t Ci = CI ? CI : g.Ci, kh = KH ? KH : g.KH, kw = KW ? KW : g.KW;
  const int64_t Ho = g.pool.Ho, Wo = g.pool.Wo, Ls = g.Ls, rs = 2 * Ls, K = Ci * kh * kw;
  const F vm = F::broadcast(mean), vi = F::broadcast(invstd), z = F::zero();
  const I one = I::broadcast(1), two = I::broadcast(2);
  F acc[kMaxTaps], a1 = z, a2 = z;
#pragma GCC unroll 32
  for (int64_t t = 0; t < K; ++t) acc[t] = z;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ow += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, Wo - ow));
      F gv = F::load_n(go + oh * Wo + ow, n);  // 0 past Wo
      if (g.pool.relu) gv = F::select(gt(F::load_n(o + oh * Wo + ow, n), z), gv, z);
      const I kk = I::load_u8_n(k + oh * Wo + ow, n);
      // the argmax corner k: column 2*ow + (k & 1), row 2*oh + (k >> 1) of the window
      const I kodd = eq(kk & one, one), klow = eq(kk & two, two);
      F p[kMaxTaps];
      F y = z;
      // unrolled as in the forward (p, up, dn and acc in registers where they fit)
#pragma GCC unroll 4
      for (int64_t ci = 0; ci < Ci; ++ci) {
        // column-selected candidates of padded rows ky and ky + 1: every row's selection
        // is made once and used by two tap rows
        F up[kMaxTaps], dn[kMaxTaps];
        const float* row = eo + (ci * g.Hp + 2 * oh) * rs;
#pragma GCC unroll 8
        for (int64_t kx = 0; kx < kw; ++kx)
          up[kx] = F::select(kodd, cand_v<W>(row, Ls, ow, kx + 1), cand_v<W>(row, Ls, ow, kx));
#pragma GCC unroll 8
        for (int64_t ky = 0; ky < kh; ++ky) {
          row += rs;
#pragma GCC unroll 8
          for (int64_t kx = 0; kx < kw; ++kx)
            dn[kx] =
                F::select(kodd, cand_v<W>(row, Ls, ow, kx + 1), cand_v<W>(row, Ls, ow, kx));
#pragma GCC unroll 8
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t t = (ci * kh + ky) * kw + kx;
            p[t] = F::select(klow, dn[kx], up[kx]);
            y = fmadd(F::broadcast(wc[t]), p[t], y);
            up[kx] = dn[kx];
          }
        }
      }
      const F xh = (y - vm) * vi;
      a1 = a1 + gv;
      a2 = fmadd(gv, xh, a2);
#pragma GCC unroll 32
      for (int64_t q = 0; q < K; ++q) acc[q] = fmadd(gv, p[q], acc[q]);
    }
  }
#pragma GCC unroll 32
  for (int64_t q = 0; q < K; ++q) s[q] += hsum_tree<W>(acc[q]);
  s[K] += hsum_tree<W>(a1);
  s[K + 1] += hsum_tree<W>(a2);
}

template <int W>
CN_INLINE void sums_plane_f32(int variant, const float* eo, const float* wc, float mean,
                              float invstd, const float* go, const float* o, const uint8_t* k,
                              const CbGeo& g, double* s) {
  switch (variant) {
    case 0: return sums_plane_v<W, 1, 3, 3>(eo, wc, mean, invstd, go, o, k, g, s);
    case 1: return sums_plane_v<W, 3, 3, 3>(eo, wc, mean, invstd, go, o, k, g, s);
    case 2: return sums_plane_v<W, 1, 5, 5>(eo, wc, mean, invstd, go, o, k, g, s);
    default: return sums_plane_v<W, 0, 0, 0>(eo, wc, mean, invstd, go, o, k, g, s);
  }
}

// ---- float64: plain loops ---------------------------------------------------------

// The plane's conv rows 0..2*Ho-1 into buf [2*Ho, Wc] (taps in the same order, fused
// multiply-adds exactly where the backward's recomputation has them), then the shared
// window kernel.
template <typename T>
CN_INLINE void conv_rows(const T* xp, const T* wc, const CbGeo& g, T* buf) {
  for (int64_t r = 0; r < 2 * g.pool.Ho; ++r) {
    T* row = buf + r * g.Wc;
    std::fill(row, row + g.Wc, T(0));
    int64_t t = 0;
    for (int64_t ci = 0; ci < g.Ci; ++ci)
      for (int64_t ky = 0; ky < g.KH; ++ky)
        for (int64_t kx = 0; kx < g.KW; ++kx, ++t) {
          const T w = wc[t];
          const T* src = xp + (ci * g.Hp + r + ky) * g.Wp + kx;
#pragma omp simd
          for (int64_t j = 0; j < g.Wc; ++j) row[j] = std::fma(w, src[j], row[j]);
        }
  }
}

// The backward's sums window by window (y recomputed as conv_rows computes it).
template <typename T>
CN_INLINE void sums_plane(const T* xp, const T* wc, T mean, T invstd, const T* go, const T* o,
                          const uint8_t* k, const CbGeo& g, double* s) {
  const int64_t Ho = g.pool.Ho, Wo = g.pool.Wo, K = g.K;
  T p[kMaxTaps];
  for (int64_t oh = 0; oh < Ho; ++oh)
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t i = oh * Wo + ow;
      const T gv = go[i];
      if (gv == T(0) || (g.pool.relu && !(o[i] > T(0)))) continue;
      const int64_t r = 2 * oh + (k[i] >> 1), col = 2 * ow + (k[i] & 1);
      T y = T(0);
      int64_t t = 0;
      for (int64_t ci = 0; ci < g.Ci; ++ci)
        for (int64_t ky = 0; ky < g.KH; ++ky)
          for (int64_t kx = 0; kx < g.KW; ++kx, ++t) {
            p[t] = xp[(ci * g.Hp + r + ky) * g.Wp + col + kx];
            y = std::fma(wc[t], p[t], y);
          }
      const double gd = static_cast<double>(gv);
      for (int64_t q = 0; q < K; ++q) s[q] += gd * static_cast<double>(p[q]);
      s[K] += gd;
      s[K + 1] += gd * static_cast<double>((y - mean) * invstd);
    }
}

}  // namespace cna
}  // namespace scaleinv
