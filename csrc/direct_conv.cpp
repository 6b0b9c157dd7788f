// Direct grouped 2-D convolution (stride 1, dilation 1, zero padding <= kernel - 1) on CPU,
// forward and backward. See scaleinv_kernels/ops/direct_conv.py for the contract.
//
// Why it exists: the first convolution of an ensemble of M CNNs is a grouped convolution
// with groups = M and one (grey) or three (RGB) input channels per group. oneDNN's grouped
// kernels are slow there (forward + weight gradient took about twice as long as a loop of
// per-member convolutions plus the stacking copy). With so few input channels the
// convolution does ~9 FLOP per output element and is bound by writing the output
// (forward) and reading grad_out (backward).
//
// Why one file of ~600 lines: forward, input gradient and weight gradient are three
// readings of the same padded-plane geometry (below) and share its buffers and checks.
//
// Algorithm ("flat rows"): each input plane is copied once into a zero-padded buffer
// [Hp, Wp] (+ KW elements of tail). Output row oh, column ow, computed at the padded width
// Wp, is then  sum_{ci,ki,kj} w[ci,ki,kj] * xp[(oh + ki) * Wp + ow + kj],  so a whole
// output plane is Ci*KH*KW axpys over ONE contiguous range of Ho*Wp elements (long,
// vectorisable loops instead of 28-wide rows); the Wp - Wo junk columns per row (7 % at
// 28x28 with padding 1) are dropped when the plane is written out. The weight gradient is
// the same geometry read the other way: dw[ci,ki,kj] = sum_j gyp[j] * xp[j + ki*Wp + kj],
// with grad_out copied into a row-padded buffer whose junk columns are zero. The input
// gradient is the forward kernel run on grad_out with the flipped, transposed weights
// (a "full" convolution with padding KH - 1 - ph).
//
// Vectors: the loops are written for the vectoriser (lanes of one register block,
// kLanes), except the float32 weight gradient, whose accumulators GCC keeps on the stack:
// it is written over VecF<W> (vec.h; W = 4, 8, 16 in the portable, AVX2 and AVX-512
// builds), with an AVX-512 intrinsics twin that the AVX-512 build runs.
//
// Determinism: every output element and every weight-gradient entry is summed by one
// thread in a fixed order; weight gradients accumulate the per-plane fp32 (or fp64) dot
// products in fp64.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu_isa.h"
#include "vec.h"

namespace scaleinv {
namespace {

#define DC_INLINE SCALEINV_INLINE

struct ConvGeo {
  int64_t N, G, Ci, Co;  // batch, groups, input/output channels per group
  int64_t H, W, KH, KW, ph, pw;
  int64_t Ho, Wo, Hp, Wp;
  int64_t flat;  // Ho * Wp: one output plane computed at the padded width
  int64_t plen;  // Hp * Wp + KW: one padded input plane (the tail is read by the last taps)
};

template <typename T>
DC_INLINE void pad_plane(const T* __restrict__ src, T* __restrict__ dst, const ConvGeo& g) {
  std::fill(dst, dst + g.plen, T(0));
  for (int64_t h = 0; h < g.H; ++h)
    std::copy(src + h * g.W, src + (h + 1) * g.W, dst + (h + g.ph) * g.Wp + g.pw);
}

template <typename T>
struct FwdArgs {
  const T* x;     // [N, G*Ci, H, W]
  const T* w;     // [G*Co, Ci, KH, KW]
  const T* bias;  // [G*Co] or nullptr
  T* y;           // [N, G*Co, Ho, Wo]
  ConvGeo g;
};

// Lanes of one register block: 64 bytes (one AVX-512 register, two AVX2 ones).
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);
// Output channels computed together, so that each loaded input vector feeds CB of them.
constexpr int64_t kCoBlock = 4;

// Stores the first `len` lanes (written as a masked loop, which the vectoriser turns into
// a masked store, not a memcpy call per row).
template <typename T>
DC_INLINE void store_lanes(const T* __restrict__ v, T* __restrict__ dst, int64_t len) {
  constexpr int64_t L = kLanes<T>;
#pragma omp simd
  for (int64_t j = 0; j < L; ++j)
    if (j < len) dst[j] = v[j];
}

// Output channels oc .. oc + CB - 1 of one (n, g): for each output row and each block of
// kLanes columns, all Ci*KH*KW taps accumulate in registers (acc[CB][kLanes]); a block may
// read past the row's Wo valid columns into the padded buffer (those lanes are junk and
// are not stored; the buffer has a kLanes tail for the last row).
template <typename T, bool FMA, int64_t CB>
DC_INLINE void conv_rows(const T* __restrict__ xp, const T* __restrict__ wk,
                         const int64_t* __restrict__ off, int64_t ntaps, const T* b0,
                         T* __restrict__ out, const ConvGeo& g) {
  constexpr int64_t L = kLanes<T>;
  const int64_t plane = g.Ho * g.Wo;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ow += L) {
      T acc[CB][L];
      for (int64_t c = 0; c < CB; ++c)
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) acc[c][j] = b0[c];
      const T* base = xp + oh * g.Wp + ow;
      for (int64_t t = 0; t < ntaps; ++t) {
        const T* __restrict__ src = base + off[t];
#pragma GCC unroll 8
        for (int64_t c = 0; c < CB; ++c) {  // unrolled: acc stays in registers
          const T wv = wk[c * ntaps + t];
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) acc[c][j] = madd<FMA>(wv, src[j], acc[c][j]);
        }
      }
      const int64_t len = std::min(L, g.Wo - ow);
      for (int64_t c = 0; c < CB; ++c) store_lanes(acc[c], out + c * plane + oh * g.Wo + ow, len);
    }
  }
}

