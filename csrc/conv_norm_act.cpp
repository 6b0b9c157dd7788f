// scaleinv::conv_bn_act_pool on CPU: an ensemble's input layer, grouped convolution (few
// taps) -> BatchNorm -> ReLU -> 2x2 max pool, forward and backward, without ever storing
// the convolution's output. See scaleinv_kernels/ops/conv_norm_act.py for the contract.
//
// Why: the first layer of an ensemble of M CNNs has 1 (grey) or 3 (RGB) input channels per
// member and its convolution output is the largest tensor of the step ([B, M*16, 28, 28]:
// 205 MB at M=64). Unfused it is written by the convolution, read twice by the norm's
// forward, re-read by its backward, and its gradient written and read once more by the
// convolution's weight gradient; all of it is memory traffic around ~9 FLOP per element.
//
// The identity that removes it: with K = Ci*KH*KW taps, every conv output is a dot product
// y[pos] = W_c . p_pos with the zero-padded K-patch p_pos of the group's input. So
//   * training statistics come from the group's patch moments S = sum p, G = sum p p^T
//     (one K x K Gram matrix per group, shared by its Co channels, float64):
//       mean_c = W_c . S / cnt,  E[y^2]_c = W_c^T G W_c / cnt;
//   * the backward needs no dense dy: with g routed to the window argmax (the only places
//     the pooled ReLU output has a gradient), s1 = sum g, s2 = sum g*xhat and the routed
//     patch sum A_c = sum g * p_pos,
//       dW_c = w*invstd * (A_c - s1/cnt * S - s2/cnt * invstd * (G W_c - mean * S))
//     (eval: w*invstd * A_c), because sum_pos xhat[pos] p_pos = invstd (G W_c - mean S).
// The forward then makes ONE pass that computes y only at the 2x2 windows it pools (the
// pooled-away odd row/column is not computed; it is in the statistics through G and S),
// and the backward ONE pass over grad_out, out and the index, recomputing y at each argmax
// from its patch (the same float operations as the forward, so the same bits).
//
// Layout: x is [N, G*Ci, H, W]. Per (sample, group) the Ci input planes are copied into
// zero-padded planes; the AVX-512 float32 kernels read them split into even and odd
// columns (E/O, rows of Ls floats), so the candidate values of 16 windows for one tap are
// one contiguous load: column 2*ow + e of the padded plane is E[ow + e/2] (e even) or
// O[ow + (e-1)/2]. Portable loops (float64, or no AVX-512) compute each conv plane into an
// L1 buffer and run the shared window kernels (window_kernels.h) on it.
//
// Determinism: each group's moments are summed over chunks of samples fixed by N, reduced
// in order; each channel's backward sums are added sample by sample in order by one
// thread. So neither the thread count nor the other groups of the call change a group's
// bits (the tests run one member alone and among others).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "window_kernels.h"

