"""``scaleinv::bn_act_pool`` — fused BatchNorm → ReLU → MaxPool2d(2), forward and backward.

An ensemble of M CNNs keeps activations as ``[B, M·C, H, W]`` (member i's channel c is
channel ``i·C + c``), so per-member BatchNorm is ordinary BatchNorm2d over M·C channels.
BN, ReLU and max-pool are each memory-bound; fused, the forward reads x (twice, the
second time from cache on CPU) and writes the pooled output and a one-byte window index;
the backward reads the small pooled tensors and x and writes dx.

Contract (same for every backend)::

    bn_act_pool(x, weight, bias, mean, invstd, eps, relu, pool)
        -> (out, save_mean, save_invstd, index)

* ``x``: float32 (or float64) ``[N, C, H, W]``; with ``pool == 0`` also ``[N, C, L]`` or
  ``[N, C]``. Any strides (non-contiguous x is read through a contiguous copy).
* ``weight``/``bias``: optional ``[C]`` affine parameters (x's dtype and device).
* ``mean``/``invstd``: both given (eval: running_mean and 1/sqrt(running_var + eps)) or
  both None (training: batch statistics over (N, H, W), biased variance, need
  N·H·W > 1). ``eps`` is used only in training.
* ``y = (x − mean)·invstd·w + b``; ``relu(y)`` if ``relu``; then, if ``pool == 2``, a
  2×2/stride-2 max pool (floor mode: an odd last row/column is dropped). ``pool`` ∈ {0, 2}.
* ``out``: ``[N, C, H//2, W//2]`` (``x``'s shape without pool). ``save_mean``/
  ``save_invstd``: ``[C]``, the statistics used (batch statistics in training, copies of
  the given ones in eval). ``index``: uint8, the position 0..3 (row-major) of the max
  inside each window, chosen as ``torch.max_pool2d`` chooses (the first max; a NaN
  replaces the running max) among the post-ReLU values; ``[0]``-shaped without pool.

::

    bn_act_pool_backward(grad_out, x, weight, bias, save_mean, save_invstd, out, index,
                         training, relu, pool, output_mask) -> (grad_x, grad_weight, grad_bias)

* g = grad_out routed to the argmax of its window (0 elsewhere, also on a dropped odd
  row/column), and 0 where ``out <= 0`` (or NaN) when ``relu``; ``x̂ = (x−mean)·invstd``.
* training: ``grad_x = w·invstd·(g − mean(g) − x̂·mean(g·x̂))``, means over (N, H, W);
  eval: ``grad_x = g·w·invstd``. ``grad_weight = Σ g·x̂`` and ``grad_bias = Σ g`` (only
  where ``output_mask[1]``/``[2]``, else None), computed from grad_out, index and x̂ at
  the argmax without materialising g. ``grad_x`` is always computed.
* x̂ at the argmax, for ``Σ g·x̂``: where g ≠ 0, ``out`` is the forward's y = x·α + β
  there (α = invstd·w, β = b − mean·α), so ``x̂ = (out − b)·invstd/α`` and the sums need
  not read x (the identity in-place-activated BatchNorm is built on); this is why the
  backward takes ``bias`` and needs the forward's own ``out``. The C++ and Triton kernels
  use it per channel where it is well conditioned (:func:`xhat_source`: in float32 the
  recovered x̂ is off by about 2⁻²⁴·(|mean|·invstd + |b|/|w|), the forward's own
  rounding, and that bound must be ≤ 8·2⁻²⁴) and read x at the argmax elsewhere (a mean
  far from 0 in standard deviations, a large bias, w = 0); on tiny planes without
  pooling (≤ 144 B each, run as flat passes over channel groups) the C++ kernel reads x
  on every channel, as its dx pass reads x anyway. The torch backend
  (:func:`bn_act_pool_backward_torch`, the reference) always reads x.

GroupNorm is the second mode, a separate op (``scaleinv::gn_act_pool``,
:mod:`scaleinv_kernels.ops.gn_act`): its statistics reduce over (C/G, H, W) of one
sample, so its driver walks (sample, group) blocks instead of channel groups, with the
same per-plane window kernels. What both modes share — validation, the Triton kernels
and their launch geometry, pieces of the torch contracts, the running-statistics update —
is in :mod:`scaleinv_kernels.ops.norm_common`, which also states the naming rule
(``bn_act_pool`` the layer, ``*_reference`` the unfused layers, ``*_torch`` the op's
contract in torch ops, ``*_triton`` its Triton implementation). Other dtypes than
float32/float64 are refused here; the ensemble runs torch's unfused layers for them.

Autograd is registered on ``bn_act_pool`` in C++ (``csrc/norm_act_autograd.cpp``, every
device; ``save_mean``, ``save_invstd`` and ``index`` are not differentiable). Backends:
C++ (``csrc/bn_act.cpp``) on CPU, Triton (below) on CUDA. :func:`bn_act_pool_reference`
is the same layer in plain torch (``F.batch_norm`` → ``relu`` → ``F.max_pool2d``) and
:func:`bn_act_pool` the layer the ensemble calls (it also updates the running statistics).

Registration: the schemas live in C++ (``csrc/registration.cpp``), so
``torch.library.triton_op`` (which defines its op's schema itself) cannot be used. The op
is a registered custom op with a fake kernel (opaque to torch.compile, traceable by
make_fx and export), its CUDA kernels are registered through
:func:`~scaleinv_kernels.ops.registry.register_cuda_kernel` (so
:func:`~scaleinv_kernels.ops.registry.cuda_code_path_on_cpu` can run them on CPU tensors),
and every Triton launch goes through ``torch.library.wrap_triton`` (``launch``).
Without triton the CUDA kernels are :func:`bn_act_pool_torch` and
:func:`bn_act_pool_backward_torch`, which say so once in the log, with the fix
(``pip install triton``).

The Triton launchers take the ``max_block``/``split`` keywords that force the launch
geometry on small shapes (:mod:`scaleinv_kernels.ops.norm_common`); the op passes neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv_kernels._extension import extension_loaded, log_once, triton_available
from scaleinv_kernels.ops.norm_common import (
    MAX_BLOCK,
    act_pool_torch,
    bcast_channels,
    block_size,
    bwd_dx_kernel,
    bwd_reduce_kernel,
    empty_outputs,
    fake_grads,
    fwd_kernel,
    plane_geometry,
    routed_grad_torch,
    running_stats_args,
    split_reduction,
    stats_kernel,
    torch_cuda_fallback,
    update_running_stats,
    validate_bn,
    validate_launch_geometry,
)
from scaleinv_kernels.ops.registry import launch_triton as launch
from scaleinv_kernels.ops.registry import register_cuda_kernel

if triton_available():
    import triton

OP = "scaleinv::bn_act_pool"
__all__ = ["OP", "OUT_COND", "bn_act_pool", "bn_act_pool_backward_torch",
           "bn_act_pool_backward_triton", "bn_act_pool_reference", "bn_act_pool_torch",
           "bn_act_pool_triton", "xhat_source"]

# ----------------------------------------------------------------------------------
# reference: plain torch, the unfused layers
# ----------------------------------------------------------------------------------


def bn_act_pool_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                          running_mean: Tensor | None, running_var: Tensor | None, *,
                          training: bool, momentum: float = 0.1, eps: float = 1e-5,
                          relu: bool = True, pool: int = 2) -> Tensor:
    """``F.batch_norm`` → ``F.relu`` → ``F.max_pool2d(2)``; same signature and semantics as
    :func:`bn_act_pool` (running statistics updated in place when training; batch
    statistics always when they are None)."""
    if pool not in (0, 2):
        raise ValueError(f"bn_act_pool_reference: pool must be 0 or 2, got {pool!r}")
    use_batch = training or running_mean is None
    y = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch, momentum, eps)
    if relu:
        y = F.relu(y)
    if pool == 2:
        y = F.max_pool2d(y, 2)
    return y


# ----------------------------------------------------------------------------------
# the op contract in torch ops (float64 on CUDA, and the oracle of the op-level tests)
# ----------------------------------------------------------------------------------


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def bn_act_pool_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      mean: Tensor | None, invstd: Tensor | None, eps: float, relu: bool,
                      pool: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward op's contract with torch ops (statistics in float64)."""
    validate_bn(x, weight, bias, mean, invstd, eps, pool)
    if mean is None:
        var, m = torch.var_mean(x.double(), dim=_reduce_dims(x), correction=0)
        mean, invstd = m.to(x.dtype), (var + eps).rsqrt().to(x.dtype)
    else:
        mean, invstd = mean.clone(), invstd.clone()
    alpha = invstd * weight if weight is not None else invstd
    beta = -mean * alpha if bias is None else bias - mean * alpha
    out, index = act_pool_torch(x * bcast_channels(alpha, x) + bcast_channels(beta, x), relu,
                                pool)
    return out, mean, invstd, index