// tap t = (ci, ki, kj) reads the padded buffer at offset off[t] from the output position
template <typename T>
DC_INLINE std::vector<int64_t> tap_offsets(const ConvGeo& g) {
  std::vector<int64_t> off(g.Ci * g.KH * g.KW);
  for (int64_t ci = 0; ci < g.Ci; ++ci)
    for (int64_t ki = 0; ki < g.KH; ++ki)
      for (int64_t kj = 0; kj < g.KW; ++kj)
        off[(ci * g.KH + ki) * g.KW + kj] = ci * g.plen + ki * g.Wp + kj;
  return off;
}

// Output planes of (n, g) items [lo, hi).
template <typename T, bool FMA, int /*W*/>
DC_INLINE void forward_items(const FwdArgs<T>& a, int64_t lo, int64_t hi) {
  const ConvGeo& g = a.g;
  const int64_t ntaps = g.Ci * g.KH * g.KW;
  // the Ci padded planes back to back, plus a block's tail
  std::vector<T> xp(g.Ci * g.plen + kLanes<T>, T(0));
  const std::vector<int64_t> off = tap_offsets<T>(g);
  for (int64_t item = lo; item < hi; ++item) {
    const int64_t n = item / g.G, grp = item % g.G;
    for (int64_t ci = 0; ci < g.Ci; ++ci)
      pad_plane(a.x + ((n * g.G + grp) * g.Ci + ci) * g.H * g.W, xp.data() + ci * g.plen, g);
    for (int64_t co = 0; co < g.Co;) {
      const int64_t cb = std::min(kCoBlock, g.Co - co);
      const int64_t oc = grp * g.Co + co;
      T b0[kCoBlock];
      for (int64_t c = 0; c < cb; ++c) b0[c] = a.bias ? a.bias[oc + c] : T(0);
      const T* wk = a.w + oc * ntaps;
      T* out = a.y + (n * g.G * g.Co + oc) * g.Ho * g.Wo;
      if (cb == kCoBlock) {
        conv_rows<T, FMA, kCoBlock>(xp.data(), wk, off.data(), ntaps, b0, out, g);
      } else {
        for (int64_t c = 0; c < cb; ++c)
          conv_rows<T, FMA, 1>(xp.data(), wk + c * ntaps, off.data(), ntaps, b0 + c,
                          out + c * g.Ho * g.Wo, g);
      }
      co += cb;
    }
  }
}

