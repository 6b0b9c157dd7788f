// Fused GroupNorm -> ReLU -> MaxPool2d(2) over NCHW, forward and backward, on CPU: the
// driver and registration of scaleinv::gn_act_pool (contract:
// scaleinv_kernels/ops/gn_act.py), over the same per-plane kernels as BatchNorm
// (norm_common.h, window_kernels.h, norm_windows.h).
//
// Statistics per (sample n, group of C/G channels): a group's planes are one contiguous
// run of x, so a task takes whole (n, group) blocks: the block's statistics (x from
// memory), then normalize/ReLU/pool of its planes (x from L1/L2); the backward likewise:
// per-plane sums, the group's weighted totals, then dx. The per-plane sums are kept
// ([N, C, 2]) for grad_weight/grad_bias, which sum them over n afterwards in a fixed order.
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

template <typename T, int W>
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
      plane_forward<T, W>(a.x, a.out, a.ind, g, n, c, alpha, beta);
    }
  }
}

// a: BwdArgs in GroupNorm mode (gn_groups = G, training, from_out = nullptr); psums
// [N, C, 2] receives each plane's sum(g), sum(g * (x - mean)).
template <typename T, int W>
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
      plane_sums<T, W>(a, n * g.C + c, ps);
      const double wc = a.w ? static_cast<double>(a.w[c]) : 1.0;
      A += wc * ps[0];
      B += wc * ps[1];
    }
    // dx = invstd * (w g - A/cnt - xhat * B * invstd / cnt), xhat = (x - mean) * invstd
    const T k0 = static_cast<T>(-invstd * A / cnt);
    const T k2 = static_cast<T>(-invstd * invstd * invstd * B / cnt);
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      const double wc = a.w ? static_cast<double>(a.w[c]) : 1.0;
      plane_dx<T, W>(a, n, c, static_cast<T>(invstd * wc), k0, k2);
    }
  }
}

// ---- instruction-set builds (see bn_act.cpp) ---------------------------------------

SCALEINV_ISA_CLONES_W(gn_fwd_blocks, GnFwdArgs, gn_forward_blocks)
SCALEINV_ISA_CLONES_W(gn_bwd_blocks, BwdArgs, gn_backward_blocks)

// ---- ops -------------------------------------------------------------------------

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
  m.impl("gn_act_pool", &gn_act_pool_cpu);
  m.impl("gn_act_pool_backward", &gn_act_pool_backward_cpu);
}

}  // namespace norm
}  // namespace scaleinv
