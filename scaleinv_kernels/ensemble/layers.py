"""Member-batched layers: one module holds the parameters of M copies of a layer.

Activation layout. Inside an :class:`~scaleinv_kernels.ensemble.Ensemble` every
activation is *member-folded*: a tensor of shape ``[m·B, ...]`` whose first ``B`` rows
belong to the first selected member, the next ``B`` rows to the second, and so on. Every
op that treats dim 0 as the batch (activations, pooling, ``flatten(x, 1)``,
``x.view(x.size(0), -1)``, residual adds, channel concatenation, dropout) is therefore
already correct for all members at once; only layers holding parameters or computing
batch statistics need to know the member boundaries, and they are replaced by the
classes below.

Shared batch. In :meth:`Ensemble.forward_shared` the input ``[B, ...]`` is fed as is;
the first parameterised layer broadcasts it (a convolution or linear layer with the
members' weights concatenated along the output channels: one GEMM, no copy of the
input per member) and from there on activations are member-folded. Layers tell the two
cases apart by the leading size (``B`` vs ``m·B``) against the :class:`MemberContext`
the ensemble sets before each call.

All parameters and buffers carry a leading member dimension ``[M, ...]``; a call on a
member range ``members=slice(a, b)`` uses the views ``param[a:b]``, so gradients and
running-statistics updates land in the right rows of the full tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleinv_kernels.optim.members import mark_members

CONV_IMPLS = ("auto", "grouped", "loop")


@dataclass
class MemberContext:
    """Set by the ensemble before each forward; read by every member layer."""

    n_members: int  # M, members stored
    start: int = 0  # first selected member
    m: int = 0  # number of selected members
    batch: int = 0  # B, samples per member
    shared: bool = False  # the network input was one batch [B, ...] for all members

    @property
    def sel(self) -> slice:
        return slice(self.start, self.start + self.m)

    def member_view(self, x: Tensor, layer: str) -> Tensor:
        """``x`` as ``[m, B, ...]``: a view of a member-folded tensor, or a copy of a
        shared one broadcast to every member (only layers that need per-member samples,
        e.g. normalization before any weight layer, pay for that copy)."""
        m, b = self.m, self.batch
        if x.dim() == 0:
            raise ValueError(f"{layer}: got a 0-d tensor; member layers need a batch dimension")
        if x.shape[0] == m * b:
            return x.view(m, b, *x.shape[1:])
        if self.shared and x.shape[0] == b:
            return x.unsqueeze(0).expand(m, *x.shape).contiguous()
        raise ValueError(
            f"{layer}: input has leading size {x.shape[0]}, but the ensemble expects "
            f"{m}·{b} = {m * b} member-folded rows (or {b} for a shared batch); an op before "
            "this layer mixed the batch dimension (e.g. a view/reshape that does not keep "
            "x.size(0) first)")

    def is_shared(self, x: Tensor) -> bool:
        """True when ``x`` is still the one batch [B, ...] shared by all members."""
        return self.shared and self.m > 1 and x.dim() > 0 and x.shape[0] == self.batch


def _stack(tensors: Sequence[Tensor | None], what: str) -> Tensor | None:
    if tensors[0] is None:
        return None
    return torch.stack([t.detach() for t in tensors]).contiguous()


def _stacked_param(tensors: Sequence[Tensor | None], n: int) -> nn.Parameter | None:
    """[M, ...] parameter from M member tensors; frozen if the source is frozen."""
    if tensors[0] is None:
        return None
    p = nn.Parameter(_stack(tensors, "param"), requires_grad=tensors[0].requires_grad)
    mark_members(p, n)
    return p


def _bcast(t: Tensor, ndim: int) -> Tensor:
    """[m, C] → [m, 1, C, 1, ..., 1] broadcastable against [m, B, C, *spatial]."""
    return t.view(t.shape[0], 1, t.shape[1], *([1] * (ndim - 3)))


class MemberLayer(nn.Module):
    """Base: keeps the ensemble's context and the member count."""

    ctx: MemberContext

    def __init__(self, ctx: MemberContext) -> None:
        super().__init__()
        object.__setattr__(self, "ctx", ctx)  # shared plain object, not a submodule

    def _p(self, t: Tensor | None) -> Tensor | None:
        """This call's members of a stacked tensor (the whole tensor when all are used)."""
        if t is None:
            return None
        c = self.ctx
        return t if c.m == t.shape[0] else t[c.sel]


