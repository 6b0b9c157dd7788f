"""Member-batched normalization layers: M copies of BatchNorm, GroupNorm or LayerNorm.

The activation layout and the member context are those of :mod:`.layers`. BatchNorm and
GroupNorm run on the free view ``[B, m·C, ...]`` of a folded activation (member i's
channel c is channel ``i·C + c``), so per-member statistics are ordinary statistics over
``m·C`` channels. Followed by ReLU (and MaxPool2d(2)) they run the fused ops
``scaleinv::bn_act_pool``/``gn_act_pool`` (:mod:`scaleinv_kernels.ops.norm_act`,
:mod:`scaleinv_kernels.ops.gn_act`), and BatchNorm also takes the input-layer
convolution before it into ``scaleinv::conv_bn_act_pool`` where
:meth:`~.layers.MemberConv.fusable_input` allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleinv_kernels.ensemble.layers import (
    MemberContext,
    MemberConv,
    MemberLayer,
    refold,
    stack_members,
    stacked_param,
)
from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool
from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference
from scaleinv_kernels.ops.norm_act import bn_act_pool, bn_act_pool_reference
from scaleinv_kernels.ops.norm_common import SUPPORTED_DTYPES as FUSED_NORM_DTYPES


def _member_affine(y: Tensor, w: Tensor | None, b: Tensor | None, m: int,
                   feat: tuple) -> Tensor:
    """Per-member elementwise affine on folded ``y`` [B·m, *feat, *rest]: w, b [m, *feat]."""
    if w is None and b is None:
        return y
    shape = (1, m, *feat, *([1] * (y.dim() - 1 - len(feat))))
    y5 = y.view(-1, m, *y.shape[1:])
    if w is not None:
        y5 = y5 * w.view(shape)
    if b is not None:
        y5 = y5 + b.view(shape)
    return y5.view(y.shape)


def _as_channels(layer: MemberLayer, x: Tensor, channels: int, kind: str
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Folded ``x`` [B·m, C, ...] as the free view [B, m·C, ...] (member i's channel c is
    channel i·C + c) and the layer's [m, C] weight and bias flattened to match."""
    c = layer.ctx
    if x.dim() not in (2, 3, 4) or x.shape[1] != channels:
        raise ValueError(f"{kind}: expected [N, {channels}, ...] input, "
                         f"got per-member shape {[c.batch, *x.shape[1:]]}")
    xc = x.view(c.batch, c.m * channels, *x.shape[2:])
    w, b = layer._p(layer.weight), layer._p(layer.bias)
    return xc, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1)


def _fused_repr(layer: nn.Module) -> str:
    if layer.fused_relu:
        return ", fused: +ReLU" + (" +MaxPool2d(2)" if layer.fused_pool else "")
    if layer.fused_in_forward:
        return f", fused in forward: {layer.fused_in_forward}"
    return ""


