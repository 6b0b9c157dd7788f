"""FusedSGDWD: torch.optim.SGD's update in one fused pass, plus per-layer statistics."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from scaleinv_kernels.ops.sgd_wd import select_backend, sgd_wd_, validate_args
from scaleinv_kernels.optim.stats import LayerStats

_GROUP_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


@dataclass
class _Launch:
    """One op call: the params of one group that share a (device, dtype)."""

    group: int
    backend: str
    params: list[Tensor]
    names: list[str]
    rows: list[int]
    states: list[dict]  # self.state[p] per param, looked up once (with momentum only)
    segments: list[int]
    no_fresh: list[bool]


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
      * ``lr`` may be a 0-d tensor; it is read on the device (no ``.item()`` on CUDA).

    Statistics: after each ``step()``, :meth:`layer_stats` returns the values of that
    step, one entry per parameter tensor in parameter order (NaN for params without a
    gradient). ``track_stats=False`` skips every statistics computation.

    Backends (chosen once per (device, dtype), shown by :attr:`backend`): ``"cpp"`` on
    CPU, ``"triton"`` on CUDA, ``"reference"`` (plain torch) when neither is available.
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
        track_stats: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=None, differentiable=False, fused=None)
        _check_hparams(defaults, "FusedSGDWD")
        self.track_stats = bool(track_stats)
        self._plan_cache: dict = {}
        self._stats: dict[torch.device, Tensor] = {}
        self._last: tuple | None = None
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
        _check_hparams(merged, f"FusedSGDWD {where}")
        super().add_param_group(param_group)
        self._plan_cache.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            _check_hparams(g, "FusedSGDWD.load_state_dict")
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
    def _plan(self, has_grad: tuple) -> tuple[list[_Launch], list[str], int]:
        """Launches for a pattern of which params have grads (cached)."""
        cached = self._plan_cache.get(has_grad)
        if cached is not None:
            return cached
        launches: dict[tuple, _Launch] = {}
        names: list[str] = []
        row = 0
        for gi, group in enumerate(self.param_groups):
            pnames = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                name = pnames[pi] if pnames else f"group{gi}.param{pi}"
                names.append(name)
                if has_grad[gi][pi]:
                    key = (gi, p.device, p.dtype)
                    if key not in launches:
                        launches[key] = _Launch(gi, select_backend(p.device), [], [], [], [],
                                                [], [])
                    la = launches[key]
                    la.params.append(p)
                    la.names.append(name)
                    la.rows.append(row)
                    la.segments.append(1)
                    la.no_fresh.append(False)
                row += 1
        plan = (list(launches.values()), names, row)
        self._plan_cache[has_grad] = plan
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
        launches, names, n_rows = self._plan(has_grad)
        calls = []
        for la in launches:
            group = self.param_groups[la.group]
            grads = [p.grad for p in la.params]
            bufs, fresh = [], []
            if group["momentum"] != 0:
                if len(la.states) != len(la.params):  # like SGD: state only with momentum
                    la.states = [self.state[p] for p in la.params]
                bufs = [s.get("momentum_buffer") for s in la.states]
                fresh = la.no_fresh
                if any(b is None for b in bufs):
                    fresh = [b is None for b in bufs]
            calls.append((la, group, grads, bufs, fresh))
        # Every backend checks its own inputs before writing anything; with several
        # launches every launch is checked first so that a bad one cannot leave others
        # applied.
        if len(calls) > 1:
            for la, group, grads, bufs, fresh in calls:
                self._checked(la, validate_args, la.params, grads,
                              [b if b is not None else p for b, p in zip(bufs, la.params)],
                              fresh, torch.empty(0), [0] * len(grads), [1] * len(grads),
                              0.0 if isinstance(group["lr"], Tensor) else group["lr"],
                              group["weight_decay"], group["momentum"], group["dampening"],
                              group["nesterov"])
        lrs: list = []
        if self.track_stats:  # one zeroed [rows, 6] float64 sum buffer per device
            used = {la.params[0].device for la in launches}
            self._stats = {d: self._zeroed_stats(d, n_rows) for d in used}
        for la, group, grads, bufs, fresh in calls:
            stats = self._stats[la.params[0].device] if self.track_stats else _EMPTY
            new_bufs = fresh is not la.no_fresh
            if new_bufs:
                bufs = [torch.empty_like(p, memory_format=torch.contiguous_format)
                        if b is None else b for p, b in zip(la.params, bufs)]
            self._checked(la, sgd_wd_, la.params, grads, bufs, fresh, stats, la.rows,
                          la.segments, group["lr"], group["weight_decay"],
                          group["momentum"], group["dampening"], group["nesterov"],
                          group["maximize"], backend=la.backend)
            if new_bufs:
                for state, b, f in zip(la.states, bufs, fresh):
                    if f:
                        state["momentum_buffer"] = b
            lr = group["lr"]
            lrs.append((la.rows, lr.detach().clone() if isinstance(lr, Tensor) else float(lr)))
        self._last = (names, n_rows, lrs, launches) if self.track_stats else None
        return loss

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
        names, n_rows, lrs, launches = self._last
        device = launches[0].params[0].device if launches else torch.device("cpu")
        sums = torch.zeros(n_rows, 6, dtype=torch.float64, device=device)
        for buf in self._stats.values():
            sums += buf.to(device)
        lr = torch.full((n_rows,), float("nan"), dtype=torch.float64, device=device)
        updated = torch.zeros(n_rows, dtype=torch.bool, device=device)
        for rows, value in lrs:
            index = torch.tensor(rows, device=device)
            lr[index] = value.to(device, torch.float64) if isinstance(value, Tensor) else value
            updated[index] = True
        return LayerStats.from_sums(names, sums, lr, updated)


_EMPTY = torch.empty(0, dtype=torch.float64)


def _check_hparams(group: dict, where: str) -> None:
    """Raise ValueError/TypeError for invalid hyper-parameters of a group."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise ValueError(f"{where}: a tensor lr must be a one-element float tensor, "
                             f"got shape {tuple(lr.shape)} {lr.dtype}")
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"{where}: lr must be a float or a 0-d tensor, got {type(lr).__name__}")
    elif lr < 0:
        raise ValueError(f"{where}: invalid lr {lr}; the learning rate must be >= 0")
    for key in ("momentum", "dampening", "weight_decay"):
        value = group[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{where}: {key} must be a float, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{where}: invalid {key} {value}; it must be >= 0")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0 "
                         f"(got momentum={group['momentum']}, dampening={group['dampening']})")
