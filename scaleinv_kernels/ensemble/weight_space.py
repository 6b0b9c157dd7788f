"""Weight-space statistics of trained nets: SWA-style averaging and snapshot distances.

:func:`average_weights` (and :func:`average_state_dicts`) average several models of one
architecture — epoch snapshots of one run, or the M members of an ensemble — into one model,
recomputing BatchNorm running statistics for the averaged weights. :func:`flatten_params`
and :func:`pairwise_distances` measure how far weight snapshots lie from each other.
Statistics of the nets' predictions live in :mod:`scaleinv_kernels.ensemble.function_space`.

An "ensemble" is duck-typed (no import of the Ensemble class, which would create a cycle):
:func:`average_weights` needs ``n_members`` and ``member(i)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "average_state_dicts",
    "average_weights",
    "flatten_params",
    "pairwise_distances",
]

# Buffer names that are statistics of the data, not weights (excluded from state-dict
# distances by default).
_BN_STAT_SUFFIXES = ("running_mean", "running_var")


# --------------------------------------------------------------------------------------
# weight averaging (SWA)


def _state_dict_of(obj: Any, i: int, fn: str) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{fn}: item {i} is a mapping but its entry {k!r} is a "
                                f"{type(v).__name__}, not a tensor; pass a model.state_dict()")
        return obj
    raise TypeError(f"{fn}: item {i} must be an nn.Module or a state_dict, "
                    f"got {type(obj).__name__}")


def _is_ensemble(obj: Any) -> bool:
    return hasattr(obj, "n_members") and callable(getattr(obj, "member", None))


def _as_items(models: Any, fn: str) -> list[Any]:
    if _is_ensemble(models):
        return [models.member(i) for i in range(models.n_members)]
    if isinstance(models, (Tensor, Mapping)) or (
            isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList)):
        raise TypeError(f"{fn}: pass a list of models or state_dicts (or an ensemble), "
                        f"got a single {type(models).__name__}")
    if not isinstance(models, Iterable):
        raise TypeError(f"{fn}: models must be a list of nn.Modules or state_dicts, or an "
                        f"ensemble, got {type(models).__name__}")
    items = list(models)
    if not items:
        raise ValueError(f"{fn}: nothing to average (empty list)")
    return items


def average_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Entrywise mean of state_dicts with the same keys, shapes and dtypes.

    Args:
        state_dicts: T ≥ 1 mappings name → tensor (e.g. ``model.state_dict()`` snapshots).

    Returns:
        A new dict in the first state_dict's key order. Floating (and complex) entries are
        the mean over the T inputs, accumulated in float64 (complex128) and cast back to
        their dtype, on the first input's device; other entries (e.g. BatchNorm's int64
        ``num_batches_tracked``) are copies of the first input's. Floating buffers such as
        BatchNorm running statistics are averaged too; recompute them for the averaged
        weights (see :func:`average_weights`).
    """
    return _average([_state_dict_of(sd, i, "average_state_dicts")
                     for i, sd in enumerate(state_dicts)], "average_state_dicts")


