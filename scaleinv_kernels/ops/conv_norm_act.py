"""``scaleinv::conv_bn_act_pool`` — an ensemble's input layer fused: conv → BatchNorm → ReLU
→ MaxPool2d(2), forward and backward, without materialising the convolution's output.

The first layer of an ensemble of M CNNs convolves 1 (grey) or 3 (RGB) input channels per
member (a grouped convolution, groups = M) and its output y is the largest activation of
the step; unfused, y is written by the convolution, read by BatchNorm's forward and
backward, and its gradient written and read again by the convolution's weight gradient.
With so few input channels y is cheap to recompute, and everything BatchNorm needs from it
follows from small per-group moments of the input patches:

* with K = C_in·KH·KW taps, every output is a dot product ``y[pos] = W_c·p_pos``, p_pos the
  zero-padded K-patch of the group's input at pos and W_c channel c's filter as a K-vector;
* so over the cnt = N·Hc·Wc positions of a group, with ``S = Σ p_pos`` (K) and
  ``G = Σ p_pos p_posᵀ`` (K×K) in float64: ``mean_c = W_c·S/cnt`` and
  ``E[y²]_c = W_cᵀ G W_c/cnt`` — the training statistics without y;
* the backward's gradient g lives only at each window's argmax, so with ``s1 = Σ g``,
  ``s2 = Σ g·x̂`` and the routed patch sum ``A_c = Σ g[pos]·p_pos``, and because
  ``Σ x̂[pos]·p_pos = invstd·(G W_c − mean·S)``, ``scale = w·invstd``:
  training ``grad_conv_weight_c = scale·(A_c − (s1/cnt)·S − (s2/cnt)·invstd·(G W_c −
  mean·S))``, eval ``scale·A_c`` — no dense dy either.

Contract (same for every backend)::

    conv_bn_act_pool(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps, relu)
        -> (out, save_mean, save_invstd, index, moments)

* ``x``: float32 or float64 ``[N, groups·C_in, H, W]``, any strides; ``conv_weight``:
  ``[groups·C_out, C_in, KH, KW]``, x's dtype and device. The convolution has stride 1,
  dilation 1, zero padding ``(ph, pw)`` with ``0 <= ph < KH``, ``0 <= pw < KW``, and no
  bias (BatchNorm in training cancels one; the ensemble fuses only bias-free convs).
  ``K = C_in·KH·KW <= 32``. Its output ``[N, C, Hc, Wc]`` (C = groups·C_out,
  Hc = H + 2ph − KH + 1, Wc likewise) needs ``Hc, Wc >= 2`` for the pool. N may be 0 in
  eval (empty outputs); training needs N·Hc·Wc > 1.
* Then exactly ``bn_act_pool(y, weight, bias, mean, invstd, eps, relu, pool=2)`` on
  ``y = F.conv2d(x, conv_weight, None, 1, padding, 1, groups)``
  (:mod:`scaleinv_kernels.ops.norm_act`): ``weight``/``bias`` optional ``[C]``;
  ``mean``/``invstd`` both given (eval) or both None (training: batch statistics of y,
  biased variance); ``out`` ``[N, C, Hc//2, Wc//2]``; ``index`` uint8, the position 0..3
  (row-major) of each window's max among the post-ReLU values, torch's first-max rule;
  ``save_mean``/``save_invstd`` ``[C]`` of x's dtype (the batch statistics in training,
  copies of the given ones in eval).
* ``moments``: training: float64 ``[groups, K, K+1]``, ``[:, :, :K] = G`` and
  ``[:, :, K] = S`` of each group over all Hc×Wc positions (also an odd last row/column
  the pool drops: the statistics cover the whole conv output), taps in the order
  ``t = (ci·KH + ky)·KW + kx`` of ``conv_weight.view(C, K)``; eval: an empty float64
  ``[0]``.

::

    conv_bn_act_pool_backward(grad_out, x, conv_weight, groups, padding, weight, save_mean,
                              save_invstd, out, index, moments, training, relu, output_mask)
        -> (grad_conv_weight, grad_weight, grad_bias)

* ``grad_out``, ``out``, ``index``, ``moments`` and the statistics are the forward's;
  g = grad_out routed to each window's argmax, 0 where ``out <= 0`` when ``relu``.
* ``grad_conv_weight`` as above (``[C, C_in, KH, KW]``), ``grad_weight = s2``,
  ``grad_bias = s1`` (``[C]``); each only where ``output_mask`` ([conv_weight, weight,
  bias]) asks for it, else None; ``grad_weight`` is None also without a ``weight``.
* There is no gradient for x: the op is for a network's input. The layer
  (:func:`conv_bn_act_pool`) and the op's autograd refuse an x that requires grad.

Bad input raises ``ValueError``/``TypeError`` naming the argument; nothing is mutated.

Backends: C++ on CPU (``csrc/conv_norm_act.cpp``; autograd in C++ for every device,
``csrc/norm_act_autograd.cpp``). CUDA: no kernel of its own, by decision (as for
``direct_conv2d``): there the convolution's output is cheap to store and cuDNN is fast, so
the op runs the materialised path — cuDNN's convolution, the Triton ``bn_act_pool``
forward (when Triton is installed) and :func:`patch_moments`; its backward is
:func:`conv_bn_act_pool_backward_torch` (the Triton ``bn_act_pool`` backward takes x̂ from
``out`` through the bias, which this op's backward is not given). Names follow the rule
of :mod:`scaleinv_kernels.ops.norm_common`: the ``*_torch`` functions are the contract in
torch ops (float64 statistics and sums), the oracle of the op-level tests;
:func:`conv_bn_act_pool_triton` is the CUDA forward with triton (cuDNN, then the Triton
``bn_act_pool`` forward); :func:`conv_bn_act_pool_reference` is the unfused layers
(``F.conv2d`` → ``F.batch_norm`` → ``relu`` → ``max_pool2d``) and
:func:`conv_bn_act_pool` the layer the ensemble calls (it also updates the running
statistics, with :func:`~scaleinv_kernels.ops.norm_common.update_running_stats`).

Registration: the schema lives in C++ (``csrc/registration.cpp``), so the op is a
registered custom op with a fake kernel, not a ``torch.library.triton_op``; its CUDA
kernels are registered through
:func:`~scaleinv_kernels.ops.registry.register_cuda_kernel`, and its only Triton launches,
those of the ``bn_act_pool`` forward, are wrapped by ``torch.library.wrap_triton``
(:func:`~scaleinv_kernels.ops.registry.launch_triton`). Without triton the CUDA forward is
:func:`conv_bn_act_pool_torch`, which says so once in the log, with the fix
(``pip install triton``); the CUDA backward is :func:`conv_bn_act_pool_backward_torch`
either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv_kernels._extension import extension_loaded, log_once, triton_available
from scaleinv_kernels.ops import direct_conv as dc
from scaleinv_kernels.ops.norm_act import (
    bn_act_pool_backward_torch,
    bn_act_pool_reference,
    bn_act_pool_torch,
    bn_act_pool_triton,
)
from scaleinv_kernels.ops.norm_common import (
    empty_outputs,
    running_stats_args,
    torch_cuda_fallback,
    update_running_stats,
    validate_bn,
)
from scaleinv_kernels.ops.registry import register_cuda_kernel

OP = "scaleinv::conv_bn_act_pool"
MAX_TAPS = 32  # K = C_in·KH·KW; the C++ kernel keeps a patch in registers
MOMENTS_CHUNK_BYTES = 32 << 20  # float64 patches unfolded at a time by patch_moments

# ----------------------------------------------------------------------------------
# validation (the C++ kernel checks the same things)
# ----------------------------------------------------------------------------------


def _padding_pair(padding: int | tuple[int, int] | list[int], op: str) -> list[int]:
    """An int pads both dimensions; else exactly 2 ints."""
    if isinstance(padding, int) and not isinstance(padding, bool):
        return [padding, padding]
    if not isinstance(padding, (tuple, list)) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in padding):
        raise TypeError(f"{op}padding must be an int or 2 ints, got {padding!r}")
    return list(padding)


def conv_geometry(x: Tensor, conv_weight: Tensor, padding: list[int]
                  ) -> tuple[int, int, int, int]:
    """``(C, K, Hc, Wc)``: channels and taps of the convolution, its output plane."""
    c, cin, kh, kw = conv_weight.shape
    return (c, cin * kh * kw, x.shape[2] + 2 * padding[0] - kh + 1,
            x.shape[3] + 2 * padding[1] - kw + 1)


def validate_conv(x: Tensor, conv_weight: Tensor, groups: int, padding: list[int],
                  op: str = "scaleinv::conv_bn_act_pool: ") -> None:
    """The convolution's checks: tensors, dtype, device, geometry, taps, output >= 2×2."""
    for name, t in (("x", x), ("conv_weight", conv_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}{name} must be a Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{op}{name} must be a dense (strided) tensor, got {t.layout}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}groups must be an int, got {groups!r}")
    if x.dtype in dc.SUPPORTED_DTYPES and conv_weight.dtype != x.dtype:
        raise TypeError(f"{op}conv_weight must have x's dtype {x.dtype}, got "
                        f"{conv_weight.dtype}")
    dc.validate(x, conv_weight, None, groups, padding, op)
    if conv_weight.shape[0] == 0:
        raise ValueError(f"{op}conv_weight has no output channels, shape "
                         f"{list(conv_weight.shape)}")
    if conv_weight.device != x.device:
        raise ValueError(f"{op}conv_weight is on {conv_weight.device} but x is on {x.device}")
    _, k, hc, wc = conv_geometry(x, conv_weight, padding)
    if k > MAX_TAPS:
        raise ValueError(f"{op}C_in/groups·KH·KW = {k} taps, at most {MAX_TAPS} are "
                         "supported; use direct_conv2d (or F.conv2d) followed by bn_act_pool")
    if hc < 2 or wc < 2:
        raise ValueError(f"{op}the convolution's output {hc}x{wc} is smaller than the 2x2 "
                         f"pool window (x {list(x.shape)}, kernel {list(conv_weight.shape[2:])}"
                         f", padding {list(padding)})")