class MemberBatchNorm(MemberLayer):
    """M copies of ``nn.BatchNorm1d``/``nn.BatchNorm2d``: torch's own batch norm over the
    ``m·C`` channels of the free view ``[B, m·C, ...]`` — per-member, per-channel batch
    statistics and running statistics (views of the ``[M, C]`` buffers), same update
    rule as torch; ``momentum=None`` (cumulative average) is applied per member."""

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm],
                 ctx: MemberContext) -> None:
        super().__init__(ctx)
        n0 = norms[0]
        self.kind = type(n0).__name__
        self.num_features, self.eps, self.momentum = n0.num_features, n0.eps, n0.momentum
        self.affine, self.track_running_stats = n0.affine, n0.track_running_stats
        n = len(norms)
        self.weight = stacked_param([b.weight for b in norms], n)
        self.bias = stacked_param([b.bias for b in norms], n)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, stack_members([getattr(b, name) for b in norms]))
        # Set by the conversion when this norm is followed by ReLU (and MaxPool2d(2)) in
        # an nn.Sequential: those modules become nn.Identity and this layer runs the fused
        # op scaleinv::bn_act_pool on the [B, m·C, H, W] view instead.
        self.fused_relu = False
        self.fused_pool = 0
        # what the Ensemble's fx pass fused with this norm in forward (ensemble/fusion.py),
        # e.g. "+ReLU"; for print(ens) only: the rewritten forward calls fused_forward
        self.fused_in_forward = ""
        # Set when, in addition, the MemberConv before it is fused in (ReLU and pool fused
        # too): calls where that conv defers run scaleinv::conv_bn_act_pool. Not a
        # submodule (the conv stays where it is in the Sequential and in state_dict).
        object.__setattr__(self, "fused_conv", None)

    def extra_repr(self) -> str:
        return (f"{self.kind}, members={self.ctx.n_members}, {self.num_features}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{_fused_repr(self)}")

    def can_fuse(self) -> bool:
        """The fused op covers BatchNorm2d with an exponential running average."""
        return self.kind == "BatchNorm2d" and self.momentum is not None

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        pending, c.pending_conv = c.pending_conv, None
        conv_input = (pending is not None and pending[0] is self.fused_conv
                      and pending[1] is x)
        return self._run(x, self.fused_relu, self.fused_pool,
                         self.fused_conv if conv_input else None)

    def fused_forward(self, x: Tensor, pool: int, conv: MemberConv | None = None) -> Tensor:
        """This norm → ReLU (→ MaxPool2d(2) if ``pool``), for a ``forward`` rewritten by
        the Ensemble's fx pass; with ``conv``, ``x`` is that conv's input and conv → norm
        → ReLU → pool runs as one ``scaleinv::conv_bn_act_pool`` where
        :meth:`MemberConv.fusable_input` (else the conv runs first)."""
        if conv is not None and not conv.fusable_input(x):
            x, conv = conv(x), None
        return self._run(x, True, pool, conv)

    def _run(self, x: Tensor, relu: bool, pool: int, conv: MemberConv | None) -> Tensor:
        c = self.ctx
        if conv is None:
            x = c.folded(x, self.kind)
            xc, w, b = _as_channels(self, x, self.num_features, self.kind)
        m = c.m
        rm, rv = self._p(self.running_mean), self._p(self.running_var)
        training = self.training or rm is None
        update = self.training and self.track_running_stats and rm is not None
        if update:
            nbt = self._p(self.num_batches_tracked)
            nbt.add_(1)
        if conv is not None:
            return self._conv_forward(conv, x, rm, rv, training, update)
        if relu:
            # the fused kernels cover float32/float64; other dtypes (bf16, fp16) run the
            # same layer as torch's BN -> ReLU -> max-pool (the op's reference)
            fn = bn_act_pool if xc.dtype in FUSED_NORM_DTYPES else bn_act_pool_reference
            y = fn(xc, w, b, None if rm is None else rm.view(-1),
                   None if rv is None else rv.view(-1), training=training,
                   momentum=self.momentum if update else 0.0, eps=self.eps, relu=True,
                   pool=pool)
            return refold(y, c.batch * m, self.num_features, *y.shape[2:])
        if update and self.momentum is None:
            y = F.batch_norm(xc, None, None, w, b, True, 0.0, self.eps)
            self._cumulative_update(xc, rm, rv, nbt)
        else:
            y = F.batch_norm(xc, None if rm is None else rm.view(-1),
                             None if rv is None else rv.view(-1), w, b, training,
                             0.0 if self.momentum is None else self.momentum, self.eps)
        return refold(y, *x.shape)

    def _conv_forward(self, conv: MemberConv, x: Tensor, rm: Tensor | None,
                      rv: Tensor | None, training: bool, update: bool) -> Tensor:
        """conv → this norm → ReLU → MaxPool2d(2) as ONE scaleinv::conv_bn_act_pool on the
        conv's input x (folded [B·m, C_in, H, W], or the shared batch [B, C_in, H, W] with
        the members' filters side by side when the conv has groups=1)."""
        c = self.ctx
        wc = conv._p(conv.weight)
        wc = wc.reshape(c.m * conv.out_channels, *wc.shape[2:])
        if c.is_shared(x) and conv.groups == 1:
            xv, groups = x, 1
        else:
            x = c.folded(x, conv.kind)
            xv = x.view(c.batch, c.m * conv.in_channels, *x.shape[2:])
            groups = c.m * conv.groups
        w, b = self._p(self.weight), self._p(self.bias)
        y = conv_bn_act_pool(xv, wc, groups, conv.padding,
                             None if w is None else w.reshape(-1),
                             None if b is None else b.reshape(-1),
                             None if rm is None else rm.view(-1),
                             None if rv is None else rv.view(-1), training=training,
                             momentum=self.momentum if update else 0.0, eps=self.eps,
                             relu=True)
        return refold(y, c.batch * c.m, self.num_features, *y.shape[2:])

    @torch.no_grad()
    def _cumulative_update(self, xc: Tensor, rm: Tensor, rv: Tensor, nbt: Tensor) -> None:
        """``momentum=None``: running = running + (batch − running) / num_batches_tracked,
        per member (members may have seen different numbers of batches)."""
        dims = [0, *range(2, xc.dim())]
        var, mean = torch.var_mean(xc, dim=dims, unbiased=True)
        f = (1.0 / nbt.double()).to(rm.dtype)[:, None]
        rm.add_((mean.view_as(rm) - rm) * f)
        rv.add_((var.view_as(rv) - rv) * f)