def _check_same_layout(dicts: Sequence[Mapping[str, Tensor]], fn: str, noun: str,
                       what: str, *, check_dtype: bool) -> None:
    """Raise ValueError unless every dict has dict 0's keys and shapes (and dtypes)."""
    ref = dicts[0]
    for i, d in enumerate(dicts[1:], start=1):
        if set(d) != set(ref):
            missing, extra = sorted(set(ref) - set(d)), sorted(set(d) - set(ref))
            raise ValueError(f"{fn}: {noun} {i} has different {what} from {noun} 0: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        for k, t in ref.items():
            if d[k].shape != t.shape or (check_dtype and d[k].dtype != t.dtype):
                raise ValueError(f"{fn}: entry {k!r} of {noun} {i} is {d[k].dtype} "
                                 f"{tuple(d[k].shape)}, {noun} 0 has {t.dtype} "
                                 f"{tuple(t.shape)}")


def _average(sds: list[Mapping[str, Tensor]], fn: str) -> dict[str, Tensor]:
    if not sds:
        raise ValueError(f"{fn}: nothing to average (empty list)")
    ref = sds[0]
    _check_same_layout(sds, fn, "item", "keys", check_dtype=True)
    out: dict[str, Tensor] = {}
    for k, t in ref.items():
        if not (t.is_floating_point() or t.is_complex()):
            out[k] = t.detach().clone()
            continue
        wide = torch.complex128 if t.is_complex() else torch.float64
        acc = t.detach().to(wide, copy=True)
        for sd in sds[1:]:
            acc += sd[k].detach().to(device=t.device, dtype=wide)
        out[k] = (acc / len(sds)).to(t.dtype)
    return out


class _Counted:
    """Iterable over the batches of ``data`` that counts how many it handed out."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.count = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.count += 1
            yield batch


def average_weights(models: Any, *, data: Tensor | Iterable[Any] | None = None,
                    batch_size: int = 256, template: nn.Module | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Stochastic weight averaging: one model whose weights are the mean of several.

    Args:
        models: a list of T ≥ 1 models (nn.Modules of the same architecture) and/or their
            state_dicts (e.g. epoch snapshots, or ``ens.member(i)`` for several i); or an
            ensemble (anything with ``n_members`` and ``member(i)``), whose M members are
            averaged into one ordinary model.
        data: inputs for recomputing BatchNorm running statistics of the averaged model:
            a tensor X [N, ...] (split into batches of ``batch_size`` along dim 0) or an
            iterable of batches, each a tensor or a tuple/list whose first element is the
            input (a DataLoader of (x, y) works). None: leave the running statistics at the
            average of the inputs' ones — these are *not* the statistics of the averaged
            weights, so do pass data when the model has BatchNorm.
        batch_size: batch size when ``data`` is a tensor.
        template: the model to copy when ``models`` holds only state_dicts (ignored
            otherwise unless given, in which case it is the one copied).
        device: where batches are moved before the forward pass; None = the device of the
            averaged model's first parameter or buffer.

    Returns:
        A new module, a deep copy of ``template`` or of the first nn.Module in ``models``
        (its train/eval mode included), with the averaged state (see
        :func:`average_state_dicts`: floating tensors are the mean, others come from the
        first item). With ``data`` its BatchNorm statistics are then recomputed by
        ``torch.optim.swa_utils.update_bn``: running stats reset, momentum None (each
        batch's statistics weighted equally — with equal batch sizes ``running_mean`` is
        exactly the mean of the layer's inputs over the data and ``running_var`` the mean
        of the per-batch unbiased variances), forward passes in train mode under
        ``no_grad``, mode restored. The inputs are not modified.
    """
    fn = "average_weights"
    items = _as_items(models, fn)
    sds = [_state_dict_of(x, i, fn) for i, x in enumerate(items)]
    if template is not None and not isinstance(template, nn.Module):
        raise TypeError(f"{fn}: template must be an nn.Module, got {type(template).__name__}")
    base = template if template is not None else next(
        (x for x in items if isinstance(x, nn.Module)), None)
    if base is None:
        raise TypeError(f"{fn}: only state_dicts given; pass template=<a model of the same "
                        "architecture>, or use average_state_dicts for a plain dict")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"{fn}: batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be >= 1, got {batch_size}")
    avg = _average(sds, fn)
    model = copy.deepcopy(base)
    own = model.state_dict()
    if set(own) != set(avg):
        missing, extra = sorted(set(own) - set(avg)), sorted(set(avg) - set(own))
        raise ValueError(f"{fn}: the model to fill ({type(model).__name__}) does not match the "
                         f"averaged state: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in own.items():
        if t.shape != avg[k].shape:
            raise ValueError(f"{fn}: entry {k!r} is {tuple(t.shape)} in the model to fill but "
                             f"{tuple(avg[k].shape)} in the averaged state")
    model.load_state_dict(avg)
    if data is None:
        return model

    if isinstance(data, Tensor):
        if data.ndim < 1 or data.shape[0] == 0:
            raise ValueError(f"{fn}: data must be a non-empty tensor [N, ...], got shape "
                             f"{tuple(data.shape)}")
        batches: Iterable[Any] = data.split(batch_size)
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise TypeError(f"{fn}: data must be a tensor [N, ...] or an iterable of batches, "
                        f"got {type(data).__name__}")
    if device is None:
        first = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        device = first.device if first is not None else None
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    counted = _Counted(batches)
    torch.optim.swa_utils.update_bn(counted, model, device=device)
    if has_bn and counted.count == 0:
        raise ValueError(f"{fn}: data yielded no batches, so the BatchNorm statistics could "
                         "not be recomputed")
    return model


# --------------------------------------------------------------------------------------
# distances between weight snapshots


def _named_weights(obj: Any, keys: Sequence[str] | None, fn: str, i: int) -> dict[str, Tensor]:
    """name → tensor of the floating weights of a module or state_dict (see flatten_params)."""
    if isinstance(obj, nn.Module):
        named = {k: p.detach() for k, p in obj.named_parameters() if p.is_floating_point()}
        what = "parameter"
    elif isinstance(obj, Mapping):
        named = {}
        for k, t in obj.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: snapshot {i}: entry {k!r} is a {type(t).__name__}, "
                                "not a tensor")
            if t.is_floating_point() and (keys is not None or not k.endswith(_BN_STAT_SUFFIXES)):
                named[k] = t.detach()
        what = "floating entry"
    else:
        raise TypeError(f"{fn}: snapshot {i} must be an nn.Module, a state_dict or a 1-D "
                        f"tensor, got {type(obj).__name__}")
    if keys is None:
        return named
    absent = [k for k in keys if k not in named]
    if absent:
        raise ValueError(f"{fn}: snapshot {i} has no {what} named {absent[:5]}")
    return {k: named[k] for k in keys}