# ------------------------------------------------------------------------------------
# convolution and linear
# ------------------------------------------------------------------------------------


class MemberConv(MemberLayer):
    """M copies of ``nn.Conv1d``/``nn.Conv2d`` (zero padding only).

    ``impl`` chooses how the per-member convolution runs (results agree to rounding):
    ``"grouped"`` transposes ``[m·B, C, ...]`` to ``[B, m·C, ...]`` and runs ONE
    convolution with ``groups = m·groups``; ``"loop"`` runs one convolution per member on
    views. ``"auto"`` takes ``"grouped"`` on CUDA and, on CPU, when a group has at least
    4 input channels — measured on this 2-core CPU (M=64, B=64, fwd+bwd): grouped is
    2.4–3.7× faster than the loop for 16→32 and 32→32 channels, while for 1→16 channels
    (a depthwise-like grouped conv, a slow oneDNN path) the loop is as fast or faster.
    """

    def __init__(self, convs: Sequence[nn.Conv1d | nn.Conv2d], ctx: MemberContext,
                 impl: str = "auto") -> None:
        super().__init__(ctx)
        c0 = convs[0]
        if c0.padding_mode != "zeros":
            raise ValueError(f"Ensemble: {type(c0).__name__}(padding_mode="
                             f"{c0.padding_mode!r}) is not supported; only zero padding is")
        if isinstance(c0.padding, str) and c0.padding == "same" and any(
                s != 1 for s in c0.stride):
            raise ValueError("Ensemble: padding='same' needs stride 1")
        self.kind = type(c0).__name__
        self.spatial = 1 if isinstance(c0, nn.Conv1d) else 2
        self.in_channels, self.out_channels = c0.in_channels, c0.out_channels
        self.kernel_size, self.stride, self.padding = c0.kernel_size, c0.stride, c0.padding
        self.dilation, self.groups = c0.dilation, c0.groups
        if impl not in CONV_IMPLS:
            raise ValueError(f"Ensemble: conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.impl = impl
        n = len(convs)
        self.weight = _stacked_param([c.weight for c in convs], n)
        self.bias = _stacked_param([c.bias for c in convs], n)

    def extra_repr(self) -> str:
        return (f"{self.kind}, members={self.weight.shape[0]}, {self.in_channels}→"
                f"{self.out_channels}, k={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, bias={self.bias is not None}, impl={self.impl}")

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        fn = F.conv1d if self.spatial == 1 else F.conv2d
        return fn(x, w, b, self.stride, self.padding, self.dilation, groups)

    def _use_grouped(self, x: Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        return x.is_cuda or self.in_channels // self.groups >= 4

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        w, b = self._p(self.weight), self._p(self.bias)
        m = c.m
        if c.is_shared(x) and self.groups == 1:
            # One convolution with the members' filters side by side: [B, m·O, ...].
            y = self._conv(x, w.reshape(m * self.out_channels, *w.shape[2:]),
                           None if b is None else b.reshape(-1), 1)
            y = y.view(c.batch, m, self.out_channels, *y.shape[2:]).transpose(0, 1)
            return y.reshape(m * c.batch, self.out_channels, *y.shape[3:])
        x5 = c.member_view(x, self.kind)  # [m, B, C, ...]
        if self._use_grouped(x):
            xg = x5.transpose(0, 1).reshape(c.batch, m * self.in_channels, *x5.shape[3:])
            y = self._conv(xg, w.reshape(m * self.out_channels, *w.shape[2:]),
                           None if b is None else b.reshape(-1), m * self.groups)
            y = y.view(c.batch, m, self.out_channels, *y.shape[2:]).transpose(0, 1)
            return y.reshape(m * c.batch, self.out_channels, *y.shape[3:])
        outs = [self._conv(x5[i], w[i], None if b is None else b[i], self.groups)
                for i in range(m)]
        return torch.cat(outs, 0)


class MemberLinear(MemberLayer):
    """M copies of ``nn.Linear``: one batched GEMM (``baddbmm``) over the members."""

    def __init__(self, linears: Sequence[nn.Linear], ctx: MemberContext) -> None:
        super().__init__(ctx)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        n = len(linears)
        self.weight = _stacked_param([lin.weight for lin in linears], n)
        self.bias = _stacked_param([lin.bias for lin in linears], n)

    def extra_repr(self) -> str:
        return (f"members={self.weight.shape[0]}, {self.in_features}→{self.out_features}, "
                f"bias={self.bias is not None}")

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        w, b = self._p(self.weight), self._p(self.bias)
        m, o = c.m, self.out_features
        if c.is_shared(x):
            # [N, F] @ [F, m·O]: the shared input is read once.
            y = x.reshape(-1, self.in_features) @ w.reshape(m * o, -1).t()
            if b is not None:
                y = y + b.reshape(-1)
            y = y.view(-1, m, o).transpose(0, 1)  # [m, N, O]
            return y.reshape(m * c.batch, *x.shape[1:-1], o)
        x3 = c.member_view(x, "Linear").reshape(m, -1, self.in_features)
        if b is None:
            y = torch.bmm(x3, w.transpose(1, 2))
        else:
            y = torch.baddbmm(b.unsqueeze(1), x3, w.transpose(1, 2))
        return y.view(m * c.batch, *x.shape[1:-1], o)


# ------------------------------------------------------------------------------------
# normalization
# ------------------------------------------------------------------------------------


class _MemberBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm with per-(member, channel) batch statistics.

    x: [m, B, C, L] (L = flattened spatial size, ≥ 1). Saves x, the mean and 1/σ (not
    x̂: without affine the output IS x̂, and a following in-place ReLU would overwrite
    it); the backward recomputes x̂ and applies the closed form
    dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = dy·γ.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        var, mean = torch.var_mean(x, dim=(1, 3), unbiased=False, keepdim=True)  # [m,1,C,1]
        invstd = torch.rsqrt(var + eps)
        y = (x - mean) * invstd
        if weight is not None:
            y = y * weight[:, None, :, None]
        if bias is not None:
            y = y + bias[:, None, :, None]
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.has_bias = bias is not None
        m, c = x.shape[0], x.shape[2]
        return y, mean.view(m, c), var.view(m, c)

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, mean, invstd, weight = ctx.saved_tensors
        xhat = (x - mean) * invstd
        dw = db = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dy * xhat).sum(dim=(1, 3))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(1, 3))
        dx = None
        if ctx.needs_input_grad[0]:
            g = dy if weight is None else dy * weight[:, None, :, None]
            mean_g = g.mean(dim=(1, 3), keepdim=True)
            mean_gx = (g * xhat).mean(dim=(1, 3), keepdim=True)
            dx = (g - mean_g - xhat * mean_gx) * invstd
        return dx, dw, db, None


