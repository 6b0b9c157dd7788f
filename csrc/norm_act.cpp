// Fused BatchNorm (train or eval) -> ReLU -> MaxPool2d(2) over NCHW, forward and
// backward, on CPU (scaleinv::bn_act_pool), and its GroupNorm mode (scaleinv::gn_act_pool,
// at the end of the file: the same per-plane window kernels, driven per (sample, group)).
// See scaleinv_kernels/ops/norm_act.py and gn_act.py for the contracts.
//
// Work layout: at::parallel_for over groups of consecutive channels. For each n a group's
// planes are one contiguous run of >= 16 KiB (walking one channel at a time reads 784-byte
// runs 1.6 MB apart for 14x14 planes, which the prefetchers do not follow: ~3x slower),
// and a whole group (N runs) is <= 1 MiB, so it is still in L2 for the second pass:
//   forward  (training): statistics of the group (x from memory), then normalize/ReLU/
//                        pool (x from L2) writing out (1/4) and the uint8 window index;
//   backward (training): sums over the pooled positions (grad_out, index and out: x̂ is
//                        recovered from out, see XhatSource; x only on ill-conditioned
//                        channels), then dx (x, and the small tensors from L2).
// Eval mode needs no statistics: the forward runs over (n, c) planes in memory order.
//
// Statistics are accumulated in fp64 (shifted by the channel's first element, so the
// single-pass variance does not cancel), as torch's CPU batch norm accumulates in fp64;
// each channel is summed by one thread in a fixed order (deterministic).
// The loops are plain C++ written for the vectoriser, except the 2x2 windows (AVX-512
// intrinsics below); AVX2/AVX-512 builds of the same code are picked at run time from
// ATen's CPU capability (no -march flags needed).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <type_traits>
#include <optional>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu_isa.h"
#include "window_kernels.h"