def flatten_params(module_or_state_dict: nn.Module | Mapping[str, Tensor],
                   keys: Sequence[str] | None = None) -> Tensor:
    """All floating weights of a model, concatenated into one float64 vector.

    Args:
        module_or_state_dict: an nn.Module — its floating ``named_parameters()`` (frozen
            ones included; buffers never) — or a state_dict — all its floating tensors
            except BatchNorm statistics (keys ending in ``running_mean``/``running_var``),
            which keeps other floating buffers; pass ``keys`` to select exactly.
        keys: names to take, in this order (for a module: parameter names); None = all of
            the above, in their order.

    Returns:
        float64 tensor [P] on the device of the weights (CPU if there are none), P = the
        total number of elements.
    """
    named = _named_weights(module_or_state_dict, keys, "flatten_params", 0)
    if not named:
        return torch.zeros(0, dtype=torch.float64)
    device = next(iter(named.values())).device
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64)
                      for t in named.values()])


def pairwise_distances(snapshots: Sequence[Any] | Tensor, *,
                       keys: Sequence[str] | None = None) -> Tensor:
    """Euclidean distances between T weight snapshots.

    Args:
        snapshots: either a float tensor [T, P] or a list of T 1-D float tensors [P]
            (flattened weights), or a list of T modules and/or state_dicts, whose weights
            are selected as in :func:`flatten_params` (modules: floating parameters;
            state_dicts: floating entries except BatchNorm running statistics) and matched
            by name (every snapshot must have the same names and shapes as the first).
        keys: restrict to these names (modules/state_dicts only).

    Returns:
        float64 tensor [T, T] on the CPU: ``out[i, j]`` = ‖w_i − w_j‖₂. Computed from
        direct differences in float64 (``torch.cdist`` without the ‖a‖² + ‖b‖² − 2ab
        shortcut, which cancels catastrophically for nearby snapshots), so it is exactly
        symmetric with a zero diagonal. Memory: the stacked [T, P] float64 matrix.
    """
    fn = "pairwise_distances"
    if isinstance(snapshots, Tensor):
        if snapshots.ndim != 2:
            raise ValueError(f"{fn}: a tensor of snapshots must be [T, P], got shape "
                             f"{tuple(snapshots.shape)}")
        items: list[Any] = list(snapshots)
    else:
        items = list(snapshots)
    if not items:
        raise ValueError(f"{fn}: no snapshots")
    n_tensors = sum(isinstance(x, Tensor) for x in items)
    if n_tensors == len(items):
        if keys is not None:
            raise ValueError(f"{fn}: keys= only applies to modules and state_dicts")
        for i, x in enumerate(items):
            if x.ndim != 1 or not x.is_floating_point():
                raise ValueError(f"{fn}: snapshot {i} must be a 1-D floating tensor [P], got "
                                 f"{x.dtype} {tuple(x.shape)}")
            if x.shape != items[0].shape:
                raise ValueError(f"{fn}: snapshot {i} has {x.numel()} entries, snapshot 0 "
                                 f"has {items[0].numel()}")
        vectors = [x.detach() for x in items]
    elif n_tensors:
        raise TypeError(f"{fn}: do not mix flattened tensors with modules/state_dicts; "
                        "flatten them all with flatten_params")
    else:
        named = [_named_weights(x, keys, fn, i) for i, x in enumerate(items)]
        ref = named[0]
        _check_same_layout(named, fn, "snapshot", "weights", check_dtype=False)
        vectors = [torch.cat([nd[k].reshape(-1).double().cpu() for k in ref])
                   if ref else torch.zeros(0, dtype=torch.float64) for nd in named]
    X = torch.stack([v.to(device="cpu", dtype=torch.float64) for v in vectors])
    return torch.cdist(X[None], X[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