def _conv_out_like(x: Tensor, conv_weight: Tensor, padding: list[int]) -> Tensor:
    """A stand-in for y with its shape, dtype and device and no storage (for the checks
    and the output shapes of bn_act_pool, which are those of y)."""
    c, _, hc, wc = conv_geometry(x, conv_weight, padding)
    return x.new_empty(()).expand(x.shape[0], c, hc, wc)


def validate_forward(x: Tensor, conv_weight: Tensor, groups: int, padding: list[int],
                     weight: Tensor | None, bias: Tensor | None, mean: Tensor | None,
                     invstd: Tensor | None, eps: float,
                     op: str = "scaleinv::conv_bn_act_pool: ") -> None:
    """Raise ValueError/TypeError naming the offending argument."""
    validate_conv(x, conv_weight, groups, padding, op)
    _validate_norm(x, conv_weight, padding, weight, bias, mean, invstd, eps, op)


def _validate_norm(x: Tensor, conv_weight: Tensor, padding: list[int], weight: Tensor | None,
                   bias: Tensor | None, mean: Tensor | None, invstd: Tensor | None,
                   eps: float, op: str) -> None:
    """The BatchNorm part's checks on the convolution's output (after validate_conv)."""
    _, _, hc, wc = conv_geometry(x, conv_weight, padding)
    if mean is None and invstd is None and x.shape[0] * hc * wc <= 1:
        raise ValueError(f"{op}training needs more than 1 value per channel (N·Hc·Wc > 1), "
                         f"got N = {x.shape[0]} with a {hc}x{wc} convolution output; give "
                         "mean and invstd (eval) for an empty batch")
    validate_bn(_conv_out_like(x, conv_weight, padding), weight, bias, mean, invstd, eps, 2,
                op)


