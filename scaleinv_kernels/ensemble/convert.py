"""nn.Module → member-batched module.

Conversion replaces every parameterised or batch-statistics leaf module by its member
class from :mod:`.layers` (same attribute names, so ``state_dict`` keys are unchanged
and only gain a leading member dimension). Stateless modules that act per sample are
kept. The module's own ``forward`` code runs unchanged on member-folded activations
``[m·B, ...]``, which is correct as long as it never mixes rows of dim 0; the check of
that is :mod:`.forward_check`. :data:`SUPPORTED` lists both sides, module by module and
for the forward code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from scaleinv_kernels.ensemble.layers import (
    MemberContext,
    MemberConv,
    MemberDropout,
    MemberLinear,
)
from scaleinv_kernels.ensemble.norm_layers import (
    MemberBatchNorm,
    MemberGroupNorm,
    MemberLayerNorm,
)

# Stateless modules that act on each sample (row of dim 0) separately.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_STATELESS = _ACTIVATIONS + (nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                             nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONVERTED = {nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Linear: "Linear",
              nn.BatchNorm1d: "BatchNorm1d", nn.BatchNorm2d: "BatchNorm2d",
              nn.GroupNorm: "GroupNorm", nn.LayerNorm: "LayerNorm"}

_CONVERTED_DETAILS = {"Conv1d": "zero padding; stride, dilation, groups, bias",
                      "Conv2d": "zero padding; stride, dilation, groups, bias",
                      "BatchNorm1d": "affine or not, running stats or not, momentum=None",
                      "BatchNorm2d": "affine or not, running stats or not, momentum=None"}


def _names(kinds) -> str:
    return ", ".join(k.__name__ for k in kinds)


#: What the model's own ``forward`` may do (checked by
#: :func:`~scaleinv_kernels.ensemble.forward_check.check_forward`).
SUPPORTED_FUNCTIONS = (
    "elementwise arithmetic (+, -, *, /, unary -, in-place forms), torch/F activations "
    "(relu, gelu, silu, sigmoid, tanh, leaky_relu, elu, relu6, hardtanh, softplus), "
    "torch.flatten(x, start_dim>=1), x.view/x.reshape(x.size(0), ...) or "
    "(x.shape[:k] + (...)), indexing that keeps dim 0 whole (x[:, ...], x[..., i] on a "
    "tensor of more dims than the index), chunk/split/unbind/narrow/select/index_select/"
    "cat/stack along dims >= 1, expand(-1, ...), repeat(1, ...), F.max_pool*/avg_pool*/"
    "adaptive pools, reductions (mean/sum/amax/amin/softmax/log_softmax) over dims other "
    "than 0, x.size()/x.shape, contiguous, permute/transpose/squeeze/unsqueeze that keep "
    "dim 0; random ops only as nn.Dropout modules (each member its own stream)")


#: What the converter batches and what it refuses, by kind: the "converted" list of
#: docs/ensembles.md is rendered from this table (:func:`supported_markdown`, checked by a
#: test).
SUPPORTED = {
    "member layers (parameters and batch statistics per member)": ", ".join(
        f"{k.__name__} ({_CONVERTED_DETAILS[k.__name__]})" if k.__name__ in _CONVERTED_DETAILS
        else k.__name__ for k in _CONVERTED),
    "random layers (each member its own random stream)": _names(_DROPOUT),
    "per-sample modules": _names(_STATELESS) + ", Flatten/Unflatten (not over dim 0)",
    "containers": _names(_CONTAINERS) + ", and your own module classes without parameters "
                  "or buffers of their own",
    "the model's own forward code": SUPPORTED_FUNCTIONS,
    "refused, naming the module or function and the line of forward": (
        "recurrent layers (RNN/LSTM/GRU), attention layers (MultiheadAttention, "
        "Transformer*), other modules holding tensors, ops that could mix rows of dim 0 "
        "(x.mean(0), x.view(-1, k), x[0], x[None], chunk/split/narrow/select along dim 0, "
        "unknown functions), random functions (F.dropout, torch.rand_like, ...: use "
        "nn.Dropout), in-place writes by index (x[0] = ...)"),
}

SUPPORTED_MODULES = "; ".join(SUPPORTED[k] for k in list(SUPPORTED)[:4])


class UnsupportedModuleError(TypeError):
    """The module cannot be turned into a member-batched ensemble."""


def convert(members: Sequence[nn.Module], ctx: MemberContext, *,
            conv_impl: str = "auto", fuse: bool = True) -> nn.Module:
    """Member-batched copy of ``members[0]``'s structure holding all members' tensors.

    ``members`` are modules of identical architecture (checked by the caller). Returns a
    deep copy of ``members[0]`` whose supported leaves are replaced by member layers;
    with ``fuse``, BatchNorm2d or GroupNorm → ReLU (→ MaxPool2d(2)) runs inside ``nn.Sequential``
    containers become one fused op (:func:`fuse_norm_act`).
    """
    out = copy.deepcopy(members[0])
    for name, module in list(out.named_modules()):
        if name == "":
            if type(module) in _CONVERTED:  # the whole model is one layer
                return _convert_leaf(module, [m for m in members], ctx, conv_impl)
            continue
        parts = [m.get_submodule(name) for m in members]
        new = _convert_leaf(module, parts, ctx, conv_impl)
        if new is not module:
            out.set_submodule(name, new)
    for name, module in out.named_modules():
        _check_module(name, module)
    if fuse:
        fuse_norm_act(out)
    return out


def is_pool2(module: nn.Module) -> bool:
    """``module`` is exactly ``nn.MaxPool2d(2)`` (kernel 2, stride 2, no padding, no
    dilation, floor mode, no indices): the pool the fused norm ops take over."""
    if type(module) is not nn.MaxPool2d:
        return False
    size = {module.kernel_size} if isinstance(module.kernel_size, int) else set(
        module.kernel_size)
    stride = module.stride if module.stride is not None else module.kernel_size
    stride = {stride} if isinstance(stride, int) else set(stride)
    pad = {module.padding} if isinstance(module.padding, int) else set(module.padding)
    dil = {module.dilation} if isinstance(module.dilation, int) else set(module.dilation)
    return (size == {2} and stride == {2} and pad == {0} and dil == {1}
            and not module.ceil_mode and not module.return_indices)


def fuse_norm_act(model: nn.Module) -> int:
    """Inside every ``nn.Sequential`` of ``model``, turn MemberBatchNorm(2d) → ReLU
    (→ MaxPool2d(kernel 2, stride 2)) into the norm running ``scaleinv::bn_act_pool``, and
    MemberGroupNorm → ReLU (→ MaxPool2d(2)) into ``scaleinv::gn_act_pool``; the
    ReLU and pool entries become ``nn.Identity`` (no state, so ``state_dict`` keys do not
    change). A MemberConv right before such a BatchNorm → ReLU → MaxPool2d(2) that
    :meth:`MemberConv.can_fuse_into_norm` (an input layer: few taps, no bias) is fused in
    as well: where its input needs no gradient the two run as ONE
    ``scaleinv::conv_bn_act_pool`` (the conv stays in place, so state_dict keys do not
    change either). Other code paths (a ``forward`` calling its modules itself) are left
    unfused: without tracing, the order of calls is unknown. Returns the number of norm
    fusions."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        i = 0
        while i < len(names) - 1:
            norm, act = seq._modules[names[i]], seq._modules[names[i + 1]]
            if (isinstance(norm, (MemberBatchNorm, MemberGroupNorm)) and norm.can_fuse()
                    and type(act) is nn.ReLU):
                norm.fused_relu = True
                seq._modules[names[i + 1]] = nn.Identity()
                step = 2
                if i + 2 < len(names) and is_pool2(seq._modules[names[i + 2]]):
                    norm.fused_pool = 2
                    seq._modules[names[i + 2]] = nn.Identity()
                    step = 3
                    conv = seq._modules[names[i - 1]] if i > 0 else None
                    if (isinstance(norm, MemberBatchNorm) and isinstance(conv, MemberConv)
                            and conv.can_fuse_into_norm()
                            and conv.out_channels == norm.num_features):
                        object.__setattr__(conv, "fused_norm", norm)
                        object.__setattr__(norm, "fused_conv", conv)
                fused += 1
                i += step
            else:
                i += 1
    return fused


