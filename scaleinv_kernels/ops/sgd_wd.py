"""``scaleinv::sgd_wd_`` — fused SGD + coupled weight decay with per-segment statistics.

Contract (same for every backend)::

    sgd_wd_(params, grads, momentum_buffers, fresh_buffers, stats, stats_rows, segments,
            lr_tensor, segment_hparams, lr, weight_decay, momentum, dampening, nesterov,
            maximize) -> None

* ``params`` (mutated): float32/float64/bfloat16/float16 tensors of ONE dtype on ONE
  device; any strides (non-contiguous ones are updated through a contiguous copy).
* ``grads``: same shapes/dtype/device as their params, dense.
* ``momentum_buffers`` (mutated): one per param when ``momentum != 0``, else ``[]``.
  ``fresh_buffers[i]`` says that buffer ``i`` holds garbage and is initialised with the
  first direction, like ``torch.optim.SGD``'s ``buf = d.clone()``.
* Per element, in fp32 (fp64 for fp64 params), exactly torch.optim.SGD's arithmetic:
  ``d = ±g + wd·w``; ``buf = d`` (fresh) or ``mom·buf + (1−damp)·d``; ``d = d + mom·buf``
  (nesterov) or ``buf``; ``w ← w − lr·d``; each stored value is rounded once.
* ``stats`` (mutated, float64 ``[rows, 6]``, or empty to skip all statistics work):
  param ``i`` is cut into ``segments[i]`` equal contiguous segments; segment ``s`` ADDS
  ``Σw², Σg², Σw·g, ΣΔ², Σw·Δ, #nonfinite(g)`` into row ``stats_rows[i] + s`` (w before
  the update, g as stored in ``.grad``, Δ = stored new w − w). The caller zeroes rows.
  Products and sums are fp64 (the products of fp32 values are exact), so the angular
  update derived from them stays accurate for tiny angles.
* ``lr_tensor`` (optional one-element tensor on the params' device) overrides ``lr``.
* ``segment_hparams`` (optional float64 ``[S, 2]`` on the params' device,
  ``S = sum(segments)``) gives every segment its own ``(lr, weight_decay)``: row
  ``offset_i + s`` (``offset_i = sum(segments[:i])``, call order) belongs to segment ``s``
  of param ``i`` and overrides ``lr``/``lr_tensor`` and ``weight_decay`` there. A
  zero-numel param still owns its ``segments[i]`` rows (they are unused). The values are
  rounded to the math type like the scalars, and a segment with weight_decay 0 skips the
  add, so the result equals, segment by segment and bit for bit, separate calls on each
  segment's slice with scalar ``lr``/``weight_decay``. Shape, dtype and device are always
  checked; values (finite, >= 0) wherever that needs no host sync, i.e. on CPU.

* ``stats`` (when not empty), ``lr_tensor`` and ``segment_hparams`` must be on the
  params' device: a CPU ``lr_tensor`` with CUDA params is a ValueError here (the Triton
  kernel would read it through a CPU pointer); :class:`~scaleinv_kernels.FusedSGDWD`
  moves a CPU 0-d ``lr`` to the params' device before it launches anything, as
  ``torch.optim.SGD`` accepts one. Sparse grads are a ValueError before anything is
  written.

Backends: C++ (``csrc/sgd_wd.cpp``) for the ``CPU`` dispatch key, Triton (below) for
``CUDA``, and :func:`sgd_wd_reference` in plain torch, which is also the fallback (the
``CUDA`` kernel where triton is missing). The schema lives in ``csrc/registration.cpp``
with the other ops' schemas, so ``torch.library.triton_op`` (which defines its op's
schema itself) cannot be used here; instead the op is a custom op with a fake kernel
(which checks devices, so tracing sees the same errors), hence opaque to and traceable
by torch.compile, its Triton kernel is registered for ``CUDA`` through
:func:`scaleinv_kernels.ops.registry.register_cuda_kernel`, and the kernel launch goes
through ``torch.library.wrap_triton`` (see :func:`.registry.launch_triton`). :func:`sgd_wd_` reaches
the C++ and the Triton kernel through one path, ``torch.ops.scaleinv.sgd_wd_``: the
tensors' device picks the kernel (CPU tensors take the Triton one inside
:func:`scaleinv_kernels.ops.registry.cuda_code_path_on_cpu`).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from scaleinv_kernels._extension import extension_loaded, log_once, triton_available
from scaleinv_kernels.ops.registry import cuda_code_path_active, register_cuda_kernel
from scaleinv_kernels.ops.registry import launch_triton as _launch

STAT_COLUMNS = ("w_sq", "g_sq", "w_dot_g", "delta_sq", "w_dot_delta", "nonfinite")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------
# validation shared by the Python backends (the C++ kernel checks the same things)
# ----------------------------------------------------------------------------------


def validate_args(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    fresh_buffers: Sequence[bool],
    stats: Tensor,
    stats_rows: Sequence[int],
    segments: Sequence[int],
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    *,
    segment_hparams: Tensor | None = None,
    lr_tensor: Tensor | None = None,
) -> None:
    """Raise ValueError/TypeError naming the offending index; mutate nothing.

    ``segment_hparams`` values are checked only on CPU (on a GPU it would need a sync);
    ``lr_tensor``'s value is the caller's to check (``lr``), its place here."""
    n = len(params)
    op = "scaleinv::sgd_wd_: "
    check_devices(params, stats, lr_tensor, segment_hparams)
    if len(grads) != n or len(stats_rows) != n or len(segments) != n:
        raise ValueError(f"{op}params, grads, stats_rows and segments need equal lengths")
    if min(weight_decay, momentum, dampening) < 0 or lr < 0:
        raise ValueError(f"{op}lr, weight_decay, momentum and dampening must be >= 0")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{op}nesterov needs momentum > 0 and dampening == 0")
    if momentum != 0 and (len(momentum_buffers) != n or len(fresh_buffers) != n):
        raise ValueError(f"{op}momentum != 0 needs one momentum buffer and fresh flag per param")
    track = stats.numel() > 0
    if track and (stats.dim() != 2 or stats.shape[1] != 6 or stats.dtype != torch.float64):
        raise ValueError(f"{op}stats must be float64 of shape [rows, 6], got {stats.dtype} "
                         f"{tuple(stats.shape)}")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != dtype:
            raise TypeError(f"{op}param {i} is {p.dtype} but param 0 is {dtype}; "
                            "call once per dtype")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}param {i} has dtype {p.dtype}; only float32/float64/"
                            "bfloat16/float16 params are supported")
        if p.device != device:
            raise ValueError(f"{op}param {i} is on {p.device} but param 0 on {device}")
        if g.layout != torch.strided:
            raise ValueError(f"{op}param {i} has a sparse gradient; sparse gradients are "
                             "not supported")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"{op}param {i} has shape {list(p.shape)} {p.dtype} on {p.device} but its "
                f"grad has shape {list(g.shape)} {g.dtype} on {g.device}; a grad must "
                "match its param")
        if segments[i] < 1 or p.numel() % segments[i]:
            raise ValueError(f"{op}param {i} with {p.numel()} elements cannot be cut into "
                             f"{segments[i]} equal segments")
        if momentum != 0:
            b = momentum_buffers[i]
            if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                raise ValueError(f"{op}momentum buffer {i} must match its param "
                                 f"({list(p.shape)} {p.dtype})")
        if track and not (0 <= stats_rows[i] and stats_rows[i] + segments[i] <= stats.shape[0]):
            raise ValueError(f"{op}stats rows of param {i} fall outside stats "
                             f"({stats.shape[0]} rows)")
    if segment_hparams is not None:
        _validate_segment_hparams(segment_hparams, segments, device)


def check_devices(params: Sequence[Tensor], stats: Tensor, lr_tensor: Tensor | None,
                  segment_hparams: Tensor | None) -> None:
    """The checks that need neither a loop over the tensors nor their values: a one-element
    ``lr_tensor``, and ``stats`` (when not empty), ``lr_tensor`` and ``segment_hparams``
    on the params' device. Also run by the fake kernel, so a trace meets the same errors."""
    op = "scaleinv::sgd_wd_: "
    if lr_tensor is not None and lr_tensor.numel() != 1:
        raise ValueError(f"{op}lr_tensor must have one element, got shape "
                         f"{list(lr_tensor.shape)}")
    if not params:
        return
    device = params[0].device
    if lr_tensor is not None and lr_tensor.device != device:
        raise ValueError(f"{op}lr_tensor is on {lr_tensor.device} but the params are on "
                         f"{device}; move it to their device first, e.g. "
                         f"lr.to({str(device)!r}, non_blocking=True) (FusedSGDWD does)")
    if stats.numel() > 0 and stats.device != device:
        raise ValueError(f"{op}stats is on {stats.device} but the params are on {device}; "
                         "it must be on their device")
    if isinstance(segment_hparams, Tensor) and segment_hparams.device != device:
        raise ValueError(f"{op}segment_hparams is on {segment_hparams.device} but the params "
                         f"are on {device}; it must be a dense tensor on their device")


