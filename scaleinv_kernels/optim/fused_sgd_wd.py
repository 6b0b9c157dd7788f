"""FusedSGDWD: torch.optim.SGD's update in one fused pass, plus per-layer statistics."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scaleinv_kernels.ops.registry import cuda_code_path_active
from scaleinv_kernels.ops.sgd_wd import select_backend, sgd_wd_, validate_args
from scaleinv_kernels.ops.sgd_wd_kernel import host_table
from scaleinv_kernels.optim.members import members_of
from scaleinv_kernels.optim.stats import LayerStats

_GROUP_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


@dataclass
class _Launch:
    """One op call: the params of one group that share a (device, dtype)."""

    group: int
    backend: str
    params: list[Tensor]
    names: list[str]
    rows: list[int]  # first stats row of each param
    states: list[dict]  # self.state[p] per param, looked up once (with momentum only)
    segments: list[int]  # M for an ensemble tensor (one segment per member), else 1
    no_fresh: list[bool]
    seg_rows: list[int]  # every stats row of the launch, param order, members consecutive


@dataclass
class _Plan:
    """The launches of one pattern of which params have grads, and the per-row labels of
    the statistics (cached per pattern)."""

    launches: list[_Launch]
    names: list[str]
    n_rows: int
    member: list[int]
    param_index: list[int]
    # device -> (seg_rows of each launch, member, param_index) as device tensors, built
    # once: layer_stats() then creates no tensor from a Python list (on CUDA that would
    # be a copy that waits for the device)
    index: dict = field(default_factory=dict)

    def device_index(self, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
        cached = self.index.get(device)
        if cached is None:
            cached = ([host_table(la.seg_rows, torch.int64, device) for la in self.launches],
                      host_table(self.member, torch.int64, device),
                      host_table(self.param_index, torch.int64, device))
            self.index[device] = cached
        return cached


class FusedSGDWD(torch.optim.Optimizer):
    """Drop-in replacement for :class:`torch.optim.SGD` that fuses the update of all
    tensors of a (device, dtype) group into one kernel and measures per-layer statistics
    in the same pass (see :class:`~scaleinv_kernels.LayerStats`).

    Matches torch.optim.SGD:
      * update rule (coupled weight decay, momentum, dampening, nesterov, maximize),
        param groups, ``named_parameters()``, closures, ``add_param_group``;
      * float32/float64 results are **bitwise equal** to ``SGD(foreach=False)`` on CPU;
      * ``state_dict()`` / ``load_state_dict()`` are interchangeable with SGD in both
        directions (state key ``momentum_buffer``).

    Differs from torch.optim.SGD:
      * bfloat16/float16 params: the step is computed in fp32 and each stored value
        (param, momentum buffer) is rounded once; torch rounds after every op;
      * invalid hyper-parameters, duplicate params, non-float params and mismatched or
        sparse grads raise ``ValueError``/``TypeError`` that name the parameter, before
        anything is modified;
      * ``lr`` may be a 0-d tensor; it is read on the device (no ``.item()`` on CUDA). A
        CPU 0-d ``lr`` with CUDA params is accepted like torch does: it is copied to the
        params' device (non-blocking) before anything is launched;
      * ``foreach`` and ``fused`` are accepted and recorded in the defaults like torch's,
        and ignored: they choose among torch's implementations, and there is one fused
        implementation here. ``differentiable=True`` is refused (ValueError): the fused
        kernels write in place outside autograd.

    Ensembles: a parameter marked with :func:`~scaleinv_kernels.optim.mark_members` as
    holding M members along dim 0 is cut into M segments (statistics per member). A param
    group's ``lr`` and/or ``weight_decay`` may then be a 1-D float tensor of length M, one
    value per member; every param of such a group must be an ensemble tensor of M members.
    Each member's slice is updated bit for bit as a separate optimizer with scalar
    ``lr[m]``, ``weight_decay[m]`` would update it. The per-member values are read on the
    device each step (change them in place or assign new tensors for a schedule); they
    must be finite and >= 0, which is checked when the group is added and, for CPU
    tensors, at every step (on CUDA that check would need a host sync).

    Statistics: after each ``step()``, :meth:`layer_stats` returns the values of that
    step, one entry per segment (a parameter tensor, or one member of an ensemble tensor)
    in parameter order (NaN for params without a gradient). ``track_stats=False`` skips
    every statistics computation.

    Backends (chosen once per (device, dtype), shown by :attr:`backend`): ``"cpp"`` on
    CPU, ``"triton"`` on CUDA (and on CPU tensors inside
    :func:`~scaleinv_kernels.ops.registry.cuda_code_path_on_cpu`), ``"reference"`` (plain
    torch) when neither is available.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        track_stats: bool = True,
    ) -> None:
        # Keyword names and positions are torch.optim.SGD's (torch 2.11-2.14), with
        # track_stats after them.
        if differentiable:
            raise ValueError("FusedSGDWD does not support differentiable=True: its fused "
                             "kernels update the params in place outside autograd, so no "
                             "graph through the step exists; use torch.optim.SGD("
                             "differentiable=True) where the step must be differentiated")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=False, fused=fused)
        _check_hparams(defaults, "FusedSGDWD")
        self.track_stats = bool(track_stats)
        self._plan_cache: dict = {}
        self._stats: dict[torch.device, Tensor] = {}
        self._last: tuple[_Plan, list] | None = None
        super().__init__(params, defaults)

    # ---- param groups ---------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ValueError("FusedSGDWD: a param group must be a dict with a 'params' entry "
                             f"(got {type(param_group).__name__} with keys "
                             f"{sorted(param_group) if isinstance(param_group, dict) else '-'})")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        where = f"param group {len(self.param_groups)}"
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        seen: set[int] = set()
        for i, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"FusedSGDWD: {where} entry {i} is a {type(p).__name__}, "
                                "not a Tensor; pass model.parameters() or named_parameters()")
            if not p.dtype.is_floating_point or p.is_complex():
                raise TypeError(f"FusedSGDWD: {where} param {i} has dtype {p.dtype}; only "
                                "real floating-point params can be optimized")
            if id(p) in seen:
                raise ValueError(f"FusedSGDWD: {where} lists param {i} twice; pass each "
                                 "parameter once")
            seen.add(id(p))
        merged = {**self.defaults, **param_group}
        names = [p[0] if isinstance(p, tuple) else f"group{len(self.param_groups)}.param{i}"
                 for i, p in enumerate(params)]
        _check_hparams(merged, f"FusedSGDWD {where}", tensors, names)
        super().add_param_group(param_group)
        self._plan_cache.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for gi, g in enumerate(self.param_groups):
            _check_hparams(g, f"FusedSGDWD.load_state_dict: param group {gi}", g["params"],
                           _param_names(g, gi))
        self._plan_cache.clear()

    @property
    def backend(self) -> str:
        """Backend of the first (device, dtype) group: "cpp", "triton" or "reference".
        See :attr:`backends` for all of them."""
        backends = self.backends
        return next(iter(backends.values())) if backends else select_backend(torch.device("cpu"))

    @property
    def backends(self) -> dict[tuple[torch.device, torch.dtype], str]:
        """Backend per (device, dtype) of the params."""
        out = {}
        for g in self.param_groups:
            for p in g["params"]:
                out.setdefault((p.device, p.dtype), select_backend(p.device))
        return out

    # ---- step -----------------------------------------------------------------------
    def _plan(self, has_grad: tuple) -> _Plan:
        """Launches and per-row (names, member, param index) for a pattern of which params
        have grads (cached). Rows are segments: 1 per tensor, M per ensemble tensor.

        The backends depend on whether CPU tensors take the CUDA code path
        (``cuda_code_path_on_cpu``), so that is part of the cache key."""
        plan_key = (has_grad, cuda_code_path_active())
        cached = self._plan_cache.get(plan_key)
        if cached is not None:
            return cached
        launches: dict[tuple, _Launch] = {}
        names: list[str] = []
        member: list[int] = []
        param_index: list[int] = []
        row = 0
        flat = 0  # index of the param in optimizer parameter order
        for gi, group in enumerate(self.param_groups):
            pnames = _param_names(group, gi)
            for pi, p in enumerate(group["params"]):
                m = members_of(p)
                k = 1 if m is None else m
                names += [pnames[pi]] * k
                member += [-1] if m is None else list(range(m))
                param_index += [flat] * k
                flat += 1
                if has_grad[gi][pi]:
                    key = (gi, p.device, p.dtype)
                    if key not in launches:
                        launches[key] = _Launch(gi, select_backend(p.device), [], [], [], [],
                                                [], [], [])
                    la = launches[key]
                    la.params.append(p)
                    la.names.append(pnames[pi])
                    la.rows.append(row)
                    la.segments.append(k)
                    la.no_fresh.append(False)
                    la.seg_rows += range(row, row + k)
                row += k
        plan = _Plan(list(launches.values()), names, row, member, param_index)
        self._plan_cache[plan_key] = plan
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One SGD step over every param that has a ``.grad``; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        has_grad = tuple(tuple([p.grad is not None for p in g["params"]])
                         for g in self.param_groups)
        plan = self._plan(has_grad)
        launches = plan.launches
        calls = []
        for la in launches:
            group = self.param_groups[la.group]
            grads = [p.grad for p in la.params]
            table = self._segment_table(la, group)
            lr = group["lr"] if table is None else 0.0  # 0.0: overridden by the table
            device = la.params[0].device
            if isinstance(lr, Tensor) and lr.device != device:
                # torch.optim.SGD takes a CPU 0-d lr with CUDA params; the kernel reads lr
                # on the params' device, so it is copied there before anything launches
                # (non-blocking: a 0-d host tensor needs no pinned staging to be safe).
                lr = lr.detach().to(device, non_blocking=device.type != "cpu")
            bufs, fresh = [], []
            if group["momentum"] != 0:
                if len(la.states) != len(la.params):  # like SGD: state only with momentum
                    la.states = [self.state[p] for p in la.params]
                bufs = [s.get("momentum_buffer") for s in la.states]
                fresh = la.no_fresh
                if any(b is None for b in bufs):
                    fresh = [b is None for b in bufs]
            calls.append((la, group, grads, bufs, fresh, table, lr))
        # Every backend checks its own inputs before writing anything; with several
        # launches every launch is checked first so that a bad one cannot leave others
        # applied.
        if len(calls) > 1:
            for la, group, grads, bufs, fresh, table, lr in calls:
                self._checked(la, validate_args, la.params, grads,
                              [b if b is not None else p for b, p in zip(bufs, la.params)],
                              fresh, torch.empty(0), [0] * len(grads), la.segments,
                              0.0 if isinstance(lr, Tensor) else lr,
                              0.0 if table is not None else group["weight_decay"],
                              group["momentum"], group["dampening"], group["nesterov"],
                              segment_hparams=table,
                              lr_tensor=lr if isinstance(lr, Tensor) else None)
        lrs: list = []
        if self.track_stats:  # one zeroed [rows, 6] float64 sum buffer per device
            used = {la.params[0].device for la in launches}
            self._stats = {d: self._zeroed_stats(d, plan.n_rows) for d in used}
        for la, group, grads, bufs, fresh, table, lr in calls:
            stats = self._stats[la.params[0].device] if self.track_stats else _EMPTY
            new_bufs = fresh is not la.no_fresh
            if new_bufs:
                bufs = [torch.empty_like(p, memory_format=torch.contiguous_format)
                        if b is None else b for p, b in zip(la.params, bufs)]
            wd = group["weight_decay"] if table is None else 0.0  # overridden by the table
            self._checked(la, sgd_wd_, la.params, grads, bufs, fresh, stats, la.rows,
                          la.segments, lr, wd, group["momentum"], group["dampening"],
                          group["nesterov"], group["maximize"], backend=la.backend,
                          segment_hparams=table)
            if new_bufs:
                for state, b, f in zip(la.states, bufs, fresh):
                    if f:
                        state["momentum_buffer"] = b
            if table is not None:
                lr = table[:, 0]  # a new tensor every step: no clone needed
            elif isinstance(lr, Tensor):
                # the value of this step, on the params' device (a copy made above is
                # already the step's own)
                lr = lr.detach().clone() if lr is group["lr"] else lr
            else:
                lr = float(lr)
            lrs.append(lr)
        self._last = (plan, lrs) if self.track_stats else None
        return loss

    def _segment_table(self, la: _Launch, group: dict) -> Tensor | None:
        """The float64 [segments, 2] (lr, weight_decay) table of a launch whose group has
        per-member hyper-parameters (None otherwise). Only device ops: no host sync."""
        where = f"FusedSGDWD param group {la.group}"
        m = _hparam_members(group, where)
        if m is None:
            return None
        _check_members(m, group, where, la.params, la.names)
        device = la.params[0].device
        cols = []
        for key in ("lr", "weight_decay"):
            v = group[key]
            if isinstance(v, Tensor):
                if v.device.type == "cpu" and v.dim() == 1:
                    _check_values(v, key, where)  # free on CPU
                v = v.detach().to(device=device, dtype=torch.float64, non_blocking=True)
                v = v if v.dim() == 1 else v.reshape(()).expand(m)
            else:
                v = torch.full((m,), float(v), dtype=torch.float64, device=device)
            cols.append(v)
        return torch.stack(cols, 1).repeat(len(la.params), 1)

    def _zeroed_stats(self, device: torch.device, n_rows: int) -> Tensor:
        buf = self._stats.get(device)
        if buf is None or buf.shape[0] != n_rows:
            return torch.zeros(n_rows, 6, dtype=torch.float64, device=device)
        return buf.zero_()

    @staticmethod
    def _checked(la: _Launch, fn, *args, **kwargs) -> None:
        """Call ``fn``; re-raise its ValueError/TypeError naming the parameter."""
        try:
            fn(*args, **kwargs)
        except (ValueError, TypeError) as err:
            msg = str(err).split("\nException raised from")[0]
            m = re.search(r"(?:param|buffer|grad) (\d+)", msg)
            if m and int(m.group(1)) < len(la.names):
                msg = f"parameter '{la.names[int(m.group(1))]}' (param group {la.group}): {msg}"
            raise type(err)(msg) from None

    # ---- statistics -----------------------------------------------------------------
    def layer_stats(self) -> LayerStats:
        """Statistics of the last ``step()`` (see :mod:`scaleinv_kernels.optim.stats`).

        Fields live on the device of the first parameter; nothing synchronises.
        """
        if not self.track_stats:
            raise RuntimeError("layer_stats() needs FusedSGDWD(..., track_stats=True)")
        if self._last is None:
            raise RuntimeError("layer_stats() is available after the first step()")
        plan, lrs = self._last
        launches, n_rows = plan.launches, plan.n_rows
        device = launches[0].params[0].device if launches else torch.device("cpu")
        rows, member, param_index = plan.device_index(device)
        sums = torch.zeros(n_rows, 6, dtype=torch.float64, device=device)
        for buf in self._stats.values():
            sums += buf.to(device)
        lr = torch.full((n_rows,), float("nan"), dtype=torch.float64, device=device)
        updated = torch.zeros(n_rows, dtype=torch.bool, device=device)
        for index, value in zip(rows, lrs):
            lr[index] = value.to(device, torch.float64) if isinstance(value, Tensor) else value
            updated[index] = True
        return LayerStats.from_sums(plan.names, sums, lr, updated, plan.member,
                                    plan.param_index, member_tensor=member.clone(),
                                    param_index_tensor=param_index.clone())