namespace scaleinv {
namespace {

#define CN_INLINE SCALEINV_INLINE

constexpr int64_t kMaxTaps = 32;
// Samples per work item of the moments pass (items: groups x chunks of samples).
constexpr int64_t kMomentChunk = 32;

struct CbGeo {
  int64_t N, G, Ci, Co, C;      // batch, groups, channels per group in/out, C = G*Co
  int64_t H, W, KH, KW, PH, PW;  // input plane, kernel, padding
  int64_t Hp, Wp, Hc, Wc, K;     // padded plane, conv output plane, taps
  int64_t Ls;                    // row length of the even/odd column planes
  Geo pool;                      // the pooled BN/ReLU geometry over [N, C, Hc, Wc]
};

// ---- padded input planes ----------------------------------------------------------

// The group's Ci input planes of sample n, zero-padded: xp [Ci][Hp][Wp].
template <typename T>
CN_INLINE void pad_planes(const T* x, const CbGeo& g, int64_t n, int64_t grp, T* xp) {
  std::fill(xp, xp + g.Ci * g.Hp * g.Wp, T(0));
  for (int64_t ci = 0; ci < g.Ci; ++ci) {
    const T* src = x + ((n * g.G + grp) * g.Ci + ci) * g.H * g.W;
    T* dst = xp + ci * g.Hp * g.Wp;
    for (int64_t h = 0; h < g.H; ++h)
      std::copy(src + h * g.W, src + (h + 1) * g.W, dst + (h + g.PH) * g.Wp + g.PW);
  }
}

// Even and odd columns of padded planes: eo [Ci][Hp][2][Ls] (E row, then O row).
template <typename T>
CN_INLINE void split_columns(const T* xp, const CbGeo& g, T* eo) {
  std::fill(eo, eo + g.Ci * g.Hp * 2 * g.Ls, T(0));
  for (int64_t r = 0; r < g.Ci * g.Hp; ++r) {
    const T* src = xp + r * g.Wp;
    T* e = eo + r * 2 * g.Ls;
    for (int64_t j = 0; j < g.Wp; ++j) e[(j & 1) * g.Ls + (j >> 1)] = src[j];
  }
}

// ---- forward: patch moments (training statistics) -------------------------------

// Grey 3x3 (Ci = 1, KH = KW = 3; needs Hc >= 2): G[a][b] = sum over the conv positions of
// xp[pos + d_a] * xp[pos + d_b] is a sum of the lag product P_l = xp[u] * xp[u + l],
// l = d_b - d_a, over the rectangle u in [ky_a, ky_a + Hc) x [kx_a, kx_a + Wc) of the padded
// plane; the 45 tap pairs have only 13 lags. So each padded row is multiplied by 13 shifted
// rows (and summed once more for S) into per-column float64 accumulators, one set per row
// class: rows 0 and 1, the core rows [2, Hc) that every rectangle contains, rows Hc and
// Hc + 1. At the end each pair sums its classes over its column range. 14 instead of 54
// multiply-adds per padded pixel; the same float64 products, summed in another order
// (1e-15 relative from the tap-pair kernel). Training forward of [64, 8, 28, 28] -> 128
// channels, interleaved A/B: moments 0.67 -> 0.30 ms (2 threads), 1.54 -> 0.81 ms (one);
// at [64, 64, 28, 28] 6.5 -> 3.4 ms. Plain loops: every build and dtype takes it.
constexpr int kLags = 14;  // 13 lags (dy, dx) with dy > 0 or 0 == dy <= dx; 13: S
constexpr int kLagDy[kLags] = {0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0};
constexpr int kLagDx[kLags] = {0, 1, 2, -2, -1, 0, 1, 2, -2, -1, 0, 1, 2, 0};

inline bool lag_moments_apply(const CbGeo& g) {
  return g.Ci == 1 && g.KH == 3 && g.KW == 3 && g.Hc >= 2;
}

template <typename T>
CN_INLINE void lag_moments_3x3(const T* x, const CbGeo& g, int64_t grp, int64_t n0,
                               int64_t n1, double* m) {
  const int64_t Hp = g.Hp, Wp = g.Wp, Hc = g.Hc, Wc = g.Wc;
  const int64_t Wr = (Wp + 7) / 8 * 8, ld = Wr + 8;  // zero columns: 2 left, >= 6 right
  std::vector<T> xp(Hp * Wp);
  std::vector<double> xd((Hp + 2) * ld, 0.0);       // + 2 zero rows below
  std::vector<double> acc(5 * kLags * Wr, 0.0);     // [row class][lag][column]
  const int64_t row_lo[5] = {0, 1, 2, Hc, Hc + 1}, row_hi[5] = {1, 2, Hc, Hc + 1, Hc + 2};
  for (int64_t n = n0; n < n1; ++n) {
    pad_planes(x, g, n, grp, xp.data());
    for (int64_t r = 0; r < Hp; ++r)
      for (int64_t c = 0; c < Wp; ++c) xd[r * ld + 2 + c] = static_cast<double>(xp[r * Wp + c]);
    // per block of 8 columns and row class: the 14 lag sums of 8 columns stay in
    // registers over the class's rows (one load of u, 13 of shifted rows per row)
    for (int64_t j = 0; j < Wr; j += 8) {
      for (int64_t cls = 0; cls < 5; ++cls) {
        double s[kLags][8] = {};
        for (int64_t r = row_lo[cls]; r < row_hi[cls]; ++r) {
          const double* __restrict__ u = xd.data() + r * ld + 2 + j;
#pragma GCC unroll 16
          for (int l = 0; l < kLags - 1; ++l) {
            const double* __restrict__ v = xd.data() + (r + kLagDy[l]) * ld + 2 + kLagDx[l] + j;
#pragma omp simd
            for (int e = 0; e < 8; ++e) s[l][e] += u[e] * v[e];
          }
#pragma omp simd
          for (int e = 0; e < 8; ++e) s[kLags - 1][e] += u[e];
        }
#pragma GCC unroll 16
        for (int l = 0; l < kLags; ++l) {
          double* __restrict__ d = acc.data() + (cls * kLags + l) * Wr + j;
#pragma omp simd
          for (int e = 0; e < 8; ++e) d[e] += s[l][e];
        }
      }
    }
  }
  // rows [ky, ky + Hc) = the core rows and two edge classes (see above)
  static constexpr int64_t kEdges[3][2] = {{0, 1}, {1, 3}, {3, 4}};
  const auto rect = [&](int l, int64_t ky, int64_t kx) {
    double t = 0;
    for (const int64_t cls : {int64_t(2), kEdges[ky][0], kEdges[ky][1]}) {
      const double* d = acc.data() + (cls * kLags + l) * Wr;
      for (int64_t c = kx; c < kx + Wc; ++c) t += d[c];
    }
    return t;
  };
  for (int a = 0; a < 9; ++a) {
    const int ky = a / 3, kx = a % 3;
    m[a * 10 + 9] += rect(kLags - 1, ky, kx);
    for (int b = a; b < 9; ++b) {
      const int dy = b / 3 - ky, dx = b % 3 - kx;
      const int l = dy == 0 ? dx : 3 + (dy - 1) * 5 + dx + 2;
      m[a * 10 + b] += rect(l, ky, kx);
    }
  }
}

// Adds S and G (upper triangle) of samples [n0, n1) of group grp into m [K][K+1]: grey
// 3x3 by lags (above); any other geometry by tap pairs: conv output rows are gathered as K float64 row vectors; each tap pair accumulates in a
// vector of column partial sums (reduced at the end), so the inner loops are long axpys.
template <typename T>
CN_INLINE void group_moments(const T* x, const CbGeo& g, int64_t grp, int64_t n0, int64_t n1,
                             double* m) {
  if (lag_moments_apply(g)) return lag_moments_3x3(x, g, grp, n0, n1, m);
  constexpr int64_t JB = 32;  // columns per block
  const int64_t K = g.K, pairs = K * (K + 1) / 2;
  std::vector<T> xp(g.Ci * g.Hp * g.Wp);
  std::vector<double> rows(K * JB), acc(pairs * JB, 0.0), sacc(K * JB, 0.0);
  for (int64_t n = n0; n < n1; ++n) {
    pad_planes(x, g, n, grp, xp.data());
    for (int64_t r = 0; r < g.Hc; ++r) {
      for (int64_t j0 = 0; j0 < g.Wc; j0 += JB) {
        const int64_t jn = std::min(JB, g.Wc - j0);
        int64_t t = 0;
        for (int64_t ci = 0; ci < g.Ci; ++ci)
          for (int64_t ky = 0; ky < g.KH; ++ky)
            for (int64_t kx = 0; kx < g.KW; ++kx, ++t) {
              const T* src = xp.data() + (ci * g.Hp + r + ky) * g.Wp + kx + j0;
              double* dst = rows.data() + t * JB;
              for (int64_t j = 0; j < jn; ++j) dst[j] = static_cast<double>(src[j]);
              for (int64_t j = jn; j < JB; ++j) dst[j] = 0.0;
            }
        int64_t q = 0;
        for (int64_t a = 0; a < K; ++a) {
          const double* ra = rows.data() + a * JB;
          double* sa = sacc.data() + a * JB;
#pragma omp simd
          for (int64_t j = 0; j < JB; ++j) sa[j] += ra[j];
          for (int64_t b = a; b < K; ++b, ++q) {
            const double* rb = rows.data() + b * JB;
            double* d = acc.data() + q * JB;
#pragma omp simd
            for (int64_t j = 0; j < JB; ++j) d[j] += ra[j] * rb[j];
          }
        }
      }
    }
  }
  int64_t q = 0;
  for (int64_t a = 0; a < K; ++a) {
    double s = 0;
    for (int64_t j = 0; j < JB; ++j) s += sacc[a * JB + j];
    m[a * (K + 1) + K] += s;
    for (int64_t b = a; b < K; ++b, ++q) {
      double v = 0;
      for (int64_t j = 0; j < JB; ++j) v += acc[q * JB + j];
      m[a * (K + 1) + b] += v;
    }
  }
}

// ---- forward: convolution at the pooled windows, normalize, ReLU, pool ------------

template <typename T>
struct FwdArgs {
  const T* x;
  const T* cw;  // [C, K]
  const T* alpha;  // [C] invstd * w
  const T* beta;   // [C] b - mean * alpha
  T* out;
  uint8_t* ind;
  CbGeo g;
};

// The tap geometries the AVX-512 plane kernels are compiled for (index into their
// tables): grey and RGB 3x3 (the CNN input layers), grey 5x5; 3 = any other (runtime
// loops).
inline int tap_variant(const CbGeo& g) {
  if (g.KH == 3 && g.KW == 3) return g.Ci == 1 ? 0 : g.Ci == 3 ? 1 : 3;
  return g.KH == 5 && g.KW == 5 && g.Ci == 1 ? 2 : 3;
}

#ifdef NA_HAVE_AVX512_KERNELS
// The value at column 2*ow + e (+ 2 per lane) of padded row `row` (E/O rows of Ls floats).
NA_AVX512_FN static inline __m512 cand(const float* eo_row, int64_t Ls, int64_t ow, int64_t e) {
  return _mm512_loadu_ps(eo_row + (e & 1) * Ls + ow + (e >> 1));
}

// Forward of NCH (sample, channel) planes of one group (channels c0, c0+1, ...): the four
// window corners of 16 windows are y = sum_t w[t] * x[patch tap t at the corner], then
// relu?(y * alpha + beta), max, index. CI/KH/KW > 0 fix the tap geometry at compile time
// (the loops unroll and the broadcast weights stay in registers: 3x faster for 1x3x3 than
// the runtime loops); 0 reads it from g. NCH = 2 shares every candidate load between two
// channels: half of the loads are misaligned by one float and split across cache lines,
// so with one channel the loads, not the FMAs, bound the loop (1x3x3, eval forward of
// [64, 8, 28, 28] -> 128 channels, interleaved A/B: 1.56 -> 1.21 ms on 2 threads, 3.00 ->
// 2.48 ms on one; outputs and indices bitwise equal). Each channel's arithmetic is the
// same for NCH = 1 and 2 (same bits).
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

// Portable: the plane's conv rows 0..2*Ho-1 into buf [2*Ho, Wc] (taps in the same order,
// fused multiply-adds exactly where the backward's recomputation has them), then the
// shared window kernel.
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

template <typename T>
CN_INLINE void forward_items(const FwdArgs<T>& a, int64_t i0, int64_t i1) {
  const CbGeo& g = a.g;
  std::vector<T> xp(g.Ci * g.Hp * g.Wp), buf;
#ifdef NA_HAVE_AVX512_KERNELS
  const bool vec = std::is_same_v<T, float> && use_avx512_kernels();
#else
  const bool vec = false;
#endif
  std::vector<T> eo(vec ? g.Ci * g.Hp * 2 * g.Ls : 0);
  if (!vec) buf.resize(2 * g.pool.Ho * g.Wc);
#ifdef NA_HAVE_AVX512_KERNELS
  const ConvPoolPlanesFn pair_fn = vec ? conv_pool_planes_for(g, true) : nullptr;
  const ConvPoolPlanesFn one_fn = vec ? conv_pool_planes_for(g, false) : nullptr;
#endif
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t n = item / g.G, grp = item % g.G;
    pad_planes(a.x, g, n, grp, xp.data());
    if (vec) split_columns(xp.data(), g, eo.data());
    for (int64_t co = 0; co < g.Co; ++co) {
      const int64_t c = grp * g.Co + co, plane = n * g.C + c;
      T* out = a.out + plane * g.pool.HWo;
      uint8_t* ind = a.ind + plane * g.pool.HWo;
#ifdef NA_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (vec) {
          const bool pair = co + 1 < g.Co;  // channels co and co+1 in one pass
          (pair ? pair_fn : one_fn)(eo.data(), a.cw + c * g.K, a.alpha + c, a.beta + c, out,
                                    ind, g.pool.HWo, g);
          co += pair;
          continue;
        }
      }
#endif
      conv_rows(xp.data(), a.cw + c * g.K, g, buf.data());
      plane_forward_at(buf.data(), out, ind, g.pool, a.alpha[c], a.beta[c]);
    }
  }
}