template <typename T>
struct WgradArgs {
  const T* gy;  // [N, G*Co, Ho, Wo]
  const T* xp;  // [N, G*Ci, plen] padded input planes, plus a kLanes tail
  T* dw;        // [G*Co, Ci, KH, KW]
  ConvGeo g;
};

// Taps taps[0..TB) of one sample's weight gradient: acc[k][lane] collects
// grad_out * shifted x over the plane in registers (the lanes past Wo load grad_out as 0),
// then each tap's lane sum is added into sums (fp64).
template <typename T, bool FMA, int TB>
DC_INLINE void wgrad_taps(const T* __restrict__ gy, const T* xpn, const int64_t* off,
                          const ConvGeo& g, double* sums) {
  constexpr int64_t L = kLanes<T>;
  T acc[TB][L];
  for (int k = 0; k < TB; ++k)
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) acc[k][j] = T(0);
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ow += L) {
      const int64_t len = std::min(L, g.Wo - ow);
      T gv[L];
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) gv[j] = j < len ? gy[oh * g.Wo + ow + j] : T(0);
      const T* base = xpn + oh * g.Wp + ow;
#pragma GCC unroll 8
      for (int k = 0; k < TB; ++k) {  // unrolled: acc stays in registers
        const T* __restrict__ src = base + off[k];
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) acc[k][j] = madd<FMA>(gv[j], src[j], acc[k][j]);
      }
    }
  }
  for (int k = 0; k < TB; ++k) {
    T s = 0;
    for (int64_t j = 0; j < L; ++j) s += acc[k][j];
    sums[k] += static_cast<double>(s);
  }
}

#ifdef SCALEINV_X86_BUILDS
#define DC_HAVE_AVX512_KERNELS 1
#define DC_AVX512_FN SCALEINV_TARGET_AVX512

// float32 weight gradient of one sample, AVX-512: sums[k] += sum over the plane of
// grad_out * x shifted by off[k], for NT <= 8 taps; NT zmm accumulators, each grad_out
// vector feeding NT fused multiply-adds. The AVX-512 build's path; wgrad_plane_v below is
// its portable twin (the same bits at W = 16).
template <int NT>
DC_AVX512_FN void wgrad_plane_f32(const float* gy, const float* xpn, const int64_t* off,
                                  const ConvGeo& g, double* sums) {
  __m512 acc[NT];
#pragma GCC unroll 8
  for (int k = 0; k < NT; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const float* gr = gy + oh * g.Wo;
    const float* base = xpn + oh * g.Wp;
    for (int64_t ow = 0; ow < g.Wo; ow += 16) {
      const int64_t rem = std::min<int64_t>(16, g.Wo - ow);
      const __mmask16 m = static_cast<__mmask16>(rem == 16 ? 0xFFFFu : (1u << rem) - 1u);
      const __m512 gv = _mm512_maskz_loadu_ps(m, gr + ow);  // 0 past Wo
#pragma GCC unroll 8
      for (int k = 0; k < NT; ++k)
        acc[k] = _mm512_fmadd_ps(gv, _mm512_loadu_ps(base + ow + off[k]), acc[k]);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < NT; ++k) sums[k] += static_cast<double>(_mm512_reduce_add_ps(acc[k]));
}

DC_AVX512_FN void wgrad_plane_f32_taps(const float* gy, const float* xpn, const int64_t* off,
                                       int64_t ntaps, const ConvGeo& g, double* sums) {
  for (int64_t t = 0; t < ntaps; t += 8) {
    switch (std::min<int64_t>(8, ntaps - t)) {
      case 8: wgrad_plane_f32<8>(gy, xpn, off + t, g, sums + t); break;
      case 7: wgrad_plane_f32<7>(gy, xpn, off + t, g, sums + t); break;
      case 6: wgrad_plane_f32<6>(gy, xpn, off + t, g, sums + t); break;
      case 5: wgrad_plane_f32<5>(gy, xpn, off + t, g, sums + t); break;
      case 4: wgrad_plane_f32<4>(gy, xpn, off + t, g, sums + t); break;
      case 3: wgrad_plane_f32<3>(gy, xpn, off + t, g, sums + t); break;
      case 2: wgrad_plane_f32<2>(gy, xpn, off + t, g, sums + t); break;
      default: wgrad_plane_f32<1>(gy, xpn, off + t, g, sums + t); break;
    }
  }
}
#endif

// float32 weight gradient of one sample over VecF<W> (every build; the AVX-512 kernel
// above computes the same at W = 16): NT accumulator vectors (GCC does not keep the plain
// loops' acc[TB][16] in registers), each grad_out vector feeding NT multiply-adds (fused
// in the FMA builds, as ATen's kernels), each tap's lanes summed by a halving tree (the
// order of _mm512_reduce_add_ps).
template <int W, bool FMA, int NT>
DC_INLINE void wgrad_plane_v(const float* gy, const float* xpn, const int64_t* off,
                             const ConvGeo& g, double* sums) {
  using F = VecF<W>;
  F acc[NT];
#pragma GCC unroll 8
  for (int k = 0; k < NT; ++k) acc[k] = F::zero();
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const float* gr = gy + oh * g.Wo;
    const float* base = xpn + oh * g.Wp;
    for (int64_t ow = 0; ow < g.Wo; ow += W) {
      // 0 past Wo; the x loads may read past the row into the padded buffer's tail
      const F gv = F::load_n(gr + ow, static_cast<int>(std::min<int64_t>(W, g.Wo - ow)));
#pragma GCC unroll 8
      for (int k = 0; k < NT; ++k) {
        const F xv = F::load(base + ow + off[k]);
        acc[k] = FMA ? fmadd(gv, xv, acc[k]) : gv * xv + acc[k];
      }
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < NT; ++k) {
    float l[W];
    acc[k].store(l);
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) l[i] = l[i] + l[i + h];
    sums[k] += static_cast<double>(l[0]);
  }
}

