"""The Triton kernel of ``scaleinv::sgd_wd_`` and how it is launched.

:func:`launch_sgd_wd` runs the contract of :mod:`scaleinv_kernels.ops.sgd_wd` (the module
docstring there) with ONE launch, for arguments already validated and params that are
not float64 (:func:`~scaleinv_kernels.ops.sgd_wd.sgd_wd_triton` checks both and is the
op's CUDA kernel). :func:`host_table` is also how the optimizer ships its own index
tables to the GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from scaleinv_kernels._extension import triton_available
from scaleinv_kernels.ops.registry import launch_triton as launch

# Layout: ONE launch per (device, dtype) group. The tensors stay where the user put
# them; the kernel reads their addresses from int64 pointer tables (rebuilt each call,
# since `zero_grad(set_to_none=True)` reallocates grads) and walks a work table of
# (tensor, begin, end, stats row) items of at most CHUNK elements, cached per layout.
# Each program loops over its item in BLOCK-wide steps, keeps fp64 lane sums and adds
# one fp64 partial per statistic with atomic_add (so the last bits of the statistics may
# vary between runs; the parameter update itself is deterministic).

CHUNK = 16384
BLOCK = 1024

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to(x, DTYPE: tl.constexpr):
        """Round fp32 ``x`` to DTYPE to nearest-even. For bf16 the rounding is spelled out
        in integer ops (as c10::BFloat16 does): the Triton interpreter truncates on
        ``.to(tl.bfloat16)``, and this way the GPU and the interpreter agree bit for bit."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays a quiet NaN
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def sgd_wd_kernel(
        param_ptrs,  # *i64 [T]  address of param t
        grad_ptrs,  # *i64 [T]  address of grad t
        buf_ptrs,  # *i64 [T]  address of momentum buffer t (unused without momentum)
        fresh_ptr,  # *i8  [T]  1 = buffer t is uninitialised: buf = d
        work_ptr,  # *i64 [W, 4] (tensor index, begin, end, stats row) per program
        stats_ptr,  # *f64 [R, 6] per-segment sums, accumulated with atomic_add
        lr_ptr,  # *fp  [1]  learning rate when LR_FROM_TENSOR
        hparams_ptr,  # *f64 [S, 2] (lr, weight_decay) per segment when PER_SEGMENT
        neg_lr,  # fp32  -lr when not LR_FROM_TENSOR
        weight_decay,  # fp32
        momentum,  # fp32
        one_minus_dampening,  # fp32
        DTYPE: tl.constexpr,  # element type of params/grads/buffers
        HAS_WD: tl.constexpr,  # weight_decay != 0 (torch skips the add when it is 0)
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        TRACK_STATS: tl.constexpr,
        LR_FROM_TENSOR: tl.constexpr,
        PER_SEGMENT: tl.constexpr,  # lr/weight_decay from hparams_ptr; work rows have 5 cols
        BLOCK: tl.constexpr,  # elements per inner step
    ):
        if PER_SEGMENT:
            item = tl.program_id(0).to(tl.int64) * 5
        else:
            item = tl.program_id(0).to(tl.int64) * 4
        t = tl.load(work_ptr + item)
        begin = tl.load(work_ptr + item + 1)
        end = tl.load(work_ptr + item + 2)
        row = tl.load(work_ptr + item + 3)
        p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(DTYPE))
        if PER_SEGMENT:
            # the segment's own (lr, wd), rounded fp64 -> fp32 to nearest like the scalars
            seg = tl.load(work_ptr + item + 4)
            lr_scale = tl.load(hparams_ptr + seg * 2).to(tl.float32) * -1.0
            weight_decay = tl.load(hparams_ptr + seg * 2 + 1).to(tl.float32)
        elif LR_FROM_TENSOR:
            lr_scale = tl.load(lr_ptr).to(tl.float32) * -1.0
        else:
            lr_scale = neg_lr
        # fp64 statistics: with fp32 products the sin^2 term of the angular update,
        # |w|^2|D|^2 - <w,D>^2, cancels down to rounding noise for small angles.
        acc_ww = tl.zeros([BLOCK], dtype=tl.float64)
        acc_gg = tl.zeros([BLOCK], dtype=tl.float64)
        acc_wg = tl.zeros([BLOCK], dtype=tl.float64)
        acc_dd = tl.zeros([BLOCK], dtype=tl.float64)
        acc_wd = tl.zeros([BLOCK], dtype=tl.float64)
        acc_nf = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < end
            w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if MAXIMIZE:
                # x * -1.0, not -x: triton < 3.8 lowers unary minus to 0.0 - x, which
                # gives +0.0 for x = +0.0 where torch's neg gives -0.0 (bitwise contract)
                d = g * -1.0
            else:
                d = g
            if PER_SEGMENT:  # torch skips the add when wd == 0 (g + 0*w is not g for -0/inf)
                d = tl.where(weight_decay != 0.0, tl.fma(w, weight_decay, d), d)
            elif HAS_WD:
                d = tl.fma(w, weight_decay, d)
            if HAS_MOMENTUM:
                b_ptr = tl.load(buf_ptrs + t).to(tl.pointer_type(DTYPE))
                fresh = tl.load(fresh_ptr + t)
                b_old = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                b = tl.where(fresh != 0, d, tl.fma(d, one_minus_dampening, b_old * momentum))
                tl.store(b_ptr + offs, _round_to(b, DTYPE), mask=mask)
                if NESTEROV:
                    d = tl.fma(b, momentum, d)
                else:
                    d = b
            w_new = _round_to(tl.fma(d, lr_scale, w), DTYPE)
            tl.store(p_ptr + offs, w_new, mask=mask)
            if TRACK_STATS:
                w64 = w.to(tl.float64)
                g64 = g.to(tl.float64)
                delta = w_new.to(tl.float32).to(tl.float64) - w64
                acc_ww += w64 * w64
                acc_gg += g64 * g64
                acc_wg += w64 * g64
                acc_dd += delta * delta
                acc_wd += w64 * delta
                acc_nf += tl.where(tl.abs(g) < float("inf"), 0.0, 1.0)
        if TRACK_STATS:
            s = stats_ptr + row * 6
            tl.atomic_add(s + 0, tl.sum(acc_ww, axis=0))
            tl.atomic_add(s + 1, tl.sum(acc_gg, axis=0))
            tl.atomic_add(s + 2, tl.sum(acc_wg, axis=0))
            tl.atomic_add(s + 3, tl.sum(acc_dd, axis=0))
            tl.atomic_add(s + 4, tl.sum(acc_wd, axis=0))
            tl.atomic_add(s + 5, tl.sum(acc_nf, axis=0).to(tl.float64))

    TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                     torch.float16: tl.float16}