class MemberGroupNorm(MemberLayer):
    """M copies of ``nn.GroupNorm``: statistics are per sample already, so one
    ``F.group_norm`` over all members, then the per-member affine transform. Fused with a
    following ReLU (and MaxPool2d(2)): ``scaleinv::gn_act_pool`` on the ``[B, m·C, ...]``
    view with ``m·G`` groups (member i's groups are i·G .. i·G+G−1) and the ``[m·C]``
    affine parameters."""

    def __init__(self, norms: Sequence[nn.GroupNorm], ctx: MemberContext) -> None:
        super().__init__(ctx)
        n0 = norms[0]
        self.num_groups, self.num_channels, self.eps = n0.num_groups, n0.num_channels, n0.eps
        n = len(norms)
        self.weight = stacked_param([g.weight for g in norms], n)
        self.bias = stacked_param([g.bias for g in norms], n)
        self.fused_relu = False  # set by the conversion, as for MemberBatchNorm
        self.fused_pool = 0
        self.fused_in_forward = ""

    def extra_repr(self) -> str:
        return (f"GroupNorm, members={self.ctx.n_members}, {self.num_groups}, "
                f"{self.num_channels}, eps={self.eps}{_fused_repr(self)}")

    def can_fuse(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.fused_relu, self.fused_pool)

    def fused_forward(self, x: Tensor, pool: int, conv: None = None) -> Tensor:
        """This norm → ReLU (→ MaxPool2d(2) if ``pool``), for a rewritten ``forward``."""
        return self._run(x, True, pool)

    def _run(self, x: Tensor, relu: bool, pool: int) -> Tensor:
        c = self.ctx
        x = c.folded(x, "GroupNorm")
        if relu:
            m = c.m
            xc, w, b = _as_channels(self, x, self.num_channels, "GroupNorm")
            # float32/float64 fused; other dtypes run the same layers unfused
            fn = gn_act_pool if xc.dtype in FUSED_NORM_DTYPES else gn_act_pool_reference
            y = fn(xc, w, b, m * self.num_groups, eps=self.eps, relu=True, pool=pool)
            return refold(y, c.batch * m, self.num_channels, *y.shape[2:])
        y = F.group_norm(x, self.num_groups, eps=self.eps)
        return _member_affine(y, self._p(self.weight), self._p(self.bias), c.m,
                              (self.num_channels,))


class MemberLayerNorm(MemberLayer):
    """M copies of ``nn.LayerNorm``: ``F.layer_norm`` without affine over all members,
    then the per-member elementwise affine."""

    def __init__(self, norms: Sequence[nn.LayerNorm], ctx: MemberContext) -> None:
        super().__init__(ctx)
        n0 = norms[0]
        self.normalized_shape, self.eps = tuple(n0.normalized_shape), n0.eps
        n = len(norms)
        self.weight = stacked_param([ln.weight for ln in norms], n)
        self.bias = stacked_param([ln.bias for ln in norms], n)

    def forward(self, x: Tensor) -> Tensor:
        c = self.ctx
        x = c.folded(x, "LayerNorm")
        y = F.layer_norm(x, self.normalized_shape, eps=self.eps)
        w, b = self._p(self.weight), self._p(self.bias)
        if w is None and b is None:
            return y
        k = len(self.normalized_shape)
        lead = y.shape[1:y.dim() - k]  # non-normalized dims between batch and the last k
        y5 = y.view(c.batch, c.m, *y.shape[1:])
        shape = (1, c.m, *([1] * len(lead)), *self.normalized_shape)
        if w is not None:
            y5 = y5 * w.view(shape)
        if b is not None:
            y5 = y5 + b.view(shape)
        return y5.view(y.shape)
