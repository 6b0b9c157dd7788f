"""nn.Module → member-batched module, and the check that its forward is member-safe.

Conversion replaces every parameterised or batch-statistics leaf module by its member
class from :mod:`.layers` (same attribute names, so ``state_dict`` keys are unchanged
and only gain a leading member dimension). Stateless modules that act per sample are
kept. The module's own ``forward`` code runs unchanged on member-folded activations
``[m·B, ...]``, which is correct as long as it never mixes rows of dim 0; the
:func:`check_forward` pass traces it with ``torch.fx`` and rejects any function or
method that could (a reduction over dim 0, ``view(-1, k)``, indexing the batch, ...).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from scaleinv_kernels.ensemble.layers import (
    MemberBatchNorm,
    MemberContext,
    MemberConv,
    MemberDropout,
    MemberGroupNorm,
    MemberLayerNorm,
    MemberLinear,
)

# Stateless modules that act on each sample (row of dim 0) separately.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_STATELESS = _ACTIVATIONS + (nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                             nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONVERTED = {nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Linear: "Linear",
              nn.BatchNorm1d: "BatchNorm1d", nn.BatchNorm2d: "BatchNorm2d",
              nn.GroupNorm: "GroupNorm", nn.LayerNorm: "LayerNorm"}

SUPPORTED_MODULES = (
    "Conv1d, Conv2d (zero padding), Linear, BatchNorm1d, BatchNorm2d, GroupNorm, LayerNorm, "
    "Dropout/Dropout1d/Dropout2d/AlphaDropout, Flatten/Unflatten (not over dim 0), "
    + ", ".join(t.__name__ for t in _STATELESS)
    + ", and containers (Sequential, ModuleList, ModuleDict, or your own module classes "
      "without parameters of their own)")

SUPPORTED_FUNCTIONS = (
    "elementwise arithmetic (+, -, *, /, unary -, in-place forms), torch/F activations "
    "(relu, gelu, silu, sigmoid, tanh, leaky_relu, elu, relu6, hardtanh, softplus, "
    "dropout), torch.flatten(x, start_dim>=1), x.view/x.reshape(x.size(0), ...), "
    "torch.cat/stack along dim>=1, F.max_pool*/avg_pool*/adaptive pools, reductions "
    "(mean/sum/amax/amin/softmax/log_softmax) over dims other than 0, x.size()/x.shape, "
    "contiguous, permute/transpose/squeeze/unsqueeze that keep dim 0")


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


def _is_pool2(module: nn.Module) -> bool:
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
                if i + 2 < len(names) and _is_pool2(seq._modules[names[i + 2]]):
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
    from scaleinv_kernels.ensemble.layers import MemberLayer

    if isinstance(module, MemberLayer) or type(module) in _STATELESS + _CONTAINERS:
        return
    if isinstance(module, _DROPOUT):  # inside a MemberDropout
        return
    if isinstance(module, nn.Flatten):
        if module.start_dim == 0 or module.start_dim == -module.end_dim - 1 == 0:
            raise UnsupportedModuleError(f"Ensemble: module '{name}' is Flatten(start_dim=0), "
                                         "which mixes the batch; use start_dim>=1")
        return
    if isinstance(module, nn.Unflatten):
        if module.dim == 0:
            raise UnsupportedModuleError(f"Ensemble: module '{name}' unflattens dim 0")
        return
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(
        recurse=False))
    is_leaf = not list(module.children())
    if own or (is_leaf and type(module).__module__.startswith("torch.nn")):
        what = f"holds {[n for n, _ in own]}" if own else "is not supported"
        raise UnsupportedModuleError(
            f"Ensemble: module '{name or '<root>'}' ({type(module).__name__}) {what}; "
            f"supported modules: {SUPPORTED_MODULES}")


# ------------------------------------------------------------------------------------
# forward check (torch.fx)
# ------------------------------------------------------------------------------------

_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.clamp, torch.where, torch.neg,
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.sigmoid, F.tanh,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.mish, F.dropout, F.dropout1d,
    F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, getattr,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid",
    "tanh", "exp", "abs", "sqrt", "neg", "clamp", "clamp_", "pow", "contiguous", "clone",
    "float", "to", "type_as", "size", "dim", "detach",
}
_DIM_FUNCS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
              F.softmax: "softmax", F.log_softmax: "log_softmax", torch.softmax: "softmax",
              torch.log_softmax: "log_softmax", torch.cat: "cat", torch.stack: "stack"}
_DIM_METHODS = {"mean", "sum", "amax", "amin", "softmax", "log_softmax", "squeeze",
                "unsqueeze"}


class _Tracer(fx.Tracer):
    """Treats torch.nn leaves (the ones the conversion knows) as opaque calls."""


def check_forward(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` if ``model.forward`` uses an op that could mix
    the rows of the batch dimension (so would mix members). Needs ``torch.fx`` to trace
    ``forward``; data-dependent control flow cannot be traced — pass
    ``check_forward=False`` to the Ensemble to skip this check at your own risk."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "cannot check"
        raise UnsupportedModuleError(
            f"Ensemble: cannot trace {type(model).__name__}.forward with torch.fx to check "
            f"that it keeps members apart ({type(err).__name__}: {err}). Make forward "
            "traceable, or pass check_forward=False if you are sure it never mixes rows of "
            "the batch dimension") from None
    batch_size_nodes = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr", "call_module"):
            continue
        if _is_batch_size(node):
            batch_size_nodes.add(node)
            continue
        problem = _node_problem(node, batch_size_nodes)
        if problem:
            where = _where(node)
            raise UnsupportedModuleError(
                f"Ensemble: {where} {problem}; the batch dimension (dim 0) must stay the "
                f"batch. Supported functions: {SUPPORTED_FUNCTIONS}")


def _where(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))
    stack = node.meta.get("stack_trace")
    line = f" (at {stack.strip().splitlines()[-1].strip()})" if stack else ""
    kind = "method" if node.op == "call_method" else "function"
    return f"forward calls {kind} '{target}'{line}, which"


def _is_batch_size(node: fx.Node) -> bool:
    """x.size(0), x.shape[0], len(x)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        return node.args[1] == 0
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and node.args[1] == 0 and (
                (src.op == "call_function" and src.target is getattr
                 and src.args[1] == "shape")
                or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)):
            return True
    return node.op == "call_function" and node.target is len