@functools.lru_cache(maxsize=64)
def work_table(numels: tuple[int, ...], segments: tuple[int, ...], rows: tuple[int, ...],
                device: torch.device, per_segment: bool = False) -> Tensor:
    """(tensor, begin, end, stats row) items of at most CHUNK elements, never across a
    segment, plus the segment's row of segment_hparams as a 5th column when
    ``per_segment``; cached because it depends only on the shapes, not on the data."""
    items: list[int] = []
    offset = 0  # first segment_hparams row of tensor t
    for t, (numel, k, row) in enumerate(zip(numels, segments, rows)):
        seg_len = numel // k if numel else 0
        for s in range(k if numel else 0):
            for b in range(0, seg_len, CHUNK):
                items += (t, s * seg_len + b, s * seg_len + min(seg_len, b + CHUNK), row + s)
                if per_segment:
                    items.append(offset + s)
        offset += k
    return host_table(items, torch.int64, device).reshape(-1, 5 if per_segment else 4)


def host_table(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small table built on the host, copied to the GPU asynchronously from pinned
    memory (a plain ``torch.tensor(values, device="cuda")`` waits for the copy)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def pointer_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The tensors' addresses as an int64 table on ``device``."""
    return host_table([t.data_ptr() for t in tensors], torch.int64, device)


def launch_sgd_wd(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    fresh_buffers: Sequence[bool],
    stats: Tensor,
    stats_rows: Sequence[int],
    segments: Sequence[int],
    lr_tensor: Tensor | None,
    segment_hparams: Tensor | None,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One launch of :func:`sgd_wd_kernel` over all params (validated, not float64, at
    least one); non-contiguous tensors are updated through contiguous copies written
    back after."""
    device = params[0].device
    has_mom = momentum != 0
    work_p = [p if p.is_contiguous() else p.contiguous() for p in params]
    work_g = [g if g.is_contiguous() else g.contiguous() for g in grads]
    work_b = [b if b.is_contiguous() else b.contiguous() for b in momentum_buffers]
    track = stats.numel() > 0
    per_segment = segment_hparams is not None
    work = work_table(tuple(p.numel() for p in params), tuple(segments), tuple(stats_rows),
                      device, per_segment)
    if work.shape[0] == 0:
        return
    p_table = pointer_table(work_p, device)
    g_table = pointer_table(work_g, device)
    b_table = pointer_table(work_b, device) if has_mom else p_table
    fresh = host_table([int(bool(f)) for f in fresh_buffers] if has_mom else [0], torch.int8,
                       device)
    stats_arg = stats if track else torch.zeros(1, dtype=torch.float64, device=device)
    lr_arg = lr_tensor if lr_tensor is not None else stats_arg
    hparams_arg = segment_hparams.contiguous() if per_segment else stats_arg
    launch(
        sgd_wd_kernel, (work.shape[0],),
        p_table, g_table, b_table, fresh, work, stats_arg, lr_arg, hparams_arg,
        -float(lr), float(weight_decay), float(momentum), 1.0 - float(dampening),
        DTYPE=TRITON_DTYPES[params[0].dtype], HAS_WD=weight_decay != 0 and not per_segment,
        HAS_MOMENTUM=has_mom, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
        TRACK_STATS=track, LR_FROM_TENSOR=lr_tensor is not None and not per_segment,
        PER_SEGMENT=per_segment, BLOCK=BLOCK, num_warps=8,
        enable_fp_fusion=False,  # every fma is explicit (tl.fma), as torch's kernels fuse
    )
    for src, dst in zip(work_p + work_b, list(params) + list(momentum_buffers)):
        if src is not dst:
            dst.copy_(src)