class MemberBatchNorm(MemberLayer):
    """M copies of ``nn.BatchNorm1d``/``nn.BatchNorm2d`` with per-member batch statistics
    and running statistics (same update rule as torch: unbiased variance in the running
    estimate, ``momentum=None`` → cumulative average over ``num_batches_tracked``)."""

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm],
                 ctx: MemberContext) -> None:
        super().__init__(ctx)
        n0 = norms[0]
        self.kind = type(n0).__name__
        self.num_features, self.eps, self.momentum = n0.num_features, n0.eps, n0.momentum
        self.affine, self.track_running_stats = n0.affine, n0.track_running_stats
        n = len(norms)
        self.weight = _stacked_param([b.weight for b in norms], n)
        self.bias = _stacked_param([b.bias for b in norms], n)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, _stack([getattr(b, name) for b in norms], name))

    def extra_repr(self) -> str:
        return (f"{self.kind}, members={self.ctx.n_members}, {self.num_features}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        x5 = c.member_view(x, self.kind)
        if x5.dim() not in (3, 4, 5) or x5.shape[2] != self.num_features:
            raise ValueError(f"{self.kind}: expected [N, {self.num_features}, ...] input, "
                             f"got per-member shape {list(x5.shape[1:])}")
        x4 = x5.reshape(c.m, c.batch, self.num_features, -1)
        w, b = self._p(self.weight), self._p(self.bias)
        use_batch = self.training or self.running_mean is None
        if use_batch:
            if self.training and c.batch * x4.shape[3] <= 1:
                raise ValueError(f"{self.kind}: expected more than 1 value per channel when "
                                 f"training, got input of per-member shape "
                                 f"{list(x5.shape[1:])}")
            y, mean, var = _MemberBatchNormFn.apply(x4, w, b, self.eps)
            if self.training and self.track_running_stats and self.running_mean is not None:
                self._update_running(mean.detach(), var.detach(), x4.shape[1] * x4.shape[3])
        else:
            rm, rv = self._p(self.running_mean), self._p(self.running_var)
            scale = torch.rsqrt(rv + self.eps)
            shift = -rm * scale
            if w is not None:
                scale, shift = scale * w, shift * w
            if b is not None:
                shift = shift + b
            y = x4 * scale[:, None, :, None] + shift[:, None, :, None]
        return y.view(x5.shape).reshape(c.m * c.batch, *x5.shape[2:])

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: int) -> None:
        nbt = self._p(self.num_batches_tracked)
        nbt.add_(1)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        rm, rv = self._p(self.running_mean), self._p(self.running_var)
        if self.momentum is None:  # cumulative moving average, per member
            f = (1.0 / nbt.double()).to(rm.dtype)[:, None]
            rm.mul_(1 - f).add_(mean * f)
            rv.mul_(1 - f).add_(unbiased * f)
        else:
            rm.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            rv.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)