def _validate_segment_hparams(table: Tensor, segments: Sequence[int],
                              device: torch.device | None) -> None:
    op = "scaleinv::sgd_wd_: "
    n_seg = sum(segments)
    if not isinstance(table, Tensor) or table.dtype != torch.float64:
        raise TypeError(f"{op}segment_hparams must be float64, got "
                        f"{getattr(table, 'dtype', type(table).__name__)}")
    if table.dim() != 2 or table.shape[0] != n_seg or table.shape[1] != 2:
        raise ValueError(f"{op}segment_hparams must have shape [sum(segments), 2] = [{n_seg}, 2] "
                         f"(one (lr, weight_decay) row per segment), got {list(table.shape)}")
    if table.layout != torch.strided or (device is not None and table.device != device):
        raise ValueError(f"{op}segment_hparams is on {table.device} but the params are on "
                         f"{device}; it must be a dense tensor on their device")
    if table.device.type != "cpu" or n_seg == 0:
        return
    bad = ~(torch.isfinite(table) & (table >= 0)).all(1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        i = next(i for i, end in enumerate(itertools.accumulate(segments)) if r < end)
        s = r - (sum(segments[:i]))
        raise ValueError(f"{op}segment_hparams row {r} (param {i}, segment {s}) is "
                         f"(lr={table[r, 0].item()}, weight_decay={table[r, 1].item()}); every "
                         "lr and weight_decay must be finite and >= 0")


# ----------------------------------------------------------------------------------
# reference: plain torch, the same ops torch.optim.SGD issues (hence bitwise equal)
# ----------------------------------------------------------------------------------


def sgd_wd_reference(
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
    """Plain-torch implementation of the contract in the module docstring.

    Statistics are computed in float64 from the fp32 values, i.e. they are the exact
    sums the kernels approximate.
    """
    check_devices(params, stats, lr_tensor, segment_hparams)  # before reading lr_tensor
    if lr_tensor is not None:
        lr = float(lr_tensor)
    validate_args(params, grads, momentum_buffers, fresh_buffers, stats, stats_rows,
                  segments, lr, weight_decay, momentum, dampening, nesterov,
                  segment_hparams=segment_hparams, lr_tensor=lr_tensor)
    if segment_hparams is not None:
        _validate_segment_hparams(segment_hparams.cpu(), segments, None)  # values, anywhere
        table = segment_hparams.tolist()
    track = stats.numel() > 0
    offset = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        math = torch.float64 if p.dtype == torch.float64 else torch.float32
        if segment_hparams is None:  # the whole tensor at once
            parts = [(lr, weight_decay)]
        else:
            parts = table[offset:offset + segments[i]]
        offset += segments[i]
        k = len(parts)
        w = p.detach().to(math, copy=True).reshape(k, -1)
        gm = g.to(math).reshape(k, -1)
        buf = momentum_buffers[i] if momentum != 0 else None
        b_old = buf.to(math).reshape(k, -1) if buf is not None else None
        new_w, new_b = torch.empty_like(w), torch.empty_like(w)
        for s, (lr_s, wd_s) in enumerate(parts):  # each segment: SGD's ops on its slice
            d = -gm[s] if maximize else gm[s]
            if wd_s != 0:
                d = d.add(w[s], alpha=wd_s)
            if buf is not None:
                if fresh_buffers[i]:
                    bv = d.clone()
                else:
                    bv = b_old[s].clone().mul_(momentum).add_(d, alpha=1 - dampening)
                new_b[s] = bv
                d = d.add(bv, alpha=momentum) if nesterov else bv
            new_w[s] = w[s].add(d, alpha=-lr_s)
        if buf is not None:
            buf.copy_(new_b.reshape(p.shape))
        p.detach().copy_(new_w.reshape(p.shape))
        w = w.reshape(p.shape)
        if track and p.numel() > 0:
            k = segments[i]
            w64 = w.double().reshape(k, -1)
            g64 = g.double().reshape(k, -1)
            delta = p.detach().double().reshape(k, -1) - w64
            sums = torch.stack([
                (w64 * w64).sum(1), (g64 * g64).sum(1), (w64 * g64).sum(1),
                (delta * delta).sum(1), (w64 * delta).sum(1),
                (~torch.isfinite(g64)).sum(1).double(),
            ], dim=1)
            stats[stats_rows[i]:stats_rows[i] + k] += sums.to(stats.device)


# ----------------------------------------------------------------------------------
# Triton kernel (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------
#
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
    def _sgd_wd_kernel(
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
            lr_scale = -tl.load(hparams_ptr + seg * 2).to(tl.float32)
            weight_decay = tl.load(hparams_ptr + seg * 2 + 1).to(tl.float32)
        elif LR_FROM_TENSOR:
            lr_scale = -tl.load(lr_ptr).to(tl.float32)
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
                d = -g
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
def _work_table(numels: tuple[int, ...], segments: tuple[int, ...], rows: tuple[int, ...],
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
    return _host_table(items, torch.int64, device).reshape(-1, 5 if per_segment else 4)


def _host_table(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small table built on the host, copied to the GPU asynchronously from pinned
    memory (a plain ``torch.tensor(values, device="cuda")`` waits for the copy)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _pointer_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    return _host_table([t.data_ptr() for t in tensors], torch.int64, device)


def sgd_wd_triton(
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
    """Triton implementation of the contract in the module docstring (one launch).

    float64 params have no Triton kernel and run :func:`sgd_wd_reference`.
    """
    validate_args(params, grads, momentum_buffers, fresh_buffers, stats, stats_rows,
                  segments, 0.0 if lr_tensor is not None else lr, weight_decay, momentum,
                  dampening, nesterov, segment_hparams=segment_hparams, lr_tensor=lr_tensor)
    if not params:
        return
    if params[0].dtype == torch.float64:
        log_once("float64 params have no Triton kernel; they use the torch reference")
        return sgd_wd_reference(params, grads, momentum_buffers, fresh_buffers, stats,
                                stats_rows, segments, lr_tensor, segment_hparams, lr,
                                weight_decay, momentum, dampening, nesterov, maximize)
    device = params[0].device
    has_mom = momentum != 0
    # Non-contiguous tensors are updated through contiguous copies written back after.
    work_p = [p if p.is_contiguous() else p.contiguous() for p in params]
    work_g = [g if g.is_contiguous() else g.contiguous() for g in grads]
    work_b = [b if b.is_contiguous() else b.contiguous() for b in momentum_buffers]
    track = stats.numel() > 0
    per_segment = segment_hparams is not None
    work = _work_table(tuple(p.numel() for p in params), tuple(segments), tuple(stats_rows),
                       device, per_segment)
    if work.shape[0] == 0:
        return
    p_table = _pointer_table(work_p, device)
    g_table = _pointer_table(work_g, device)
    b_table = _pointer_table(work_b, device) if has_mom else p_table
    fresh = _host_table([int(bool(f)) for f in fresh_buffers] if has_mom else [0], torch.int8,
                        device)
    stats_arg = stats if track else torch.zeros(1, dtype=torch.float64, device=device)
    lr_arg = lr_tensor if lr_tensor is not None else stats_arg
    hparams_arg = segment_hparams.contiguous() if per_segment else stats_arg
    _launch(
        _sgd_wd_kernel, (work.shape[0],),
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



# ----------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------

BACKENDS = ("cpp", "triton", "reference")


def select_backend(device: torch.device) -> str:
    """The backend for tensors on ``device``; decided once per parameter group.

    ``SCALEINV_BACKEND=reference`` forces the plain-torch path (debugging, A/B runs).
    CPU tensors get ``"triton"`` while they take the CUDA code path
    (:func:`scaleinv_kernels.ops.registry.cuda_code_path_on_cpu`).
    """
    forced = os.environ.get("SCALEINV_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SCALEINV_BACKEND={forced!r}; choose one of {BACKENDS}")
        return forced
    if device.type == "cpu":
        if cuda_code_path_active():
            return "triton"
        return "cpp" if extension_loaded() else "reference"
    if device.type == "cuda" and triton_available():
        return "triton"
    log_once(f"no fused kernel for {device.type} tensors; using the torch reference")
    return "reference"


def _kernel_for(device: torch.device) -> str | None:
    """Which kernel the dispatcher runs for tensors on ``device``."""
    if device.type == "cuda" or (device.type == "cpu" and cuda_code_path_active()):
        return "triton"
    return "cpp" if device.type == "cpu" else None


def sgd_wd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    fresh_buffers: Sequence[bool],
    stats: Tensor,
    stats_rows: Sequence[int],
    segments: Sequence[int],
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    *,
    backend: str,
    segment_hparams: Tensor | None = None,
) -> None:
    """Run the op with ``backend`` ("cpp", "triton" or "reference"); see module doc.
    The sequences must be lists (the C++ op takes no other sequence type).
    ``segment_hparams`` (float64 [sum(segments), 2]) overrides ``lr``/``weight_decay``
    per segment.

    "cpp" and "triton" both call ``torch.ops.scaleinv.sgd_wd_``, where the tensors'
    device picks the kernel, so ``backend`` must name the kernel of that device: "cpp"
    for CPU tensors, "triton" for CUDA tensors and for CPU tensors inside
    ``cuda_code_path_on_cpu()`` (anything else is a ValueError, not a silent switch).
    "reference" calls :func:`sgd_wd_reference` directly, on any device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"scaleinv::sgd_wd_: unknown backend {backend!r}; choose one of "
                         f"{BACKENDS}")
    lr_tensor = lr if isinstance(lr, Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    args = (params, grads, momentum_buffers, fresh_buffers,
            stats, stats_rows, segments, lr_tensor, segment_hparams, lr_value,
            float(weight_decay),
            float(momentum), float(dampening), bool(nesterov), bool(maximize))
    if backend == "reference":
        return sgd_wd_reference(*args)
    # Checked here, before the dispatcher, because the dispatcher itself would send a
    # sparse grad to a SparseCPU/SparseCUDA kernel that does not exist
    # (NotImplementedError) and a tensor on another device, e.g. a CPU lr_tensor with
    # CUDA params, to a kernel that cannot read it.
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise ValueError(f"scaleinv::sgd_wd_: param {i} has a sparse gradient "
                             f"({g.layout}); sparse gradients are not supported")
    check_devices(params, stats, lr_tensor, segment_hparams)
    if params:
        kernel = _kernel_for(params[0].device)
        if kernel != backend:
            raise ValueError(
                f"scaleinv::sgd_wd_: backend {backend!r} was asked for but the dispatcher "
                f"runs {kernel or 'no'} kernel for {params[0].device.type} tensors here; the "
                "tensors' device picks the kernel (CPU tensors take the Triton kernel "
                "inside scaleinv_kernels.ops.registry.cuda_code_path_on_cpu())")
    if extension_loaded():
        torch.ops.scaleinv.sgd_wd_(*args)
    elif backend == "triton":
        # Without the compiled extension there is no schema (it is defined in C++), hence
        # no dispatcher entry: the Python kernel is called directly.
        sgd_wd_triton(*args)
    else:
        raise RuntimeError("scaleinv::sgd_wd_: backend 'cpp' needs the compiled extension "
                           "(scaleinv_kernels._C); rebuild it with `pip install "
                           "--no-build-isolation -e .` or use backend='reference'")


def _sgd_wd_fake(params, grads, momentum_buffers, fresh_buffers, stats, stats_rows, segments,
                 lr_tensor, segment_hparams, lr, weight_decay, momentum, dampening, nesterov,
                 maximize) -> None:
    """Fake (meta) kernel: the op returns nothing and mutates its inputs in place, so
    there is no output to describe; it checks what can be checked without values."""
    check_devices(params, stats, lr_tensor, segment_hparams)


def _sgd_wd_cuda_reference(*args) -> None:
    """The ``CUDA`` kernel where triton is not installed: correct, not fused."""
    log_once("triton is not installed; scaleinv::sgd_wd_ runs its plain-torch reference "
             "on CUDA tensors (`pip install triton` for the fused kernel)")
    sgd_wd_reference(*args)


def _register() -> None:
    """Fake kernel and the ``CUDA`` kernel of ``scaleinv::sgd_wd_`` (the Triton kernel, or
    the reference without triton); the C++ extension registered the schema and the
    ``CPU`` kernel."""
    torch.library.register_fake("scaleinv::sgd_wd_")(_sgd_wd_fake)
    if triton_available():
        register_cuda_kernel("scaleinv::sgd_wd_", sgd_wd_triton)
    else:
        register_cuda_kernel("scaleinv::sgd_wd_", _sgd_wd_cuda_reference)


if extension_loaded():
    _register()