namespace scaleinv {
namespace {

#define NA_INLINE SCALEINV_INLINE


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
NA_AVX512_FN void pool_sums_plane_f32(const float* x, const float* go, const float* o,
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
// the portable loop scalar: 4.7 GB/s on [64, 128, 7, 7]): s1 += g, s2 += g * (v - shift),
// v = x or out (see pool_sums_plane_f32).
NA_AVX512_FN void plain_sums_plane_f32(const float* x, const float* go, const float* o,
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
NA_AVX512_FN void pool_dx_plane_f32(const float* x, float* dx, const float* go, const float* o,
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
NA_AVX512_FN void stream_copy_f32(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

NA_AVX512_FN void store_fence() { _mm_sfence(); }
#endif


// ---- forward ---------------------------------------------------------------------

// Shifted sums of one plane, added into s[0] (sum(x - shift)) and s[1] (sum((x - shift)^2)).
template <typename T>
NA_INLINE void plane_stats(const T* __restrict__ p, int64_t HW, double shift, double* s) {
  double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < HW; ++i) {
    const double d = static_cast<double>(p[i]) - shift;
    a += d;
    b += d * d;
  }
  s[0] += a;
  s[1] += b;
}

template <typename T>
NA_INLINE void plane_forward(const T* x, T* out, uint8_t* ind, const Geo& g, int64_t n,
                             int64_t c, T alpha, T beta) {
  const int64_t plane = n * g.C + c;
  plane_forward_at(x + plane * g.HW, out + plane * g.HWo, ind ? ind + plane * g.HWo : nullptr, g,
                   alpha, beta);
}

template <typename T>
struct FwdArgs {
  const T* x;
  const T* w;  // nullable
  const T* b;  // nullable
  const T* mean_in;    // eval mode: given statistics (nullable)
  const T* invstd_in;
  T* out;
  uint8_t* ind;
  T* save_mean;
  T* save_invstd;
  double eps;
  Geo g;
  const double* shift;  // [C] training: the channel's first element
  double* part;         // [K, C, 2] training: shifted sums of each chunk of planes
  int64_t per;          // planes per chunk
};

// alpha/beta exactly as torch's CPU batch norm forms them: alpha = invstd * w,
// beta = b - mean * alpha.
template <typename T>
NA_INLINE void affine(const FwdArgs<T>& a, int64_t c, T mean, T invstd, T* alpha, T* beta) {
  const T w = a.w ? a.w[c] : T(1);
  const T b = a.b ? a.b[c] : T(0);
  *alpha = invstd * w;
  *beta = b - mean * *alpha;
}

// save_mean/save_invstd of channel c from its shifted sums a.part[2c], a.part[2c + 1]
// over its N*H*W values.
template <typename T>
NA_INLINE void store_stats(const FwdArgs<T>& a, int64_t c) {
  const double cnt = static_cast<double>(a.g.N * a.g.HW);
  const double mu = a.part[2 * c] / cnt;
  const double var = std::max(a.part[2 * c + 1] / cnt - mu * mu, 0.0);
  a.save_mean[c] = static_cast<T>(a.shift[c] + mu);
  a.save_invstd[c] = static_cast<T>(1.0 / std::sqrt(var + a.eps));
}

// ---- small planes without pooling: flat runs --------------------------------------
// Without pooling every pass is elementwise with per-channel coefficients, and a channel
// group's planes of sample n are one contiguous run of L = (c1 - c0) * HW values. For tiny
// planes (a [N, C] input has HW = 1; 3x3 after three pools) the per-plane loops spend more
// on their set-up and horizontal reductions than on the values, so these passes run over
// whole runs instead: the coefficients expanded to one per element ([L], in L1/L2) and
// float64 accumulators per position, reduced per channel at the end (in a fixed order:
// still deterministic). Training forward / forward+backward, interleaved A/B, 2 threads:
// [256, 512] 0.74 -> 0.055 / 1.91 -> 0.24 ms; [64, 64, 3, 3] 0.090 -> 0.032 / 0.23 -> 0.10;
// [64, 128, 5, 5] 0.117 -> 0.076 / 0.40 -> 0.28; [64, 64, 6, 6] 0.068 -> 0.054 / 0.25 ->
// 0.20; at 7x7 ([64, 256, 7, 7]) no gain (one thread: 0.52 -> 0.63 forward), hence the
// bound of 36 float32 values per plane.
constexpr int64_t kFlatMaxPlaneBytes = 144;

template <typename T>
NA_INLINE bool flat_runs(const Geo& g) {
  return g.pool == 0 && g.HW * static_cast<int64_t>(sizeof(T)) <= kFlatMaxPlaneBytes;
}

// Sum of the HW per-position accumulators of channel c0 + j.
NA_INLINE double channel_total(const std::vector<double>& acc, int64_t j, int64_t HW) {
  double t = 0;
  for (int64_t i = j * HW; i < (j + 1) * HW; ++i) t += acc[i];
  return t;
}

// Training forward of channels [c0, c1) (see forward_groups), flat.
template <typename T>
NA_INLINE void forward_group_flat(const FwdArgs<T>& a, int64_t c0, int64_t c1) {
  const Geo& g = a.g;
  const int64_t HW = g.HW, L = (c1 - c0) * HW;
  std::vector<double> sh(L), s1(L, 0.0), s2(L, 0.0);
  for (int64_t i = 0; i < L; ++i) sh[i] = a.shift[c0 + i / HW];
  for (int64_t n = 0; n < g.N; ++n) {
    const T* __restrict__ x = a.x + (n * g.C + c0) * HW;
    const double* __restrict__ shp = sh.data();
    double* __restrict__ p1 = s1.data();
    double* __restrict__ p2 = s2.data();
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) {
      const double d = static_cast<double>(x[i]) - shp[i];
      p1[i] += d;
      p2[i] += d * d;
    }
  }
  std::vector<T> al(L), be(L);
  for (int64_t c = c0; c < c1; ++c) {
    a.part[2 * c] = channel_total(s1, c - c0, HW);
    a.part[2 * c + 1] = channel_total(s2, c - c0, HW);
    store_stats(a, c);
    T alpha, beta;
    affine(a, c, a.save_mean[c], a.save_invstd[c], &alpha, &beta);
    std::fill(al.begin() + (c - c0) * HW, al.begin() + (c - c0 + 1) * HW, alpha);
    std::fill(be.begin() + (c - c0) * HW, be.begin() + (c - c0 + 1) * HW, beta);
  }
  const T* __restrict__ alp = al.data();
  const T* __restrict__ bep = be.data();
  for (int64_t n = 0; n < g.N; ++n) {
    const T* __restrict__ x = a.x + (n * g.C + c0) * HW;
    T* __restrict__ out = a.out + (n * g.C + c0) * HW;
    if (g.relu) {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) out[i] = relu_keep_nan(x[i] * alp[i] + bep[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) out[i] = x[i] * alp[i] + bep[i];
    }
  }
}

// Training forward over channel groups [grp*per, ...): the group's planes form runs of
// per*H*W contiguous elements (one per n); the statistics pass reads them from memory, the
// normalize/ReLU/pool pass right after finds them in L2 (the group is sized to fit).
// a.part ([C, 2], zeroed) receives the channel's shifted sums.
template <typename T>
NA_INLINE void forward_planes(const FwdArgs<T>& a, int64_t p0, int64_t p1);

template <typename T>
NA_INLINE void forward_groups(const FwdArgs<T>& a, int64_t g0, int64_t g1) {
  const Geo& g = a.g;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t c0 = grp * a.per, c1 = std::min(g.C, c0 + a.per);
    if (flat_runs<T>(g)) {
      forward_group_flat(a, c0, c1);
      continue;
    }
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = c0; c < c1; ++c)
        plane_stats(a.x + (n * g.C + c) * g.HW, g.HW, a.shift[c], a.part + 2 * c);
    for (int64_t c = c0; c < c1; ++c) store_stats(a, c);
    for (int64_t n = 0; n < g.N; ++n) forward_planes(a, n * g.C + c0, n * g.C + c1);
  }
}

template <typename T>
NA_INLINE void forward_planes(const FwdArgs<T>& a, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / a.g.C, c = p % a.g.C;
    T alpha, beta;
    affine(a, c, a.mean_in[c], a.invstd_in[c], &alpha, &beta);
    plane_forward(a.x, a.out, a.ind, a.g, n, c, alpha, beta);
  }
}

// ---- backward --------------------------------------------------------------------

template <typename T>
struct BwdArgs {
  const T* gout;
  const T* x;
  const T* w;  // nullable
  const T* mean;
  const T* invstd;
  const T* out;
  const uint8_t* ind;
  T* dx;
  double* sums;  // [C, 2]: sum(g), sum(g * xhat)
  bool training, need_sums;
  const uint8_t* from_out;  // [C] see XhatSource
  const T* shift;           // [C]
  const double* post;       // [C]
  Geo g;
  double* part;  // [K, C, 2] per-chunk sum(g), sum(g * (x - mean))
  int64_t per;   // planes per chunk
  bool stream = false;     // dx via a staging run and non-temporal stores (see below)
  int64_t dx_plane0 = 0;   // plane p's dx is at dx + (p - dx_plane0) * HW
  int64_t gn_groups = 0;   // GroupNorm mode: G; mean/invstd are [N, G] (0: BatchNorm, [C])
};

// Index of plane's statistics in mean/invstd: its channel (BatchNorm) or its (sample,
// group) (GroupNorm).
template <typename T>
NA_INLINE int64_t stat_index(const BwdArgs<T>& a, int64_t plane) {
  const int64_t c = plane % a.g.C;
  if (a.gn_groups == 0) return c;
  return (plane / a.g.C) * a.gn_groups + c / (a.g.C / a.gn_groups);
}

// sum(g) and sum(g * (v - shift)) of channel c (post[c] turns the second into sum(g *
// xhat)), g = grad_out routed to the argmax (masked by out > 0 with relu); only the pooled
// positions carry a gradient. v is the output there (from_out[c]) or x at the argmax.
template <typename T>
NA_INLINE void plane_sums(const BwdArgs<T>& a, int64_t plane, double* out) {
  const Geo& g = a.g;
  const int64_t c = plane % g.C;
  // GroupNorm (from_out == nullptr): x at the argmax, shifted by the plane's group mean
  const bool from_out = a.from_out && a.from_out[c];
  const T shift = a.from_out ? a.shift[c] : a.mean[stat_index(a, plane)];
  double s1 = 0, s2 = 0;
  {
    const T* __restrict__ x = a.x + plane * g.HW;
#ifdef NA_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<T, float>) {
      if (g.pool == 2 && use_avx512_kernels()) {
        pool_sums_plane_f32(x, a.gout + plane * g.HWo, a.out + plane * g.HWo,
                            a.ind + plane * g.HWo, g.W, g.Ho, g.Wo, shift, from_out, g.relu,
                            out, out + 1);
        return;
      }
      if (g.pool == 0 && use_avx512_kernels()) {
        const float* o = a.out + plane * g.HW;
        plain_sums_plane_f32(from_out ? o : x, a.gout + plane * g.HW, o, g.HW, shift, g.relu,
                             out, out + 1);
        return;
      }
    }
#endif
    const double sh = static_cast<double>(shift);
    if (g.pool == 2) {
      const T* __restrict__ go = a.gout + plane * g.HWo;
      const T* __restrict__ o = a.out + plane * g.HWo;
      const uint8_t* __restrict__ k = a.ind + plane * g.HWo;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        if (from_out) {  // contiguous: no gather from x
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t j = oh * g.Wo + ow;
            double gv = static_cast<double>(go[j]);
            if (g.relu) gv = o[j] > T(0) ? gv : 0.0;
            s1 += gv;
            s2 += gv * (static_cast<double>(o[j]) - sh);
          }
          continue;
        }
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int64_t j = oh * g.Wo + ow;
          double gv = static_cast<double>(go[j]);
          if (g.relu) gv = o[j] > T(0) ? gv : 0.0;
          const int kk = k[j];
          const double xv = x[(2 * oh + (kk >> 1)) * g.W + 2 * ow + (kk & 1)];
          s1 += gv;
          s2 += gv * (xv - sh);
        }
      }
    } else {
      const T* __restrict__ go = a.gout + plane * g.HW;
      const T* __restrict__ o = a.out + plane * g.HW;
      const T* __restrict__ v = from_out ? o : x;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = 0; i < g.HW; ++i) {
        double gv = static_cast<double>(go[i]);
        if (g.relu) gv = o[i] > T(0) ? gv : 0.0;
        s1 += gv;
        s2 += gv * (static_cast<double>(v[i]) - sh);
      }
    }
  }
  out[0] += s1;
  out[1] += s2;
}