// ---- backward: routed sums per channel -------------------------------------------

template <typename T>
struct BwdArgs {
  const T* x;
  const T* cw;      // [C, K]
  const T* mean;    // [C]
  const T* invstd;  // [C]
  const T* gout;    // [N, C, Ho, Wo]
  const T* out;
  const uint8_t* ind;
  double* sums;     // [C, K + 2]: A (K), s1, s2
  int64_t per;      // channels per work item (items: groups x channel blocks)
  CbGeo g;
};

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
        // selection is made once and used by two tap rows (21 instead of 27 blends, 1x3x3;
        // backward of [64, 8, 28, 28] -> 128 channels 1.73 -> 1.46 ms on 2 threads, 3.3 ->
        // 2.8 ms on one, alternating processes; the same values are selected)
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

// Portable: the same sums window by window (y recomputed as conv_rows computes it).
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

// Items [i0, i1): (group, block of `per` channels); samples in order, so each channel's
// sums are added by one thread in a fixed order.
template <typename T>
CN_INLINE void backward_items(const BwdArgs<T>& a, int64_t i0, int64_t i1) {
  const CbGeo& g = a.g;
  const int64_t blocks = (g.Co + a.per - 1) / a.per;
  std::vector<T> xp(g.Ci * g.Hp * g.Wp);
#ifdef NA_HAVE_AVX512_KERNELS
  const bool vec = std::is_same_v<T, float> && use_avx512_kernels();
#else
  const bool vec = false;
#endif
  std::vector<T> eo(vec ? g.Ci * g.Hp * 2 * g.Ls : 0);
#ifdef NA_HAVE_AVX512_KERNELS
  const SumsPlaneFn plane_fn = vec ? sums_plane_for(g) : nullptr;
#endif
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t grp = item / blocks, co0 = (item % blocks) * a.per;
    const int64_t co1 = std::min(g.Co, co0 + a.per);
    for (int64_t n = 0; n < g.N; ++n) {
      pad_planes(a.x, g, n, grp, xp.data());
      if (vec) split_columns(xp.data(), g, eo.data());
      for (int64_t co = co0; co < co1; ++co) {
        const int64_t c = grp * g.Co + co, off = (n * g.C + c) * g.pool.HWo;
        double* s = a.sums + c * (g.K + 2);
#ifdef NA_HAVE_AVX512_KERNELS
        if constexpr (std::is_same_v<T, float>) {
          if (vec) {
            plane_fn(eo.data(), a.cw + c * g.K, a.mean[c], a.invstd[c], a.gout + off,
                           a.out + off, a.ind + off, g, s);
            continue;
          }
        }
#endif
        sums_plane(xp.data(), a.cw + c * g.K, a.mean[c], a.invstd[c], a.gout + off, a.out + off,
                   a.ind + off, g, s);
      }
    }
  }
}

