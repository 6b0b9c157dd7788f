"""Per-layer statistics derived from the fused kernel's per-segment sums.

The kernel leaves, per segment (one parameter tensor, or one member of an ensemble tensor
marked with :func:`~scaleinv_kernels.optim.mark_members`), the float64 sums
``Σw², Σg², Σw·g, ΣΔ², Σw·Δ, #nonfinite(g)`` (w before the step, g as stored in
``.grad``, Δ = w_{t+1} − w_t). Everything here is computed from them on the device, with
no host synchronisation:

================== ===========================================================
weight_norm        ‖w_t‖ = √Σw²
grad_norm          ‖g_t‖ = √Σg²
grad_weight_cosine ⟨w_t, g_t⟩ / (‖w_t‖‖g_t‖)   (≈ 0 for scale-invariant weights)
update_norm        ‖Δ‖ = √ΣΔ²
new_weight_norm    ‖w_{t+1}‖ = √(Σw² + 2Σw·Δ + ΣΔ²)
angular_update     ∠(w_t, w_{t+1}) = atan2(√(Σw²ΣΔ² − (Σw·Δ)²), Σw² + Σw·Δ)  [rad]
effective_lr       η / ‖w_t‖²
nonfinite          number of non-finite entries of g_t
================== ===========================================================

The atan2 form (|w ∧ w_{t+1}| = |w ∧ Δ|) keeps the angle accurate when it is tiny,
where acos of a cosine near 1 would lose all digits. Rows of parameters that had no
gradient in the last step are NaN.

Rows are segments in parameter order: one per ordinary parameter tensor, M consecutive
rows (members 0..M-1) per ensemble tensor. ``member`` / ``param_index`` say which
member (-1 for ordinary tensors) and which parameter tensor each row is;
:meth:`LayerStats.per_member` arranges a field as ``[M, ensemble tensors]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

STAT_FIELDS = ("weight_norm", "grad_norm", "grad_weight_cosine", "update_norm",
               "new_weight_norm", "angular_update", "effective_lr", "nonfinite")


@dataclass(frozen=True)
class LayerStats:
    """Statistics of the last optimizer step; each statistic (STAT_FIELDS) is a 1-D
    float32 tensor with one entry per segment, on the params' device.

    Segments are in parameter order: one per ordinary parameter tensor, M consecutive
    ones (members 0..M-1) per ensemble tensor. ``names[r]`` is the parameter's name (the
    same for every member row), ``member`` (int64) the member of row r or -1 for an
    ordinary tensor, ``param_index`` (int64) the index of its parameter tensor in the
    optimizer's parameter order.
    """

    names: list[str]
    member: Tensor
    param_index: Tensor
    weight_norm: Tensor
    grad_norm: Tensor
    grad_weight_cosine: Tensor
    update_norm: Tensor
    new_weight_norm: Tensor
    angular_update: Tensor
    effective_lr: Tensor
    nonfinite: Tensor
    # host copies of member / param_index (no device sync to read them)
    _member_host: tuple[int, ...] = dataclasses.field(default=(), repr=False, compare=False)
    _param_index_host: tuple[int, ...] = dataclasses.field(default=(), repr=False, compare=False)

    @classmethod
    def from_sums(cls, names: list[str], sums: Tensor, lr: Tensor, updated: Tensor,
                  member: list[int] | None = None,
                  param_index: list[int] | None = None, *,
                  member_tensor: Tensor | None = None,
                  param_index_tensor: Tensor | None = None) -> LayerStats:
        """``sums``: float64 [S, 6] kernel sums; ``lr``: [S] learning rate of each segment
        in the step; ``updated``: [S] bool, False where the param had no gradient;
        ``member`` / ``param_index``: per-row lists (default: one row per ordinary
        tensor); ``member_tensor`` / ``param_index_tensor``: the same as int64 tensors on
        ``sums``' device, where the caller keeps them (made from the lists otherwise,
        which on CUDA is a copy that waits for the device)."""
        n = sums.shape[0]
        member = [-1] * n if member is None else list(member)
        param_index = list(range(n)) if param_index is None else list(param_index)
        if not len(names) == len(member) == len(param_index) == n:
            raise ValueError(f"LayerStats.from_sums: {n} rows but {len(names)} names, "
                             f"{len(member)} members and {len(param_index)} param indices")
        ww, gg, wg, dd, wdel, nonfinite = sums.unbind(1)
        nan = torch.full_like(ww, float("nan"))
        values = {
            "weight_norm": ww.sqrt(),
            "grad_norm": gg.sqrt(),
            "grad_weight_cosine": wg / (ww * gg).sqrt(),
            "update_norm": dd.sqrt(),
            "new_weight_norm": (ww + 2 * wdel + dd).clamp_min(0).sqrt(),
            "angular_update": torch.atan2((ww * dd - wdel * wdel).clamp_min(0).sqrt(), ww + wdel),
            "effective_lr": lr.to(ww) / ww,
            "nonfinite": nonfinite,
        }
        device = sums.device
        if member_tensor is None:
            member_tensor = torch.tensor(member, dtype=torch.int64, device=device)
        if param_index_tensor is None:
            param_index_tensor = torch.tensor(param_index, dtype=torch.int64, device=device)
        return cls(names=list(names), member=member_tensor, param_index=param_index_tensor,
                   _member_host=tuple(member), _param_index_host=tuple(param_index),
                   **{k: torch.where(updated, v, nan).float() for k, v in values.items()})

    def stacked(self) -> Tensor:
        """All statistics as one float32 [len(STAT_FIELDS), S] tensor (STAT_FIELDS order)."""
        return torch.stack([getattr(self, f) for f in STAT_FIELDS])

    def as_dict(self) -> dict[str, Tensor]:
        """The float statistics (STAT_FIELDS), by name."""
        return {f: getattr(self, f) for f in STAT_FIELDS}

    def per_member(self, field: str) -> Tensor:
        """``field`` as a float32 ``[M, E]`` tensor: column j is the j-th ensemble tensor in
        parameter order, row m its member m. Ordinary tensors are left out.

        Raises ValueError for an unknown field, when there are no ensemble tensors, or
        when the ensemble tensors have different member counts.
        """
        if field not in STAT_FIELDS:
            raise ValueError(f"LayerStats.per_member: unknown field {field!r}; choose from "
                             f"{STAT_FIELDS}")
        columns: dict[int, list[int]] = {}  # param index -> its rows, member order
        for r, (m, pi) in enumerate(zip(self._member_host, self._param_index_host)):
            if m >= 0:
                columns.setdefault(pi, []).append(r)
        if not columns:
            raise ValueError("LayerStats.per_member: no ensemble tensors (params marked with "
                             "mark_members) among the optimizer's parameters")
        counts = {pi: len(rows) for pi, rows in columns.items()}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{self.names[rows[0]]!r}: {len(rows)}"
                               for rows in columns.values())
            raise ValueError("LayerStats.per_member: the ensemble tensors have different "
                             f"member counts ({detail})")
        index = torch.tensor(list(columns.values()), dtype=torch.int64).t()  # [M, E]
        values = getattr(self, field)
        return values[index.to(values.device)]


class StatsRecorder:
    """Keeps the history of ``optimizer.layer_stats()`` on the device.

    Every ``every``-th optimizer step (counted from the recorder's creation) appends one
    stacked record via a step post-hook, without host synchronisation. ``to_numpy`` /
    ``to_dataframe`` / ``plot`` copy the history to the host when asked.
    """

    def __init__(self, optimizer, every: int = 1) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"StatsRecorder: every must be a positive int, got {every!r}")
        if not getattr(optimizer, "track_stats", False):
            raise ValueError("StatsRecorder needs an optimizer created with track_stats=True")
        self.optimizer = optimizer
        self.every = every
        self.steps: list[int] = []
        self._records: list[Tensor] = []
        self.names: list[str] = []
        self.members: list[int] = []
        self._count = 0
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._count += 1
        if self._count % self.every:
            return
        stats = optimizer.layer_stats()
        members = list(stats._member_host)
        if (stats.names != self.names or members != self.members) and self._records:
            raise RuntimeError("StatsRecorder: the parameter set changed; start a new recorder")
        self.names = stats.names
        self.members = members
        self.steps.append(self._count)
        self._records.append(stats.stacked())

    def remove(self) -> None:
        """Stop recording (the history is kept)."""
        self._handle.remove()

    def to_numpy(self) -> dict[str, np.ndarray]:
        """``{"step": [T], field: [T, S] for each field}`` as float arrays."""
        hist = (torch.stack(self._records).cpu().numpy() if self._records
                else np.zeros((0, len(STAT_FIELDS), len(self.names)), np.float32))
        out = {"step": np.asarray(self.steps, dtype=np.int64)}
        out.update({f: hist[:, k, :] for k, f in enumerate(STAT_FIELDS)})
        return out

    def to_dataframe(self):
        """Long-format pandas DataFrame: one row per (step, segment) with columns ``step``,
        ``layer`` (parameter name), ``member`` (-1 for ordinary tensors) and one per
        field."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("StatsRecorder.to_dataframe needs pandas: "
                              "pip install pandas") from err
        arrays = self.to_numpy()
        t, s = len(self.steps), len(self.names)
        data = {"step": np.repeat(arrays["step"], s), "layer": np.tile(np.asarray(self.names), t),
                "member": np.tile(np.asarray(self.members, dtype=np.int64), t)}
        data.update({f: arrays[f].reshape(-1) for f in STAT_FIELDS})
        return pd.DataFrame(data)

    def plot(self, path, fields: tuple[str, ...] = ("effective_lr", "angular_update"),
             *, reference: dict[str, float] | None = None, logy: bool = True) -> None:
        """Save a PNG with one panel per field and one line per layer.

        ``reference`` maps a field to a value drawn as a dashed horizontal line (e.g. the
        predicted equilibrium angular update).
        """
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("StatsRecorder.plot needs matplotlib: "
                              "pip install matplotlib") from err
        unknown = [f for f in fields if f not in STAT_FIELDS]
        if unknown:
            raise ValueError(f"StatsRecorder.plot: unknown fields {unknown}; "
                             f"choose from {STAT_FIELDS}")
        arrays = self.to_numpy()
        fig, axes = plt.subplots(len(fields), 1, figsize=(8, 3.2 * len(fields)), sharex=True,
                                 squeeze=False)
        for ax, field in zip(axes[:, 0], fields):
            for k, (name, m) in enumerate(zip(self.names, self.members)):
                label = name if m < 0 else f"{name}[{m}]"
                ax.plot(arrays["step"], arrays[field][:, k], lw=1, label=label)
            if reference and field in reference:
                ax.axhline(reference[field], color="k", ls="--", lw=1.5, label="prediction")
            if logy:
                ax.set_yscale("log")
            ax.set_ylabel(field.replace("_", " "))
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        axes[0, 0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