template <int W, bool FMA>
DC_INLINE void wgrad_plane_v_taps(const float* gy, const float* xpn, const int64_t* off,
                                  int64_t ntaps, const ConvGeo& g, double* sums) {
  for (int64_t t = 0; t < ntaps; t += 8) {
    const int64_t nt = std::min<int64_t>(8, ntaps - t);
    const int64_t* o = off + t;
    double* s = sums + t;
    switch (nt) {
      case 8: wgrad_plane_v<W, FMA, 8>(gy, xpn, o, g, s); break;
      case 7: wgrad_plane_v<W, FMA, 7>(gy, xpn, o, g, s); break;
      case 6: wgrad_plane_v<W, FMA, 6>(gy, xpn, o, g, s); break;
      case 5: wgrad_plane_v<W, FMA, 5>(gy, xpn, o, g, s); break;
      case 4: wgrad_plane_v<W, FMA, 4>(gy, xpn, o, g, s); break;
      case 3: wgrad_plane_v<W, FMA, 3>(gy, xpn, o, g, s); break;
      case 2: wgrad_plane_v<W, FMA, 2>(gy, xpn, o, g, s); break;
      default: wgrad_plane_v<W, FMA, 1>(gy, xpn, o, g, s); break;
    }
  }
}

// Weight-gradient rows for items [lo, hi): item i covers output channels
// [i*kWgradCo, (i+1)*kWgradCo) of one group (so per sample its grad_out planes are one
// contiguous run the prefetchers follow; one channel at a time read 3 KB runs 400 KB
// apart and ran at a third of the speed). One thread owns each row and sums over n in
// order; per sample the taps go in register blocks of kTapBlock, the rest one at a time.
constexpr int kTapBlock = 4;
constexpr int64_t kWgradCo = 4;