def _dim_arg(node: fx.Node, position: int, default):
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[position] if len(node.args) > position else default


def _touches_dim0(dim) -> bool:
    if dim is None:
        return True
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(isinstance(d, int) and d == 0 for d in dims) or not all(
        isinstance(d, int) for d in dims)


def _node_problem(node: fx.Node, batch_nodes: set) -> str | None:
    t = node.target
    if node.op == "call_function":
        if t is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr:
                return None  # x.shape[i]
            if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "size":
                return None
            idx = node.args[1]
            if isinstance(idx, tuple) and idx and idx[0] == slice(None):
                return None  # x[:, ...] keeps every row
            return "indexes the batch dimension"
        if t in _ELEMENTWISE_FUNCS:
            return None
        if t is torch.flatten:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            return None if start != 0 else "flattens dim 0 (use torch.flatten(x, 1))"
        if t in _DIM_FUNCS:
            default = 0 if t in (torch.cat, torch.stack) else None
            dim = _dim_arg(node, 1, default)
            if t is torch.stack:
                return None if isinstance(dim, int) and dim != 0 else "stacks along dim 0"
            return ("works along dim 0 (or over all dims)" if _touches_dim0(dim) else None)
        if t in (torch.reshape,):
            return _shape_problem(node.args[1:], batch_nodes)
        return "is not known to keep the rows of dim 0 apart"
    if node.op == "call_method":
        if t in _ELEMENTWISE_METHODS:
            return None
        if t in ("view", "reshape"):
            return _shape_problem(node.args[1:], batch_nodes)
        if t == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            return None if start != 0 else "flattens dim 0 (use x.flatten(1))"
        if t in _DIM_METHODS:
            dim = _dim_arg(node, 1, None)
            return "works along dim 0 (or over all dims)" if _touches_dim0(dim) else None
        if t == "permute":
            dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return None if dims and dims[0] == 0 else "moves dim 0"
        if t in ("transpose", "swapaxes"):
            return None if 0 not in node.args[1:3] else "moves dim 0"
        return "is not known to keep the rows of dim 0 apart"
    return None


def _shape_problem(shape_args, batch_nodes: set) -> str | None:
    shape = shape_args[0] if len(shape_args) == 1 and isinstance(shape_args[0],
                                                                  (tuple, list)) else shape_args
    if shape and isinstance(shape[0], fx.Node) and shape[0] in batch_nodes:
        return None
    return ("reshapes without keeping x.size(0) as the first size (write "
            "x.view(x.size(0), ...) or torch.flatten(x, 1))")
