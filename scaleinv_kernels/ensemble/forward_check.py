"""The check that a model's own ``forward`` is member-safe (torch.fx).

The ensemble runs a converted model's ``forward`` unchanged on member-folded activations
``[m·B, ...]`` (:mod:`.convert`), which is correct as long as it never mixes rows of dim
0. :func:`check_forward` traces it with ``torch.fx`` and rejects any function or method
that could (a reduction over dim 0, ``view(-1, k)``, indexing the batch, ...), naming
the line of ``forward``; conditions that depend on input ranks are checked at the first
call (:meth:`ForwardCheck.verify_ranks`). What passes is
:data:`~scaleinv_kernels.ensemble.convert.SUPPORTED_FUNCTIONS`.
"""

from __future__ import annotations

import copy
import operator
import os
import re
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from scaleinv_kernels.ensemble.convert import (
    SUPPORTED_FUNCTIONS,
    SUPPORTED_MODULES,
    UnsupportedModuleError,
    module_problem,
)

_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.clamp, torch.where, torch.neg,
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.sigmoid, F.tanh,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.mish, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, getattr,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid",
    "tanh", "exp", "abs", "sqrt", "neg", "clamp", "clamp_", "pow", "contiguous", "clone",
    "float", "to", "type_as", "size", "dim", "detach",
}
# Random functions draw from the global RNG, so a member's draws would depend on the
# members beside it in the call; nn.Dropout modules draw from the member's own stream.
_RANDOM_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                 F.feature_alpha_dropout, torch.dropout, torch.bernoulli, torch.rand_like,
                 torch.randn_like, torch.randint_like, torch.rand, torch.randn, torch.randint,
                 torch.randperm, torch.multinomial, torch.normal}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_",
                   "exponential_", "geometric_", "cauchy_", "log_normal_"}
# name -> (position of the dim argument, its keyword, its default, rank offset): the op
# keeps the rows of dim 0 apart as long as that dim is not 0. The rank offset is 1 where
# a negative dim counts in the output's rank (unsqueeze, stack).
_REQUIRED = object()
_ALONG_DIM = {
    "mean": (1, "dim", None, 0), "sum": (1, "dim", None, 0), "amax": (1, "dim", None, 0),
    "amin": (1, "dim", None, 0), "softmax": (1, "dim", None, 0),
    "log_softmax": (1, "dim", None, 0), "cat": (1, "dim", 0, 0), "stack": (1, "dim", 0, 1),
    "chunk": (2, "dim", 0, 0), "split": (2, "dim", 0, 0), "unbind": (1, "dim", 0, 0),
    "narrow": (1, "dim", _REQUIRED, 0), "select": (1, "dim", _REQUIRED, 0),
    "index_select": (1, "dim", _REQUIRED, 0), "squeeze": (1, "dim", None, 0),
    "unsqueeze": (1, "dim", _REQUIRED, 1), "flatten": (1, "start_dim", 0, 0),
    "transpose": (1, "dim0", _REQUIRED, 0), "swapaxes": (1, "axis0", _REQUIRED, 0),
}
_ALONG_DIM_FUNCS = {
    torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
    F.softmax: "softmax", F.log_softmax: "log_softmax", torch.softmax: "softmax",
    torch.log_softmax: "log_softmax", torch.cat: "cat", torch.concat: "cat",
    torch.stack: "stack", torch.chunk: "chunk", torch.split: "split",
    torch.unbind: "unbind", torch.narrow: "narrow", torch.select: "select",
    torch.index_select: "index_select", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", torch.flatten: "flatten", torch.transpose: "transpose",
    torch.swapaxes: "swapaxes",
}
_TUPLE_OPS = {"chunk", "split", "unbind", "size"}  # ops whose result is a tuple
_WHAT = {"chunk": "splits", "split": "splits", "unbind": "unbinds", "narrow": "narrows",
         "select": "selects from", "index_select": "selects from", "cat": "concatenates",
         "stack": "stacks", "squeeze": "squeezes", "unsqueeze": "inserts a dim at",
         "flatten": "flattens", "transpose": "moves", "swapaxes": "moves"}


class MemberTracer(fx.Tracer):
    """torch.nn leaves and member layers are opaque calls; records where each node comes
    from in ``forward``, so that an error can name the line."""

    def __init__(self, record_stack_traces: bool = True) -> None:
        super().__init__()
        self.record_stack_traces = record_stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from scaleinv_kernels.ensemble.layers import MemberLayer

        return isinstance(m, MemberLayer) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """``model.forward`` as a torch.fx graph, in the model's current train/eval mode."""
    return MemberTracer().trace(model)