template <typename T, bool FMA, int W>
DC_INLINE void wgrad_items(const WgradArgs<T>& a, int64_t lo, int64_t hi) {
  const ConvGeo& g = a.g;
  const int64_t ntaps = g.Ci * g.KH * g.KW;
  const int64_t blocks = (g.Co + kWgradCo - 1) / kWgradCo;  // per group
  const std::vector<int64_t> off = tap_offsets<T>(g);
  std::vector<double> sums(kWgradCo * ntaps);
#ifdef DC_HAVE_AVX512_KERNELS
  // the intrinsics kernel where ATen runs AVX-512 (SCALEINV_NO_AVX512=1: the VecF twin)
  const bool use_avx512 = std::is_same_v<T, float> && isa_level() == 2 &&
                          std::getenv("SCALEINV_NO_AVX512") == nullptr;
#endif
  for (int64_t item = lo; item < hi; ++item) {
    const int64_t grp = item / blocks;
    const int64_t co0 = (item % blocks) * kWgradCo, nco = std::min(kWgradCo, g.Co - co0);
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t n = 0; n < g.N; ++n) {
      const T* xpn = a.xp + (n * g.G + grp) * g.Ci * g.plen;
      for (int64_t c = 0; c < nco; ++c) {
        const T* gy = a.gy + (n * g.G * g.Co + grp * g.Co + co0 + c) * g.Ho * g.Wo;
        double* sc = sums.data() + c * ntaps;
        if constexpr (std::is_same_v<T, float>) {
#ifdef DC_HAVE_AVX512_KERNELS
          if (use_avx512) {
            wgrad_plane_f32_taps(gy, xpn, off.data(), ntaps, g, sc);
            continue;
          }
#endif
          wgrad_plane_v_taps<W, FMA>(gy, xpn, off.data(), ntaps, g, sc);
          continue;
        }
        int64_t t = 0;
        for (; t + kTapBlock <= ntaps; t += kTapBlock)
          wgrad_taps<T, FMA, kTapBlock>(gy, xpn, off.data() + t, g, sc + t);
        for (; t < ntaps; ++t) wgrad_taps<T, FMA, 1>(gy, xpn, off.data() + t, g, sc + t);
      }
    }
    T* out = a.dw + (grp * g.Co + co0) * ntaps;
    for (int64_t k = 0; k < nco * ntaps; ++k) out[k] = static_cast<T>(sums[k]);
  }
}

template <typename T>
struct PadArgs {
  const T* x;
  T* xp;
  ConvGeo g;
};

template <typename T, bool /*FMA*/, int /*W*/>
DC_INLINE void pad_items(const PadArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t p = lo; p < hi; ++p) pad_plane(a.x + p * a.g.H * a.g.W, a.xp + p * a.g.plen, a.g);
}

// ---- instruction-set builds (cpu_isa.h: one per ATen CPU capability) ------------------
// The portable build multiplies and adds separately; the AVX2/AVX-512 ones use FMA.
// BODY<T, FMA, W>: W the vector lanes of the build (vec.h).
#define DC_CLONES(NAME, ARGS, BODY)                                                       \
  template <typename T>                                                                  \
  void NAME##_default(const ARGS<T>& a, int64_t lo, int64_t hi) {                        \
    BODY<T, false, kLanesDefault>(a, lo, hi);                                            \
  }                                                                                      \
  template <typename T>                                                                  \
  SCALEINV_TARGET_AVX2 void NAME##_avx2(const ARGS<T>& a, int64_t lo, int64_t hi) {      \
    BODY<T, true, kLanesAvx2>(a, lo, hi);                                                \
  }                                                                                      \
  template <typename T>                                                                  \
  SCALEINV_TARGET_AVX512 void NAME##_avx512(const ARGS<T>& a, int64_t lo, int64_t hi) {  \
    BODY<T, true, kLanesAvx512>(a, lo, hi);                                              \
  }

DC_CLONES(fwd, FwdArgs, forward_items)
DC_CLONES(wgrad, WgradArgs, wgrad_items)
DC_CLONES(pad, PadArgs, pad_items)

// Enough work per task that scheduling does not dominate.
int64_t grain(int64_t per_item, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, (1 << 15) / std::max<int64_t>(1, per_item)));
}

// ---- validation ------------------------------------------------------------------

