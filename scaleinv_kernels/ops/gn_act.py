"""``scaleinv::gn_act_pool`` — fused GroupNorm → ReLU → MaxPool2d(2), forward and backward.

The GroupNorm mode of ``bn_act_pool`` (:mod:`scaleinv_kernels.ops.norm_act`): the same
window kernels (normalize, ReLU, 2×2 max with a one-byte index; routed gradient sums; dx
written once, all in :mod:`scaleinv_kernels.ops.norm_common`), driven per (sample, group)
instead of per channel. In an ensemble ``[B, m·C, H, W]`` view,
member i's G groups are groups ``i·G .. i·G+G−1`` of ``m·G``, so one call covers all
members with their own affine parameters.

Contract (same for every backend)::

    gn_act_pool(x, weight, bias, groups, eps, relu, pool)
        -> (out, save_mean, save_invstd, index)

* ``x``: float32 (or float64) ``[N, C, H, W]``; with ``pool == 0`` also ``[N, C, L]`` or
  ``[N, C]``. ``groups`` ≥ 1 divides C; ``weight``/``bias``: optional ``[C]``.
* Statistics per sample and group (C/groups channels × H × W values; biased variance;
  always from the batch: GroupNorm has no running statistics and no eval mode),
  ``save_mean``/``save_invstd``: ``[N, groups]`` (``invstd = 1/sqrt(var + eps)``).
* ``y = (x − mean)·invstd·w + b``; ``relu(y)`` if ``relu``; then, if ``pool == 2``, a
  2×2/stride-2 max pool (floor mode) with ``index`` as in ``bn_act_pool``.

::

    gn_act_pool_backward(grad_out, x, weight, save_mean, save_invstd, out, index, groups,
                         relu, pool, output_mask) -> (grad_x, grad_weight, grad_bias)

* g = grad_out routed to the argmax (0 elsewhere), 0 where ``out <= 0`` with ``relu``;
  x̂ = (x − mean)·invstd of the plane's group. Per (sample, group), with means over its
  C/groups·H·W values: ``grad_x = invstd·(w·g − mean(w·g) − x̂·mean(w·g·x̂))``;
  ``grad_weight = Σ g·x̂``, ``grad_bias = Σ g`` over (N, H, W) per channel (only where
  ``output_mask[1]``/``[2]``, else None). ``grad_x`` is always computed.

Backends: C++ on CPU (``csrc/gn_act.cpp``, autograd in ``csrc/norm_act_autograd.cpp``);
on CUDA the Triton kernels ``bn_act_pool`` runs too (:func:`gn_act_pool_triton`): the
statistics kernel over the ``[1, N·G, C/G·H·W]`` view (one "channel" per sample and
group), the eval-mode forward and the backward kernels over the ``[1, N·C, H, W]`` view
(one "channel" per plane) with per-plane statistics and dx coefficients formed from the
group sums by a few torch ops on ``[N, C]`` tensors. The x̂-from-out identity of
``bn_act_pool``'s backward is not used here: a group's planes are still in L1/L2 when
the dx pass reads x again. Float32/float64 only (float64 on CUDA: the torch ops of
:func:`gn_act_pool_torch`); the ensemble runs torch's unfused layers for other dtypes.
:func:`gn_act_pool_reference` is the layer in plain torch (``F.group_norm`` → ``relu``
→ ``F.max_pool2d``). Names follow the rule stated in
:mod:`scaleinv_kernels.ops.norm_common` (the layer, ``*_reference``, ``*_torch``,
``*_triton``).

Registration as for ``bn_act_pool`` (see :mod:`scaleinv_kernels.ops.norm_act`): the
schema lives in C++, so the op is a registered custom op with a fake kernel rather than
a ``torch.library.triton_op``; its CUDA kernels are registered through
:func:`~scaleinv_kernels.ops.registry.register_cuda_kernel`, its Triton launches are
wrapped by ``torch.library.wrap_triton`` (``launch``,
:func:`~scaleinv_kernels.ops.registry.launch_triton`), and without triton the CUDA
kernels are :func:`gn_act_pool_torch` and :func:`gn_act_pool_backward_torch`, logged
once with the fix (``pip install triton``). The Triton launchers take the
``max_block``/``split`` keywords of :mod:`scaleinv_kernels.ops.norm_common`, which force
several blocks per plane and several programs per reduction on small shapes (tests).
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
    split_reduction,
    stats_kernel,
    torch_cuda_fallback,
    validate_gn,
    validate_launch_geometry,
)
from scaleinv_kernels.ops.registry import launch_triton as launch
from scaleinv_kernels.ops.registry import register_cuda_kernel

if triton_available():
    import triton

OP = "scaleinv::gn_act_pool"


def gn_act_pool_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                          eps: float = 1e-5, relu: bool = True, pool: int = 2) -> Tensor:
    """The unfused layers the op replaces: ``F.group_norm`` → ReLU → ``max_pool2d(2)``."""
    y = F.group_norm(x, groups, weight, bias, eps)
    if relu:
        y = F.relu(y)
    return F.max_pool2d(y, 2) if pool == 2 else y


def _group_view(t: Tensor, groups: int) -> Tensor:
    return t.reshape(t.shape[0], groups, -1)


def gn_act_pool_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                      eps: float, relu: bool, pool: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward op's contract with torch ops (statistics in float64)."""
    validate_gn(x, weight, bias, groups, eps, pool)
    n, c = x.shape[0], x.shape[1]
    var, m = torch.var_mean(_group_view(x.double(), groups), dim=2, correction=0)
    mean, invstd = m.to(x.dtype), (var + eps).rsqrt().to(x.dtype)  # [N, G]
    per = c // groups
    mc = mean.repeat_interleave(per, 1).reshape(n, c, *[1] * (x.dim() - 2))
    ic = invstd.repeat_interleave(per, 1).reshape(n, c, *[1] * (x.dim() - 2))
    alpha = ic * bcast_channels(weight, x) if weight is not None else ic
    beta = -mc * alpha if bias is None else bcast_channels(bias, x) - mc * alpha
    out, index = act_pool_torch(x * alpha + beta, relu, pool)
    return out, mean, invstd, index