def validate_backward(grad_out: Tensor, x: Tensor, conv_weight: Tensor, groups: int,
                      padding: list[int], weight: Tensor | None, save_mean: Tensor,
                      save_invstd: Tensor, out: Tensor, index: Tensor, moments: Tensor,
                      training: bool) -> None:
    """The backward's checks: the forward's, and its outputs as the forward made them."""
    op = "scaleinv::conv_bn_act_pool_backward: "
    validate_forward(x, conv_weight, groups, padding, weight, None, save_mean, save_invstd,
                     0.0, op)
    c, k, hc, wc = conv_geometry(x, conv_weight, padding)
    shape = (x.shape[0], c, hc // 2, wc // 2)
    for name, t, dtype in (("grad_out", grad_out, x.dtype), ("out", out, x.dtype),
                           ("index", index, torch.uint8)):
        if not isinstance(t, Tensor) or t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{op}{name} must be {dtype} of the output's shape "
                             f"{list(shape)}, got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{list(getattr(t, 'shape', []))}")
    if training and (moments.dtype != torch.float64 or moments.shape != (groups, k, k + 1)):
        raise ValueError(f"{op}training: moments must be the forward's float64 [groups, K, "
                         f"K+1] = {[groups, k, k + 1]}, got {moments.dtype} "
                         f"{list(moments.shape)}")


