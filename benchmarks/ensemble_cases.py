"""One training step of M copies of the normalized CNN, three ways (Ensemble issue §6).

Model: conv 1→16→32→32 (3×3, padding 1, no bias), each followed by BatchNorm2d(affine=False)
and ReLU, MaxPool2d(2) after the first two, global average pool, frozen Linear(32→10)
(``scaleinv_kernels.scale_invariance.normalized_cnn``); batch 64 per member, 28×28 inputs,
every member its own batch; SGD lr 0.1, momentum 0.9, weight decay 5e-4.

* ``ensemble``: :class:`Ensemble` + :class:`FusedSGDWD` (statistics on), one process;
* ``eager_loop``: M separate models, each with ``torch.optim.SGD`` (the default foreach
  implementation), stepped one after the other;
* ``vmap``: ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap(grad)``
  over the members, then ``torch.optim.SGD`` on the stacked tensors (the same update).
  BatchNorm running statistics cannot be updated in place under vmap, so this variant
  does not track them (``replace_all_batch_norm_modules_``): it does slightly LESS work.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.ensemble import Ensemble
from scaleinv_kernels.scale_invariance import normalized_cnn

BATCH = 64
HW = 28
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
#: members per forward/backward pass of the chunked variant, chosen by measurement on the
#: 2-core CPU at M=64 (interleaved, one run, 2026-11-29, with Ensemble's default
#: retain_cpu_memory): chunks of 4/8/16/32/64 members took 542/473/478/471/483 ms per step.
#: Before freed memory was retained (glibc page-faulting every big activation in afresh)
#: chunks of 1/2/4/8/16/64 took 967/963/913/996/1194/1434 ms and 4 was the choice.
CPU_CHUNK = 8
VARIANTS = {
    "ensemble": "Ensemble + FusedSGDWD (stats on), all members per pass",
    "ensemble_chunked": f"Ensemble + FusedSGDWD (stats on), {CPU_CHUNK} members per pass",
    "eager_loop": "eager loop of M models + torch SGD",
    "vmap": "torch.func vmap(grad) + torch SGD",
}


def _data(m: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, BATCH, 1, HW, HW, generator=g).to(device),
            torch.randint(0, 10, (m, BATCH), generator=g).to(device))


def _model(norm: str) -> Callable[[], torch.nn.Module]:
    return functools.partial(normalized_cnn, norm=norm)


def ensemble_step(m: int, conv_impl: str = "auto", chunk: int | None = None,
                  device: str = "cpu", norm: str = "batch") -> Callable[[], None]:
    """Forward + backward per chunk of ``chunk`` members (as ``EnsembleTrainer`` with
    ``chunk_size``: gradients go straight into the chunk's rows of ``p.grad``), then ONE
    optimizer step over all members."""
    ens = Ensemble(_model(norm), m, init="independent", seed=0,
                   conv_impl=conv_impl).to(device)
    opt = FusedSGDWD(ens.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = _data(m, device)
    chunk = chunk or m

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            out = ens(x[a:b], members=slice(a, b), direct_grads=chunk < m)
            loss = F.cross_entropy(out.reshape(-1, 10), y[a:b].reshape(-1), reduction="none")
            loss.view(b - a, BATCH).mean(1).sum().backward()
        opt.step()

    return step


def eager_loop_step(m: int, device: str = "cpu", norm: str = "batch") -> Callable[[], None]:
    models = [_model(norm)().to(device) for _ in range(m)]
    opts = [torch.optim.SGD(mod.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
            for mod in models]
    x, y = _data(m, device)

    def step() -> None:
        for i, (mod, opt) in enumerate(zip(models, opts)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(mod(x[i]), y[i]).backward()
            opt.step()

    return step


def vmap_step(m: int, device: str = "cpu", norm: str = "batch") -> Callable[[], None]:
    from torch.func import (
        functional_call,
        grad,
        replace_all_batch_norm_modules_,
        stack_module_state,
        vmap,
    )

    models = [_model(norm)().to(device) for _ in range(m)]
    for mod in models:
        replace_all_batch_norm_modules_(mod)
    params, buffers = stack_module_state(models)
    trainable = {k: v for k, v in params.items() if models[0].get_parameter(k).requires_grad}
    frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
    base = copy.deepcopy(models[0]).to("meta")
    leaves = {k: v.detach().requires_grad_() for k, v in trainable.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = _data(m, device)

    def member_loss(p, f, b, xi, yi):
        out = functional_call(base, ({**p, **f}, b), (xi,))
        return F.cross_entropy(out, yi)

    grads_fn = vmap(grad(member_loss), in_dims=(0, 0, 0, 0, 0))

    def step() -> None:
        with torch.no_grad():
            grads = grads_fn({k: v.detach() for k, v in leaves.items()}, frozen, buffers, x, y)
        for k, v in leaves.items():
            v.grad = grads[k]
        opt.step()

    return step


BUILDERS = {"ensemble": ensemble_step,
            "ensemble_chunked": lambda m, device="cpu", norm="batch": ensemble_step(
                m, chunk=min(CPU_CHUNK, m), device=device, norm=norm),
            "eager_loop": eager_loop_step, "vmap": vmap_step}


def check_same_update(m: int = 2) -> float:
    """Largest relative parameter difference after one step between the ensemble and
    the eager loop started from the same weights (a sanity check of the benchmark)."""
    ens = Ensemble(normalized_cnn, m, init="independent", seed=0)
    models = [ens.member(i) for i in range(m)]
    x, y = _data(m)
    opt = FusedSGDWD(ens.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    out = ens(x)
    F.cross_entropy(out.reshape(-1, 10), y.reshape(-1), reduction="none").view(
        m, BATCH).mean(1).sum().backward()
    opt.step()
    worst = 0.0
    for i, mod in enumerate(models):
        sgd = torch.optim.SGD(mod.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        F.cross_entropy(mod(x[i]), y[i]).backward()
        sgd.step()
        for name, p in mod.named_parameters():
            q = ens.net.get_parameter(name)[i]
            worst = max(worst, float((q - p).detach().abs().max() / p.detach().abs().max()))
    return worst