_EMPTY = torch.empty(0, dtype=torch.float64)


def _param_names(group: dict, gi: int) -> list[str]:
    pnames = group.get("param_names")
    return list(pnames) if pnames else [f"group{gi}.param{pi}" for pi in
                                        range(len(group["params"]))]


def _hparam_members(group: dict, where: str) -> int | None:
    """M if the group's lr and/or weight_decay are per-member (1-D tensors of length M),
    else None. Checks types and shapes only (nothing that needs a host sync)."""
    lengths = {}
    for key in ("lr", "weight_decay"):
        v = group[key]
        if not isinstance(v, Tensor):
            continue
        if not v.dtype.is_floating_point or v.is_complex():
            raise ValueError(f"{where}: a tensor {key} must be a float tensor, got {v.dtype}")
        if v.dim() == 1:
            if v.numel() == 0:
                raise ValueError(f"{where}: a per-member {key} needs one value per member, "
                                 "got an empty tensor")
            lengths[key] = v.numel()
        elif key == "weight_decay":
            raise ValueError(f"{where}: weight_decay must be a float or a 1-D tensor with one "
                             f"value per member, got shape {list(v.shape)}")
        elif v.numel() != 1:
            raise ValueError(f"{where}: a tensor lr must be 0-d (one lr) or 1-D (one lr per "
                             f"ensemble member), got shape {list(v.shape)} {v.dtype}")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: per-member lr and weight_decay must have the same length "
                         f"(the member count), got {lengths['lr']} and "
                         f"{lengths['weight_decay']}")
    return next(iter(lengths.values()), None)


