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
// zero-padded planes (conv_patch.h); the float32 kernels read them split into even and odd
// columns, so the candidate values of W windows for one tap are one contiguous load.
//
// Files: conv_patch.h (geometry, padded planes), conv_moments.h (the statistics pass),
// conv_pool_kernels.h (the plane kernels over VecF<W>, every build; float64 loops),
// conv_pool_avx512.h (their AVX-512 intrinsics twins, the AVX-512 build's float32 path),
// this file (work items, ISA builds, validation, the ops and the closed-form weight
// gradient).
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
#include "conv_moments.h"
#include "conv_patch.h"
#include "conv_pool_avx512.h"
#include "conv_pool_kernels.h"
#include "cpu_isa.h"
#include "window_kernels.h"

namespace scaleinv {
namespace {

using namespace cna;  // NOLINT: the kernels of this op

// Samples per work item of the moments pass (items: groups x chunks of samples).
constexpr int64_t kMomentChunk = 32;

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

// Items [i0, i1): (sample, group). float32: the vector kernels (the AVX-512 intrinsics
// ones in the AVX-512 build, VecF<W> ones elsewhere); float64: conv rows + window kernel.
template <typename T, int W>
CN_INLINE void forward_items(const FwdArgs<T>& a, int64_t i0, int64_t i1) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const CbGeo& g = a.g;
  const int variant = tap_variant(g);
  std::vector<T> xp(g.Ci * g.Hp * g.Wp), buf;
  std::vector<T> eo(f32 ? g.Ci * g.Hp * 2 * g.Ls : 0);
  if (!f32) buf.resize(2 * g.pool.Ho * g.Wc);
#ifdef NA_HAVE_AVX512_KERNELS
  const bool avx512 = f32 && use_avx512_kernels();
  const ConvPoolPlanesFn pair_fn = avx512 ? conv_pool_planes_for(g, true) : nullptr;
  const ConvPoolPlanesFn one_fn = avx512 ? conv_pool_planes_for(g, false) : nullptr;
#endif
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t n = item / g.G, grp = item % g.G;
    pad_planes(a.x, g, n, grp, xp.data());
    if (f32) split_columns(xp.data(), g, eo.data());
    for (int64_t co = 0; co < g.Co; ++co) {
      const int64_t c = grp * g.Co + co, plane = n * g.C + c;
      T* out = a.out + plane * g.pool.HWo;
      uint8_t* ind = a.ind + plane * g.pool.HWo;
      if constexpr (f32) {
        const bool pair = co + 1 < g.Co;  // channels co and co+1 in one pass
#ifdef NA_HAVE_AVX512_KERNELS
        if (avx512) {
          (pair ? pair_fn : one_fn)(eo.data(), a.cw + c * g.K, a.alpha + c, a.beta + c, out,
                                    ind, g.pool.HWo, g);
          co += pair;
          continue;
        }
#endif
        conv_pool_planes_f32<W>(variant, pair, eo.data(), a.cw + c * g.K, a.alpha + c,
                                a.beta + c, out, ind, g.pool.HWo, g);
        co += pair;
      } else {
        conv_rows(xp.data(), a.cw + c * g.K, g, buf.data());
        plane_forward_at(buf.data(), out, ind, g.pool, a.alpha[c], a.beta[c]);
      }
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

// Items [i0, i1): (group, block of `per` channels); samples in order, so each channel's
// sums are added by one thread in a fixed order.
template <typename T, int W>
CN_INLINE void backward_items(const BwdArgs<T>& a, int64_t i0, int64_t i1) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const CbGeo& g = a.g;
  const int variant = tap_variant(g);
  const int64_t blocks = (g.Co + a.per - 1) / a.per;
  std::vector<T> xp(g.Ci * g.Hp * g.Wp);
  std::vector<T> eo(f32 ? g.Ci * g.Hp * 2 * g.Ls : 0);
#ifdef NA_HAVE_AVX512_KERNELS
  const bool avx512 = f32 && use_avx512_kernels();
  const SumsPlaneFn plane_fn = avx512 ? sums_plane_for(g) : nullptr;
#endif
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t grp = item / blocks, co0 = (item % blocks) * a.per;
    const int64_t co1 = std::min(g.Co, co0 + a.per);
    for (int64_t n = 0; n < g.N; ++n) {
      pad_planes(a.x, g, n, grp, xp.data());
      if (f32) split_columns(xp.data(), g, eo.data());
      for (int64_t co = co0; co < co1; ++co) {
        const int64_t c = grp * g.Co + co, off = (n * g.C + c) * g.pool.HWo;
        double* s = a.sums + c * (g.K + 2);
        if constexpr (f32) {
#ifdef NA_HAVE_AVX512_KERNELS
          if (avx512) {
            plane_fn(eo.data(), a.cw + c * g.K, a.mean[c], a.invstd[c], a.gout + off,
                     a.out + off, a.ind + off, g, s);
            continue;
          }
#endif
          sums_plane_f32<W>(variant, eo.data(), a.cw + c * g.K, a.mean[c], a.invstd[c],
                            a.gout + off, a.out + off, a.ind + off, g, s);
        } else {
          sums_plane(xp.data(), a.cw + c * g.K, a.mean[c], a.invstd[c], a.gout + off,
                     a.out + off, a.ind + off, g, s);
        }
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

SCALEINV_ISA_CLONES_W(fwd_items, FwdArgs, forward_items)
SCALEINV_ISA_CLONES_W(bwd_items, BwdArgs, backward_items)
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