ConvGeo check(const char* op, const at::Tensor& x, const at::Tensor& w,
              const std::optional<at::Tensor>& bias, int64_t groups, at::IntArrayRef padding) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ",
                   x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && x.device().is_cpu() &&
                        w.layout() == at::kStrided && w.device().is_cpu(),
                    op, "x and weight must be dense CPU tensors");
  TORCH_CHECK_VALUE(x.dim() == 4, op, "x must be [N, C, H, W], got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(w.dim() == 4, op, "weight must be [C_out, C_in/groups, KH, KW], got shape ",
                    shape_str(w.sizes()));
  TORCH_CHECK_VALUE(groups >= 1, op, "groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(padding.size() == 2, op, "padding must have 2 entries, got ",
                    padding.size());
  ConvGeo g;
  g.N = x.size(0);
  g.G = groups;
  g.H = x.size(2);
  g.W = x.size(3);
  g.Ci = w.size(1);
  g.KH = w.size(2);
  g.KW = w.size(3);
  g.ph = padding[0];
  g.pw = padding[1];
  TORCH_CHECK_VALUE(g.Ci >= 1 && g.KH >= 1 && g.KW >= 1, op,
                    "weight must have nonzero C_in/groups and kernel size, got ",
                    shape_str(w.sizes()));
  TORCH_CHECK_VALUE(x.size(1) == groups * g.Ci, op, "x has ", x.size(1),
                    " channels, but weight ", shape_str(w.sizes()), " with groups=", groups,
                    " expects ", groups * g.Ci);
  TORCH_CHECK_VALUE(w.size(0) % groups == 0, op, "weight's C_out ", w.size(0),
                    " is not divisible by groups=", groups);
  g.Co = w.size(0) / groups;
  TORCH_CHECK_VALUE(g.ph >= 0 && g.pw >= 0 && g.ph < g.KH && g.pw < g.KW, op,
                    "padding must be in [0, kernel_size - 1] per dimension, got ",
                    shape_str(padding), " with kernel ", g.KH, "x", g.KW);
  g.Hp = g.H + 2 * g.ph;
  g.Wp = g.W + 2 * g.pw;
  g.Ho = g.Hp - g.KH + 1;
  g.Wo = g.Wp - g.KW + 1;
  TORCH_CHECK_VALUE(g.Ho >= 1 && g.Wo >= 1, op, "the padded input ", g.Hp, "x", g.Wp,
                    " is smaller than the kernel ", g.KH, "x", g.KW);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.size(0), op,
                      "bias must have shape [C_out] = [", w.size(0), "], got ",
                      shape_str(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, "bias must have x's dtype");
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->layout() == at::kStrided, op,
                      "bias must be a dense CPU tensor");
  }
  g.flat = g.Ho * g.Wp;
  g.plen = g.Hp * g.Wp + g.KW;
  return g;
}

