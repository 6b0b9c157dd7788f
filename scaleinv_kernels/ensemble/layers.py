"""Member-batched layers: one module holds the parameters of M copies of a layer.

Activation layout. Inside an :class:`~scaleinv_kernels.ensemble.Ensemble` every
activation is *member-folded, batch-major*: a tensor ``[B·m, ...]`` whose row
``b·m + i`` is sample ``b`` of member ``i`` (the members' batches interleaved). Two
consequences make this the layout of choice:

* every op that treats dim 0 as the batch (activations, pooling, ``flatten(x, 1)``,
  ``x.view(x.size(0), -1)``, residual adds, channel concatenation, dropout) is already
  correct for all members at once, so the module's own ``forward`` runs unchanged;
* ``[B·m, C, ...]`` and ``[B, m·C, ...]`` are the SAME memory: a grouped convolution
  with ``groups = m`` and a BatchNorm over ``m·C`` channels (per-member, per-channel
  statistics) run on free views, with no transposition anywhere in a CNN. The
  alternative member-major order ``[m·B, ...]`` costs two transposing copies per
  convolution and per BatchNorm.

Only layers holding parameters or computing batch statistics know about members; they
are the classes below, and read the member count and batch size from the
:class:`MemberContext` their ensemble sets before each call.

Shared batch. In :meth:`Ensemble.forward_shared` the input ``[B, ...]`` is fed as is;
the first convolution or linear layer applies the members' weights side by side (one
convolution/GEMM with ``m·O`` output channels, whose output ``[B, m·O, ...]`` is already
``[B·m, O, ...]``), so the shared input is never copied per member.

All parameters and buffers carry a leading member dimension ``[M, ...]``; a call on a
member range ``members=slice(a, b)`` uses the views ``param[a:b]``, so gradients and
running-statistics updates land in the right rows of the full tensors.

This module holds the context, the base class, convolution, linear and dropout layers;
the normalization layers are in :mod:`.norm_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleinv_kernels._extension import extension_loaded
from scaleinv_kernels.ops.conv_norm_act import MAX_TAPS as FUSED_CONV_MAX_TAPS
from scaleinv_kernels.ops.direct_conv import SUPPORTED_DTYPES as DIRECT_DTYPES
from scaleinv_kernels.ops.direct_conv import direct_conv2d
from scaleinv_kernels.ops.norm_common import SUPPORTED_DTYPES as FUSED_NORM_DTYPES
from scaleinv_kernels.ops.registry import cuda_code_path_active
from scaleinv_kernels.optim.members import mark_members

CONV_IMPLS = ("auto", "grouped", "loop", "direct")


def _cpu_kernels(x: Tensor) -> bool:
    """True when x takes the C++ CPU kernels' path; False on CUDA and while CPU tensors
    take the CUDA code path (``ops.registry.cuda_code_path_on_cpu``), so that an ensemble
    on CPU tensors then makes every choice it makes on a GPU."""
    return x.device.type == "cpu" and not cuda_code_path_active()


@dataclass
class MemberContext:
    """Set by the ensemble before each forward; read by every member layer."""

    n_members: int  # M, members stored
    start: int = 0  # first selected member
    m: int = 0  # number of selected members
    batch: int = 0  # B, samples per member
    shared: bool = False  # the network input was one batch [B, ...] for all members
    # direct_grads calls: id(param) -> this call's leaf for param[sel] (see Ensemble.forward)
    leaves: dict[int, Tensor] | None = None
    # (conv, x): a MemberConv fused into the BatchNorm after it passed its input x on
    # unconvolved (see MemberConv.defers); that norm consumes it
    pending_conv: tuple[nn.Module, Tensor] | None = None
    # per-member random streams (see .random): the seed, the global index of member 0,
    # each member's count of random forward passes (CPU int64 [M]) and the random layer
    # calls of this pass so far
    random_seed: int = 0
    member_offset: int = 0
    steps: Tensor | None = None
    draws: int = 0

    @property
    def sel(self) -> slice:
        return slice(self.start, self.start + self.m)

    def fold(self, x: Tensor) -> Tensor:
        """[m, B, ...] → [B·m, ...] (batch-major; a copy unless m == 1)."""
        return x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    def unfold(self, y: Tensor) -> Tensor:
        """[B·m, ...] → [m, B, ...] (a strided view)."""
        return y.view(self.batch, self.m, *y.shape[1:]).transpose(0, 1)

    def folded(self, x: Tensor, layer: str) -> Tensor:
        """``x`` as member-folded ``[B·m, ...]``: unchanged if it already is, a copy of a
        shared batch broadcast to every member otherwise (only layers that need
        per-member samples before any weight layer, e.g. a leading norm, pay for it)."""
        m, b = self.m, self.batch
        if x.dim() == 0:
            raise ValueError(f"{layer}: got a 0-d tensor; member layers need a batch dimension")
        if x.shape[0] == m * b:
            return x
        if self.shared and x.shape[0] == b:
            return x.unsqueeze(1).expand(b, m, *x.shape[1:]).reshape(b * m, *x.shape[1:])
        raise ValueError(
            f"{layer}: input has leading size {x.shape[0]}, but the ensemble expects "
            f"{b}·{m} = {m * b} member-folded rows (or {b} for a shared batch); an op before "
            "this layer mixed the batch dimension (e.g. a view/reshape that does not keep "
            "x.size(0) first)")

    def is_shared(self, x: Tensor) -> bool:
        """True when ``x`` is still the one batch [B, ...] shared by all members."""
        return self.shared and self.m > 1 and x.dim() > 0 and x.shape[0] == self.batch


def refold(y: Tensor, *shape: int) -> Tensor:
    """Reshape a FRESH op output to ``shape`` as a non-view (``aten._unsafe_view``), like
    torch's own matmul does: an in-place op that follows (``ReLU(inplace=True)`` after a
    norm) then modifies a plain tensor, instead of a view whose base autograd would have
    to rebuild with full-size copies (CopySlices) in the backward pass."""
    return torch.ops.aten._unsafe_view(y, shape)


def stack_members(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """[M, ...] tensor (detached, contiguous) from M member tensors; None stays None."""
    if tensors[0] is None:
        return None
    return torch.stack([t.detach() for t in tensors]).contiguous()


def stacked_param(tensors: Sequence[Tensor | None], n: int) -> nn.Parameter | None:
    """[M, ...] parameter from M member tensors; frozen if the source is frozen."""
    if tensors[0] is None:
        return None
    p = nn.Parameter(stack_members(tensors), requires_grad=tensors[0].requires_grad)
    mark_members(p, n)
    return p


class MemberLayer(nn.Module):
    """Base: keeps the ensemble's context."""

    ctx: MemberContext

    def __init__(self, ctx: MemberContext) -> None:
        super().__init__()
        object.__setattr__(self, "ctx", ctx)  # shared plain object, not a submodule

    def _p(self, t: Tensor | None) -> Tensor | None:
        """This call's members of a stacked tensor (the whole tensor when all are used;
        the call's leaf in a ``direct_grads`` call)."""
        if t is None:
            return None
        c = self.ctx
        if c.m == t.shape[0]:
            return t
        if c.leaves is not None and id(t) in c.leaves:
            return c.leaves[id(t)]
        return t[c.sel]