def _convert_leaf(module: nn.Module, parts: list[nn.Module], ctx: MemberContext,
                  conv_impl: str) -> nn.Module:
    kind = type(module)
    if kind in (nn.Conv1d, nn.Conv2d):
        return MemberConv(parts, ctx, conv_impl)
    if kind is nn.Linear:
        return MemberLinear(parts, ctx)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return MemberBatchNorm(parts, ctx)
    if kind is nn.GroupNorm:
        return MemberGroupNorm(parts, ctx)
    if kind is nn.LayerNorm:
        return MemberLayerNorm(parts, ctx)
    if kind in _DROPOUT:
        return MemberDropout(copy.deepcopy(module), ctx)
    return module


def _check_module(name: str, module: nn.Module) -> None:
    problem = module_problem(module)
    if problem:
        raise UnsupportedModuleError(
            f"Ensemble: module '{name or '<root>'}' ({type(module).__name__}) {problem}; "
            f"supported modules: {SUPPORTED_MODULES}")


def module_problem(module: nn.Module) -> str | None:
    """Why the ensemble cannot batch ``module`` (an original or a converted one), or None."""
    from scaleinv_kernels.ensemble.layers import MemberLayer

    kind = type(module)
    if isinstance(module, MemberLayer) or kind in _STATELESS + _CONTAINERS + tuple(_CONVERTED):
        return None
    if isinstance(module, _DROPOUT):
        return None
    if isinstance(module, nn.Flatten):
        if module.start_dim == 0 and module.end_dim != 0:
            return "is Flatten(start_dim=0), which mixes the batch; use start_dim>=1"
        return None
    if isinstance(module, nn.Unflatten):
        return "unflattens dim 0" if module.dim == 0 else None
    if isinstance(module, nn.RNNBase):
        return ("is a recurrent layer, which the ensemble does not batch (its recurrence "
                "runs over a dim of the input, not per sample)")
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer,
                           nn.TransformerDecoderLayer)):
        return "is an attention layer, which the ensemble does not batch"
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(
        recurse=False))
    if own:
        return f"holds {[n for n, _ in own]} (only the supported modules may hold tensors)"
    if not list(module.children()) and kind.__module__.startswith("torch.nn"):
        return "is not supported"
    return None


def supported_markdown() -> str:
    """The "converted" list of docs/ensembles.md, rendered from :data:`SUPPORTED`."""
    return "\n".join(f"  - {kind}: {what}." for kind, what in SUPPORTED.items())
