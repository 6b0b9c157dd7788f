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

Backends: C++ (``csrc/sgd_wd.cpp``) for the ``CPU`` dispatch key, Triton
(:func:`sgd_wd_triton`; the kernel and its launch are in
:mod:`scaleinv_kernels.ops.sgd_wd_kernel`) for ``CUDA``, and :func:`sgd_wd_reference` in
plain torch, which is also the fallback (the ``CUDA`` kernel where triton is missing).
The schema lives in ``csrc/registration.cpp`` with the other ops' schemas, so
``torch.library.triton_op`` (which defines its op's schema itself) cannot be used here;
instead the op is a custom op with a fake kernel (which checks devices, so tracing sees
the same errors), hence opaque to and traceable by torch.compile, its Triton kernel is
registered for ``CUDA`` through
:func:`scaleinv_kernels.ops.registry.register_cuda_kernel`, and the kernel launch goes
through ``torch.library.wrap_triton`` (see :func:`.registry.launch_triton`).
:func:`sgd_wd_` reaches the C++ and the Triton kernel through one path,
``torch.ops.scaleinv.sgd_wd_``: the tensors' device picks the kernel (CPU tensors take
the Triton one inside :func:`scaleinv_kernels.ops.registry.cuda_code_path_on_cpu`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from scaleinv_kernels._extension import extension_loaded, log_once, triton_available
from scaleinv_kernels.ops.registry import cuda_code_path_active, register_cuda_kernel
from scaleinv_kernels.ops.sgd_wd_kernel import launch_sgd_wd

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
# the Triton kernel (CUDA): validation and float64 here, the launch in sgd_wd_kernel.py
# ----------------------------------------------------------------------------------


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
    launch_sgd_wd(params, grads, momentum_buffers, fresh_buffers, stats, stats_rows, segments,
                  lr_tensor, segment_hparams, lr, weight_decay, momentum, dampening, nesterov,
                  maximize)


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