// Moments items: (group, chunk of samples); m points at [items, K, K+1] partials.
template <typename T>
struct MomArgs {
  const T* x;
  double* part;
  int64_t chunks;  // sample chunks per group
  CbGeo g;
};

template <typename T>
CN_INLINE void moment_items(const MomArgs<T>& a, int64_t i0, int64_t i1) {
  const CbGeo& g = a.g;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t grp = item / a.chunks, ch = item % a.chunks;
    const int64_t n0 = g.N * ch / a.chunks, n1 = g.N * (ch + 1) / a.chunks;
    group_moments(a.x, g, grp, n0, n1, a.part + item * g.K * (g.K + 1));
  }
}

SCALEINV_ISA_CLONES(fwd_items, FwdArgs, forward_items)
SCALEINV_ISA_CLONES(bwd_items, BwdArgs, backward_items)
SCALEINV_ISA_CLONES(mom_items, MomArgs, moment_items)

// ---- validation ------------------------------------------------------------------

CbGeo check_conv(const char* op, const at::Tensor& x, const at::Tensor& cw, int64_t groups,
                 at::IntArrayRef padding) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(cw.scalar_type() == x.scalar_type(), op, "conv_weight must have x's dtype ",
                   x.scalar_type(), ", got ", cw.scalar_type());
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && x.device().is_cpu() &&
                        cw.layout() == at::kStrided && cw.device().is_cpu(),
                    op, "x and conv_weight must be dense CPU tensors");
  TORCH_CHECK_VALUE(x.dim() == 4, op, "x must be [N, C, H, W], got shape ", shape_str(x));
  TORCH_CHECK_VALUE(cw.dim() == 4, op,
                    "conv_weight must be [C_out, C_in/groups, KH, KW], got shape ",
                    shape_str(cw));
  TORCH_CHECK_VALUE(groups >= 1, op, "groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(padding.size() == 2, op, "padding must have 2 entries, got ",
                    padding.size());
  CbGeo g{};
  g.N = x.size(0);
  g.G = groups;
  g.Ci = cw.size(1);
  g.KH = cw.size(2);
  g.KW = cw.size(3);
  g.PH = padding[0];
  g.PW = padding[1];
  TORCH_CHECK_VALUE(g.Ci >= 1 && g.KH >= 1 && g.KW >= 1 && x.size(1) == groups * g.Ci, op,
                    "x has ", x.size(1), " channels but groups * conv_weight.size(1) = ",
                    groups * g.Ci);
  TORCH_CHECK_VALUE(cw.size(0) % groups == 0 && cw.size(0) > 0, op, "conv_weight's C_out ",
                    cw.size(0), " must be a positive multiple of groups = ", groups);
  TORCH_CHECK_VALUE(g.PH >= 0 && g.PW >= 0 && g.PH < g.KH && g.PW < g.KW, op,
                    "padding must satisfy 0 <= padding < kernel size, got padding (", g.PH,
                    ", ", g.PW, ") for kernel ", g.KH, "x", g.KW);
  g.K = g.Ci * g.KH * g.KW;
  TORCH_CHECK_VALUE(g.K <= kMaxTaps, op, "C_in/groups * KH * KW = ", g.K, " taps; at most ",
                    kMaxTaps, " are supported (use direct_conv2d/F.conv2d + bn_act_pool)");
  g.Co = cw.size(0) / groups;
  g.C = cw.size(0);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Hp = g.H + 2 * g.PH;
  g.Wp = g.W + 2 * g.PW;
  g.Hc = g.Hp - g.KH + 1;
  g.Wc = g.Wp - g.KW + 1;
  TORCH_CHECK_VALUE(g.Hc >= 2 && g.Wc >= 2, op, "the convolution's output ", g.Hc, "x", g.Wc,
                    " is smaller than the 2x2 pool window");
  g.pool.N = g.N;
  g.pool.C = g.C;
  g.pool.H = g.Hc;
  g.pool.W = g.Wc;
  g.pool.HW = g.Hc * g.Wc;
  g.pool.Ho = g.Hc / 2;
  g.pool.Wo = g.Wc / 2;
  g.pool.HWo = g.pool.Ho * g.pool.Wo;
  g.pool.pool = 2;
  g.Ls = (g.pool.Wo + 15) / 16 * 16 + 16;  // every candidate load of a 16-window step fits
  return g;
}

