// The one place where the scaleinv operator schemas live. Backends register
// implementations elsewhere: C++ CPU kernels with TORCH_LIBRARY_IMPL in their own
// files, the Triton CUDA kernels from Python (scaleinv_kernels/ops/*.py).
#include <torch/library.h>

TORCH_LIBRARY(scaleinv, m) {
  // Fused SGD + coupled weight decay + momentum over a list of tensors, with the
  // per-segment sums sum(w^2), sum(g^2), sum(w*g), sum(D^2), sum(w*D), #nonfinite(g)
  // (D = w_new - w_old) accumulated into rows of `stats` in the same pass.
  // `segment_hparams` (float64 [sum(segments), 2]) optionally gives every segment its
  // own (lr, weight_decay), overriding lr/lr_tensor and weight_decay.
  // See scaleinv_kernels/ops/sgd_wd.py for the full contract.
  m.def(
      "sgd_wd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "bool[] fresh_buffers, Tensor(c!) stats, int[] stats_rows, int[] segments, "
      "Tensor? lr_tensor, Tensor? segment_hparams, float lr, float weight_decay, float momentum, float dampening, "
      "bool nesterov, bool maximize) -> ()");

  // Fused BatchNorm (training: batch statistics over (N, H, W); eval: the given mean and
  // invstd) -> ReLU (if relu) -> 2x2 max pool (if pool == 2) over NCHW; `index` holds the
  // argmax's position 0..3 in each window (uint8, empty without pool).
  // See scaleinv_kernels/ops/norm_act.py for the full contract.
  m.def(
      "bn_act_pool(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, "
      "float eps, bool relu, int pool) -> (Tensor out, Tensor save_mean, Tensor save_invstd, "
      "Tensor index)");
  m.def(
      "bn_act_pool_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, "
      "Tensor save_invstd, Tensor out, Tensor index, bool training, bool relu, int pool, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor? grad_weight, Tensor? grad_bias)");

  // Fused GroupNorm (statistics per sample and group of C/groups channels, always from
  // the batch; save_mean/save_invstd are [N, groups]) -> ReLU -> 2x2 max pool, with the
  // window kernels of bn_act_pool. See scaleinv_kernels/ops/gn_act.py.
  m.def(
      "gn_act_pool(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool relu, "
      "int pool) -> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor index)");
  m.def(
      "gn_act_pool_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, Tensor out, Tensor index, int groups, bool relu, int pool, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor? grad_weight, Tensor? grad_bias)");

  // An input layer fused: grouped convolution (stride 1, dilation 1, zero padding < kernel,
  // no bias, K = C_in/groups * KH * KW <= 32 taps) -> BatchNorm (training: batch statistics
  // of the convolution's output; eval: the given mean and invstd) -> ReLU (if relu) -> 2x2
  // max pool; the convolution's output is never stored. `moments` (float64 [groups, K, K+1]
  // in training, [0] in eval) holds each group's patch Gram matrix and patch sum, from
  // which the statistics and the backward's grad_conv_weight follow. No gradient for x.
  // See scaleinv_kernels/ops/conv_norm_act.py for the full contract.
  m.def(
      "conv_bn_act_pool(Tensor x, Tensor conv_weight, int groups, int[2] padding, "
      "Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, float eps, bool relu) "
      "-> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor index, Tensor moments)");
  m.def(
      "conv_bn_act_pool_backward(Tensor grad_out, Tensor x, Tensor conv_weight, int groups, "
      "int[2] padding, Tensor? weight, Tensor save_mean, Tensor save_invstd, Tensor out, "
      "Tensor index, Tensor moments, bool training, bool relu, bool[3] output_mask) "
      "-> (Tensor? grad_conv_weight, Tensor? grad_weight, Tensor? grad_bias)");

  // Direct grouped 2-D convolution, stride 1, dilation 1, zero padding <= kernel - 1,
  // for few input channels per group (an ensemble's first convolution); same result as
  // F.conv2d(x, weight, bias, 1, padding, 1, groups).
  // See scaleinv_kernels/ops/direct_conv.py for the full contract.
  m.def(
      "direct_conv2d(Tensor x, Tensor weight, Tensor? bias, int groups, int[2] padding) "
      "-> Tensor");
  m.def(
      "direct_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int groups, "
      "int[2] padding, bool[3] output_mask) -> (Tensor? grad_x, Tensor? grad_weight, "
      "Tensor? grad_bias)");
}

// An importable (empty) Python module, so that `import scaleinv_kernels._C` loads this
// library and runs the registrations above; no Python bindings are needed beyond that.
#include <Python.h>
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
