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
same per-plane window kernels. Other dtypes than float32/float64 are refused here; the
ensemble runs torch's unfused layers for them.

Autograd is registered on ``bn_act_pool`` in C++ (``csrc/norm_act_autograd.cpp``, every
device; ``save_mean``, ``save_invstd`` and ``index`` are not differentiable). Backends:
C++ (``csrc/norm_act.cpp``) on CPU, Triton (below) on CUDA. :func:`bn_act_pool_reference`
is the same layer in plain torch (``F.batch_norm`` → ``relu`` → ``F.max_pool2d``) and
:func:`bn_act_pool` the layer the ensemble calls (it also updates the running statistics).

Registration: the schemas live in C++ (``csrc/registration.cpp``), so
``torch.library.triton_op`` (which defines its op's schema itself) cannot be used. The op
is a registered custom op with a fake kernel (opaque to torch.compile, traceable by
make_fx and export), its CUDA kernels are registered through
:func:`~scaleinv_kernels.ops.registry.register_cuda_kernel` (so
:func:`~scaleinv_kernels.ops.registry.cuda_code_path_on_cpu` can run them on CPU tensors),
and every Triton launch goes through ``torch.library.wrap_triton`` (:func:`launch`).
Without triton the CUDA kernels are :func:`bn_act_pool_torch` and
:func:`bn_act_pool_backward_torch`, which say so once in the log, with the fix
(``pip install triton``).

Launch geometry: the reductions (``_stats_kernel``, ``_bwd_reduce_kernel``) split each
channel over several programs to fill a GPU, and the elementwise kernels cover a plane
with blocks of at most ``MAX_BLOCK`` values. Planes small enough for the interpreter
trigger neither, so the Triton launchers take two keywords that force them:
``max_block`` (a power of two from 16 to ``MAX_BLOCK``: the largest block of every
kernel, so a plane of more values spans several blocks) and ``split`` (programs per
channel of the reductions, at most one per block of values). The ops never pass them;
the tests do, to check those paths against the float64 contract on small odd shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv_kernels._extension import extension_loaded, log_once, triton_available
from scaleinv_kernels.ops.registry import launch_triton as launch
from scaleinv_kernels.ops.registry import register_cuda_kernel

OP = "scaleinv::bn_act_pool"
SUPPORTED_DTYPES = (torch.float32, torch.float64)

# ----------------------------------------------------------------------------------
# validation shared by the Python backends (the C++ kernel checks the same things)
# ----------------------------------------------------------------------------------


def _out_shape(shape: torch.Size | tuple[int, ...], pool: int) -> list[int]:
    out = list(shape)
    if pool == 2:
        out[2] //= 2
        out[3] //= 2
    return out


def empty_outputs(x: Tensor, pool: int) -> tuple[Tensor, Tensor]:
    """The forward's ``out`` and uint8 ``index`` (``[0]``-shaped without pool), both
    norm modes, uninitialised."""
    out = x.new_empty(_out_shape(x.shape, pool))
    return out, x.new_empty(out.shape if pool == 2 else (0,), dtype=torch.uint8)


def _check_vec(op: str, name: str, t: Tensor | None, x: Tensor, c: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}{name} must be a Tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{op}{name} must have shape [C] = [{c}], got {list(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}{name} is on {t.device} but x is on {x.device}")


def validate_x(x: Tensor, pool: int, op: str) -> None:
    """The checks of x and pool both norm modes share (ValueError/TypeError naming them)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}x must be a Tensor, got {type(x).__name__}")
    if pool not in (0, 2) or isinstance(pool, bool):
        raise ValueError(f"{op}pool must be 0 (none) or 2 (2x2 max pool), got {pool!r}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}x must be float32 or float64, got {x.dtype}")
    if x.layout != torch.strided:
        raise ValueError(f"{op}x must be a dense (strided) tensor, got layout {x.layout}")
    if pool == 2 and x.dim() != 4:
        raise ValueError(f"{op}pool=2 needs a 4-D x [N, C, H, W], got shape {list(x.shape)}")
    if not 2 <= x.dim() <= 4:
        raise ValueError(f"{op}x must be [N, C], [N, C, L] or [N, C, H, W], got shape "
                         f"{list(x.shape)}")
    if pool == 2 and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"{op}pool=2 needs H >= 2 and W >= 2, got shape {list(x.shape)}")


def validate_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     mean: Tensor | None, invstd: Tensor | None, eps: float, pool: int,
                     op: str = "scaleinv::bn_act_pool: ") -> None:
    """Raise ValueError/TypeError naming the offending argument."""
    validate_x(x, pool, op)
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
        _check_vec(op, name, t, x, c)
    if (mean is None) != (invstd is None):
        raise ValueError(f"{op}give both mean and invstd (eval mode) or neither (training "
                         "mode)")
    if mean is None:
        if eps < 0:
            raise ValueError(f"{op}eps must be >= 0, got {eps}")
        per_channel = x.shape[0] * (x.shape[2:].numel() if x.dim() > 2 else 1)
        if per_channel <= 1:
            raise ValueError(f"{op}training needs more than 1 value per channel (N*H*W > 1), "
                             f"got shape {list(x.shape)}")


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


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def bn_act_pool_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      mean: Tensor | None, invstd: Tensor | None, eps: float, relu: bool,
                      pool: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward op's contract with torch ops (statistics in float64)."""
    validate_forward(x, weight, bias, mean, invstd, eps, pool)
    if mean is None:
        var, m = torch.var_mean(x.double(), dim=_reduce_dims(x), correction=0)
        mean, invstd = m.to(x.dtype), (var + eps).rsqrt().to(x.dtype)
    else:
        mean, invstd = mean.clone(), invstd.clone()
    alpha = invstd * weight if weight is not None else invstd
    beta = -mean * alpha if bias is None else bias - mean * alpha
    y = x * _bcast(alpha, x) + _bcast(beta, x)
    if relu:
        y = torch.relu(y)
    if pool == 2:
        n, c, h, w = y.shape
        out, flat = F.max_pool2d(y, 2, return_indices=True)
        index = ((flat // w) % 2 * 2 + flat % w % 2).to(torch.uint8)
    else:
        out, index = y, x.new_empty(0, dtype=torch.uint8)
    return out, mean, invstd, index


def _routed_grad(grad_out: Tensor, x: Tensor, out: Tensor, index: Tensor, relu: bool,
                 pool: int) -> Tensor:
    """g: grad_out at the argmax of each window (zero elsewhere), masked by out > 0."""
    g = torch.where(out > 0, grad_out, 0) if relu else grad_out
    if pool != 2:
        return g
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    k = index.long()
    rows = torch.arange(ho, device=x.device).view(1, 1, ho, 1) * 2 + k // 2
    cols = torch.arange(wo, device=x.device).view(1, 1, 1, wo) * 2 + k % 2
    full = x.new_zeros(n, c, h * w)
    full.scatter_(2, (rows * w + cols).reshape(n, c, -1), g.reshape(n, c, -1))
    return full.view(n, c, h, w)


def bn_act_pool_backward_torch(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                               bias: Tensor | None, save_mean: Tensor, save_invstd: Tensor,
                               out: Tensor,
                               index: Tensor, training: bool, relu: bool, pool: int,
                               output_mask: list[bool]
                               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward op's contract with torch ops (sums in float64; x̂ from x, the exact
    reference the kernels' x̂-from-out sums are tested against)."""
    validate_forward(x, weight, bias, save_mean, save_invstd, 0.0, pool,
                     op="scaleinv::bn_act_pool_backward: ")
    g = _routed_grad(grad_out, x, out, index, relu, pool).double()
    xhat = (x.double() - _bcast(save_mean.double(), x)) * _bcast(save_invstd.double(), x)
    dims = _reduce_dims(x)
    s1, s2 = g.sum(dims), (g * xhat).sum(dims)
    scale = save_invstd.double() * (weight.double() if weight is not None else 1.0)
    if training:
        cnt = x.numel() // x.shape[1]
        dx = _bcast(scale, x) * (g - _bcast(s1 / cnt, x) - xhat * _bcast(s2 / cnt, x))
    else:
        dx = _bcast(scale, x) * g
    return (dx.to(x.dtype), s2.to(x.dtype) if output_mask[1] else None,
            s1.to(x.dtype) if output_mask[2] else None)


# Largest x̂ error, in units of 2⁻²⁴, for which the backward sums take x̂ from out
# (the C++ kernels use the same bound: kOutCond in csrc/norm_act.cpp).
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


# ----------------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------
#
# Forward: _stats_kernel (grid C x SPLIT: each program sums a slice of its channel's
# N*H*W values, shifted by the channel's first element, in fp64, and adds them with
# atomic_add into sums[C, 2]); _fwd_kernel (grid N*C planes x blocks of outputs: mean and
# invstd from the sums, normalize, ReLU, 2x2 max + index). Backward: _bwd_reduce_kernel
# (grid C x SPLIT over the pooled positions: sum(g), sum(g*(v - shift)) into fp64
# sums[C, 2], v = out or x at the argmax as xhat_source decides) and
# _bwd_dx_kernel (grid N*C planes x blocks of inputs). The atomics make the last bits of
# the statistics depend on the order in which programs finish.

MAX_BLOCK = 1024

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_kernel(
        x_ptr,  # *fp32 [N, C, HW] input
        sums_ptr,  # *fp64 [C, 2] (zeroed) sum(x - shift), sum((x - shift)^2)
        C,  # channels
        HW,  # elements per plane
        total,  # N * HW: values per channel
        per_prog,  # values per program (a multiple of BLOCK)
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        start0 = tl.program_id(1).to(tl.int64) * per_prog
        shift = tl.load(x_ptr + c * HW).to(tl.float64)
        acc_s = tl.zeros([BLOCK], dtype=tl.float64)
        acc_ss = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(start0, tl.minimum(start0 + per_prog, total), BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < total
            n = offs // HW
            addr = (n * C + c) * HW + offs % HW
            d = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float64) - shift
            d = tl.where(mask, d, 0.0)
            acc_s += d
            acc_ss += d * d
        tl.atomic_add(sums_ptr + c * 2, tl.sum(acc_s, axis=0))
        tl.atomic_add(sums_ptr + c * 2 + 1, tl.sum(acc_ss, axis=0))

    @triton.jit
    def _fwd_kernel(
        x_ptr,  # *fp32 [N, C, H, W] input (contiguous)
        w_ptr,  # *fp32 [C] weight (read if HAS_W)
        b_ptr,  # *fp32 [C] bias (read if HAS_B)
        sums_ptr,  # *fp64 [C, 2] shifted sums (TRAINING)
        mean_ptr,  # *fp32 [C] eval: given mean; training: save_mean (written)
        invstd_ptr,  # *fp32 [C] eval: given invstd; training: save_invstd (written)
        out_ptr,  # *fp32 [N, C, Ho, Wo] output
        ind_ptr,  # *u8 [N, C, Ho, Wo] argmax position 0..3 (POOL)
        C,  # channels
        W,  # input width
        HW,  # input elements per plane
        Wo,  # output width
        HWo,  # output elements per plane
        count,  # N * HW (training)
        eps,  # fp32 (training)
        TRAINING: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        RELU: tl.constexpr,
        POOL: tl.constexpr,  # 0 or 2
        BLOCK: tl.constexpr,  # outputs per program
    ):
        plane = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        c = plane % C
        if TRAINING:
            shift = tl.load(x_ptr + c * HW).to(tl.float64)
            s = tl.load(sums_ptr + c * 2)
            ss = tl.load(sums_ptr + c * 2 + 1)
            m = s / count
            var = tl.maximum(ss / count - m * m, 0.0)
            mean = (shift + m).to(tl.float32)
            invstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
            if (plane < C) & (blk == 0):  # n == 0: one program per channel saves them
                tl.store(mean_ptr + c, mean)
                tl.store(invstd_ptr + c, invstd)
        else:
            mean = tl.load(mean_ptr + c)
            invstd = tl.load(invstd_ptr + c)
        if HAS_W:
            alpha = invstd * tl.load(w_ptr + c)
        else:
            alpha = invstd
        if HAS_B:
            beta = tl.load(b_ptr + c) - mean * alpha
        else:
            beta = -mean * alpha
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HWo
        xp = x_ptr + plane * HW
        if POOL == 2:
            oh = offs // Wo
            ow = offs % Wo
            p0 = xp + 2 * oh * W + 2 * ow
            v0 = tl.load(p0, mask=mask, other=0.0) * alpha + beta
            v1 = tl.load(p0 + 1, mask=mask, other=0.0) * alpha + beta
            v2 = tl.load(p0 + W, mask=mask, other=0.0) * alpha + beta
            v3 = tl.load(p0 + W + 1, mask=mask, other=0.0) * alpha + beta
            if RELU:  # NaN passes: (v < 0) is False for NaN
                v0 = tl.where(v0 < 0, 0.0, v0)
                v1 = tl.where(v1 < 0, 0.0, v1)
                v2 = tl.where(v2 < 0, 0.0, v2)
                v3 = tl.where(v3 < 0, 0.0, v3)
            # torch.max_pool2d's rule: first max wins, a NaN replaces the running max
            best = v0
            idx = tl.zeros([BLOCK], dtype=tl.int32)
            up = (v1 > best) | (v1 != v1)
            best = tl.where(up, v1, best)
            idx = tl.where(up, 1, idx)
            up = (v2 > best) | (v2 != v2)
            best = tl.where(up, v2, best)
            idx = tl.where(up, 2, idx)
            up = (v3 > best) | (v3 != v3)
            best = tl.where(up, v3, best)
            idx = tl.where(up, 3, idx)
            tl.store(out_ptr + plane * HWo + offs, best, mask=mask)
            tl.store(ind_ptr + plane * HWo + offs, idx.to(tl.uint8), mask=mask)
        else:
            v = tl.load(xp + offs, mask=mask, other=0.0) * alpha + beta
            if RELU:
                v = tl.where(v < 0, 0.0, v)
            tl.store(out_ptr + plane * HWo + offs, v, mask=mask)

    @triton.jit
    def _bwd_reduce_kernel(
        gout_ptr,  # *fp32 [N, C, Ho, Wo] incoming gradient
        x_ptr,  # *fp32 [N, C, H, W] input
        from_out_ptr,  # *i8 [C] 1: v = out (x not read), 0: v = x at the argmax
        shift_ptr,  # *fp32 [C] subtracted from v (b, resp. mean)
        out_ptr,  # *fp32 [N, C, Ho, Wo] forward output (ReLU mask: out > 0)
        ind_ptr,  # *u8 [N, C, Ho, Wo] argmax position (POOL)
        sums_ptr,  # *fp64 [C, 2] (zeroed) sum(g), sum(g * (v - shift))
        C,
        W,  # input width
        HW,  # input elements per plane
        Wo,  # output width
        HWo,  # output elements per plane
        total,  # N * HWo: pooled positions per channel
        per_prog,  # positions per program (a multiple of BLOCK)
        RELU: tl.constexpr,
        POOL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        start0 = tl.program_id(1).to(tl.int64) * per_prog
        shift = tl.load(shift_ptr + c)
        from_out = tl.load(from_out_ptr + c).to(tl.int32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float64)
        acc2 = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(start0, tl.minimum(start0 + per_prog, total), BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < total
            n = offs // HWo
            j = offs % HWo
            plane = n * C + c
            g = tl.load(gout_ptr + plane * HWo + j, mask=mask, other=0.0)
            o = tl.load(out_ptr + plane * HWo + j, mask=mask, other=0.0)
            if RELU:
                g = tl.where(o > 0, g, 0.0)
            if POOL == 2:
                k = tl.load(ind_ptr + plane * HWo + j, mask=mask, other=0).to(tl.int32)
                pos = (2 * (j // Wo) + (k >> 1)) * W + 2 * (j % Wo) + (k & 1)
            else:
                pos = j
            # x only for channels that need it (a masked-off load moves no memory)
            use_x = (j * 0 + from_out) == 0
            xv = tl.load(x_ptr + plane * HW + pos, mask=mask & use_x, other=0.0)
            v = tl.where(use_x, xv, o)
            g64 = g.to(tl.float64)
            acc1 += g64
            acc2 += g64 * (v - shift).to(tl.float64)
        tl.atomic_add(sums_ptr + c * 2, tl.sum(acc1, axis=0))
        tl.atomic_add(sums_ptr + c * 2 + 1, tl.sum(acc2, axis=0))

    @triton.jit
    def _bwd_dx_kernel(
        gout_ptr,  # *fp32 [N, C, Ho, Wo]
        x_ptr,  # *fp32 [N, C, H, W]
        w_ptr,  # *fp32 [C] (HAS_W)
        mean_ptr,  # *fp32 [C]
        invstd_ptr,  # *fp32 [C]
        out_ptr,  # *fp32 [N, C, Ho, Wo] (RELU)
        ind_ptr,  # *u8 [N, C, Ho, Wo] (POOL)
        sums_ptr,  # *fp64 [C, 2] sum(g), sum(g * xhat) (TRAINING)
        coef_ptr,  # *fp32 [C, 3] (COEF) the channel's scale, k0, k2 given, not from sums
        dx_ptr,  # *fp32 [N, C, H, W] output
        C,
        W,  # input width
        HW,
        Ho,  # output height
        Wo,
        HWo,
        count,  # N * HW
        TRAINING: tl.constexpr,
        HAS_W: tl.constexpr,
        RELU: tl.constexpr,
        POOL: tl.constexpr,
        BLOCK: tl.constexpr,  # inputs per program
        COEF: tl.constexpr = False,  # dx = scale*g + k0 + k2*(x - mean) from coef_ptr
    ):
        # COEF: the GroupNorm mode (gn_act.py) runs this kernel over [1, N*C, H, W] with
        # per-plane coefficients it forms from its group sums
        plane = tl.program_id(0).to(tl.int64)
        c = plane % C
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HW
        if COEF:
            scale = tl.load(coef_ptr + c * 3)
        else:
            invstd = tl.load(invstd_ptr + c)
            if HAS_W:
                scale = invstd * tl.load(w_ptr + c)
            else:
                scale = invstd
        if POOL == 2:
            h = offs // W
            w = offs % W
            oh = h // 2
            ow = w // 2
            j = oh * Wo + ow
            inside = mask & (oh < Ho) & (ow < Wo)
            k = tl.load(ind_ptr + plane * HWo + j, mask=inside, other=0).to(tl.int32)
            hit = inside & (k == (h % 2) * 2 + (w % 2))
        else:
            j = offs
            hit = mask
        g = tl.load(gout_ptr + plane * HWo + j, mask=hit, other=0.0)
        if RELU:
            o = tl.load(out_ptr + plane * HWo + j, mask=hit, other=0.0)
            g = tl.where(o > 0, g, 0.0)
        dx = scale * g
        if TRAINING:
            mean = tl.load(mean_ptr + c)
            if COEF:
                k0 = tl.load(coef_ptr + c * 3 + 1)
                k2 = tl.load(coef_ptr + c * 3 + 2)
            else:
                s1 = tl.load(sums_ptr + c * 2)
                s2 = tl.load(sums_ptr + c * 2 + 1)
                k0 = (-scale.to(tl.float64) * s1 / count).to(tl.float32)
                k2 = (-scale.to(tl.float64) * invstd.to(tl.float64) * s2 / count).to(tl.float32)
            xv = tl.load(x_ptr + plane * HW + offs, mask=mask, other=0.0)
            dx = dx + k0 + k2 * (xv - mean)
        tl.store(dx_ptr + plane * HW + offs, dx, mask=mask)


def check_geometry(max_block: int, split: int | None) -> None:
    """The launchers' forcing keywords (see the module docstring): ValueError if bad."""
    if (isinstance(max_block, bool) or not isinstance(max_block, int)
            or not 16 <= max_block <= MAX_BLOCK or max_block & (max_block - 1)):
        raise ValueError(f"max_block must be a power of two from 16 to {MAX_BLOCK}, got "
                         f"{max_block!r}")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int)
                              or split < 1):
        raise ValueError(f"split must be None or an int >= 1, got {split!r}")


def _block(n: int, max_block: int = MAX_BLOCK) -> int:
    return max(16, min(max_block, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(c: int, total: int, block: int, device: torch.device,
           programs: int | None = None) -> tuple[int, int]:
    """(programs per channel, values per program, a multiple of ``block``): enough
    programs to fill the GPU, or ``programs`` of them where given (fewer where the
    channel has fewer blocks of values, or where the blocks do not divide evenly)."""
    if programs is None:
        target = 4 * _sm_count(device) if device.type == "cuda" else 2
        programs = triton.cdiv(target, max(c, 1))
    blocks = triton.cdiv(max(total, 1), block)
    split = max(1, min(blocks, programs))
    per_prog = triton.cdiv(blocks, split) * block
    return triton.cdiv(max(total, 1), per_prog), per_prog


def _geometry(x: Tensor, pool: int) -> tuple[int, int, int, int, int, int]:
    n, c = x.shape[0], x.shape[1]
    h = x.shape[2] if x.dim() == 4 else 1
    w = x.shape[-1] if x.dim() >= 3 else 1
    ho, wo = (h // 2, w // 2) if pool == 2 else (h, w)
    return n, c, h, w, ho, wo


def bn_act_pool_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       mean: Tensor | None, invstd: Tensor | None, eps: float, relu: bool,
                       pool: int, *, max_block: int = MAX_BLOCK, split: int | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of the forward contract (float64: torch ops). ``max_block``
    and ``split`` force the launch geometry (module docstring); the op passes neither."""
    validate_forward(x, weight, bias, mean, invstd, eps, pool)
    check_geometry(max_block, split)
    if x.dtype == torch.float64:
        return bn_act_pool_torch(x, weight, bias, mean, invstd, eps, relu, pool)
    x = x.contiguous()
    n, c, h, w, ho, wo = _geometry(x, pool)
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
        programs, per_prog = _split(c, total, max_block, x.device, split)
        launch(_stats_kernel, (c, programs), x, sums, c, h * w, total, per_prog,
               BLOCK=max_block, num_warps=8)
    block = _block(ho * wo, max_block)
    launch(
        _fwd_kernel, (n * c, triton.cdiv(ho * wo, block)), x,
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
    validate_forward(x, weight, bias, save_mean, save_invstd, 0.0, pool,
                     op="scaleinv::bn_act_pool_backward: ")
    check_geometry(max_block, split)
    if x.dtype == torch.float64:
        return bn_act_pool_backward_torch(grad_out, x, weight, bias, save_mean, save_invstd,
                                          out, index, training, relu, pool, output_mask)
    x, grad_out, out = x.contiguous(), grad_out.contiguous(), out.contiguous()
    save_mean, save_invstd = save_mean.contiguous(), save_invstd.contiguous()
    index = index.contiguous() if pool == 2 else out
    n, c, h, w, ho, wo = _geometry(x, pool)
    dx = torch.empty_like(x)
    sums = torch.zeros(c, 2, dtype=torch.float64, device=x.device)
    need_sums = training or output_mask[1] or output_mask[2]
    if x.numel() and need_sums:
        from_out, shift, post = xhat_source(weight, bias, save_mean, save_invstd)
        total = n * ho * wo
        programs, per_prog = _split(c, total, max_block, x.device, split)
        launch(
            _bwd_reduce_kernel, (c, programs), grad_out, x, from_out.to(torch.int8), shift,
            out, index, sums, c, w, h * w, wo, ho * wo, total, per_prog, RELU=bool(relu),
            POOL=pool, BLOCK=max_block, num_warps=8)
        sums[:, 1] *= post  # sum(g * xhat)
    if x.numel():
        block = _block(h * w, max_block)
        launch(
            _bwd_dx_kernel, (n * c, triton.cdiv(h * w, block)), grad_out, x,
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
    validate_forward(x, weight, bias, mean, invstd, eps, pool)
    out, index = empty_outputs(x, pool)
    c = x.shape[1]
    return out, x.new_empty(c), x.new_empty(c), index


def fake_grads(x: Tensor, output_mask: list[bool]
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward ops' outputs as fake tensors (both norm modes): dx like x, [C] grads."""
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(c) if output_mask[1] else None,
            x.new_empty(c) if output_mask[2] else None)


def _fake_backward(grad_out, x, weight, bias, save_mean, save_invstd, out, index, training,
                   relu, pool, output_mask):
    return fake_grads(x, output_mask)


def torch_cuda_fallback(op: str, fn: Callable) -> Callable:
    """``fn`` (an op's contract in torch ops) as the op's CUDA kernel where triton is not
    installed: correct, not fused, and it says so once in the log, with the fix. The
    original is ``__wrapped__``."""
    @functools.wraps(fn)
    def kernel(*args):
        log_once(f"triton is not installed; {op} runs its plain-torch implementation on "
                 "CUDA tensors (`pip install triton` for the fused Triton kernels)")
        return fn(*args)

    return kernel


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


def norm_stats_args(x: Tensor, c: int, running_mean: Tensor | None,
                    running_var: Tensor | None, training: bool, eps: float, op: str
                    ) -> tuple[Tensor | None, Tensor | None]:
    """The op's ``(mean, invstd)`` for a BatchNorm layer over c channels: ``(None, None)``
    (batch statistics) when ``training`` or without running statistics, else the running
    mean and ``1/sqrt(running_var + eps)``. Shared by the layers of the BatchNorm ops."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}give both running_mean and running_var or neither")
    if training or running_mean is None:
        return None, None
    _check_vec(op, "running_var", running_var, x, c)
    return running_mean, torch.rsqrt(running_var + eps)


def update_running_stats(running_mean: Tensor, running_var: Tensor, save_mean: Tensor,
                         save_invstd: Tensor, cnt: int, momentum: float, eps: float) -> None:
    """``r ← (1−momentum)·r + momentum·s`` in place, as ``F.batch_norm`` does in training:
    s the batch mean, resp. the unbiased batch variance recovered from the op's
    ``save_invstd`` (``1/invstd² − eps``, times ``cnt/(cnt−1)``), cnt values per channel."""
    with torch.no_grad():
        var = save_invstd.double().pow(-2).sub_(eps).clamp_(min=0)
        running_mean.mul_(1 - momentum).add_(save_mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (cnt / (cnt - 1))).to(running_var.dtype),
                                            alpha=momentum)


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
    mean, invstd = norm_stats_args(x, x.shape[1], running_mean, running_var, training, eps,
                                   "bn_act_pool: ")
    validate_forward(x, weight, bias, mean, invstd, eps, pool, op="bn_act_pool: ")
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