class MemberGroupNorm(MemberLayer):
    """M copies of ``nn.GroupNorm``: statistics are per sample already, so one
    ``F.group_norm`` over all members, then the per-member affine transform."""

    def __init__(self, norms: Sequence[nn.GroupNorm], ctx: MemberContext) -> None:
        super().__init__(ctx)
        n0 = norms[0]
        self.num_groups, self.num_channels, self.eps = n0.num_groups, n0.num_channels, n0.eps
        n = len(norms)
        self.weight = _stacked_param([g.weight for g in norms], n)
        self.bias = _stacked_param([g.bias for g in norms], n)

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        x5 = c.member_view(x, "GroupNorm")
        y = F.group_norm(x5.reshape(c.m * c.batch, *x5.shape[2:]), self.num_groups,
                         eps=self.eps)
        y = y.view(c.m, c.batch, self.num_channels, -1)
        w, b = self._p(self.weight), self._p(self.bias)
        if w is not None:
            y = y * w[:, None, :, None]
        if b is not None:
            y = y + b[:, None, :, None]
        return y.reshape(c.m * c.batch, *x5.shape[2:])


class MemberLayerNorm(MemberLayer):
    """M copies of ``nn.LayerNorm``: ``F.layer_norm`` without affine over all members,
    then the per-member elementwise affine."""

    def __init__(self, norms: Sequence[nn.LayerNorm], ctx: MemberContext) -> None:
        super().__init__(ctx)
        n0 = norms[0]
        self.normalized_shape, self.eps = tuple(n0.normalized_shape), n0.eps
        n = len(norms)
        self.weight = _stacked_param([ln.weight for ln in norms], n)
        self.bias = _stacked_param([ln.bias for ln in norms], n)

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        x5 = c.member_view(x, "LayerNorm")
        y = F.layer_norm(x5, self.normalized_shape, eps=self.eps)
        w, b = self._p(self.weight), self._p(self.bias)
        k = len(self.normalized_shape)
        mid = [1] * (y.dim() - 1 - k)  # batch and leading non-normalized dims
        if w is not None:
            y = y * w.view(c.m, *mid, *self.normalized_shape)
        if b is not None:
            y = y + b.view(c.m, *mid, *self.normalized_shape)
        return y.reshape(c.m * c.batch, *x5.shape[2:])


class MemberDropout(MemberLayer):
    """``nn.Dropout*`` with an independent mask per member (a shared batch is broadcast
    to every member first, so members never share a mask)."""

    def __init__(self, module: nn.Module, ctx: MemberContext) -> None:
        super().__init__(ctx)
        self.inner = module

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        if self.training and self.inner.p > 0 and c.is_shared(x):
            x = c.member_view(x, type(self.inner).__name__).reshape(c.m * c.batch,
                                                                      *x.shape[1:])
        return self.inner(x)