std::vector<int64_t> pooled_shape(const CbGeo& g) { return {g.N, g.C, g.pool.Ho, g.pool.Wo}; }

template <typename T>
std::vector<T> vec_or(const std::optional<at::Tensor>& t, int64_t C, T fill) {
  if (!t.has_value()) return std::vector<T>(C, fill);
  const at::Tensor c = t->contiguous();
  return std::vector<T>(c.const_data_ptr<T>(), c.const_data_ptr<T>() + C);
}

// ---- ops -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_pool_cpu(
    const at::Tensor& x_in, const at::Tensor& cw_in, int64_t groups, at::IntArrayRef padding,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd, double eps,
    bool relu) {
  const char* op = "scaleinv::conv_bn_act_pool: ";
  CbGeo g = check_conv(op, x_in, cw_in, groups, padding);
  g.pool.relu = relu;
  TORCH_CHECK_VALUE(mean.has_value() == invstd.has_value(), op,
                    "give both mean and invstd (eval mode) or neither (training mode)");
  const bool training = !mean.has_value();
  check_channel_vec(op, "weight", weight, x_in, g.C);
  check_channel_vec(op, "bias", bias, x_in, g.C);
  check_channel_vec(op, "mean", mean, x_in, g.C);
  check_channel_vec(op, "invstd", invstd, x_in, g.C);
  const double cnt = static_cast<double>(g.N * g.Hc * g.Wc);
  if (training) {
    TORCH_CHECK_VALUE(eps >= 0, op, "eps must be >= 0, got ", eps);
    TORCH_CHECK_VALUE(cnt > 1, op, "training needs more than 1 value per channel (N*Hc*Wc > 1)",
                      ", got x of shape ", shape_str(x_in));
  }
  const at::Tensor x = x_in.contiguous(), cw = cw_in.contiguous();
  const at::Tensor out = at::empty(pooled_shape(g), x.options());
  const at::Tensor index = at::empty(pooled_shape(g), x.options().dtype(at::kByte));
  at::Tensor save_mean, save_invstd;
  at::Tensor moments = at::zeros(training ? std::vector<int64_t>{g.G, g.K, g.K + 1}
                                          : std::vector<int64_t>{0},
                                 x.options().dtype(at::kDouble));
  if (!training) {
    save_mean = mean->clone();
    save_invstd = invstd->clone();
  } else {
    save_mean = at::empty({g.C}, x.options());
    save_invstd = at::empty({g.C}, x.options());
  }
  if (g.N == 0) return {out, save_mean, save_invstd, index, moments};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::conv_bn_act_pool", [&] {
    using T = scalar_t;
    const T* cwp = cw.const_data_ptr<T>();
    if (training) {
      // chunks of kMomentChunk samples per group: fixed by N alone (not the thread count
      // or the number of groups), so a group's reduction order and its result are the
      // same for any number of threads and for any groups (ensemble members) beside it
      const int64_t chunks = std::max<int64_t>(1, (g.N + kMomentChunk - 1) / kMomentChunk);
      std::vector<double> part(g.G * chunks * g.K * (g.K + 1), 0.0);
      MomArgs<T> ma{x.const_data_ptr<T>(), part.data(), chunks, g};
      auto fn = pick_build<MomArgs<T>>(&mom_items_default<T>, &mom_items_avx2<T>,
                                   &mom_items_avx512<T>);
      at::parallel_for(0, g.G * chunks, 1, [&](int64_t lo, int64_t hi) { fn(ma, lo, hi); });
      double* mom = moments.data_ptr<double>();
      const int64_t KK = g.K * (g.K + 1);
      for (int64_t grp = 0; grp < g.G; ++grp) {
        double* m = mom + grp * KK;
        for (int64_t ch = 0; ch < chunks; ++ch)
          for (int64_t i = 0; i < KK; ++i) m[i] += part[(grp * chunks + ch) * KK + i];
        for (int64_t a = 0; a < g.K; ++a)  // mirror the upper triangle
          for (int64_t b = 0; b < a; ++b) m[a * (g.K + 1) + b] = m[b * (g.K + 1) + a];
      }
      T* sm = save_mean.data_ptr<T>();
      T* si = save_invstd.data_ptr<T>();
      for (int64_t c = 0; c < g.C; ++c) {
        const double* m = mom + (c / g.Co) * KK;
        const T* w = cwp + c * g.K;
        double mu = 0, e2 = 0;
        for (int64_t a = 0; a < g.K; ++a) {
          double gw = 0;
          for (int64_t b = 0; b < g.K; ++b) gw += m[a * (g.K + 1) + b] * static_cast<double>(w[b]);
          e2 += static_cast<double>(w[a]) * gw;
          mu += static_cast<double>(w[a]) * m[a * (g.K + 1) + g.K];
        }
        mu /= cnt;
        const double var = std::max(e2 / cnt - mu * mu, 0.0);
        sm[c] = static_cast<T>(mu);
        si[c] = static_cast<T>(1.0 / std::sqrt(var + eps));
      }
    }
    // alpha/beta as torch's CPU batch norm forms them (and bn_act_pool): alpha = invstd * w,
    // beta = b - mean * alpha
    const std::vector<T> w = vec_or<T>(weight, g.C, T(1)), b = vec_or<T>(bias, g.C, T(0));
    const T* sm = save_mean.const_data_ptr<T>();
    const T* si = save_invstd.const_data_ptr<T>();
    std::vector<T> alpha(g.C), beta(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      alpha[c] = si[c] * w[c];
      beta[c] = b[c] - sm[c] * alpha[c];
    }
    FwdArgs<T> fa{x.const_data_ptr<T>(), cwp,  alpha.data(), beta.data(), out.data_ptr<T>(),
                  index.data_ptr<uint8_t>(), g};
    auto fn = pick_build<FwdArgs<T>>(&fwd_items_default<T>, &fwd_items_avx2<T>,
                                 &fwd_items_avx512<T>);
    at::parallel_for(0, g.N * g.G, 1, [&](int64_t lo, int64_t hi) { fn(fa, lo, hi); });
  });
  return {out, save_mean, save_invstd, index, moments};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