# ------------------------------------------------------------------------------------
# convolution and linear
# ------------------------------------------------------------------------------------


class MemberConv(MemberLayer):
    """M copies of ``nn.Conv1d``/``nn.Conv2d`` (zero padding only).

    ``impl="grouped"``: ONE convolution with ``groups = m·groups`` on the free view
    ``[B, m·C, ...]`` of the folded input. ``impl="loop"``: one convolution per member on
    strided slices, outputs stacked. ``impl="direct"``: the grouped convolution computed by
    ``scaleinv::direct_conv2d`` (CPU kernel for few input channels per group; Conv2d with
    stride 1, dilation 1 and padding < kernel size only, else ``ValueError`` at the call).
    ``impl="auto"`` (default): grouped on CUDA and on CPU when a group has at least 4
    input channels; below that on CPU, direct where it applies (and the compiled extension
    is loaded), else the loop. The thresholds follow CPU measurements of forward +
    backward (4 members, batch 64, 3×3 kernels): with one input channel per group direct
    beats the loop and the loop beats oneDNN's grouped kernel, which is slow for that
    shape; from 16 input channels per group on, the grouped convolution beats the loop.
    """

    def __init__(self, convs: Sequence[nn.Conv1d | nn.Conv2d], ctx: MemberContext,
                 impl: str = "auto") -> None:
        super().__init__(ctx)
        c0 = convs[0]
        if c0.padding_mode != "zeros":
            raise ValueError(f"Ensemble: {type(c0).__name__}(padding_mode="
                             f"{c0.padding_mode!r}) is not supported; only zero padding is")
        if impl not in CONV_IMPLS:
            raise ValueError(f"Ensemble: conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.kind = type(c0).__name__
        self.spatial = 1 if isinstance(c0, nn.Conv1d) else 2
        self.in_channels, self.out_channels = c0.in_channels, c0.out_channels
        self.kernel_size, self.stride, self.padding = c0.kernel_size, c0.stride, c0.padding
        self.dilation, self.groups = c0.dilation, c0.groups
        self.impl = impl
        n = len(convs)
        self.weight = stacked_param([c.weight for c in convs], n)
        self.bias = stacked_param([c.bias for c in convs], n)
        # Set by the conversion when this conv feeds a BatchNorm2d fused with ReLU and
        # MaxPool2d(2) (the norm's fused_conv): a plain attribute, not a submodule, so
        # state_dict keys do not change.
        object.__setattr__(self, "fused_norm", None)
        # set when the Ensemble's fx pass fused this conv into the norm after it in forward
        # (ensemble/fusion.py); for print(ens) only: the rewritten forward does the fusing
        self.fused_in_forward = False

    def extra_repr(self) -> str:
        fused = ", fused into the next BatchNorm" if self.fused_norm is not None else ""
        if self.fused_in_forward:
            fused = ", fused into the next BatchNorm in forward"
        return (f"{self.kind}, members={self.weight.shape[0]}, {self.in_channels}→"
                f"{self.out_channels}, k={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, bias={self.bias is not None}, impl={self.impl}{fused}")

    def can_fuse_into_norm(self) -> bool:
        """An input-layer conv the fused ``scaleinv::conv_bn_act_pool`` covers: Conv2d,
        ``conv_impl="auto"``, no bias, stride 1, dilation 1, padding < kernel, fewer than
        4 input channels per group and at most FUSED_CONV_MAX_TAPS taps (C_in·KH·KW per
        group). With more input channels the patch moments cost more than the conv."""
        if not self._unit_stride_small_padding():
            return False
        ci = self.in_channels // self.groups
        kh, kw = self.kernel_size
        return (self.impl == "auto" and self.bias is None and ci < 4
                and ci * kh * kw <= FUSED_CONV_MAX_TAPS)

    def defers(self, x: Tensor) -> bool:
        """True when this call leaves the convolution to the fused norm after it: CPU
        float32/float64 input that needs no gradient (the fused op computes none for x),
        with the compiled extension loaded."""
        return self.fused_norm is not None and self.fusable_input(x)

    def fusable_input(self, x: Tensor) -> bool:
        """``x`` can go to ``scaleinv::conv_bn_act_pool`` instead of this conv (see
        :meth:`defers`)."""
        return (_cpu_kernels(x) and x.dtype in FUSED_NORM_DTYPES and extension_loaded()
                and not (x.requires_grad and torch.is_grad_enabled()))

    def _unit_stride_small_padding(self) -> bool:
        """Conv2d, stride 1, dilation 1, numeric padding < kernel size: the geometry of
        scaleinv's direct and fused convolutions."""
        return (self.spatial == 2 and self.stride == (1, 1) and self.dilation == (1, 1)
                and not isinstance(self.padding, str)
                and all(0 <= p < k for p, k in zip(self.padding, self.kernel_size)))

    def _direct_applies(self, x: Tensor) -> bool:
        return (_cpu_kernels(x) and x.dtype in DIRECT_DTYPES
                and self._unit_stride_small_padding())

    def _pick(self, x: Tensor) -> str:
        """The implementation for this call (see the class docstring)."""
        if self.impl == "direct":
            if not self._direct_applies(x):
                raise ValueError(
                    f"Ensemble: conv_impl='direct' needs a CPU float32/float64 Conv2d with "
                    f"stride 1, dilation 1 and padding < kernel size; this layer has "
                    f"stride={self.stride}, dilation={self.dilation}, padding={self.padding} "
                    f"on {x.device} {x.dtype} (use conv_impl='auto')")
            return "direct"
        if self.impl != "auto":
            return self.impl
        if not _cpu_kernels(x) or self.in_channels // self.groups >= 4:
            return "grouped"
        return "direct" if extension_loaded() and self._direct_applies(x) else "loop"

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        fn = F.conv1d if self.spatial == 1 else F.conv2d
        return fn(x, w, b, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        if self.defers(x):
            c.pending_conv = (self, x)
            return x
        w, b = self._p(self.weight), self._p(self.bias)
        m, bsz, o = c.m, c.batch, self.out_channels
        wf = w.reshape(m * o, *w.shape[2:])
        bf = None if b is None else b.reshape(-1)
        if c.is_shared(x) and self.groups == 1:
            # members' filters side by side: [B, m·O, ...] == [B·m, O, ...]
            y = self._conv(x, wf, bf, 1)
            return refold(y, bsz * m, o, *y.shape[2:])
        x = c.folded(x, self.kind)
        impl = self._pick(x)
        if impl == "direct":
            y = direct_conv2d(x.view(bsz, m * self.in_channels, *x.shape[2:]), wf, bf,
                              m * self.groups, self.padding)
            return refold(y, bsz * m, o, *y.shape[2:])
        if impl == "grouped":
            y = self._conv(x.view(bsz, m * self.in_channels, *x.shape[2:]), wf, bf,
                           m * self.groups)
            return refold(y, bsz * m, o, *y.shape[2:])
        x5 = x.view(bsz, m, *x.shape[1:])
        outs = [self._conv(x5[:, i], w[i], None if b is None else b[i], self.groups)
                for i in range(m)]
        y = torch.stack(outs, 1)
        return refold(y, bsz * m, *y.shape[2:])


class MemberLinear(MemberLayer):
    """M copies of ``nn.Linear``: one batched GEMM over the members."""

    def __init__(self, linears: Sequence[nn.Linear], ctx: MemberContext) -> None:
        super().__init__(ctx)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        n = len(linears)
        self.weight = stacked_param([lin.weight for lin in linears], n)
        self.bias = stacked_param([lin.bias for lin in linears], n)

    def extra_repr(self) -> str:
        return (f"members={self.weight.shape[0]}, {self.in_features}→{self.out_features}, "
                f"bias={self.bias is not None}")

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: expected input [N, ..., {self.in_features}], got "
                             f"{list(x.shape)} (per member: {[c.batch, *x.shape[1:]]})")
        w, b = self._p(self.weight), self._p(self.bias)
        m, o = c.m, self.out_features
        if c.is_shared(x):
            # [N, F] @ [F, m·O] → [B, ..., m·O]: the shared input is read once.
            y = x.reshape(-1, self.in_features) @ w.reshape(m * o, -1).t()
            if b is not None:
                y = y + b.reshape(-1)
            y = y.view(c.batch, -1, m, o).transpose(1, 2)  # [B, m, ..., O]
            return y.reshape(c.batch * m, *x.shape[1:-1], o)
        x = c.folded(x, "Linear")
        x3 = x.view(c.batch, m, -1, self.in_features).transpose(0, 1)  # [m, B, T, F] view
        x3 = x3.reshape(m, -1, self.in_features)
        if b is None:
            y = torch.bmm(x3, w.transpose(1, 2))
        else:
            y = torch.baddbmm(b.unsqueeze(1), x3, w.transpose(1, 2))  # [m, B·T, O]
        y = y.view(m, c.batch, -1, o).transpose(0, 1)
        return y.reshape(c.batch * m, *x.shape[1:-1], o)


# ------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------


class MemberDropout(MemberLayer):
    """``nn.Dropout``/``Dropout1d``/``Dropout2d``/``AlphaDropout`` with each member's mask
    drawn from its own stream (:func:`.random.member_bernoulli`: keyed by seed, global
    member index, the member's random-pass count and this layer's place among the pass's
    random calls), so that a member's masks do not depend on which members share its call.
    A shared batch is broadcast to every member first, so members never share a mask. Same
    distribution and scaling as torch's dropout, not torch's bits."""

    def __init__(self, module: nn.Module, ctx: MemberContext) -> None:
        super().__init__(ctx)
        self.inner = module
        # the ATen rule: feature dropout masks whole channels ([N, C, 1, ...])
        self.feature = isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))
        self.alpha = isinstance(module, nn.AlphaDropout)

    def forward(self, x: Tensor) -> Tensor:
        from scaleinv_kernels.ensemble.random import member_bernoulli

        c, p = self.ctx, float(self.inner.p)
        if not self.training or p == 0:
            return x
        kind = type(self.inner).__name__
        x = c.folded(x, kind)
        if p == 1:  # ATen returns input * 0 for every kind of dropout
            return x * 0.0
        if self.feature:
            batched = {"Dropout1d": 3, "Dropout2d": 4, "Dropout3d": 5}[kind]
            if x.dim() != batched:
                raise ValueError(f"{kind}: the ensemble needs batched {batched}-d input "
                                 f"[N, C, ...], got per-member shape {[c.batch, *x.shape[1:]]}")
            shape = (c.batch, x.shape[1], *([1] * (x.dim() - 2)))
        else:
            shape = (c.batch, *x.shape[1:])
        noise = member_bernoulli(c, 1 - p, shape, x.device, x.dtype)
        if self.alpha:
            # ATen's alpha dropout: x·(noise·a) + (noise − 1)·alpha·a + alpha·a·p
            a = 1.0 / ((_ALPHA * _ALPHA * p + 1) * (1 - p)) ** 0.5
            b = (noise - 1) * (_ALPHA * a) + _ALPHA * a * p
            return x * (noise * a) + b
        return x * noise.div_(1 - p)


_ALPHA = 1.7580993408473766  # SELU's alpha·scale, the constant of ATen's alpha dropout


_MOVED = ("MemberBatchNorm", "MemberGroupNorm", "MemberLayerNorm")


def __getattr__(name: str):
    # the norm layers live in norm_layers.py; imports of them from here keep working
    if name in _MOVED:
        from scaleinv_kernels.ensemble import norm_layers

        return getattr(norm_layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