at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& w,
                        const std::optional<at::Tensor>& bias, const ConvGeo& g) {
  at::Tensor y = at::empty({g.N, g.G * g.Co, g.Ho, g.Wo}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const std::optional<at::Tensor> bc =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::direct_conv2d", [&] {
    FwdArgs<scalar_t> a{xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                        bc.has_value() ? bc->const_data_ptr<scalar_t>() : nullptr,
                        y.data_ptr<scalar_t>(), g};
    auto fn = pick_build<FwdArgs<scalar_t>>(&fwd_default<scalar_t>, &fwd_avx2<scalar_t>,
                                      &fwd_avx512<scalar_t>);
    const int64_t items = g.N * g.G;
    at::parallel_for(0, items, grain(g.Co * g.flat * g.Ci * g.KH * g.KW, items),
                     [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return y;
}

// ---- ops -------------------------------------------------------------------------

at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t groups,
                             at::IntArrayRef padding) {
  const ConvGeo g = check("scaleinv::direct_conv2d: ", x, weight, bias, groups, padding);
  return forward_impl(x, weight, bias, g);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
direct_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& weight, int64_t groups, at::IntArrayRef padding,
                           std::array<bool, 3> output_mask) {
  const char* op = "scaleinv::direct_conv2d_backward: ";
  const ConvGeo g = check(op, x, weight, std::nullopt, groups, padding);
  const std::vector<int64_t> yshape{g.N, g.G * g.Co, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(yshape), op,
                    "grad_out must have the output's shape ", shape_str(yshape), ", got ",
                    shape_str(grad_out.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op,
                   "grad_out must have x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device().is_cpu() && grad_out.layout() == at::kStrided, op,
                    "grad_out must be a dense CPU tensor");
  const at::Tensor gy = grad_out.contiguous();
  std::optional<at::Tensor> gx, gw, gb;
  if (output_mask[0]) {
    // full convolution of grad_out with w[g*Co + co, ci, ki, kj] seen as
    // wt[g*Ci + ci, co, KH-1-ki, KW-1-kj], padding K-1-p: the input's geometry again.
    const at::Tensor wt = at::flip(
        weight.reshape({g.G, g.Co, g.Ci, g.KH, g.KW}).transpose(1, 2).reshape(
            {g.G * g.Ci, g.Co, g.KH, g.KW}),
        {2, 3});
    const std::vector<int64_t> pad_t{g.KH - 1 - g.ph, g.KW - 1 - g.pw};
    const ConvGeo gt = check(op, gy, wt, std::nullopt, groups, pad_t);
    gx = forward_impl(gy, wt, std::nullopt, gt);
  }
  if (output_mask[1]) {
    gw = at::empty(weight.sizes(), weight.options());
    if (g.N == 0) {
      gw->zero_();
    } else {
      const at::Tensor xc = x.contiguous();
      // padded planes back to back, plus a register block's tail read by the last taps
      at::Tensor xp = at::zeros({g.N * g.G * g.Ci * g.plen + 64}, x.options());
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaleinv::direct_conv2d_backward", [&] {
        PadArgs<scalar_t> pa{xc.const_data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(), g};
        auto pad_fn = pick_build<PadArgs<scalar_t>>(&pad_default<scalar_t>, &pad_avx2<scalar_t>,
                                              &pad_avx512<scalar_t>);
        const int64_t planes = g.N * g.G * g.Ci;
        at::parallel_for(0, planes, grain(g.plen, planes),
                         [&](int64_t lo, int64_t hi) { pad_fn(pa, lo, hi); });
        WgradArgs<scalar_t> a{gy.const_data_ptr<scalar_t>(), xp.const_data_ptr<scalar_t>(),
                              gw->data_ptr<scalar_t>(), g};
        auto fn = pick_build<WgradArgs<scalar_t>>(&wgrad_default<scalar_t>, &wgrad_avx2<scalar_t>,
                                            &wgrad_avx512<scalar_t>);
        const int64_t items = g.G * ((g.Co + kWgradCo - 1) / kWgradCo);
        at::parallel_for(0, items, grain(g.N * g.flat * g.Ci * g.KH * g.KW * kWgradCo, items),
                         [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
      });
    }
  }
  if (output_mask[2]) gb = at::sum(gy, {0, 2, 3});
  return {gx, gw, gb};
}

// ---- autograd (every device: the CUDA kernels are the reference, from Python) ------

using DcFwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t, at::IntArrayRef);
using DcBwdSig =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
        std::array<bool, 3>);

class DirectConvFunction : public torch::autograd::Function<DirectConvFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t groups, at::IntArrayRef padding) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::direct_conv2d", "")
                               .typed<DcFwdSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = op.call(x, weight, bias, groups, padding);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::direct_conv2d_backward", "")
                               .typed<DcBwdSig>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                     at::Tensor()};
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->saved_data["has_bias"].toBool() &&
                                       ctx->needs_input_grad(2)};
    auto [gx, gw, gb] = op.call(grads[0], saved[0], saved[1],
                                ctx->saved_data["groups"].toInt(), padding, mask);
    return {gx.value_or(at::Tensor()), gw.value_or(at::Tensor()), gb.value_or(at::Tensor()),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor direct_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t groups,
                                  at::IntArrayRef padding) {
  return DirectConvFunction::apply(x, weight, bias, groups, padding);
}

}  // namespace

TORCH_LIBRARY_IMPL(scaleinv, CPU, m) {
  m.impl("direct_conv2d", &direct_conv2d_cpu);
  m.impl("direct_conv2d_backward", &direct_conv2d_backward_cpu);
}

TORCH_LIBRARY_IMPL(scaleinv, Autograd, m) {
  m.impl("direct_conv2d", &direct_conv2d_autograd);
}

}  // namespace scaleinv