def gn_act_pool_backward_torch(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                               save_mean: Tensor, save_invstd: Tensor, out: Tensor,
                               index: Tensor, groups: int, relu: bool, pool: int,
                               output_mask: list[bool]
                               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward op's contract with torch ops (sums in float64)."""
    validate_gn(x, weight, None, groups, 0.0, pool, op="scaleinv::gn_act_pool_backward: ")
    n, c = x.shape[0], x.shape[1]
    per = c // groups
    shape = (n, c, *[1] * (x.dim() - 2))
    mc = save_mean.double().repeat_interleave(per, 1).reshape(shape)
    ic = save_invstd.double().repeat_interleave(per, 1).reshape(shape)
    g = routed_grad_torch(grad_out, x, out, index, relu, pool).double()
    xhat = (x.double() - mc) * ic
    wg = g * bcast_channels(weight.double(), x) if weight is not None else g
    cnt = per * (x[0, 0].numel())
    a = _group_view(wg, groups).sum(2).repeat_interleave(per, 1).reshape(shape) / cnt
    b = _group_view(wg * xhat, groups).sum(2).repeat_interleave(per, 1).reshape(shape) / cnt
    dx = ic * (wg - a - xhat * b)
    dims = [0, *range(2, x.dim())]
    return (dx.to(x.dtype),
            (g * xhat).sum(dims).to(x.dtype) if output_mask[1] else None,
            g.sum(dims).to(x.dtype) if output_mask[2] else None)


def gn_act_pool_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                       eps: float, relu: bool, pool: int, *, max_block: int = MAX_BLOCK,
                       split: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of the forward contract (float64: torch ops); ``max_block``
    and ``split`` force the launch geometry as for
    :func:`~scaleinv_kernels.ops.norm_act.bn_act_pool_triton` (the op passes neither)."""
    validate_gn(x, weight, bias, groups, eps, pool)
    validate_launch_geometry(max_block, split)
    if x.dtype == torch.float64:
        return gn_act_pool_torch(x, weight, bias, groups, eps, relu, pool)
    x = x.contiguous()
    n, c, h, w, ho, wo = plane_geometry(x, pool)
    per, planes = c // groups, n * c
    out, index = empty_outputs(x, pool)
    if x.numel() == 0:
        return out, x.new_empty(n, groups), x.new_empty(n, groups), index
    blocks, total = n * groups, per * h * w  # (sample, group) blocks: contiguous runs
    sums = torch.zeros(blocks, 2, dtype=torch.float64, device=x.device)
    programs, per_prog = split_reduction(blocks, total, max_block, x.device, split)
    launch(stats_kernel, (blocks, programs), x, sums, blocks, total, total, per_prog,
           BLOCK=max_block, num_warps=8)
    # the statistics as _fwd_kernel forms them in training mode (fp64, shifted sums)
    shift = x.view(blocks, total)[:, 0].double()
    m = sums[:, 0] / total
    var = (sums[:, 1] / total - m * m).clamp_(min=0.0)
    mean = (shift + m).to(x.dtype).view(n, groups)
    invstd = (var + eps).rsqrt().to(x.dtype).view(n, groups)
    # normalize/ReLU/pool: the eval-mode kernel with one "channel" per plane
    mean_p = mean.repeat_interleave(per, 1).reshape(-1)
    inv_p = invstd.repeat_interleave(per, 1).reshape(-1)
    w_p = weight.repeat(n) if weight is not None else x
    b_p = bias.repeat(n) if bias is not None else x
    block = block_size(ho * wo, max_block)
    launch(
        fwd_kernel, (planes, triton.cdiv(ho * wo, block)), x, w_p, b_p, sums, mean_p,
        inv_p, out, index if pool == 2 else out, planes, w, h * w, wo, ho * wo, h * w,
        float(eps), TRAINING=False, HAS_W=weight is not None,
        HAS_B=bias is not None, RELU=bool(relu), POOL=pool, BLOCK=block, num_warps=4)
    return out, mean, invstd, index


def gn_act_pool_backward_triton(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                                save_mean: Tensor, save_invstd: Tensor, out: Tensor,
                                index: Tensor, groups: int, relu: bool, pool: int,
                                output_mask: list[bool], *, max_block: int = MAX_BLOCK,
                                split: int | None = None
                                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Triton implementation of the backward contract (float64: torch ops); ``max_block``
    and ``split`` as for :func:`gn_act_pool_triton`."""
    validate_gn(x, weight, None, groups, 0.0, pool, op="scaleinv::gn_act_pool_backward: ")
    validate_launch_geometry(max_block, split)
    if x.dtype == torch.float64:
        return gn_act_pool_backward_torch(grad_out, x, weight, save_mean, save_invstd, out,
                                          index, groups, relu, pool, output_mask)
    x, grad_out, out = x.contiguous(), grad_out.contiguous(), out.contiguous()
    index = index.contiguous() if pool == 2 else out
    n, c, h, w, ho, wo = plane_geometry(x, pool)
    per, planes = c // groups, n * c
    dx = torch.empty_like(x)
    psums = torch.zeros(planes, 2, dtype=torch.float64, device=x.device)
    mean_p = save_mean.contiguous().repeat_interleave(per, 1).reshape(-1)
    inv_p = save_invstd.contiguous().repeat_interleave(per, 1).reshape(-1)
    if x.numel():
        # per plane: sum(g), sum(g * (x - mean)) (x at the argmax, never out)
        programs, per_prog = split_reduction(planes, ho * wo, max_block, x.device, split)
        launch(
            bwd_reduce_kernel, (planes, programs), grad_out, x,
            torch.zeros(planes, dtype=torch.int8, device=x.device), mean_p, out, index,
            psums, planes, w, h * w, wo, ho * wo, ho * wo, per_prog, RELU=bool(relu),
            POOL=pool, BLOCK=max_block, num_warps=8)
    s1, s2 = psums[:, 0].view(n, c), psums[:, 1].view(n, c)
    inv = save_invstd.double()
    wd = weight.double() if weight is not None else torch.ones(c, dtype=torch.float64,
                                                               device=x.device)
    a = (s1 * wd).view(n, groups, per).sum(2)  # [N, G]: sum of w*g over the group
    b = (s2 * wd).view(n, groups, per).sum(2)  # sum of w*g*(x - mean)
    cnt = per * h * w
    # dx = invstd*w*g + k0 + k2*(x - mean): k0 = -invstd*a/cnt, k2 = -invstd^3*b/cnt
    coef = torch.stack([inv.repeat_interleave(per, 1) * wd,
                        (-inv * a / cnt).repeat_interleave(per, 1),
                        (-inv ** 3 * b / cnt).repeat_interleave(per, 1)], dim=2)
    coef = coef.reshape(planes, 3).to(x.dtype).contiguous()
    if x.numel():
        block = block_size(h * w, max_block)
        launch(
            bwd_dx_kernel, (planes, triton.cdiv(h * w, block)), grad_out, x, x, mean_p,
            inv_p, out, index, psums, coef, dx, planes, w, h * w, ho, wo, ho * wo, h * w,
            TRAINING=True, HAS_W=False, RELU=bool(relu), POOL=pool,
            BLOCK=block, COEF=True, num_warps=4)
    grad_w = ((s2 * inv.repeat_interleave(per, 1)).sum(0).to(x.dtype)
              if output_mask[1] else None)
    grad_b = s1.sum(0).to(x.dtype) if output_mask[2] else None
    return dx, grad_w, grad_b


def _fake_forward(x, weight, bias, groups, eps, relu, pool):
    validate_gn(x, weight, bias, groups, eps, pool)
    out, index = empty_outputs(x, pool)
    n = x.shape[0]
    return out, x.new_empty(n, groups), x.new_empty(n, groups), index


def _fake_backward(grad_out, x, weight, save_mean, save_invstd, out, index, groups, relu,
                   pool, output_mask):
    return fake_grads(x, output_mask)


def _register() -> None:
    torch.library.register_fake(OP)(_fake_forward)
    torch.library.register_fake(OP + "_backward")(_fake_backward)
    # autograd: in C++ (csrc/norm_act_autograd.cpp), for every device
    if triton_available():
        register_cuda_kernel(OP, gn_act_pool_triton)
        register_cuda_kernel(OP + "_backward", gn_act_pool_backward_triton)
    else:
        register_cuda_kernel(OP, torch_cuda_fallback(OP, gn_act_pool_torch))
        register_cuda_kernel(OP + "_backward",
                             torch_cuda_fallback(OP, gn_act_pool_backward_torch))


if extension_loaded():
    _register()


def gn_act_pool(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, *,
                eps: float = 1e-5, relu: bool = True, pool: int = 2) -> Tensor:
    """GroupNorm → ReLU (if ``relu``) → 2×2 max pool (if ``pool == 2``), fused.

    Same semantics as :func:`gn_act_pool_reference`; differentiable in x, weight and
    bias. Without the compiled extension it runs that reference (logged once).
    """
    validate_gn(x, weight, bias, groups, eps, pool, op="gn_act_pool: ")
    if not extension_loaded():
        log_once("compiled extension not loaded; gn_act_pool runs the torch reference")
        return gn_act_pool_reference(x, weight, bias, groups, eps=eps, relu=relu, pool=pool)
    return torch.ops.scaleinv.gn_act_pool(x, weight, bias, int(groups), float(eps), bool(relu),
                                          int(pool))[0]