// dx = a*g + k0 + k2*(x - mean) over one plane (k0 = k2 = 0 in eval mode).
template <typename T>
NA_INLINE void plane_dx(const BwdArgs<T>& a, int64_t n, int64_t c, T scale, T k0, T k2) {
  const Geo& g = a.g;
  const int64_t plane = n * g.C + c;
  const T* __restrict__ x = a.x + plane * g.HW;
  T* __restrict__ dx = a.dx + (plane - a.dx_plane0) * g.HW;
  const T mean = a.mean[stat_index(a, plane)];
#ifdef NA_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (g.pool == 2 && use_avx512_kernels()) {
      return pool_dx_plane_f32(x, dx, a.gout + plane * g.HWo, a.out + plane * g.HWo,
                               a.ind + plane * g.HWo, g.H, g.W, g.Ho, g.Wo, mean, scale, k0, k2,
                               g.relu, a.training);
    }
  }
#endif
  if (a.training) {
#pragma omp simd
    for (int64_t i = 0; i < g.HW; ++i) dx[i] = k0 + k2 * (x[i] - mean);
  } else {
    std::fill(dx, dx + g.HW, T(0));
  }
  if (g.pool == 2) {
    const T* __restrict__ go = a.gout + plane * g.HWo;
    const T* __restrict__ o = a.out + plane * g.HWo;
    const uint8_t* __restrict__ k = a.ind + plane * g.HWo;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const int64_t j = oh * g.Wo + ow;
        T gv = go[j];
        if (g.relu) gv = o[j] > T(0) ? gv : T(0);
        const int kk = k[j];
        dx[(2 * oh + (kk >> 1)) * g.W + 2 * ow + (kk & 1)] += scale * gv;
      }
    }
  } else {
    const T* __restrict__ go = a.gout + plane * g.HW;
    const T* __restrict__ o = a.out + plane * g.HW;
#pragma omp simd
    for (int64_t i = 0; i < g.HW; ++i) {
      T gv = go[i];
      if (g.relu) gv = o[i] > T(0) ? gv : T(0);
      dx[i] += scale * gv;
    }
  }
}

// Channel c's dx = scale * g + k0 + k2 * (x - mean), from a.sums (s1, sum(g * xhat)):
// training dx = scale * (g - s1/cnt - xhat * s2/cnt), eval k0 = k2 = 0.
template <typename T>
NA_INLINE void dx_coefficients(const BwdArgs<T>& a, int64_t c, T* scale, T* k0, T* k2) {
  const double cnt = static_cast<double>(a.g.N * a.g.HW);
  const double invstd = a.invstd[c];
  const double s = invstd * (a.w ? static_cast<double>(a.w[c]) : 1.0);
  *scale = static_cast<T>(s);
  *k0 = static_cast<T>(a.training ? -s * a.sums[2 * c] / cnt : 0.0);
  *k2 = static_cast<T>(a.training ? -s * invstd * a.sums[2 * c + 1] / cnt : 0.0);
}

