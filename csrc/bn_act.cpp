// Fused BatchNorm (train or eval) -> ReLU -> MaxPool2d(2) over NCHW, forward and
// backward, on CPU: the driver and registration of scaleinv::bn_act_pool (contract:
// scaleinv_kernels/ops/norm_act.py). The per-plane kernels are in norm_common.h,
// window_kernels.h and norm_windows.h; GroupNorm mode is gn_act.cpp.
//
// Work layout: at::parallel_for over groups of consecutive channels. For each n a group's
// planes are one contiguous run of >= 16 KiB (walking one channel at a time reads short
// runs far apart for small planes, which the hardware prefetchers do not follow), and a
// whole group (N runs) is <= 1 MiB, so it is still in L2 for the second pass:
//   forward  (training): statistics of the group (x from memory), then normalize/ReLU/
//                        pool (x from L2) writing out (1/4) and the uint8 window index;
//   backward (training): sums over the pooled positions (grad_out, index and out: x̂ is
//                        recovered from out, see XhatSource; x only on ill-conditioned
//                        channels), then dx (x, and the small tensors from L2).
// Eval mode needs no statistics: the forward runs over (n, c) planes in memory order.
//
// Statistics are accumulated in fp64 (shifted by the channel's first element, so the
// single-pass variance does not cancel), as torch's CPU batch norm accumulates in fp64;
// each channel is summed by one thread in a fixed order (deterministic for a given build:
// the vector width sets the order of the lanes' partial sums).
// Portable, AVX2 and AVX-512 builds of the same code are picked at run time from ATen's
// CPU capability (no -march flags needed).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "norm_common.h"

namespace scaleinv {
namespace norm {
namespace {

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
// still deterministic). Measured on planes up to 6x6 this is faster; at 7x7 the plane
// loops win again, hence the bound of 36 float32 values per plane.
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
template <typename T, int W>
NA_INLINE void forward_planes(const FwdArgs<T>& a, int64_t p0, int64_t p1);

template <typename T, int W>
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
    for (int64_t n = 0; n < g.N; ++n) forward_planes<T, W>(a, n * g.C + c0, n * g.C + c1);
  }
}

template <typename T, int W>
NA_INLINE void forward_planes(const FwdArgs<T>& a, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / a.g.C, c = p % a.g.C;
    T alpha, beta;
    affine(a, c, a.mean_in[c], a.invstd_in[c], &alpha, &beta);
    plane_forward<T, W>(a.x, a.out, a.ind, a.g, n, c, alpha, beta);
  }
}

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
template <typename T, int W>
NA_INLINE void dx_planes(const BwdArgs<T>& a, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % a.g.C;
    T scale, k0, k2;
    dx_coefficients(a, c, &scale, &k0, &k2);
    plane_dx<T, W>(a, p / a.g.C, c, scale, k0, k2);
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
template <typename T, int W>
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
        for (int64_t c = c0; c < c1; ++c) plane_sums<T, W>(a, n * g.C + c, a.sums + 2 * c);
      for (int64_t c = c0; c < c1; ++c) a.sums[2 * c + 1] *= a.post[c];
    }
#ifdef NA_HAVE_AVX512_KERNELS
    constexpr bool kCanStream = std::is_same_v<T, float>;
#else
    constexpr bool kCanStream = false;
#endif
    if (!(kCanStream && a.stream)) {
      for (int64_t n = 0; n < g.N; ++n) dx_planes<T, W>(a, n * g.C + c0, n * g.C + c1);
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
        dx_planes<T, W>(s, n * g.C + c0, n * g.C + c1);
        stream_copy_f32(a.dx + (n * g.C + c0) * g.HW, stage.data(), (c1 - c0) * g.HW);
      }
    }
#endif
  }
#ifdef NA_HAVE_AVX512_KERNELS
  if (a.stream) store_fence();  // order the streamed lines before the task ends
#endif
}

// ---- instruction-set builds ------------------------------------------------------
// Whole functions with a target attribute (the always_inline bodies above are compiled
// into each, with the build's vector lanes); the one matching ATen's CPU capability runs.

SCALEINV_ISA_CLONES_W(fwd_groups, FwdArgs, forward_groups)
SCALEINV_ISA_CLONES_W(fwd_planes, FwdArgs, forward_planes)
SCALEINV_ISA_CLONES_W(bwd_groups, BwdArgs, backward_groups)

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

}  // namespace

TORCH_LIBRARY_IMPL(scaleinv, CPU, m) {
  m.impl("bn_act_pool", &bn_act_pool_cpu);
  m.impl("bn_act_pool_backward", &bn_act_pool_backward_cpu);
}

}  // namespace norm
}  // namespace scaleinv
