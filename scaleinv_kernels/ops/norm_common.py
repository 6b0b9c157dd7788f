"""What the fused norm ops share: validation, output shapes, the Triton kernels of both
norm modes and their launch geometry, the pieces of the torch contracts both use, the
BatchNorm layers' running statistics and registration helpers.

Users: ``scaleinv::bn_act_pool`` (:mod:`scaleinv_kernels.ops.norm_act`, BatchNorm),
``scaleinv::gn_act_pool`` (:mod:`scaleinv_kernels.ops.gn_act`, GroupNorm) and
``scaleinv::conv_bn_act_pool`` (:mod:`scaleinv_kernels.ops.conv_norm_act`, an input-layer
convolution fused into BatchNorm). They import from here only public names, and never
from each other's private ones.

Naming rule of the norm op modules (this one, ``norm_act``, ``gn_act``, ``conv_norm_act``):

* ``<op>`` (``bn_act_pool``, ``gn_act_pool``, ``conv_bn_act_pool``): the layer the
  ensemble calls — it validates, calls ``torch.ops.scaleinv.<op>``, updates running
  statistics, and runs ``<op>_reference`` when the compiled extension is missing.
* ``<op>_reference``: the same layer as the unfused torch layers (``F.batch_norm`` /
  ``F.group_norm`` → ``F.relu`` → ``F.max_pool2d``) with the layer's signature: the
  oracle of the layer-level tests and the fallback without the extension.
* ``<op>_torch`` / ``<op>_backward_torch``: the op's contract — the schema's arguments
  and every output (saved statistics, window index) — in torch ops, with float64
  statistics and sums: the oracle of the op-level tests, and the CUDA kernel without
  triton. Building blocks of those contracts here end in ``_torch`` too.
* ``<op>_triton`` / ``<op>_backward_triton``: the contract's CUDA kernel with triton.
* ``validate_*``: raise ``ValueError``/``TypeError`` naming the offending argument (the
  C++ kernels check the same things); ``*_kernel``: a ``@triton.jit`` kernel.

Launch geometry: the reductions (:func:`stats_kernel`, :func:`bwd_reduce_kernel`) split
each channel over several programs to fill a GPU, and the elementwise kernels cover a
plane with blocks of at most ``MAX_BLOCK`` values. Planes small enough for the
interpreter trigger neither, so the Triton launchers of both modes take two keywords that
force them: ``max_block`` (a power of two from 16 to ``MAX_BLOCK``: the largest block of
every kernel, so a plane of more values spans several blocks) and ``split`` (programs per
channel of the reductions, at most one per block of values). The ops never pass them; the
tests do, to check those paths against the float64 contracts on small odd shapes.

Longer than 500 lines because the four Triton kernels (about half of it) are one unit
with their launch geometry: both norm modes launch all four, so they change together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv_kernels._extension import log_once, triton_available

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# ----------------------------------------------------------------------------------
# validation (the C++ kernels check the same things)
# ----------------------------------------------------------------------------------


def check_channel_vector(op: str, name: str, t: Tensor | None, x: Tensor, c: int) -> None:
    """A per-channel vector ``t``: None, or ``[c]`` of x's dtype on x's device."""
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
    """The checks of x and pool both norm modes share."""
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


def validate_bn(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                mean: Tensor | None, invstd: Tensor | None, eps: float, pool: int,
                op: str = "scaleinv::bn_act_pool: ") -> None:
    """The BatchNorm mode's arguments (``bn_act_pool``'s, and ``conv_bn_act_pool``'s on the
    convolution's output)."""
    validate_x(x, pool, op)
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
        check_channel_vector(op, name, t, x, c)
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