// dx pass over planes [p0, p1); a.sums holds the channel sums (s1, sum(g * xhat)).
template <typename T>
NA_INLINE void dx_planes(const BwdArgs<T>& a, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % a.g.C;
    T scale, k0, k2;
    dx_coefficients(a, c, &scale, &k0, &k2);
    plane_dx(a, p / a.g.C, c, scale, k0, k2);
  }
}

// Training backward of channels [c0, c1), flat (see forward_group_flat): the sums over
// every position, then dx. x̂ comes from x here (the dx pass reads it anyway, and the
// run is in L2 for the second pass), so a.from_out/shift/post are not used.
template <typename T>
NA_INLINE void backward_group_flat(const BwdArgs<T>& a, int64_t c0, int64_t c1) {
  const Geo& g = a.g;
  const int64_t HW = g.HW, L = (c1 - c0) * HW;
  std::vector<T> mu(L);
  std::vector<double> s1(L, 0.0), s2(L, 0.0);
  for (int64_t i = 0; i < L; ++i) mu[i] = a.mean[c0 + i / HW];
  const T* __restrict__ mup = mu.data();
  const auto run = [&](const T* p, int64_t n) { return p + (n * g.C + c0) * HW; };
  for (int64_t n = 0; n < g.N; ++n) {
    const T *__restrict__ x = run(a.x, n), *__restrict__ go = run(a.gout, n),
                          *__restrict__ o = run(a.out, n);
    double* __restrict__ p1 = s1.data();
    double* __restrict__ p2 = s2.data();
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) {
      double gv = static_cast<double>(go[i]);
      if (g.relu) gv = o[i] > T(0) ? gv : 0.0;
      p1[i] += gv;
      p2[i] += gv * (static_cast<double>(x[i]) - static_cast<double>(mup[i]));
    }
  }
  std::vector<T> sc(L), k0(L), k2(L);
  for (int64_t c = c0; c < c1; ++c) {
    a.sums[2 * c] += channel_total(s1, c - c0, HW);
    a.sums[2 * c + 1] += channel_total(s2, c - c0, HW) * static_cast<double>(a.invstd[c]);
    T cs, c0k, c2k;
    dx_coefficients(a, c, &cs, &c0k, &c2k);
    const int64_t b = (c - c0) * HW;
    std::fill(sc.begin() + b, sc.begin() + b + HW, cs);
    std::fill(k0.begin() + b, k0.begin() + b + HW, c0k);
    std::fill(k2.begin() + b, k2.begin() + b + HW, c2k);
  }
  const T* __restrict__ scp = sc.data();
  const T* __restrict__ k0p = k0.data();
  const T* __restrict__ k2p = k2.data();
  for (int64_t n = 0; n < g.N; ++n) {
    const T *__restrict__ x = run(a.x, n), *__restrict__ go = run(a.gout, n),
                          *__restrict__ o = run(a.out, n);
    T* __restrict__ dx = a.dx + (n * g.C + c0) * HW;
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) {
      T gv = go[i];
      if (g.relu) gv = o[i] > T(0) ? gv : T(0);
      const T base = k0p[i] + k2p[i] * (x[i] - mup[i]);
      dx[i] = base + scp[i] * gv;
    }
  }
}

// Backward over channel groups (see forward_groups): sums over the group's pooled
// positions into a.sums (zeroed), then dx for the group's planes (grad_out, out and the
// index from L2; x from L2 too on channels whose sums read it).
template <typename T>
NA_INLINE void backward_groups(const BwdArgs<T>& a, int64_t g0, int64_t g1) {
  const Geo& g = a.g;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t c0 = grp * a.per, c1 = std::min(g.C, c0 + a.per);
    if (a.training && a.gn_groups == 0 && a.dx_plane0 == 0 && flat_runs<T>(g)) {
      backward_group_flat(a, c0, c1);
      continue;
    }
    if (a.need_sums) {
      for (int64_t n = 0; n < g.N; ++n)
        for (int64_t c = c0; c < c1; ++c) plane_sums(a, n * g.C + c, a.sums + 2 * c);
      for (int64_t c = c0; c < c1; ++c) a.sums[2 * c + 1] *= a.post[c];
    }
#ifdef NA_HAVE_AVX512_KERNELS
    constexpr bool kCanStream = std::is_same_v<T, float>;
#else
    constexpr bool kCanStream = false;
#endif
    if (!(kCanStream && a.stream)) {
      for (int64_t n = 0; n < g.N; ++n) dx_planes(a, n * g.C + c0, n * g.C + c1);
      continue;
    }
#ifdef NA_HAVE_AVX512_KERNELS
    if constexpr (kCanStream) {
      // dx larger than the caches (a.stream): each run of the group's planes is built in
      // an L1-resident staging buffer and streamed out, so the store does not first read
      // every dx line from memory (write-allocate: 4 more bytes per element).
      std::vector<float> stage((c1 - c0) * g.HW);
      BwdArgs<T> s = a;
      s.dx = stage.data();
      for (int64_t n = 0; n < g.N; ++n) {
        s.dx_plane0 = n * g.C + c0;
        dx_planes(s, n * g.C + c0, n * g.C + c1);
        stream_copy_f32(a.dx + (n * g.C + c0) * g.HW, stage.data(), (c1 - c0) * g.HW);
      }
    }
#endif
  }
#ifdef NA_HAVE_AVX512_KERNELS
  if (a.stream) store_fence();  // order the streamed lines before the task ends
#endif
}