def _check_members(m: int, group: dict, where: str, params: list[Tensor],
                   names: list[str]) -> None:
    """Every param of a group with per-member hyper-parameters holds exactly m members."""
    key = "lr" if isinstance(group["lr"], Tensor) and group["lr"].dim() == 1 else "weight_decay"
    for p, name in zip(params, names):
        pm = members_of(p)
        if pm == m:
            continue
        what = ("is not an ensemble tensor (no member dimension)" if pm is None
                else f"is an ensemble tensor of {pm} members")
        raise ValueError(f"{where} has a per-member {key} of length {m} but parameter "
                         f"'{name}' {what}; put params with a different member count (or "
                         "non-ensemble params) in a separate group with a scalar "
                         f"{key} or one of their own length")


def _check_values(v: Tensor, key: str, where: str) -> None:
    bad = ~(torch.isfinite(v) & (v >= 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where}: invalid per-member {key} {v[i].item()} (member {i}); "
                         "every value must be finite and >= 0")


def _check_hparams(group: dict, where: str, params: list[Tensor] | None = None,
                   names: list[str] | None = None) -> None:
    """Raise ValueError/TypeError for invalid hyper-parameters of a group (and, given its
    params, for per-member hyper-parameters that do not fit them)."""
    lr = group["lr"]
    m = _hparam_members(group, where)
    if isinstance(lr, Tensor):
        if lr.dim() == 1:
            _check_values(lr, "lr", where)
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"{where}: lr must be a float, a 0-d tensor or a 1-D tensor with one "
                        f"value per ensemble member, got {type(lr).__name__}")
    elif lr < 0:
        raise ValueError(f"{where}: invalid lr {lr}; the learning rate must be >= 0")
    if isinstance(group["weight_decay"], Tensor):
        _check_values(group["weight_decay"], "weight_decay", where)
    if m is not None and params is not None:
        _check_members(m, group, where, params, names or [str(i) for i in range(len(params))])
    for key in ("momentum", "dampening", "weight_decay"):
        if key == "weight_decay" and isinstance(group[key], Tensor):
            continue
        value = group[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{where}: {key} must be a float, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{where}: invalid {key} {value}; it must be >= 0")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0 "
                         f"(got momentum={group['momentum']}, dampening={group['dampening']})")
