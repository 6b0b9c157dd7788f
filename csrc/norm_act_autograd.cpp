// Autograd of scaleinv::bn_act_pool (and gn_act_pool, conv_bn_act_pool below), in C++ for every device: the forward runs the op's
// device kernel (C++ on CPU, the Triton kernel registered from Python on CUDA) below
// autograd and saves x, weight, bias, the statistics, out and the window index; the backward
// runs scaleinv::bn_act_pool_backward. The same contract as the Python
// torch.library.register_autograd version it replaces, without its per-call Python cost
// (~0.1 ms per forward + backward, most of the op's time on small shapes).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace scaleinv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, int64_t);
using BwdSig = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, bool, int64_t, std::array<bool, 3>);

// Shared by both norms: the forward's outputs saved as [x, weight, save_mean, save_invstd,
// out, index, bias] (undefined tensors for a missing weight/bias), the flags that say
// which were given, and no zero-filled grads for the non-differentiable outputs.
void save_for_norm_backward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                            const at::Tensor& save_invstd, const at::Tensor& out,
                            const at::Tensor& index, bool relu, int64_t pool) {
  ctx->save_for_backward({x, weight.value_or(at::Tensor()), save_mean, save_invstd, out, index,
                          bias.value_or(at::Tensor())});
  ctx->saved_data["relu"] = relu;
  ctx->saved_data["pool"] = pool;
  ctx->saved_data["has_weight"] = weight.has_value();
  ctx->saved_data["has_bias"] = bias.has_value();
  ctx->mark_non_differentiable({save_mean, save_invstd, index});
  // Undefined grads stay undefined: by default autograd would zero-fill one for each of
  // the three outputs above (the index alone is E/4 bytes) on every backward.
  ctx->set_materialize_grads(false);
}

// What a norm's backward op needs besides the saved tensors.
struct NormBackwardInputs {
  std::optional<at::Tensor> weight, bias;
  std::array<bool, 3> mask;  // grad x always; grad weight/bias where given and needed
  at::Tensor grad_out;
};

NormBackwardInputs norm_backward_inputs(AutogradContext* ctx, const variable_list& saved,
                                        const variable_list& grads) {
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  NormBackwardInputs in;
  if (has_weight) in.weight = saved[1];
  if (has_bias) in.bias = saved[6];
  // needs_input_grad counts the tensor inputs given (x, then weight and bias where present):
  // with bias but no weight, bias is input 1
  in.mask = {true, has_weight && ctx->needs_input_grad(1),
             has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
  // grad_out is undefined when only the non-differentiable outputs were used
  in.grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(saved[4]);
  return in;
}

class BnActPoolFunction : public torch::autograd::Function<BnActPoolFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& invstd, double eps, bool relu,
                               int64_t pool) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::bn_act_pool", "")
                               .typed<FwdSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd, index] =
        op.call(x, weight, bias, mean, invstd, eps, relu, pool);
    save_for_norm_backward(ctx, x, weight, bias, save_mean, save_invstd, out, index, relu,
                           pool);
    ctx->saved_data["training"] = !mean.has_value();
    return {out, save_mean, save_invstd, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::bn_act_pool_backward", "")
                               .typed<BwdSig>();
    const variable_list saved = ctx->get_saved_variables();
    const NormBackwardInputs in = norm_backward_inputs(ctx, saved, grads);
    auto [gx, gw, gb] =
        op.call(in.grad_out, saved[0], in.weight, in.bias, saved[2], saved[3], saved[4],
                saved[5], ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
                ctx->saved_data["pool"].toInt(), in.mask);
    return {gx,           gw.value_or(at::Tensor()), gb.value_or(at::Tensor()), at::Tensor(),
            at::Tensor(), at::Tensor(),              at::Tensor(),              at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_pool_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, double eps, bool relu, int64_t pool) {
  const variable_list out =
      BnActPoolFunction::apply(x, weight, bias, mean, invstd, eps, relu, pool);
  return {out[0], out[1], out[2], out[3]};
}

// scaleinv::gn_act_pool: the same pattern (GroupNorm has no eval mode and no running
// statistics; save_mean/save_invstd are [N, groups]).
using GnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    int64_t, double, bool, int64_t);
using GnBwdSig = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, int64_t,
    std::array<bool, 3>);

