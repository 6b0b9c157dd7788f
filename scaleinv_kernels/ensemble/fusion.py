"""Fusion found in the graph of ``forward``, not only inside ``nn.Sequential``.

:func:`fuse_forward` traces a converted net with ``torch.fx`` (member layers as leaves) and
rewrites, wherever they occur in ``forward``, the chains

* BatchNorm2d or GroupNorm → ReLU (→ MaxPool2d(2)) into ``norm.fused_forward(x, pool)``
  (``scaleinv::bn_act_pool`` / ``gn_act_pool``), and
* an input-layer Conv → BatchNorm2d → ReLU → MaxPool2d(2) into
  ``norm.fused_forward(x, 2, conv)`` (``scaleinv::conv_bn_act_pool`` where the conv's input
  needs no gradient),

under the conditions of the ``nn.Sequential`` fusion (``convert.fuse_norm_act``): each
intermediate result has no other use, BatchNorm2d has a running-average momentum, the
ReLU is ``nn.ReLU``/``F.relu``/``torch.relu``/``x.relu()`` (in place or not), the pool is
``nn.MaxPool2d(2)`` or ``F.max_pool2d(x, 2)``. ResNet basic and bottleneck blocks
(``relu(bn(conv(x)))``) and pre-activation blocks (``conv(relu(bn(x)))``) are such
chains. Modules stay where they are (``state_dict`` and a ReLU module called elsewhere
too are unchanged); only the compiled ``forward`` the Ensemble calls differs, one per
train/eval mode (code may branch on ``self.training``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from scaleinv_kernels.ensemble.convert import is_pool2 as is_pool2_module
from scaleinv_kernels.ensemble.forward_check import MemberTracer
from scaleinv_kernels.ensemble.layers import MemberConv
from scaleinv_kernels.ensemble.norm_layers import MemberBatchNorm, MemberGroupNorm

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def fused_norm_act(norm: nn.Module, x, pool: int, conv: nn.Module | None = None):
    """The call a fused chain becomes in the rewritten graph."""
    return norm.fused_forward(x, pool, conv)


def _module(net: nn.Module, node: fx.Node) -> nn.Module | None:
    return net.get_submodule(node.target) if node.op == "call_module" else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(net: nn.Module, node: fx.Node, src: fx.Node) -> bool:
    if not node.args or node.args[0] is not src or len(node.args) > 1:
        return False
    if node.op == "call_module":
        return type(_module(net, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in _RELU_METHODS and not node.kwargs


def _is_pool2_node(net: nn.Module, node: fx.Node, src: fx.Node) -> bool:
    if not node.args or node.args[0] is not src:
        return False
    if node.op == "call_module":
        return len(node.args) == 1 and not node.kwargs and is_pool2_module(
            _module(net, node))
    if node.op == "call_function" and node.target is F.max_pool2d:
        args = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                         "return_indices"), node.args[1:]))
        args.update(node.kwargs)
        pool = nn.MaxPool2d(**args) if "kernel_size" in args else None
        return pool is not None and is_pool2_module(pool)
    return False


def _chains(net: nn.Module, graph: fx.Graph) -> list[tuple]:
    """(conv node or None, norm node, relu node, pool node or None) per fusable chain."""
    found = []
    for node in graph.nodes:
        norm = _module(net, node)
        if not isinstance(norm, (MemberBatchNorm, MemberGroupNorm)) or norm.fused_relu \
                or not norm.can_fuse() or len(node.args) != 1 or node.kwargs:
            continue
        relu = _only_user(node)
        if relu is None or not _is_relu(net, relu, node):
            continue
        pool = _only_user(relu)
        if pool is not None and not _is_pool2_node(net, pool, relu):
            pool = None
        conv_node = node.args[0]
        conv = _module(net, conv_node) if isinstance(conv_node, fx.Node) else None
        fuse_conv = (pool is not None and isinstance(norm, MemberBatchNorm)
                     and isinstance(conv, MemberConv) and conv.fused_norm is None
                     and conv.can_fuse_into_norm()
                     and conv.out_channels == norm.num_features
                     and conv_node.next is node and len(conv_node.users) == 1
                     and len(conv_node.args) == 1 and not conv_node.kwargs)
        found.append((conv_node if fuse_conv else None, node, relu, pool))
    return found


def _rewrite(graph: fx.Graph, chains: list[tuple]) -> None:
    for conv, norm, relu, pool in chains:
        first = conv if conv is not None else norm
        with graph.inserting_before(first):
            norm_attr = graph.get_attr(norm.target)
            conv_attr = graph.get_attr(conv.target) if conv is not None else None
            fused = graph.call_function(fused_norm_act, (norm_attr, first.args[0],
                                                          2 if pool is not None else 0,
                                                          conv_attr))
        last = pool if pool is not None else relu
        last.replace_all_uses_with(fused)
        for node in (pool, relu, norm, conv):
            if node is not None:
                graph.erase_node(node)


def _compile(graph: fx.Graph, name: str) -> Callable:
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<fused forward of {name}>", "exec"), scope)  # noqa: S102
    return scope["forward"]


def fuse_forward(net: nn.Module) -> dict[bool, Callable] | None:
    """Compiled forwards of ``net`` (``fn(net, x)``) with every fusable chain of its
    ``forward`` fused, keyed by train mode; None where tracing fails or nothing is found
    in either mode (the Ensemble then calls ``net`` itself). Marks the fused layers for
    ``print`` (``fused_in_forward``); does not change what they compute."""
    mode = net.training
    out: dict[bool, Callable] = {}
    marks: dict[nn.Module, str] = {}
    try:
        for training in (True, False):
            net.train(training)
            try:
                graph = MemberTracer(record_stack_traces=False).trace(net)
            except Exception:  # noqa: BLE001 - an untraceable forward runs unfused
                return None
            chains = _chains(net, graph)
            if not chains:
                continue
            for conv, norm, _, pool in chains:
                marks[net.get_submodule(norm.target)] = "+ReLU" + (
                    " +MaxPool2d(2)" if pool is not None else "") + (
                    " +the conv before it" if conv is not None else "")
                if conv is not None:
                    marks[net.get_submodule(conv.target)] = True
            _rewrite(graph, chains)
            graph.lint()
            out[training] = _compile(graph, type(net).__name__)
    finally:
        net.train(mode)
    for module, mark in marks.items():
        module.fused_in_forward = mark
    return out or None


def fused_count(net: nn.Module) -> int:
    """Norms fused in forward by :func:`fuse_forward`."""
    return sum(1 for m in net.modules() if getattr(m, "fused_in_forward", "") not in ("", False)
               and isinstance(m, (MemberBatchNorm, MemberGroupNorm)))