// ---- GroupNorm mode (scaleinv::gn_act_pool) ----------------------------------------
// Statistics per (sample n, group of C/G channels): a group's planes are one contiguous
// run of x, so a task takes whole (n, group) blocks: the block's statistics (x from
// memory), then normalize/ReLU/pool of its planes (x from L1/L2) with the same plane
// kernels as BatchNorm; the backward likewise: per-plane sums, the group's weighted
// totals, then dx. The per-plane sums are kept ([N, C, 2]) for grad_weight/grad_bias,
// which sum them over n afterwards in a fixed order.

template <typename T>
struct GnFwdArgs {
  const T* x;
  const T* w;  // nullable
  const T* b;  // nullable
  T* out;
  uint8_t* ind;
  T* save_mean;    // [N, G]
  T* save_invstd;  // [N, G]
  double eps;
  Geo g;
  int64_t G;
};

template <typename T>
NA_INLINE void gn_forward_blocks(const GnFwdArgs<T>& a, int64_t b0, int64_t b1) {
  const Geo& g = a.g;
  const int64_t Cg = g.C / a.G;
  const double cnt = static_cast<double>(Cg * g.HW);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t n = blk / a.G, c0 = (blk % a.G) * Cg;
    const T* xb = a.x + (n * g.C + c0) * g.HW;
    const double shift = static_cast<double>(xb[0]);  // no cancellation in the variance
    double s[2] = {0.0, 0.0};
    plane_stats(xb, Cg * g.HW, shift, s);
    const double mu = s[0] / cnt;
    const double var = std::max(s[1] / cnt - mu * mu, 0.0);
    const T mean = static_cast<T>(shift + mu);
    const T invstd = static_cast<T>(1.0 / std::sqrt(var + a.eps));
    a.save_mean[blk] = mean;
    a.save_invstd[blk] = invstd;
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      const T alpha = invstd * (a.w ? a.w[c] : T(1));
      const T beta = (a.b ? a.b[c] : T(0)) - mean * alpha;
      plane_forward(a.x, a.out, a.ind, g, n, c, alpha, beta);
    }
  }
}

// a: BwdArgs in GroupNorm mode (gn_groups = G, training, from_out = nullptr); psums
// [N, C, 2] receives each plane's sum(g), sum(g * (x - mean)).
template <typename T>
NA_INLINE void gn_backward_blocks(const BwdArgs<T>& a, int64_t b0, int64_t b1) {
  const Geo& g = a.g;
  const int64_t G = a.gn_groups, Cg = g.C / G;
  const double cnt = static_cast<double>(Cg * g.HW);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t n = blk / G, c0 = (blk % G) * Cg;
    const double invstd = static_cast<double>(a.invstd[blk]);
    double A = 0.0, B = 0.0;  // sum over the group of w * g and w * g * (x - mean)
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      double* ps = a.part + 2 * (n * g.C + c);
      ps[0] = ps[1] = 0.0;
      plane_sums(a, n * g.C + c, ps);
      const double wc = a.w ? static_cast<double>(a.w[c]) : 1.0;
      A += wc * ps[0];
      B += wc * ps[1];
    }
    // dx = invstd * (w g - A/cnt - xhat * B * invstd / cnt), xhat = (x - mean) * invstd
    const T k0 = static_cast<T>(-invstd * A / cnt);
    const T k2 = static_cast<T>(-invstd * invstd * invstd * B / cnt);
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      const double wc = a.w ? static_cast<double>(a.w[c]) : 1.0;
      plane_dx(a, n, c, static_cast<T>(invstd * wc), k0, k2);
    }
  }
}

// ---- instruction-set builds ------------------------------------------------------
// Whole functions with a target attribute (the always_inline bodies above are compiled
// into each); the one matching ATen's CPU capability runs.

SCALEINV_ISA_CLONES(fwd_groups, FwdArgs, forward_groups)
SCALEINV_ISA_CLONES(fwd_planes, FwdArgs, forward_planes)
SCALEINV_ISA_CLONES(bwd_groups, BwdArgs, backward_groups)
SCALEINV_ISA_CLONES(gn_fwd_blocks, GnFwdArgs, gn_forward_blocks)
SCALEINV_ISA_CLONES(gn_bwd_blocks, BwdArgs, gn_backward_blocks)


// The intrinsics kernels run where ATen runs its AVX-512 kernels (SCALEINV_NO_AVX512=1
// forces the portable loops, e.g. to test them).
// dx of at least this many bytes is written with non-temporal stores (pooled float32
// backward on AVX-512): such a dx does not stay in cache for its consumer anyway. 64 MiB
// by default; SCALEINV_STREAM_MIN_BYTES overrides it (read once; the tests force both
// paths with it).
int64_t stream_min_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("SCALEINV_STREAM_MIN_BYTES");
    return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(64) << 20;
  }();
  return bytes;
}


// Channels per group: runs of >= 16 KiB per n (hardware prefetchers stream them), a group
// of <= 1 MiB (it stays in L2 between the two passes), and enough groups for the threads.
int64_t channels_per_group(const Geo& g, int64_t elem_size) {
  const int64_t plane_bytes = std::max<int64_t>(1, g.HW * elem_size);
  int64_t per = std::max<int64_t>(1, (16 << 10) / plane_bytes);
  per = std::min(per, std::max<int64_t>(1, (1 << 20) / (plane_bytes * std::max<int64_t>(1, g.N))));
  per = std::min(per, std::max<int64_t>(1, g.C / (4 * at::get_num_threads())));
  return std::min(per, g.C);
}

// Grain sizes: enough work per task that a task is not dominated by scheduling.
int64_t grain(int64_t per_item, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, (1 << 16) / std::max<int64_t>(1, per_item)));
}

