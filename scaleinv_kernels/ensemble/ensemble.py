"""Ensemble: M copies of a network as one member-batched module."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from scaleinv_kernels.cpu_memory import retain_freed_memory
from scaleinv_kernels.ensemble.convert import convert
from scaleinv_kernels.ensemble.forward_check import check_forward
from scaleinv_kernels.ensemble.fusion import fuse_forward, fused_count
from scaleinv_kernels.ensemble.layers import MemberContext, MemberDropout
from scaleinv_kernels.ensemble.seeding import STREAM_INIT, member_seed
from scaleinv_kernels.optim.members import mark_members

INITS = ("shared", "independent")


class Ensemble(nn.Module):
    """``n_members`` copies of a network trained as one batched module.

    Args:
        model_or_factory: an ``nn.Module`` (every member starts from its weights) or a
            callable returning a fresh ``nn.Module`` of the same architecture each call.
        n_members: M ≥ 1.
        init: with a factory, ``"shared"`` gives every member the weights of one factory
            call, ``"independent"`` calls the factory once per member, member ``i`` under
            ``torch.manual_seed(member_seed(seed, 0, i))`` (reproducible from ``seed``
            alone, whatever M). A module instance only allows ``"shared"``.
        seed: seed of the initialisation (None: the current global RNG state, for
            ``"shared"``; ``"independent"`` then uses seed 0), and of the members' random
            streams (dropout; None: 0): member g's masks in its s-th random pass come from
            ``(seed, g, s)`` only (:mod:`.random`), whatever the chunking, ``members=``
            slices or sharding. ``ens.random_seed`` may be changed afterwards; the pass
            counts are the buffer ``random_step`` [M] (present when the net has dropout).
        conv_impl: ``"auto"`` (default, chosen per layer), ``"grouped"`` (one grouped
            convolution per layer), ``"loop"`` (one convolution per member) or
            ``"direct"`` (``scaleinv::direct_conv2d``, CPU, stride-1 Conv2d); see
            :class:`~.layers.MemberConv`.
        member_offset: the global index of this ensemble's first member (default 0), for
            an ensemble holding members ``member_offset … member_offset + M − 1`` of a
            larger one (a rank's share under torch.distributed): ``"independent"`` seeds
            member i from ``member_seed(seed, 0, member_offset + i)``, so the shards of a
            split ensemble hold exactly the members of the unsplit one. No other effect;
            local indices (``members=``, :meth:`member`) still count from 0.
        check_forward: trace ``forward`` with torch.fx and reject ops that mix the rows
            of the batch dimension (see :func:`.forward_check.check_forward`).
        fuse: run BatchNorm2d/GroupNorm → ReLU (→ MaxPool2d(2)) chains as the fused ops
            ``scaleinv::bn_act_pool``/``gn_act_pool`` (C++ on CPU, Triton on CUDA), with an
            input-layer conv before them as ``conv_bn_act_pool``: inside ``nn.Sequential``
            the ReLU/pool entries of ``ens.net`` become ``nn.Identity``; anywhere else in
            ``forward`` (ResNet blocks, ``F.relu(self.bn(x))``) the Ensemble calls a copy
            of ``forward`` rewritten with torch.fx (:mod:`.fusion`; one per train/eval
            mode, traced at construction). ``print(ens)`` marks every fused layer.
        retain_cpu_memory: at the first call on a CPU tensor, call
            :func:`scaleinv_kernels.cpu_memory.retain_freed_memory` (glibc keeps freed CPU
            memory for reuse, process-wide): an ensemble's activations are big enough that
            glibc otherwise maps and page-faults them in afresh at nearly every allocation,
            which makes a CPU training step measurably slower (see
            :mod:`scaleinv_kernels.cpu_memory`). An
            ensemble that only runs on CUDA never calls it; False leaves malloc alone.

    Parameters and buffers have shape ``[M, *shape]`` and live in :attr:`net` under the
    original names (``ens.net.state_dict()`` has the original keys); parameters frozen in
    the source (``requires_grad=False``) stay frozen. Every parameter is marked with
    :func:`~scaleinv_kernels.optim.mark_members`, so :class:`FusedSGDWD` reports
    statistics per (member, tensor) and accepts per-member ``lr``/``weight_decay``.

    Calls:
        * ``ens(x)``: ``x`` of shape ``[m, B, ...]`` (member i its own batch) →
          ``[m, B, ...]``;
        * ``ens.forward_shared(x)``: ONE batch ``[B, ...]`` for every member (not copied
          per member) → ``[m, B, ...]``;
        * both take ``members=slice(a, b)`` (or a range) to run only members a..b-1 — the
          way to bound memory for large M; gradients land in rows a..b-1.
    """

    def __init__(
        self,
        model_or_factory: nn.Module | Callable[[], nn.Module],
        n_members: int,
        *,
        init: str = "shared",
        seed: int | None = None,
        conv_impl: str = "auto",
        check_forward: bool = True,
        fuse: bool = True,
        member_offset: int = 0,
        retain_cpu_memory: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 1:
            raise ValueError(f"Ensemble: n_members must be a positive int, got {n_members!r}")
        if isinstance(member_offset, bool) or not isinstance(member_offset, int) \
                or member_offset < 0:
            raise ValueError(f"Ensemble: member_offset must be an int >= 0, got "
                             f"{member_offset!r}")
        if init not in INITS:
            raise ValueError(f"Ensemble: init must be one of {INITS}, got {init!r}")
        members = _build_members(model_or_factory, n_members, init, seed, member_offset)
        template = members[0]
        # graphs and the rank conditions left for the first call of each input shape
        checked = check_forward_fn(template) if check_forward else None
        object.__setattr__(self, "_checked", checked)
        self.n_members = n_members
        self.retain_cpu_memory = bool(retain_cpu_memory)
        self.init = init
        self.member_offset = member_offset
        self._ctx = MemberContext(n_members)
        self.net = convert(members, self._ctx, conv_impl=conv_impl, fuse=fuse)
        # forward rewritten by torch.fx where it holds fusable chains outside
        # nn.Sequential (train mode -> compiled forward; None: call the net itself)
        object.__setattr__(self, "_fused_forward", fuse_forward(self.net) if fuse else None)
        # Random layers (dropout) draw member g's noise from (random_seed, g, its count of
        # random passes, the layer's place in the pass): see .random. The counts are state
        # (saved, sharded and resumed with the members), kept on the CPU so that seeding
        # the generators never waits for a device.
        self.random_seed = 0 if seed is None else int(seed)
        if any(isinstance(mod, MemberDropout) for mod in self.net.modules()):
            self.register_buffer("random_step", torch.zeros(n_members, dtype=torch.int64))
        else:
            self.random_step = None
        # A CPU copy of the original module: member(i) clones it and loads member i.
        object.__setattr__(self, "_template", copy.deepcopy(template).cpu())
        self.training = template.training
        self.net.train(template.training)

    # ---- calls ------------------------------------------------------------------------
    def _select(self, members) -> tuple[int, int]:
        if members is None:
            return 0, self.n_members
        if isinstance(members, range):
            if members.step != 1:
                raise ValueError("Ensemble: members must be a contiguous range (step 1)")
            members = slice(members.start, members.stop)
        if not isinstance(members, slice) or members.step not in (None, 1):
            raise ValueError(f"Ensemble: members must be None, a slice or a range with step 1 "
                             f"(got {members!r})")
        start, stop, _ = members.indices(self.n_members)
        if stop <= start:
            raise ValueError(f"Ensemble: members={members} selects no member of "
                             f"{self.n_members}")
        return start, stop - start

    def forward(self, x: Tensor, members: slice | range | None = None, *,
                batch_major: bool = False, direct_grads: bool = False) -> Tensor:
        """x: [m, B, ...] → [m, B, ...] (m = number of selected members).

        ``batch_major=True``: x is ``[B, m, ...]`` instead (e.g. gathered as
        ``X[idx.t()]``), the ensemble's internal order, which saves one copy of the input;
        the output is still ``[m, B, ...]``.

        ``direct_grads=True`` (for a member range, in grad mode): the backward of this
        call adds the gradients of the selected members straight into the rows
        ``p.grad[a:b]`` of every trainable parameter (``p.grad`` is created as zeros when
        None), instead of autograd building a full ``[M, ...]`` gradient per call and
        adding it to ``p.grad``: O(b − a) instead of O(M) work per call, which matters
        when M/chunk calls make a step (O(M²) otherwise). The parameters themselves are
        then not in the autograd graph: use ``loss.backward()``, not
        ``torch.autograd.grad(loss, params)``, and no hooks registered on the parameters
        run. :class:`EnsembleTrainer` calls with it when ``chunk_size < M``.
        """
        start, m = self._select(members)
        dim = 1 if batch_major else 0
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[dim] != m:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            want = f"[B, {m}, ...]" if batch_major else f"[{m}, B, ...]"
            raise ValueError(
                f"Ensemble: x must have shape {want} (one batch per selected member), "
                f"got {shape}; for one batch shared by all members call "
                "ens.forward_shared(x)")
        batch = x.shape[1 - dim]
        if self._checked is not None:
            self._checked.verify_ranks(self._template, (batch, *x.shape[2:]))
        self._set(x, start, m, batch, shared=False, direct_grads=direct_grads)
        folded = x.reshape(batch * m, *x.shape[2:]) if batch_major else self._ctx.fold(x)
        out = self._call_net(folded)
        self._count_random_pass(start, m)
        return self._unfold(out, m, batch)

    def forward_shared(self, x: Tensor, members: slice | range | None = None, *,
                       direct_grads: bool = False) -> Tensor:
        """x: [B, ...], the same batch for every member → [m, B, ...]
        (``direct_grads`` as in :meth:`forward`)."""
        start, m = self._select(members)
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError("Ensemble.forward_shared: x must be a tensor [B, ...]")
        batch = x.shape[0]
        if self._checked is not None:
            self._checked.verify_ranks(self._template, tuple(x.shape))
        self._set(x, start, m, batch, shared=True, direct_grads=direct_grads)
        out = self._call_net(x)
        self._count_random_pass(start, m)
        if isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == batch and m > 1:
            return out.unsqueeze(0).expand(m, *out.shape)  # no member layer was reached
        return self._unfold(out, m, batch)

    def _set(self, x: Tensor, start: int, m: int, batch: int, shared: bool,
             direct_grads: bool = False) -> None:
        if self.retain_cpu_memory and x.device.type == "cpu":
            retain_freed_memory()  # cached: one mallopt per process
        c = self._ctx
        c.start, c.m, c.batch, c.shared = start, m, batch, shared
        c.random_seed, c.member_offset = self.random_seed, self.member_offset
        c.steps, c.draws = self.random_step, 0
        c.leaves = None
        if direct_grads and m < self.n_members and torch.is_grad_enabled():
            c.leaves = {}
            for p in self.net.parameters():
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                # a leaf viewing the rows (same storage and version counter as p); its
                # .grad is the matching rows of p.grad, which AccumulateGrad adds into
                # in place
                leaf = p.detach()[start:start + m].requires_grad_()
                leaf.grad = p.grad[start:start + m]
                c.leaves[id(p)] = leaf

    def _call_net(self, x: Tensor):
        fused = self._fused_forward
        fn = fused.get(self.net.training) if fused else None
        return fn(self.net, x) if fn is not None else self.net(x)

    def _count_random_pass(self, start: int, m: int) -> None:
        """A pass whose random layers drew noise advances its members' pass counts."""
        if self._ctx.draws:
            self.random_step[start:start + m] += 1

    @staticmethod
    def _unfold(out, m: int, batch: int) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != m * batch:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"Ensemble: the network returned {shape}; expected a tensor with "
                             f"{batch}·{m} member-folded rows")
        # rows are batch-major (b·m + i); hand back [m, B, ...] contiguous
        return out.view(batch, m, *out.shape[1:]).transpose(0, 1).contiguous()

    # ---- members ----------------------------------------------------------------------
    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"Ensemble: a member index must be an int, got {type(i).__name__}")
        if not -self.n_members <= i < self.n_members:
            raise IndexError(f"Ensemble: member {i} out of range for {self.n_members} members")
        return i % self.n_members

    def member(self, i: int) -> nn.Module:
        """A new instance of the original module class holding member ``i``'s parameters
        and buffers (copies, on the ensemble's device), in the ensemble's train/eval mode."""
        i = self._index(i)
        model = copy.deepcopy(self._template)
        state = {k: v[i] for k, v in self.net.state_dict().items()}
        device = next(iter(state.values())).device if state else torch.device("cpu")
        model.to(device)
        model.load_state_dict(state)
        return model.train(self.training)

    @torch.no_grad()
    def load_member(self, i: int, module: nn.Module) -> None:
        """Write ``module``'s parameters and buffers into member ``i`` (module unchanged)."""
        i = self._index(i)
        if type(module) is not type(self._template):
            raise TypeError(f"Ensemble.load_member: expected a {type(self._template).__name__}, "
                            f"got {type(module).__name__}")
        src = module.state_dict()
        dst = self.net.state_dict()
        if src.keys() != dst.keys():
            raise ValueError("Ensemble.load_member: state_dict keys differ: missing "
                             f"{sorted(dst.keys() - src.keys())}, unexpected "
                             f"{sorted(src.keys() - dst.keys())}")
        for k, v in src.items():
            if tuple(v.shape) != tuple(dst[k].shape[1:]):
                raise ValueError(f"Ensemble.load_member: '{k}' has shape {list(v.shape)}, the "
                                 f"ensemble's members have {list(dst[k].shape[1:])}")
        for k, v in src.items():
            dst[k][i].copy_(v)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() may create new Parameter objects; keep them marked.
        out = super()._apply(fn, recurse)
        for p in self.parameters():
            mark_members(p, self.n_members)
        if self.random_step is not None and self.random_step.device.type != "cpu":
            self.random_step = self.random_step.cpu()  # read on the host to seed
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        # a checkpoint from before the random pass counts existed: counts start at 0
        if prefix + "random_step" in missing_keys:
            missing_keys.remove(prefix + "random_step")

    def __getstate__(self):
        # compiled code does not pickle: keep whether there was any and trace again
        state = self.__dict__.copy()
        state["_fused_forward"] = bool(state.get("_fused_forward"))
        return state

    def __setstate__(self, state):
        rebuild = state.pop("_fused_forward", False)
        super().__setstate__(state)
        object.__setattr__(self, "_fused_forward", fuse_forward(self.net) if rebuild else None)

    def extra_repr(self) -> str:
        offset = f", member_offset={self.member_offset}" if self.member_offset else ""
        fused = fused_count(self.net)
        in_forward = f", fused in forward (torch.fx): {fused} norm → ReLU" if fused else ""
        return f"n_members={self.n_members}, init={self.init!r}{offset}{in_forward}"