class GnActPoolFunction : public torch::autograd::Function<GnActPoolFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, int64_t groups, double eps,
                               bool relu, int64_t pool) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::gn_act_pool", "")
                               .typed<GnFwdSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd, index] = op.call(x, weight, bias, groups, eps, relu, pool);
    save_for_norm_backward(ctx, x, weight, bias, save_mean, save_invstd, out, index, relu,
                           pool);
    ctx->saved_data["groups"] = groups;
    return {out, save_mean, save_invstd, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::gn_act_pool_backward", "")
                               .typed<GnBwdSig>();
    const variable_list saved = ctx->get_saved_variables();
    const NormBackwardInputs in = norm_backward_inputs(ctx, saved, grads);
    auto [gx, gw, gb] =
        op.call(in.grad_out, saved[0], in.weight, saved[2], saved[3], saved[4], saved[5],
                ctx->saved_data["groups"].toInt(), ctx->saved_data["relu"].toBool(),
                ctx->saved_data["pool"].toInt(), in.mask);
    return {gx,           gw.value_or(at::Tensor()), gb.value_or(at::Tensor()), at::Tensor(),
            at::Tensor(), at::Tensor(),              at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_act_pool_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t groups, double eps, bool relu, int64_t pool) {
  const variable_list out = GnActPoolFunction::apply(x, weight, bias, groups, eps, relu, pool);
  return {out[0], out[1], out[2], out[3]};
}

// scaleinv::conv_bn_act_pool: differentiable in conv_weight, weight and bias; it computes
// no gradient for x (an input layer's x is data), so an x that requires grad is refused
// here, before anything runs, instead of silently getting none.
using CbFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, int64_t, c10::IntArrayRef,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool);
using CbBwdSig =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::IntArrayRef,
        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool,
        std::array<bool, 3>);

class ConvBnActPoolFunction : public torch::autograd::Function<ConvBnActPoolFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& conv_weight, int64_t groups,
                               c10::IntArrayRef padding, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& invstd, double eps, bool relu) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::conv_bn_act_pool", "")
                               .typed<CbFwdSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd, index, moments] =
        op.call(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps, relu);
    ctx->save_for_backward({x, conv_weight, weight.value_or(at::Tensor()), save_mean,
                            save_invstd, out, index, moments});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["training"] = !mean.has_value();
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({save_mean, save_invstd, index, moments});
    ctx->set_materialize_grads(false);
    return {out, save_mean, save_invstd, index, moments};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("scaleinv::conv_bn_act_pool_backward", "")
                               .typed<CbBwdSig>();
    const variable_list saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::optional<at::Tensor> weight;
    if (has_weight) weight = saved[2];
    // needs_input_grad counts the tensor inputs given: x, conv_weight, then weight and
    // bias where present
    const std::array<bool, 3> mask = {ctx->needs_input_grad(1),
                                      has_weight && ctx->needs_input_grad(2),
                                      has_bias && ctx->needs_input_grad(has_weight ? 3 : 2)};
    const at::Tensor grad_out =
        grads[0].defined() ? grads[0].contiguous() : at::zeros_like(saved[5]);
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    auto [gcw, gw, gb] =
        op.call(grad_out, saved[0], saved[1], ctx->saved_data["groups"].toInt(), padding,
                weight, saved[3], saved[4], saved[5], saved[6], saved[7],
                ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(), mask);
    variable_list out(10);
    out[1] = gcw.value_or(at::Tensor());
    out[4] = gw.value_or(at::Tensor());
    out[5] = gb.value_or(at::Tensor());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_pool_autograd(
    const at::Tensor& x, const at::Tensor& conv_weight, int64_t groups, c10::IntArrayRef padding,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd, double eps,
    bool relu) {
  TORCH_CHECK_VALUE(!(x.requires_grad() && at::GradMode::is_enabled()),
                    "scaleinv::conv_bn_act_pool: x requires grad, but this op computes no "
                    "gradient for its input (it is an input layer's fusion); use "
                    "direct_conv2d/F.conv2d followed by bn_act_pool there");
  const variable_list out = ConvBnActPoolFunction::apply(x, conv_weight, groups, padding, weight,
                                                         bias, mean, invstd, eps, relu);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(scaleinv, Autograd, m) {
  m.impl("bn_act_pool", &bn_act_pool_autograd);
  m.impl("gn_act_pool", &gn_act_pool_autograd);
  m.impl("conv_bn_act_pool", &conv_bn_act_pool_autograd);
}

}  // namespace scaleinv