// x̂ at the pooled positions, for the backward sums (sum(g * xhat): grad_weight and the
// training-mode dx). Where g != 0 the forward's output is y = x * alpha + beta (alpha =
// invstd * w, beta = b - mean * alpha: the same float values as the forward), so x - mean
// = (y - b) / alpha, and the sums pass reads grad_out, out and the index but not x (the
// identity in-place-activated BN is built on). In float32 the recovered x̂ is off by about
// 2^-24 * (|mean| * invstd + |b| / |w|) + 1 ulp of y: the forward's own rounding. Channels
// where that bound exceeds kOutCond * 2^-24 (a mean far from 0 in units of the standard
// deviation, a large bias, w == 0) read x at the argmax instead, exactly as before.
constexpr double kOutCond = 8.0;

template <typename T>
struct XhatSource {
  std::vector<uint8_t> from_out;  // [C] 1: v = out, shift = b; 0: v = x, shift = mean
  std::vector<T> shift;           // [C]
  std::vector<double> post;       // [C] sum(g * (v - shift)) * post = sum(g * xhat)
};

template <typename T>
XhatSource<T> xhat_source(const T* w, const T* b, const T* mean, const T* invstd, int64_t C) {
  XhatSource<T> s{std::vector<uint8_t>(C), std::vector<T>(C), std::vector<double>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const T alpha = invstd[c] * (w ? w[c] : T(1));  // as affine() forms it
    const double a = static_cast<double>(alpha), is = static_cast<double>(invstd[c]);
    const double bias = b ? static_cast<double>(b[c]) : 0.0;
    const double cond = std::abs(static_cast<double>(mean[c])) * is + std::abs(bias) * is /
                                                                          std::abs(a);
    s.from_out[c] = a != 0.0 && std::isfinite(a) && cond <= kOutCond;  // NaN: false
    s.shift[c] = s.from_out[c] ? static_cast<T>(bias) : mean[c];
    s.post[c] = s.from_out[c] ? is / a : is;
  }
  return s;
}

// ---- validation ------------------------------------------------------------------

Geo check_x(const char* op, const at::Tensor& x, int64_t pool, bool relu) {
  TORCH_CHECK_VALUE(pool == 0 || pool == 2, op, "pool must be 0 (none) or 2 (2x2 max pool), got ",
                    pool);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && x.device().is_cpu(), op,
                    "x must be a dense CPU tensor");
  if (pool == 2) {
    TORCH_CHECK_VALUE(x.dim() == 4, op, "pool=2 needs a 4-D x [N, C, H, W], got shape ",
                      shape_str(x));
  } else {
    TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 4, op,
                      "x must be [N, C], [N, C, L] or [N, C, H, W], got shape ", shape_str(x));
  }
  Geo g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.dim() == 4 ? x.size(2) : 1;
  g.W = x.dim() >= 3 ? x.size(-1) : 1;
  g.HW = g.H * g.W;
  g.pool = static_cast<int>(pool);
  g.relu = relu;
  if (pool == 2) {
    g.Ho = g.H / 2;
    g.Wo = g.W / 2;
    TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, op, "pool=2 needs H >= 2 and W >= 2, got shape ",
                      shape_str(x));
  } else {
    g.Ho = g.H;
    g.Wo = g.W;
  }
  g.HWo = g.Ho * g.Wo;
  return g;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// out's shape: x's, with H and W halved (floor) by the pool.
std::vector<int64_t> output_shape(const at::Tensor& x, const Geo& g) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (g.pool == 2) {
    shape[2] = g.Ho;
    shape[3] = g.Wo;
  }
  return shape;
}

// The forward's out and index (uint8, [0]-shaped without pool), uninitialised.
std::pair<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& x, const Geo& g) {
  const std::vector<int64_t> shape = output_shape(x, g);
  return {at::empty(shape, x.options()),
          at::empty(g.pool == 2 ? shape : std::vector<int64_t>{0},
                    x.options().dtype(at::kByte))};
}

// The tensors of a backward call, as both norm modes pass them to their kernels; the
// caller sets the mode's own fields (sums/part, training, x̂ source, grouping).
template <typename T>
BwdArgs<T> backward_args(const at::Tensor& gout, const at::Tensor& x,
                         const std::optional<at::Tensor>& w, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& out,
                         const at::Tensor& index, at::Tensor& dx, const Geo& g) {
  BwdArgs<T> a{};
  a.gout = gout.const_data_ptr<T>();
  a.x = x.const_data_ptr<T>();
  a.w = ptr_or_null<T>(w);
  a.mean = mean.const_data_ptr<T>();
  a.invstd = invstd.const_data_ptr<T>();
  a.out = out.const_data_ptr<T>();
  a.ind = g.pool == 2 ? index.const_data_ptr<uint8_t>() : nullptr;
  a.dx = dx.data_ptr<T>();
  a.g = g;
  return a;
}

// grad_out, out and index of a backward call: the forward's output shape and x's dtype
// (index: uint8).
void check_backward_inputs(const char* op, const Geo& g, const at::Tensor& x,
                           const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& index) {
  const std::vector<int64_t> shape = output_shape(x, g);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(shape) &&
                        out.sizes() == at::IntArrayRef(shape),
                    op, "grad_out and out must have the output's shape ", at::IntArrayRef(shape),
                    ", got ", shape_str(grad_out), " and ", shape_str(out));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() &&
                       out.scalar_type() == x.scalar_type(),
                   op, "grad_out and out must have x's dtype ", x.scalar_type());
  if (g.pool == 2) {
    TORCH_CHECK_VALUE(index.sizes() == at::IntArrayRef(shape) &&
                          index.scalar_type() == at::kByte,
                      op, "index must be uint8 of the output's shape ", at::IntArrayRef(shape),
                      ", got ", index.scalar_type(), " ", shape_str(index));
  }
}

