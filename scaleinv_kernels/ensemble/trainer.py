"""EnsembleTrainer: every member its own SGD noise (data order), all in one process."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv_kernels.ensemble.ensemble import Ensemble
from scaleinv_kernels.ensemble.function_space import predict
from scaleinv_kernels.ensemble.seeding import STREAM_DATA, member_generator

Schedule = Callable[[int], tuple[Any, Any]]
Callback = Callable[["EnsembleTrainer", int], "dict | None"]


class EnsembleTrainer:
    """Mini-batch training of every member of an :class:`Ensemble` on the same data set.

    Args:
        ens: the ensemble (its parameters are what ``optimizer`` updates).
        optimizer: any optimizer over ``ens.parameters()``; :class:`FusedSGDWD` also takes
            per-member (length-M tensor) ``lr``/``weight_decay`` from the schedule.
        train: ``(X, Y)``: inputs ``[N, ...]`` and integer targets ``[N]``; copied once to
            the ensemble's device.
        batch_size: samples per member per step; an epoch is ``ceil(N / batch_size)``
            steps (the last batch may be smaller, like a DataLoader without drop_last).
        seed: member ``i`` visits the data in the order ``randperm(N)`` drawn from a
            generator seeded by ``(seed, i, epoch)`` only (see :mod:`.seeding`): its own
            SGD noise, reproducible whatever M, the chunking or a resume.
        member_offset: the global index of ``ens``'s first member (default:
            ``ens.member_offset``): local member i draws its data order from
            ``(seed, member_offset + i, epoch)``, so a rank training members a…b−1 of a
            sharded ensemble gives them the data order they have in the unsplit one.
        loss: ``loss(logits [n, K], targets [n], reduction="none") -> [n]``. Each
            member's loss is the mean over its own batch, and the backward pass runs on the
            SUM of the member losses, so each member's gradient equals single-model
            training.
        chunk_size: members per forward/backward pass (None: all). Bounds activation
            memory for large M; the optimizer still steps all members at once.
        progress: show a tqdm bar over epochs (mean training loss as postfix).

    Dropout masks come from each member's own random stream (``ensemble.random``): a
    member's masks, hence its trajectory, do not depend on ``chunk_size`` or sharding.
    """

    def __init__(
        self,
        ens: Ensemble,
        optimizer: torch.optim.Optimizer,
        train: tuple[Tensor, Tensor],
        batch_size: int,
        *,
        seed: int = 0,
        loss: Callable[..., Tensor] = F.cross_entropy,
        chunk_size: int | None = None,
        progress: bool = True,
        member_offset: int | None = None,
    ) -> None:
        if not isinstance(ens, Ensemble):
            raise TypeError(f"EnsembleTrainer: ens must be an Ensemble, got {type(ens).__name__}")
        if not isinstance(train, (tuple, list)) or len(train) != 2:
            raise ValueError("EnsembleTrainer: train must be a pair (X, Y)")
        X, Y = train
        if not isinstance(X, Tensor) or not isinstance(Y, Tensor) or X.dim() < 1:
            raise TypeError("EnsembleTrainer: X and Y must be tensors")
        if Y.shape[:1] != X.shape[:1] or len(X) == 0:
            raise ValueError(f"EnsembleTrainer: X has {len(X)} samples but Y has "
                             f"{Y.shape[0] if Y.dim() else 'no'} (need the same, > 0)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"EnsembleTrainer: batch_size must be a positive int, got "
                             f"{batch_size!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"EnsembleTrainer: chunk_size must be None or a positive int, "
                             f"got {chunk_size!r}")
        if member_offset is None:
            member_offset = ens.member_offset
        if isinstance(member_offset, bool) or not isinstance(member_offset, int) \
                or member_offset < 0:
            raise ValueError(f"EnsembleTrainer: member_offset must be an int >= 0, got "
                             f"{member_offset!r}")
        owned = {id(p) for p in ens.parameters()}
        foreign = [i for g in optimizer.param_groups for i, p in enumerate(g["params"])
                   if id(p) not in owned]
        if foreign:
            raise ValueError("EnsembleTrainer: the optimizer holds parameters that are not the "
                             "ensemble's; build it from ens.parameters()")
        self.ens, self.optimizer, self.loss = ens, optimizer, loss
        self.device = next(ens.parameters()).device
        self.X, self.Y = X.to(self.device), Y.to(self.device)
        self.batch_size, self.seed = batch_size, int(seed)
        self.chunk_size = chunk_size or ens.n_members
        self.progress = progress
        self.member_offset = member_offset
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []  # per epoch: {"epoch", "lr", "weight_decay", ...}

    # ---- data order ---------------------------------------------------------------------
    def permutations(self, epoch: int, members: Sequence[int] | None = None) -> Tensor:
        """int64 [len(members), N]: each member's visiting order in ``epoch`` (``members``:
        local indices, default all; global index = ``member_offset`` + local)."""
        members = range(self.ens.n_members) if members is None else members
        n, off = len(self.X), self.member_offset
        perms = [torch.randperm(n, generator=member_generator(self.seed, STREAM_DATA, off + i,
                                                              epoch))
                 for i in members]
        return torch.stack(perms).to(self.device)

    # ---- training -----------------------------------------------------------------------
    def set_hparams(self, lr, weight_decay) -> None:
        """Set ``lr`` and ``weight_decay`` of every param group (scalars, or length-M
        tensors for per-member values with FusedSGDWD)."""
        for group in self.optimizer.param_groups:
            group["lr"] = _on_device(lr, self.device)
            group["weight_decay"] = _on_device(weight_decay, self.device)

    def train_epoch(self) -> Tensor:
        """One epoch for every member; returns the float32 [M] mean training loss
        (on the device, no host sync)."""
        ens, m = self.ens, self.ens.n_members
        ens.train()
        perm = self.permutations(self.epoch)
        n, bs = perm.shape[1], self.batch_size
        total = torch.zeros(m, device=self.device)
        steps = math.ceil(n / bs)
        for s in range(steps):
            idx = perm[:, s * bs:(s + 1) * bs]
            self.optimizer.zero_grad(set_to_none=True)
            for a in range(0, m, self.chunk_size):
                b = min(m, a + self.chunk_size)
                # gathered batch-major [bs, mc, ...]: the ensemble's internal order
                x, y = self.X[idx[a:b].t()], self.Y[idx[a:b]]
                out = ens(x, members=slice(a, b), batch_major=True,
                          direct_grads=b - a < m)
                per_sample = self.loss(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                       reduction="none")
                member_loss = per_sample.view(b - a, -1).mean(1)
                member_loss.sum().backward()
                total[a:b] += member_loss.detach()
            self.optimizer.step()
        self.epoch += 1
        return total / steps

    def fit(self, epochs: int, schedule: Schedule | None = None,
            callbacks: Sequence[Callback] = ()) -> list[dict]:
        """Train ``epochs`` more epochs. Before each epoch ``e`` (counted from 0 over the
        trainer's life), ``schedule(e) -> (lr, weight_decay)`` sets the optimizer; after
        it, every callback ``cb(trainer, e)`` runs and a returned dict is merged into that
        epoch's history record. Returns the records of these epochs."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"EnsembleTrainer.fit: epochs must be an int >= 0, got {epochs!r}")
        bar = range(epochs)
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc=f"ensemble of {self.ens.n_members}", unit="epoch",
                       leave=False)
        records = []
        for _ in bar:
            e = self.epoch
            if schedule is not None:
                lr, wd = schedule(e)
                self.set_hparams(lr, wd)
            loss = self.train_epoch()
            group = self.optimizer.param_groups[0]
            record = {"epoch": e, "lr": _plain(group["lr"]),
                      "weight_decay": _plain(group["weight_decay"]), "train_loss": loss}
            for cb in callbacks:
                extra = cb(self, e)
                if extra:
                    record.update(extra)
            records.append(record)
            self.history.append(record)
            if self.progress:
                bar.set_postfix(loss=f"{float(loss.mean()):.4f}")
        return records

    # ---- evaluation ---------------------------------------------------------------------
    def accuracy(self, X: Tensor, Y: Tensor, *, batch_size: int = 1024) -> Tensor:
        """float64 [M]: each member's accuracy on (X, Y) (eval mode)."""
        preds = predict(self.ens, X, batch_size=batch_size, member_chunk=self.chunk_size)
        return (preds == Y.cpu().view(1, -1)).double().mean(1)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit: epoch, ensemble, optimizer, history."""
        return {"epoch": self.epoch, "seed": self.seed, "ensemble": self.ens.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; a checkpoint of another ``seed`` is refused."""
        if state.get("seed") != self.seed:
            raise ValueError(f"EnsembleTrainer.load_state_dict: checkpoint seed "
                             f"{state.get('seed')} differs from this trainer's {self.seed}")
        self.ens.load_state_dict(state["ensemble"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])


def _on_device(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device)
    return value


def _plain(value):
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    return value