# ----------------------------------------------------------------------------------
# reference: plain torch, the unfused layers
# ----------------------------------------------------------------------------------


def conv_bn_act_pool_reference(x: Tensor, conv_weight: Tensor, groups: int,
                               padding: int | tuple[int, int] | list[int],
                               weight: Tensor | None, bias: Tensor | None,
                               running_mean: Tensor | None, running_var: Tensor | None, *,
                               training: bool, momentum: float = 0.1, eps: float = 1e-5,
                               relu: bool = True) -> Tensor:
    """``F.conv2d`` (no bias) → :func:`~scaleinv_kernels.ops.norm_act.bn_act_pool_reference`
    with ``pool=2``; same signature and semantics as :func:`conv_bn_act_pool` (any dtype,
    and differentiable in x too)."""
    pad = _padding_pair(padding, "conv_bn_act_pool_reference: ")
    y = F.conv2d(x, conv_weight, None, 1, tuple(pad), 1, groups)
    return bn_act_pool_reference(y, weight, bias, running_mean, running_var,
                                 training=training, momentum=momentum, eps=eps, relu=relu,
                                 pool=2)


# ----------------------------------------------------------------------------------
# the op contract in torch ops (the CUDA implementation and the tests' oracle)
# ----------------------------------------------------------------------------------