@dataclass
class _RankRule:
    """A negative dim, or an index after ``...``, that is safe only if the tensor it
    applies to (``src``) has a large enough rank: checked on meta tensors at the first
    call (:meth:`ForwardCheck.verify_ranks`)."""

    node: fx.Node
    src: fx.Node
    dims: tuple[int, ...] = ()  # negative dims; problem if d + rank + offset == 0
    offset: int = 0
    consumed: int = -1  # dims an index after a leading ``...`` consumes; needs rank > it


@dataclass
class ForwardCheck:
    """What :func:`check_forward` found: the traced graphs (train and eval mode) and the
    rank conditions it could not decide without input shapes."""

    graphs: dict[bool, fx.Graph] = field(default_factory=dict)
    rules: dict[bool, list[_RankRule]] = field(default_factory=dict)
    _verified: set = field(default_factory=set)
    _meta: nn.Module | None = None  # the model on the meta device, made at the first check

    def __getstate__(self):
        return {**self.__dict__, "_meta": None}  # rebuilt when needed

    def verify_ranks(self, model: nn.Module, sample_shape: tuple[int, ...]) -> None:
        """Run ``forward`` on meta tensors of one member's input shape and check every
        rank condition; raises :class:`UnsupportedModuleError` naming the line. Each
        input shape is verified once. A forward that cannot run on meta tensors leaves
        the conditions unchecked (the static check assumed rank >= 2)."""
        key = tuple(sample_shape)
        if key in self._verified or not any(self.rules.values()):
            return
        if self._meta is None:
            try:
                self._meta = copy.deepcopy(model).to("meta")
            except Exception:  # noqa: BLE001 - a module that cannot live on meta: unchecked
                self._verified.add(key)
                return
        meta = self._meta
        param = next(meta.parameters(), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        for training, rules in self.rules.items():
            if not rules:
                continue
            meta.train(training)
            interp = fx.Interpreter(meta, garbage_collect_values=False,
                                    graph=self.graphs[training])
            try:
                with torch.no_grad():
                    interp.run(torch.empty(key, device="meta", dtype=dtype))
            except Exception:  # noqa: BLE001 - an op without a meta kernel: cannot check
                continue
            for rule in rules:
                value = interp.env.get(rule.src)
                if isinstance(value, (list, tuple)) and value:
                    value = value[0]
                if not isinstance(value, Tensor):
                    continue
                rank = value.dim()
                if rule.consumed >= 0 and rule.consumed >= rank:
                    raise UnsupportedModuleError(
                        f"Ensemble: {_where(rule.node)} indexes a {rank}-d tensor with "
                        f"{rule.consumed} indices after '...', which reaches the batch "
                        "dimension (dim 0)")
                if any(d + rank + rule.offset == 0 for d in rule.dims):
                    raise UnsupportedModuleError(
                        f"Ensemble: {_where(rule.node)} works along dim {rule.dims} of a "
                        f"{rank}-d tensor, which is the batch dimension (dim 0)")
        self._verified.add(key)


def check_forward(model: nn.Module) -> ForwardCheck:
    """Raise :class:`UnsupportedModuleError` if ``model.forward`` uses an op that could mix
    the rows of the batch dimension (so would mix members), or a module the ensemble
    cannot batch; the message names the module or function and the line of ``forward``.
    ``forward`` is traced with ``torch.fx`` in train and in eval mode (code may branch on
    ``self.training``); data-dependent control flow cannot be traced — pass
    ``check_forward=False`` to the Ensemble to skip this check at your own risk.

    Returns the graphs and the rank conditions left for the first call (an index after
    a leading ``...`` or a negative dim is safe only on a tensor of high enough rank)."""
    result = ForwardCheck()
    mode = model.training
    try:
        for training in (True, False):
            model.train(training)
            try:
                graph = trace(model)
            except Exception as err:  # noqa: BLE001 - any tracing failure: "cannot check"
                raise UnsupportedModuleError(_untraceable(model, err)) from None
            result.graphs[training] = graph
            result.rules[training] = _check_graph(model, graph)
    finally:
        model.train(mode)
    return result


def _untraceable(model: nn.Module, err: Exception) -> str:
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(torch_dir)]
    at = ""
    if frames:
        f = frames[-1]
        at = f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{f.line}`"
    if "item assignment" in str(err):
        return (f"Ensemble: {type(model).__name__}.forward writes into a tensor by index in "
                f"place{at}, which cannot be traced to check that it leaves the rows of the "
                "batch dimension alone; write it out of place (torch.where, torch.cat), or "
                "pass check_forward=False if it never writes across rows")
    return (f"Ensemble: cannot trace {type(model).__name__}.forward with torch.fx to check "
            f"that it keeps members apart ({type(err).__name__}: {err}){at}. Make forward "
            "traceable, or pass check_forward=False if you are sure it never mixes rows of "
            "the batch dimension")


def _check_graph(model: nn.Module, graph: fx.Graph) -> list[_RankRule]:
    rules: list[_RankRule] = []
    batch_size_nodes = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            problem = module_problem(module)
            if problem:
                line = _forward_line(node)
                at = f" (called at {line})" if line else ""
                raise UnsupportedModuleError(
                    f"Ensemble: module '{node.target}' ({type(module).__name__}){at} "
                    f"{problem}; supported modules: {SUPPORTED_MODULES}")
            continue
        if _is_batch_size(node):
            batch_size_nodes.add(node)
            continue
        problem = _node_problem(node, model, batch_size_nodes, rules)
        if problem:
            raise UnsupportedModuleError(
                f"Ensemble: {_where(node)} {problem}; the batch dimension (dim 0) must stay "
                f"the batch. Supported functions: {SUPPORTED_FUNCTIONS}")
    return rules


def _forward_line(node: fx.Node) -> str:
    """'file.py:12 in forward: `code`' for the innermost frame of the model's code that
    created ``node`` (frames inside torch are skipped)."""
    stack = node.meta.get("stack_trace") or ""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    found = ""
    for match in re.finditer(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack):
        path, line, fn, code = match.groups()
        if not path.startswith(torch_dir):
            found = f"{os.path.basename(path)}:{line} in {fn}: `{code.strip()}`"
    return found


def _where(node: fx.Node) -> str:
    line = _forward_line(node)
    at = f" ({line})" if line else ""
    if node.op == "call_module":
        return f"forward calls module '{node.target}'{at}"
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))
    kind = "method" if node.op == "call_method" else "function"
    return f"forward calls {kind} '{target}'{at}, which"


def _is_batch_size(node: fx.Node) -> bool:
    """x.size(0), x.shape[0], len(x)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        return node.args[1] == 0
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if _is_shape(src) and node.args[1] == 0:
            return True
    return node.op == "call_function" and node.target is len


def _is_shape(node) -> bool:
    """x.shape or x.size()."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
        or (node.op == "call_method" and node.target == "size" and len(node.args) == 1))


def _op_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return _ALONG_DIM_FUNCS.get(node.target)
    return None


def _arg(node: fx.Node, position: int, keyword: str, default):
    if keyword in node.kwargs:
        return node.kwargs[keyword]
    return node.args[position] if len(node.args) > position else default


def _returns_tuple(node, model: nn.Module) -> bool:
    """``node`` produces a tuple (so an int index picks an element, not a batch row)."""
    if not isinstance(node, fx.Node):
        return True  # a constant
    if _is_shape(node) or _op_name(node) in _TUPLE_OPS:
        return True
    if node.op == "call_function" and node.target in (
            F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d):
        return bool(node.kwargs.get("return_indices", False))
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "return_indices", False))
    return False


def _is_advanced(entry) -> bool:
    return isinstance(entry, (fx.Node, list)) or isinstance(entry, Tensor)


def _index_problem(node: fx.Node, src: fx.Node, index, rules: list) -> str | None:
    """An index of a tensor keeps dim 0 whole if it starts with ``:`` (or ``0:``), or
    with ``...`` when the entries after it do not reach dim 0; advanced (tensor) indices
    in one contiguous group stay in place."""
    idx = index if isinstance(index, tuple) else (index,)
    if not idx:
        return None
    advanced = [i for i, e in enumerate(idx) if _is_advanced(e)]
    if advanced and advanced != list(range(advanced[0], advanced[-1] + 1)):
        return ("uses tensor indices separated by slices, which moves the indexed dims "
                "before the batch dimension")
    first = idx[0]
    if isinstance(first, slice) and first.start in (None, 0) and first.stop is None \
            and first.step in (None, 1):
        return None
    if first is Ellipsis:
        consumed = sum(1 for e in idx[1:] if e is not None and e is not Ellipsis)
        if consumed:
            rules.append(_RankRule(node, src, consumed=consumed))
        return None
    if first is None:
        return "inserts a dimension before the batch dimension (x[None])"
    return "indexes the batch dimension (dim 0); x[:, ...] keeps it whole"


def _dims_problem(node: fx.Node, name: str, dim, rules: list) -> str | None:
    """Problem if ``dim`` is (or, for negative dims, may be) the batch dimension."""
    spec = _ALONG_DIM[name]
    if dim is _REQUIRED:
        return None  # torch itself will complain about the missing argument
    what = _WHAT.get(name, "works along")
    if dim is None:
        return f"{what} every dim, dim 0 included (name the dims, e.g. dim=1)"
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return f"{what} a dim computed in forward, which could be dim 0"
    if 0 in dims:
        return f"{what} dim 0, the batch dimension"
    negative = tuple(d for d in dims if d < 0)
    if negative:
        src = node.args[0]
        if name in ("cat", "stack") and isinstance(src, (list, tuple)):
            src = src[0] if src else None
        if isinstance(src, fx.Node):
            rules.append(_RankRule(node, src, dims=negative, offset=spec[3]))
    return None


def _node_problem(node: fx.Node, model: nn.Module, batch_nodes: set,
                  rules: list) -> str | None:
    t = node.target
    if node.op == "call_function" and t is operator.getitem:
        src = node.args[0]
        if _returns_tuple(src, model):
            return None  # an element of a tuple, a shape entry
        return _index_problem(node, src, node.args[1], rules)
    if node.op == "call_function" and t in _RANDOM_FUNCS:
        p = _arg(node, 1, "p", 0.5)
        training = _arg(node, 2, "training", True)
        if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                 F.feature_alpha_dropout) and (p == 0 or training is False):
            return None
        return ("draws from the global random generator, so a member's draws would depend on "
                "the members beside it; use an nn.Dropout module (each member its own stream)")
    if node.op == "call_method" and t in _RANDOM_METHODS:
        return "draws from the global random generator; use an nn.Dropout module"
    name = _op_name(node)
    if name in _ALONG_DIM:
        pos, keyword, default, _ = _ALONG_DIM[name]
        if name == "flatten":
            start = _arg(node, pos, keyword, default)
            end = _arg(node, pos + 1, "end_dim", -1)
            return None if start == end == 0 else _dims_problem(node, name, start, rules)
        if name in ("transpose", "swapaxes"):
            d0, d1 = _arg(node, 1, keyword, _REQUIRED), _arg(node, 2, keyword[:-1] + "1",
                                                              _REQUIRED)
            return _dims_problem(node, name, (d0, d1), rules)
        return _dims_problem(node, name, _arg(node, pos, keyword, default), rules)
    if node.op == "call_function":
        if t in _ELEMENTWISE_FUNCS:
            return None
        if t is torch.reshape:
            return _shape_problem(node.args[1:], batch_nodes)
        return "is not known to keep the rows of dim 0 apart"
    if node.op == "call_method":
        if t in _ELEMENTWISE_METHODS:
            return None
        if t in ("view", "reshape"):
            return _shape_problem(node.args[1:], batch_nodes)
        if t == "expand":
            return _shape_problem(node.args[1:], batch_nodes, keep=-1)
        if t == "repeat":
            sizes = _sizes(node.args[1:])
            return None if sizes and sizes[0] == 1 else "repeats along dim 0"
        if t == "permute":
            dims = _sizes(node.args[1:])
            return None if dims and dims[0] == 0 else "moves dim 0"
        return "is not known to keep the rows of dim 0 apart"
    return None


def _sizes(args) -> tuple:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def _shape_problem(shape_args, batch_nodes: set, keep=None) -> str | None:
    """A new shape keeps the batch first if it starts with x.size(0) (or ``keep``, -1 for
    expand), or is x.shape[:k] (+ more sizes)."""
    if len(shape_args) == 1 and isinstance(shape_args[0], fx.Node) \
            and _shape_prefix(shape_args[0]):
        return None
    shape = _sizes(shape_args)
    if shape and ((isinstance(shape[0], fx.Node) and shape[0] in batch_nodes)
                  or (keep is not None and shape[0] == keep)):
        return None
    if keep is not None:
        return "expands dim 0 (write x.expand(-1, ...))"
    return ("reshapes without keeping x.size(0) as the first size (write "
            "x.view(x.size(0), ...) or torch.flatten(x, 1))")


def _shape_prefix(node: fx.Node) -> bool:
    """x.shape[:k] or x.shape[:k] + (...) with k >= 1."""
    if node.op == "call_function" and node.target is operator.add:
        return isinstance(node.args[0], fx.Node) and _shape_prefix(node.args[0])
    if node.op == "call_function" and node.target is operator.getitem \
            and _is_shape(node.args[0]):
        s = node.args[1]
        return (isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1)
                and s.stop != 0)
    return False