def bn_act_pool_backward_torch(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                               bias: Tensor | None, save_mean: Tensor, save_invstd: Tensor,
                               out: Tensor,
                               index: Tensor, training: bool, relu: bool, pool: int,
                               output_mask: list[bool]
                               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward op's contract with torch ops (sums in float64; x̂ from x, the exact
    reference the kernels' x̂-from-out sums are tested against)."""
    validate_bn(x, weight, bias, save_mean, save_invstd, 0.0, pool,
                op="scaleinv::bn_act_pool_backward: ")
    g = routed_grad_torch(grad_out, x, out, index, relu, pool).double()
    mean64 = bcast_channels(save_mean.double(), x)
    xhat = (x.double() - mean64) * bcast_channels(save_invstd.double(), x)
    dims = _reduce_dims(x)
    s1, s2 = g.sum(dims), (g * xhat).sum(dims)
    scale = save_invstd.double() * (weight.double() if weight is not None else 1.0)
    if training:
        cnt = x.numel() // x.shape[1]
        dx = bcast_channels(scale, x) * (g - bcast_channels(s1 / cnt, x)
                                         - xhat * bcast_channels(s2 / cnt, x))
    else:
        dx = bcast_channels(scale, x) * g
    return (dx.to(x.dtype), s2.to(x.dtype) if output_mask[1] else None,
            s1.to(x.dtype) if output_mask[2] else None)


# ----------------------------------------------------------------------------------
# the Triton implementation (CUDA; also CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------

# Largest x̂ error, in units of 2⁻²⁴, for which the backward sums take x̂ from out
# (the C++ kernels use the same bound: kOutCond in csrc/bn_act.cpp).
OUT_COND = 8.0


def xhat_source(weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel, where the backward sums get x̂ at the argmax (see the module docstring).

    Returns ``(from_out, shift, post)``, all ``[C]``: ``from_out`` (bool) where x̂ is
    recovered from out (α ≠ 0 and finite, ``|mean|·invstd + |b|·invstd/|α| ≤ OUT_COND``);
    ``shift`` (x's dtype) is subtracted from the value read (b from out, mean from x) and
    ``post`` (float64) turns ``Σ g·(v − shift)`` into ``Σ g·x̂`` (invstd/α, resp. invstd).
    """
    alpha = invstd * weight if weight is not None else invstd  # as the forward forms it
    a, inv = alpha.double(), invstd.double()
    b = bias.double() if bias is not None else torch.zeros_like(a)
    cond = mean.double().abs() * inv + b.abs() * inv / a.abs()
    from_out = (a != 0) & torch.isfinite(a) & (cond <= OUT_COND)
    shift = torch.where(from_out, b, mean.double()).to(mean.dtype)
    post = torch.where(from_out, inv / a, inv)
    return from_out, shift, post


def bn_act_pool_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       mean: Tensor | None, invstd: Tensor | None, eps: float, relu: bool,
                       pool: int, *, max_block: int = MAX_BLOCK, split: int | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of the forward contract (float64: torch ops). ``max_block``
    and ``split`` force the launch geometry (module docstring); the op passes neither."""
    validate_bn(x, weight, bias, mean, invstd, eps, pool)
    validate_launch_geometry(max_block, split)
    if x.dtype == torch.float64:
        return bn_act_pool_torch(x, weight, bias, mean, invstd, eps, relu, pool)
    x = x.contiguous()
    n, c, h, w, ho, wo = plane_geometry(x, pool)
    training = mean is None
    out, index = empty_outputs(x, pool)
    if training:
        save_mean, save_invstd = x.new_empty(c), x.new_empty(c)
    else:
        save_mean, save_invstd = mean.contiguous().clone(), invstd.contiguous().clone()
    if x.numel() == 0:
        return out, save_mean, save_invstd, index
    sums = torch.zeros(c, 2, dtype=torch.float64, device=x.device)
    if training:
        total = n * h * w
        programs, per_prog = split_reduction(c, total, max_block, x.device, split)
        launch(stats_kernel, (c, programs), x, sums, c, h * w, total, per_prog,
               BLOCK=max_block, num_warps=8)
    block = block_size(ho * wo, max_block)
    launch(
        fwd_kernel, (n * c, triton.cdiv(ho * wo, block)), x,
        weight if weight is not None else x, bias if bias is not None else x, sums,
        save_mean, save_invstd, out, index if pool == 2 else out, c, w, h * w, wo, ho * wo,
        n * h * w, float(eps), TRAINING=training, HAS_W=weight is not None,
        HAS_B=bias is not None, RELU=bool(relu), POOL=pool, BLOCK=block, num_warps=4)
    return out, save_mean, save_invstd, index


def bn_act_pool_backward_triton(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                                bias: Tensor | None, save_mean: Tensor, save_invstd: Tensor,
                                out: Tensor,
                                index: Tensor, training: bool, relu: bool, pool: int,
                                output_mask: list[bool], *, max_block: int = MAX_BLOCK,
                                split: int | None = None
                                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Triton implementation of the backward contract (float64: torch ops); ``max_block``
    and ``split`` as for :func:`bn_act_pool_triton`."""
    validate_bn(x, weight, bias, save_mean, save_invstd, 0.0, pool,
                op="scaleinv::bn_act_pool_backward: ")
    validate_launch_geometry(max_block, split)
    if x.dtype == torch.float64:
        return bn_act_pool_backward_torch(grad_out, x, weight, bias, save_mean, save_invstd,
                                          out, index, training, relu, pool, output_mask)
    x, grad_out, out = x.contiguous(), grad_out.contiguous(), out.contiguous()
    save_mean, save_invstd = save_mean.contiguous(), save_invstd.contiguous()
    index = index.contiguous() if pool == 2 else out
    n, c, h, w, ho, wo = plane_geometry(x, pool)
    dx = torch.empty_like(x)
    sums = torch.zeros(c, 2, dtype=torch.float64, device=x.device)
    need_sums = training or output_mask[1] or output_mask[2]
    if x.numel() and need_sums:
        from_out, shift, post = xhat_source(weight, bias, save_mean, save_invstd)
        total = n * ho * wo
        programs, per_prog = split_reduction(c, total, max_block, x.device, split)
        launch(
            bwd_reduce_kernel, (c, programs), grad_out, x, from_out.to(torch.int8), shift,
            out, index, sums, c, w, h * w, wo, ho * wo, total, per_prog, RELU=bool(relu),
            POOL=pool, BLOCK=max_block, num_warps=8)
        sums[:, 1] *= post  # sum(g * xhat)
    if x.numel():
        block = block_size(h * w, max_block)
        launch(
            bwd_dx_kernel, (n * c, triton.cdiv(h * w, block)), grad_out, x,
            weight if weight is not None else x, save_mean, save_invstd, out, index, sums,
            x, dx, c, w, h * w, ho, wo, ho * wo, n * h * w,
            TRAINING=bool(training), HAS_W=weight is not None, RELU=bool(relu), POOL=pool,
            BLOCK=block, num_warps=4)
    grad_w = sums[:, 1].to(x.dtype) if output_mask[1] else None
    grad_b = sums[:, 0].to(x.dtype) if output_mask[2] else None
    return dx, grad_w, grad_b


# ----------------------------------------------------------------------------------
# registration: fake kernels, autograd, CUDA kernels
# ----------------------------------------------------------------------------------


def _fake_forward(x, weight, bias, mean, invstd, eps, relu, pool):
    validate_bn(x, weight, bias, mean, invstd, eps, pool)
    out, index = empty_outputs(x, pool)
    c = x.shape[1]
    return out, x.new_empty(c), x.new_empty(c), index


def _fake_backward(grad_out, x, weight, bias, save_mean, save_invstd, out, index, training,
                   relu, pool, output_mask):
    return fake_grads(x, output_mask)


def _register() -> None:
    torch.library.register_fake(OP)(_fake_forward)
    torch.library.register_fake(OP + "_backward")(_fake_backward)
    # autograd: in C++ (csrc/norm_act_autograd.cpp), for every device
    if triton_available():
        register_cuda_kernel(OP, bn_act_pool_triton)
        register_cuda_kernel(OP + "_backward", bn_act_pool_backward_triton)
    else:  # a CUDA tensor must never meet "no kernel registered for CUDA"
        register_cuda_kernel(OP, torch_cuda_fallback(OP, bn_act_pool_torch))
        register_cuda_kernel(OP + "_backward",
                             torch_cuda_fallback(OP, bn_act_pool_backward_torch))


if extension_loaded():
    _register()


# ----------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------


def bn_act_pool(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, *, training: bool,
                momentum: float = 0.1, eps: float = 1e-5, relu: bool = True,
                pool: int = 2) -> Tensor:
    """BatchNorm → ReLU (if ``relu``) → 2×2 max pool (if ``pool == 2``), fused.

    Same semantics as :func:`bn_act_pool_reference` (``F.batch_norm(x, running_mean,
    running_var, weight, bias, training, momentum, eps)`` → ``relu`` → ``max_pool2d(2)``):
    batch statistics when ``training`` or when the running statistics are None; when
    training with running statistics they are updated in place, ``r ← (1−momentum)·r +
    momentum·s`` with the unbiased batch variance for ``running_var``. Differentiable in
    x, weight and bias.
    """
    mean, invstd = running_stats_args(x, x.shape[1], running_mean, running_var, training,
                                      eps, "bn_act_pool: ")
    validate_bn(x, weight, bias, mean, invstd, eps, pool, op="bn_act_pool: ")
    if not extension_loaded():
        log_once("compiled extension not loaded; bn_act_pool runs the torch reference")
        return bn_act_pool_reference(x, weight, bias, running_mean, running_var,
                                     training=training, momentum=momentum, eps=eps,
                                     relu=relu, pool=pool)
    out, save_mean, save_invstd, _ = torch.ops.scaleinv.bn_act_pool(
        x, weight, bias, mean, invstd, float(eps), bool(relu), int(pool))
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, save_mean, save_invstd,
                             x.numel() // x.shape[1], momentum, eps)
    return out