def validate_gn(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                eps: float, pool: int, op: str = "scaleinv::gn_act_pool: ") -> None:
    """The GroupNorm mode's arguments."""
    validate_x(x, pool, op)
    c = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"{op}groups must be an int >= 1 that divides the {c} channels, "
                         f"got {groups!r}")
    if eps < 0:
        raise ValueError(f"{op}eps must be >= 0, got {eps}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_channel_vector(op, name, t, x, c)


# ----------------------------------------------------------------------------------
# outputs and the pieces of the torch contracts both modes use
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


def bcast_channels(t: Tensor, x: Tensor) -> Tensor:
    """A ``[C]`` vector shaped to broadcast over x's channel dimension."""
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def act_pool_torch(y: Tensor, relu: bool, pool: int) -> tuple[Tensor, Tensor]:
    """The normalized y → ReLU (if ``relu``) → 2×2 max pool (if ``pool == 2``): ``(out,
    index)`` as the contracts define them (index: the window position 0..3, row-major, of
    torch.max_pool2d's choice; ``[0]``-shaped without pool)."""
    if relu:
        y = torch.relu(y)
    if pool != 2:
        return y, y.new_empty(0, dtype=torch.uint8)
    w = y.shape[3]
    out, flat = F.max_pool2d(y, 2, return_indices=True)
    return out, ((flat // w) % 2 * 2 + flat % w % 2).to(torch.uint8)


def routed_grad_torch(grad_out: Tensor, x: Tensor, out: Tensor, index: Tensor, relu: bool,
                      pool: int) -> Tensor:
    """g of the backward contracts: grad_out at the argmax of each window (zero elsewhere,
    x's shape), masked by out > 0 when ``relu``."""
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


# ----------------------------------------------------------------------------------
# BatchNorm layers' running statistics (bn_act_pool and conv_bn_act_pool)
# ----------------------------------------------------------------------------------


def running_stats_args(x: Tensor, c: int, running_mean: Tensor | None,
                       running_var: Tensor | None, training: bool, eps: float, op: str
                       ) -> tuple[Tensor | None, Tensor | None]:
    """The op's ``(mean, invstd)`` for a BatchNorm layer over c channels: ``(None, None)``
    (batch statistics) when ``training`` or without running statistics, else the running
    mean and ``1/sqrt(running_var + eps)``."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}give both running_mean and running_var or neither")
    if training or running_mean is None:
        return None, None
    check_channel_vector(op, "running_var", running_var, x, c)
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


# ----------------------------------------------------------------------------------
# registration helpers
# ----------------------------------------------------------------------------------


def fake_grads(x: Tensor, output_mask: list[bool]
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward ops' outputs as fake tensors (both norm modes): dx like x, [C] grads."""
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(c) if output_mask[1] else None,
            x.new_empty(c) if output_mask[2] else None)


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


# ----------------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------
#
# Forward: stats_kernel (grid C x SPLIT: each program sums a slice of its channel's
# N*H*W values, shifted by the channel's first element, in fp64, and adds them with
# atomic_add into sums[C, 2]); fwd_kernel (grid N*C planes x blocks of outputs: mean and
# invstd from the sums, normalize, ReLU, 2x2 max + index). Backward: bwd_reduce_kernel
# (grid C x SPLIT over the pooled positions: sum(g), sum(g*(v - shift)) into fp64
# sums[C, 2], v = out or x at the argmax as the caller decides per channel) and
# bwd_dx_kernel (grid N*C planes x blocks of inputs). The atomics make the last bits of
# the statistics depend on the order in which programs finish. GroupNorm runs them on
# views with one "channel" per (sample, group) or per plane (ops/gn_act.py).

MAX_BLOCK = 1024

# Negation in the kernels is written x * -1.0, never -x: triton < 3.8 lowers unary minus
# to 0.0 - x, which gives +0.0 for x = +0.0 where torch's neg gives -0.0.

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def stats_kernel(
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
    def fwd_kernel(
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
            beta = (mean * -1.0) * alpha  # not -mean: see the note above stats_kernel
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
    def bwd_reduce_kernel(
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
    def bwd_dx_kernel(
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
                neg_scale = scale.to(tl.float64) * -1.0  # not -scale: see above stats_kernel
                k0 = (neg_scale * s1 / count).to(tl.float32)
                k2 = (neg_scale * invstd.to(tl.float64) * s2 / count).to(tl.float32)
            xv = tl.load(x_ptr + plane * HW + offs, mask=mask, other=0.0)
            dx = dx + k0 + k2 * (xv - mean)
        tl.store(dx_ptr + plane * HW + offs, dx, mask=mask)

else:  # the names exist without triton (the launchers that use them are not registered)
    stats_kernel = fwd_kernel = bwd_reduce_kernel = bwd_dx_kernel = None


def validate_launch_geometry(max_block: int, split: int | None) -> None:
    """The Triton launchers' forcing keywords ``max_block`` and ``split`` (see the module
    docstring): ValueError if bad."""
    if (isinstance(max_block, bool) or not isinstance(max_block, int)
            or not 16 <= max_block <= MAX_BLOCK or max_block & (max_block - 1)):
        raise ValueError(f"max_block must be a power of two from 16 to {MAX_BLOCK}, got "
                         f"{max_block!r}")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int)
                              or split < 1):
        raise ValueError(f"split must be None or an int >= 1, got {split!r}")


def block_size(n: int, max_block: int = MAX_BLOCK) -> int:
    """Values per program of an elementwise kernel over n values: a power of two, at least
    16, at most ``max_block``."""
    return max(16, min(max_block, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_reduction(c: int, total: int, block: int, device: torch.device,
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


def plane_geometry(x: Tensor, pool: int) -> tuple[int, int, int, int, int, int]:
    """``(N, C, H, W, Ho, Wo)`` of x viewed as planes (a 2-D or 3-D x has H = 1, and W = 1
    for 2-D); Ho, Wo the pooled plane (H, W without pool)."""
    n, c = x.shape[0], x.shape[1]
    h = x.shape[2] if x.dim() == 4 else 1
    w = x.shape[-1] if x.dim() >= 3 else 1
    ho, wo = (h // 2, w // 2) if pool == 2 else (h, w)
    return n, c, h, w, ho, wo
