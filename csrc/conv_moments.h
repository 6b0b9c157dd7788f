// The training statistics of scaleinv::conv_bn_act_pool (conv_norm_act.cpp): per group,
// the patch moments S = sum p and G = sum p p^T (float64) of the zero-padded K-tap patches
// p of every convolution position, from which the driver forms each channel's mean and
// variance without computing the convolution. Plain loops: every build and dtype runs them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_patch.h"

namespace scaleinv {
namespace cna {


// Grey 3x3 (Ci = 1, KH = KW = 3; needs Hc >= 2): G[a][b] = sum over the conv positions of
// xp[pos + d_a] * xp[pos + d_b] is a sum of the lag product P_l = xp[u] * xp[u + l],
// l = d_b - d_a, over the rectangle u in [ky_a, ky_a + Hc) x [kx_a, kx_a + Wc) of the padded
// plane; the 45 tap pairs have only 13 lags. So each padded row is multiplied by 13 shifted
// rows (and summed once more for S) into per-column float64 accumulators, one set per row
// class: rows 0 and 1, the core rows [2, Hc) that every rectangle contains, rows Hc and
// Hc + 1. At the end each pair sums its classes over its column range. 14 instead of 54
// multiply-adds per padded pixel; the same float64 products, summed in another order
// (1e-15 relative from the tap-pair kernel); the moments pass takes about half as long.
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
// 3x3 by lags (above); any other geometry by tap pairs: conv output rows are gathered as
// K float64 row vectors; each tap pair accumulates in a vector of column partial sums
// (reduced at the end), so the inner loops are long axpys.
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

}  // namespace cna
}  // namespace scaleinv