def patch_moments(x: Tensor, kernel_size: tuple[int, int] | list[int], groups: int,
                  padding: tuple[int, int] | list[int],
                  chunk_bytes: int = MOMENTS_CHUNK_BYTES) -> Tensor:
    """Each group's patch moments, float64 ``[groups, K, K+1]``: ``[..., :K]`` the Gram
    matrix ``Σ p pᵀ``, ``[..., K]`` the sum ``Σ p`` over all N·Hc·Wc zero-padded patches
    (taps ``(ci·KH + ky)·KW + kx``). The patches are unfolded in float64 a block of groups
    and samples at a time, at most about ``chunk_bytes`` (at least one sample of one
    group), and reduced with matrix products."""
    kh, kw = kernel_size
    n, cg = x.shape[0], x.shape[1]
    cin = cg // groups
    k = cin * kh * kw
    hc, wc = x.shape[2] + 2 * padding[0] - kh + 1, x.shape[3] + 2 * padding[1] - kw + 1
    moments = torch.zeros(groups, k, k + 1, dtype=torch.float64, device=x.device)
    per_group_sample = k * hc * wc * 8
    gb = max(1, min(groups, chunk_bytes // per_group_sample))
    nb = max(1, chunk_bytes // (gb * per_group_sample))
    for g0 in range(0, groups, gb):
        g1 = min(groups, g0 + gb)
        block = moments[g0:g1]
        for n0 in range(0, n, nb):
            xs = x[n0:n0 + nb, g0 * cin:g1 * cin].double()
            p = F.unfold(xs, (kh, kw), padding=tuple(padding))  # [n, g·K, L], t fastest in K
            p = p.view(p.shape[0], g1 - g0, k, -1).permute(1, 2, 0, 3).reshape(g1 - g0, k, -1)
            block[:, :, :k] += p @ p.transpose(1, 2)
            block[:, :, k] += p.sum(2)
    return moments


def _forward(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps, relu, bn):
    """The forward contract through the materialised y, with ``bn`` the bn_act_pool
    forward to run on it (the torch one, or the Triton kernels on CUDA)."""
    padding = list(padding)
    validate_forward(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps)
    y = F.conv2d(x, conv_weight, None, 1, tuple(padding), 1, groups)
    out, save_mean, save_invstd, index = bn(y, weight, bias, mean, invstd, eps, relu, 2)
    if mean is None:
        moments = patch_moments(x, conv_weight.shape[2:], groups, padding)
    else:
        moments = x.new_empty(0, dtype=torch.float64)
    return out, save_mean, save_invstd, index, moments


def conv_bn_act_pool_torch(x: Tensor, conv_weight: Tensor, groups: int, padding: list[int],
                           weight: Tensor | None, bias: Tensor | None, mean: Tensor | None,
                           invstd: Tensor | None, eps: float, relu: bool
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward op's contract with torch ops: y materialised by ``F.conv2d``, its
    statistics in float64 (:func:`~scaleinv_kernels.ops.norm_act.bn_act_pool_torch`),
    moments by :func:`patch_moments`."""
    return _forward(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps, relu,
                    bn_act_pool_torch)


def conv_bn_act_pool_backward_torch(grad_out: Tensor, x: Tensor, conv_weight: Tensor,
                                    groups: int, padding: list[int], weight: Tensor | None,
                                    save_mean: Tensor, save_invstd: Tensor, out: Tensor,
                                    index: Tensor, moments: Tensor, training: bool, relu: bool,
                                    output_mask: list[bool]
                                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward op's contract with torch ops, the materialised way: y recomputed,
    dy by :func:`~scaleinv_kernels.ops.norm_act.bn_act_pool_backward_torch` (sums in
    float64), grad_conv_weight from dy by ``aten.convolution_backward`` (``moments`` is
    checked, not used)."""
    padding = list(padding)
    validate_backward(grad_out, x, conv_weight, groups, padding, weight, save_mean,
                      save_invstd, out, index, moments, training)
    want = [output_mask[0], output_mask[1] and weight is not None, output_mask[2]]
    if not any(want):
        return None, None, None
    y = F.conv2d(x, conv_weight, None, 1, tuple(padding), 1, groups)
    dy, grad_w, grad_b = bn_act_pool_backward_torch(
        grad_out, y, weight, None, save_mean, save_invstd, out, index, training, relu, 2,
        [True, want[1], want[2]])
    grad_cw = None
    if want[0]:
        grad_cw = torch.ops.aten.convolution_backward(
            dy, x, conv_weight, None, [1, 1], padding, [1, 1], False, [0, 0], groups,
            [False, True, False])[1]
    return grad_cw, grad_w, grad_b


# ----------------------------------------------------------------------------------
# registration: fake kernels, CUDA kernels (autograd: C++)
# ----------------------------------------------------------------------------------


def _fake_forward(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps, relu):
    padding = list(padding)
    validate_forward(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps)
    y = _conv_out_like(x, conv_weight, padding)
    out, index = empty_outputs(y, 2)
    c, k = y.shape[1], conv_geometry(x, conv_weight, padding)[1]
    moments = x.new_empty((groups, k, k + 1) if mean is None else (0,), dtype=torch.float64)
    return out, x.new_empty(c), x.new_empty(c), index, moments


def _fake_backward(grad_out, x, conv_weight, groups, padding, weight, save_mean, save_invstd,
                   out, index, moments, training, relu, output_mask):
    c = conv_weight.shape[0]
    return (torch.empty_like(conv_weight, memory_format=torch.contiguous_format)
            if output_mask[0] else None,
            x.new_empty(c) if output_mask[1] and weight is not None else None,
            x.new_empty(c) if output_mask[2] else None)


def conv_bn_act_pool_triton(x: Tensor, conv_weight: Tensor, groups: int,
                            padding: list[int], weight: Tensor | None, bias: Tensor | None,
                            mean: Tensor | None, invstd: Tensor | None, eps: float,
                            relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The CUDA forward with triton: y by cuDNN, then the Triton bn_act_pool forward."""
    return _forward(x, conv_weight, groups, padding, weight, bias, mean, invstd, eps, relu,
                    bn_act_pool_triton)


def _register() -> None:
    torch.library.register_fake(OP)(_fake_forward)
    torch.library.register_fake(OP + "_backward")(_fake_backward)
    # autograd: in C++ (csrc/norm_act_autograd.cpp), for every device. CUDA: cuDNN and
    # the Triton bn_act_pool forward (the module docstring says why).
    if triton_available():
        register_cuda_kernel(OP, conv_bn_act_pool_triton)
    else:
        register_cuda_kernel(OP, torch_cuda_fallback(OP, conv_bn_act_pool_torch))
    register_cuda_kernel(OP + "_backward", conv_bn_act_pool_backward_torch)


if extension_loaded():
    _register()


# ----------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------


def conv_bn_act_pool(x: Tensor, conv_weight: Tensor, groups: int,
                     padding: int | tuple[int, int] | list[int], weight: Tensor | None,
                     bias: Tensor | None, running_mean: Tensor | None,
                     running_var: Tensor | None, *, training: bool, momentum: float = 0.1,
                     eps: float = 1e-5, relu: bool = True) -> Tensor:
    """Bias-free convolution → BatchNorm → ReLU (if ``relu``) → 2×2 max pool, fused.

    Same semantics as :func:`conv_bn_act_pool_reference` (``F.conv2d(x, conv_weight, None,
    1, padding, 1, groups)`` → ``F.batch_norm(·, running_mean, running_var, weight, bias,
    training, momentum, eps)`` → ``relu`` → ``max_pool2d(2)``): batch statistics when
    ``training`` or without running statistics; training with running statistics updates
    them in place as :func:`~scaleinv_kernels.ops.norm_act.bn_act_pool` does. An int
    ``padding`` pads both dimensions. Differentiable in conv_weight, weight and bias, not
    in x (an x that requires grad is refused). Runs the reference (logged once) when the
    compiled extension is missing.
    """
    op = "conv_bn_act_pool: "
    padding = _padding_pair(padding, op)
    validate_conv(x, conv_weight, groups, padding, op)
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}x requires grad, but this layer computes no gradient for its "
                         "input (it fuses a network's input layer); use direct_conv2d or "
                         "F.conv2d followed by bn_act_pool where x needs one")
    mean, invstd = running_stats_args(x, conv_weight.shape[0], running_mean, running_var,
                                      training, eps, op)
    _validate_norm(x, conv_weight, padding, weight, bias, mean, invstd, eps, op)
    if not extension_loaded():
        log_once("compiled extension not loaded; conv_bn_act_pool runs the torch reference")
        return conv_bn_act_pool_reference(x, conv_weight, groups, padding, weight, bias,
                                          running_mean, running_var, training=training,
                                          momentum=momentum, eps=eps, relu=relu)
    out, save_mean, save_invstd, _, _ = torch.ops.scaleinv.conv_bn_act_pool(
        x, conv_weight, groups, padding, weight, bias, mean, invstd, float(eps), bool(relu))
    if training and running_mean is not None:
        _, _, hc, wc = conv_geometry(x, conv_weight, padding)
        update_running_stats(running_mean, running_var, save_mean, save_invstd,
                             x.shape[0] * hc * wc, momentum, eps)
    return out
