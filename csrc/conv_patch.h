// Shared by the conv_bn_act_pool kernels (conv_moments.h, conv_pool_kernels.h) and their
// driver (conv_norm_act.cpp): the geometry of one call and the zero-padded input planes
// the kernels read, plain and split into even/odd columns.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"
#include "window_kernels.h"

namespace scaleinv {
namespace cna {

#define CN_INLINE SCALEINV_INLINE

constexpr int64_t kMaxTaps = 32;

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

// The tap geometries the plane kernels are compiled for: 0 grey 3x3, 1 RGB 3x3 (the CNN
// input layers), 2 grey 5x5; 3 = any other (loops over the runtime geometry).
inline int tap_variant(const CbGeo& g) {
  if (g.KH == 3 && g.KW == 3) return g.Ci == 1 ? 0 : g.Ci == 3 ? 1 : 3;
  return g.KH == 5 && g.KW == 5 && g.Ci == 1 ? 2 : 3;
}

}  // namespace cna
}  // namespace scaleinv