conv_bn_act_pool_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                              const at::Tensor& cw_in, int64_t groups, at::IntArrayRef padding,
                              const std::optional<at::Tensor>& weight,
                              const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in,
                              const at::Tensor& out_in, const at::Tensor& index_in,
                              const at::Tensor& moments_in, bool training, bool relu,
                              std::array<bool, 3> output_mask) {
  const char* op = "scaleinv::conv_bn_act_pool_backward: ";
  CbGeo g = check_conv(op, x_in, cw_in, groups, padding);
  g.pool.relu = relu;
  check_channel_vec(op, "weight", weight, x_in, g.C);
  check_channel_vec(op, "save_mean", save_mean_in, x_in, g.C);
  check_channel_vec(op, "save_invstd", save_invstd_in, x_in, g.C);
  const std::vector<int64_t> ps = pooled_shape(g);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == at::IntArrayRef(ps) &&
                        out_in.sizes() == at::IntArrayRef(ps) &&
                        index_in.sizes() == at::IntArrayRef(ps),
                    op, "grad_out, out and index must have the output's shape ",
                    at::IntArrayRef(ps), ", got ", shape_str(grad_out_in), ", ",
                    shape_str(out_in), " and ", shape_str(index_in));
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == x_in.scalar_type() &&
                       out_in.scalar_type() == x_in.scalar_type() &&
                       index_in.scalar_type() == at::kByte,
                   op, "grad_out and out must have x's dtype ", x_in.scalar_type(),
                   " and index must be uint8");
  if (training) {
    TORCH_CHECK_VALUE(moments_in.scalar_type() == at::kDouble &&
                          moments_in.sizes() == at::IntArrayRef({g.G, g.K, g.K + 1}),
                      op, "training: moments must be the forward's float64 [groups, K, K+1] = [",
                      g.G, ", ", g.K, ", ", g.K + 1, "], got ", moments_in.scalar_type(), " ",
                      shape_str(moments_in));
  }
  const bool want_cw = output_mask[0];
  const bool want_w = output_mask[1] && weight.has_value(), want_b = output_mask[2];
  std::optional<at::Tensor> gcw, gw, gb;
  if (!want_cw && !want_w && !want_b) return {gcw, gw, gb};
  const at::Tensor x = x_in.contiguous(), cw = cw_in.contiguous();
  const at::Tensor gout = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor index = index_in.contiguous(), moments = moments_in.contiguous();
  const at::Tensor save_mean = save_mean_in.contiguous(), save_invstd = save_invstd_in.contiguous();
  std::vector<double> sums(g.C * (g.K + 2), 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::conv_bn_act_pool_backward", [&] {
    using T = scalar_t;
    if (g.N > 0) {
      const int64_t threads = at::get_num_threads();
      const int64_t blocks = std::min(g.Co, std::max<int64_t>(1, (4 * threads + g.G - 1) / g.G));
      const int64_t per = (g.Co + blocks - 1) / blocks;
      BwdArgs<T> ba{x.const_data_ptr<T>(),  cw.const_data_ptr<T>(),  save_mean.const_data_ptr<T>(),
                    save_invstd.const_data_ptr<T>(), gout.const_data_ptr<T>(),
                    out.const_data_ptr<T>(), index.const_data_ptr<uint8_t>(), sums.data(), per, g};
      const int64_t items = g.G * ((g.Co + per - 1) / per);
      auto fn = pick_build<BwdArgs<T>>(&bwd_items_default<T>, &bwd_items_avx2<T>,
                                   &bwd_items_avx512<T>);
      at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) { fn(ba, lo, hi); });
    }
    const double cnt = static_cast<double>(g.N * g.Hc * g.Wc);
    const std::vector<T> w = vec_or<T>(weight, g.C, T(1));
    const T* sm = save_mean.const_data_ptr<T>();
    const T* si = save_invstd.const_data_ptr<T>();
    if (want_cw) {
      gcw = at::empty(cw.sizes(), cw.options());
      T* d = gcw->data_ptr<T>();
      const T* cwp = cw.const_data_ptr<T>();
      const double* mom = training ? moments.const_data_ptr<double>() : nullptr;
      for (int64_t c = 0; c < g.C; ++c) {
        const double* s = sums.data() + c * (g.K + 2);
        const double is = static_cast<double>(si[c]);
        const double scale = static_cast<double>(w[c]) * is;
        const double* m = training ? mom + (c / g.Co) * g.K * (g.K + 1) : nullptr;
        for (int64_t a = 0; a < g.K; ++a) {
          double v = s[a];
          if (training && cnt > 0) {
            double gwv = 0;
            for (int64_t b = 0; b < g.K; ++b)
              gwv += m[a * (g.K + 1) + b] * static_cast<double>(cwp[c * g.K + b]);
            const double sa = m[a * (g.K + 1) + g.K];
            v -= s[g.K] / cnt * sa +
                 s[g.K + 1] / cnt * is * (gwv - static_cast<double>(sm[c]) * sa);
          }
          d[c * g.K + a] = static_cast<T>(scale * v);
        }
      }
    }
    if (want_w) {
      gw = at::empty({g.C}, x.options());
      for (int64_t c = 0; c < g.C; ++c)
        gw->data_ptr<T>()[c] = static_cast<T>(sums[c * (g.K + 2) + g.K + 1]);
    }
    if (want_b) {
      gb = at::empty({g.C}, x.options());
      for (int64_t c = 0; c < g.C; ++c) gb->data_ptr<T>()[c] = static_cast<T>(sums[c * (g.K + 2) + g.K]);
    }
  });
  return {gcw, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(scaleinv, CPU, m) {
  m.impl("conv_bn_act_pool", &conv_bn_act_pool_cpu);
  m.impl("conv_bn_act_pool_backward", &conv_bn_act_pool_backward_cpu);
}

}  // namespace scaleinv