check_forward_fn = check_forward


def _signature(model: nn.Module) -> list:
    return ([(n, type(m).__name__) for n, m in model.named_modules()]
            + [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()])


def _build_members(source, n: int, init: str, seed: int | None,
                   offset: int = 0) -> list[nn.Module]:
    if isinstance(source, nn.Module):
        if init != "shared":
            raise ValueError("Ensemble: init='independent' needs a factory (a callable "
                             "returning a fresh module); a module instance gives every "
                             "member its weights (init='shared')")
        return [source] * n
    if not callable(source):
        raise TypeError("Ensemble: pass an nn.Module or a callable returning one, got "
                        f"{type(source).__name__}")

    def build(s: int | None) -> nn.Module:
        if s is None:  # the caller's global RNG stream, advanced as by a plain call
            model = source()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                model = source()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Ensemble: the factory returned a {type(model).__name__}, "
                            "not an nn.Module")
        return model

    if init == "shared":
        return [build(seed)] * n
    base = 0 if seed is None else seed
    members = [build(member_seed(base, STREAM_INIT, offset + i)) for i in range(n)]
    ref = _signature(members[0])
    for i, model in enumerate(members[1:], 1):
        if _signature(model) != ref:
            raise ValueError(f"Ensemble: the factory returned a different architecture for "
                             f"member {i} than for member 0 (module types, parameter names, "
                             "shapes or dtypes differ); every member must be the same network")
    return members