// ---- ops -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_pool_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, double eps, bool relu, int64_t pool) {
  const char* op = "scaleinv::bn_act_pool: ";
  const Geo g = check_x(op, x_in, pool, relu);
  TORCH_CHECK_VALUE(mean.has_value() == invstd.has_value(), op,
                    "give both mean and invstd (eval mode) or neither (training mode)");
  const bool training = !mean.has_value();
  const std::optional<at::Tensor> w = contiguous_channel_vec(op, "weight", weight, x_in, g.C);
  const std::optional<at::Tensor> b = contiguous_channel_vec(op, "bias", bias, x_in, g.C);
  std::optional<at::Tensor> m, is;
  if (!training) {
    check_channel_vec(op, "mean", *mean, x_in, g.C);
    check_channel_vec(op, "invstd", *invstd, x_in, g.C);
    m = mean->contiguous();
    is = invstd->contiguous();
  } else {
    TORCH_CHECK_VALUE(eps >= 0, op, "eps must be >= 0, got ", eps);
    TORCH_CHECK_VALUE(g.N * g.HW > 1, op,
                      "training needs more than 1 value per channel (N*H*W > 1), got shape ",
                      shape_str(x_in));
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor out, index;
  std::tie(out, index) = empty_outputs(x, g);
  at::Tensor save_mean, save_invstd;
  if (training) {
    save_mean = at::empty({g.C}, x.options());
    save_invstd = at::empty({g.C}, x.options());
  } else {
    save_mean = m->clone();
    save_invstd = is->clone();
  }
  if (x.numel() == 0) return {out, save_mean, save_invstd, index};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::bn_act_pool", [&] {
    FwdArgs<scalar_t> a{x.const_data_ptr<scalar_t>(),
                        ptr_or_null<scalar_t>(w),
                        ptr_or_null<scalar_t>(b),
                        ptr_or_null<scalar_t>(m),
                        ptr_or_null<scalar_t>(is),
                        out.data_ptr<scalar_t>(),
                        pool == 2 ? index.data_ptr<uint8_t>() : nullptr,
                        save_mean.data_ptr<scalar_t>(),
                        save_invstd.data_ptr<scalar_t>(),
                        eps,
                        g,
                        nullptr,
                        nullptr,
                        0};
    const int64_t planes = g.N * g.C;
    if (training) {
      std::vector<double> shift(g.C), part(2 * g.C, 0.0);
      for (int64_t c = 0; c < g.C; ++c) shift[c] = static_cast<double>(a.x[c * g.HW]);
      a.shift = shift.data();
      a.part = part.data();
      a.per = channels_per_group(g, sizeof(scalar_t));
      a.mean_in = a.save_mean;
      a.invstd_in = a.save_invstd;
      const int64_t groups = (g.C + a.per - 1) / a.per;
      auto fn = pick_build<FwdArgs<scalar_t>>(&fwd_groups_default<scalar_t>, &fwd_groups_avx2<scalar_t>,
                                        &fwd_groups_avx512<scalar_t>);
      at::parallel_for(0, groups, grain(a.per * g.N * g.HW, groups),
                       [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
    } else {
      auto fn = pick_build<FwdArgs<scalar_t>>(&fwd_planes_default<scalar_t>,
                                        &fwd_planes_avx2<scalar_t>, &fwd_planes_avx512<scalar_t>);
      at::parallel_for(0, planes, grain(g.HW, planes),
                       [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
    }
  });
  return {out, save_mean, save_invstd, index};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
bn_act_pool_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                         const at::Tensor& save_invstd, const at::Tensor& out_in,
                         const at::Tensor& index_in, bool training, bool relu, int64_t pool,
                         std::array<bool, 3> output_mask) {
  const char* op = "scaleinv::bn_act_pool_backward: ";
  const Geo g = check_x(op, x_in, pool, relu);
  check_backward_inputs(op, g, x_in, grad_out_in, out_in, index_in);
  const std::optional<at::Tensor> w = contiguous_channel_vec(op, "weight", weight, x_in, g.C);
  const std::optional<at::Tensor> b = contiguous_channel_vec(op, "bias", bias, x_in, g.C);
  check_channel_vec(op, "save_mean", save_mean, x_in, g.C);
  check_channel_vec(op, "save_invstd", save_invstd, x_in, g.C);
  const at::Tensor x = x_in.contiguous(), gout = grad_out_in.contiguous(),
                   out = out_in.contiguous(), mean = save_mean.contiguous(),
                   invstd = save_invstd.contiguous();
  const at::Tensor index = pool == 2 ? index_in.contiguous() : index_in;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const bool need_sums = training || output_mask[1] || output_mask[2];
  at::Tensor sums = at::zeros({g.C, 2}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::bn_act_pool_backward", [&] {
      BwdArgs<scalar_t> a =
          backward_args<scalar_t>(gout, x, w, mean, invstd, out, index, dx, g);
      a.sums = sums.data_ptr<double>();
      a.training = training;
      a.need_sums = need_sums;
      const XhatSource<scalar_t> src =
          xhat_source(a.w, ptr_or_null<scalar_t>(b), a.mean, a.invstd, g.C);
      a.from_out = src.from_out.data();
      a.shift = src.shift.data();
      a.post = src.post.data();
      a.per = channels_per_group(g, sizeof(scalar_t));
      a.stream = std::is_same_v<scalar_t, float> && g.pool == 2 && use_avx512_kernels() &&
                 dx.nbytes() >= stream_min_bytes();
      const int64_t groups = (g.C + a.per - 1) / a.per;
      auto fn = pick_build<BwdArgs<scalar_t>>(&bwd_groups_default<scalar_t>,
                                        &bwd_groups_avx2<scalar_t>, &bwd_groups_avx512<scalar_t>);
      at::parallel_for(0, groups, grain(a.per * g.N * g.HW, groups),
                       [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
    });
  }
  std::optional<at::Tensor> gw, gb;
  if (output_mask[1]) gw = sums.select(1, 1).contiguous().to(x.scalar_type());
  if (output_mask[2]) gb = sums.select(1, 0).contiguous().to(x.scalar_type());
  return {dx, gw, gb};
}

void check_groups(const char* op, const Geo& g, int64_t groups) {
  TORCH_CHECK_VALUE(groups >= 1 && g.C % groups == 0, op, "groups must be >= 1 and divide the ",
                    g.C, " channels, got ", groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_act_pool_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t groups, double eps, bool relu, int64_t pool) {
  const char* op = "scaleinv::gn_act_pool: ";
  const Geo g = check_x(op, x_in, pool, relu);
  check_groups(op, g, groups);
  TORCH_CHECK_VALUE(eps >= 0, op, "eps must be >= 0, got ", eps);
  const std::optional<at::Tensor> w = contiguous_channel_vec(op, "weight", weight, x_in, g.C);
  const std::optional<at::Tensor> b = contiguous_channel_vec(op, "bias", bias, x_in, g.C);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out, index;
  std::tie(out, index) = empty_outputs(x, g);
  at::Tensor save_mean = at::empty({g.N, groups}, x.options());
  at::Tensor save_invstd = at::empty({g.N, groups}, x.options());
  if (x.numel() == 0) return {out, save_mean, save_invstd, index};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::gn_act_pool", [&] {
    const GnFwdArgs<scalar_t> a{x.const_data_ptr<scalar_t>(),
                                ptr_or_null<scalar_t>(w),
                                ptr_or_null<scalar_t>(b),
                                out.data_ptr<scalar_t>(),
                                pool == 2 ? index.data_ptr<uint8_t>() : nullptr,
                                save_mean.data_ptr<scalar_t>(),
                                save_invstd.data_ptr<scalar_t>(),
                                eps,
                                g,
                                groups};
    const int64_t blocks = g.N * groups;
    auto fn = pick_build<GnFwdArgs<scalar_t>>(&gn_fwd_blocks_default<scalar_t>,
                                              &gn_fwd_blocks_avx2<scalar_t>,
                                              &gn_fwd_blocks_avx512<scalar_t>);
    at::parallel_for(0, blocks, grain(g.C / groups * g.HW, blocks),
                     [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return {out, save_mean, save_invstd, index};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
gn_act_pool_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                         const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                         const at::Tensor& save_invstd, const at::Tensor& out_in,
                         const at::Tensor& index_in, int64_t groups, bool relu, int64_t pool,
                         std::array<bool, 3> output_mask) {
  const char* op = "scaleinv::gn_act_pool_backward: ";
  const Geo g = check_x(op, x_in, pool, relu);
  check_groups(op, g, groups);
  check_backward_inputs(op, g, x_in, grad_out_in, out_in, index_in);
  TORCH_CHECK_TYPE(save_mean.scalar_type() == x_in.scalar_type() &&
                       save_invstd.scalar_type() == x_in.scalar_type(),
                   op, "save_mean and save_invstd must have x's dtype ", x_in.scalar_type());
  TORCH_CHECK_VALUE(save_mean.sizes() == at::IntArrayRef({g.N, groups}) &&
                        save_invstd.sizes() == at::IntArrayRef({g.N, groups}),
                    op, "save_mean and save_invstd must have shape [N, groups] = [", g.N, ", ",
                    groups, "], got ", shape_str(save_mean), " and ", shape_str(save_invstd));
  const std::optional<at::Tensor> w = contiguous_channel_vec(op, "weight", weight, x_in, g.C);
  const at::Tensor x = x_in.contiguous(), gout = grad_out_in.contiguous(),
                   out = out_in.contiguous(), mean = save_mean.contiguous(),
                   invstd = save_invstd.contiguous();
  const at::Tensor index = pool == 2 ? index_in.contiguous() : index_in;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  // per plane: sum(g), sum(g * (x - mean)); grad_weight/grad_bias sum them over n
  at::Tensor psums = at::zeros({g.N, g.C, 2}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::gn_act_pool_backward", [&] {
      // x̂ from x (from_out stays null): a group's planes are in cache for the dx pass
      BwdArgs<scalar_t> a =
          backward_args<scalar_t>(gout, x, w, mean, invstd, out, index, dx, g);
      a.part = psums.data_ptr<double>();
      a.training = true;
      a.need_sums = true;
      a.gn_groups = groups;
      const int64_t blocks = g.N * groups;
      auto fn = pick_build<BwdArgs<scalar_t>>(&gn_bwd_blocks_default<scalar_t>,
                                              &gn_bwd_blocks_avx2<scalar_t>,
                                              &gn_bwd_blocks_avx512<scalar_t>);
      at::parallel_for(0, blocks, grain(g.C / groups * g.HW, blocks),
                       [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
    });
  }
  std::optional<at::Tensor> gw, gb;
  if (output_mask[1] || output_mask[2]) {
    // ATen's sum over n of the per-plane sums (the same result for the same inputs and
    // thread count); x̂ = (x - mean) * invstd of the plane's group
    const at::Tensor inv = invstd.to(at::kDouble).repeat_interleave(g.C / groups, 1);  // [N, C]
    if (output_mask[1]) gw = psums.select(2, 1).mul(inv).sum(0).to(x.scalar_type());
    if (output_mask[2]) gb = psums.select(2, 0).sum(0).to(x.scalar_type());
  }
  return {dx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(scaleinv, CPU, m) {
  m.impl("bn_act_pool", &bn_act_pool_cpu);
  m.impl("bn_act_pool_backward", &bn_act_pool_backward_cpu);
  m.impl("gn_act_pool", &gn_act_pool_cpu);
  m.impl("gn_act_pool_backward", &gn_act_pool_backward_cpu);
}

}  // namespace scaleinv
