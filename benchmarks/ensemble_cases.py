"""One training step of M copies of a network, three ways.

Models (``MODELS``): ``cnn``: conv 1→16→32→32 (3×3, padding 1, no bias), each followed by
BatchNorm2d(affine=False) and ReLU, MaxPool2d(2) after the first two, global average pool,
frozen Linear(32→10) (``scaleinv_kernels.scale_invariance.normalized_cnn``), 28×28 grey
inputs; ``resnet20``: the CIFAR ResNet-20 (``models.normalized_resnet`` with 3 basic
blocks per stage; its BN → ReLU chains sit in block ``forward`` code and nested
Sequentials, fused by the Ensemble's torch.fx pass), 32×32 RGB inputs. Batch 64 per member,
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
from scaleinv_kernels.models import normalized_resnet
from scaleinv_kernels.scale_invariance import normalized_cnn

BATCH = 64
HW = 28
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
#: members per forward/backward pass of the chunked variant, chosen by measurement on a
#: 2-core CPU at M=64 (interleaved, with Ensemble's default retain_cpu_memory): chunks of 8
#: to 64 members were within a few per cent of each other and 4 was slower. Before freed
#: memory was retained (glibc page-faulting every big activation in afresh) 4 was the
#: fastest, and all members in one pass the slowest.
CPU_CHUNK = 8
VARIANTS = {
    "ensemble": "Ensemble + FusedSGDWD (stats on), all members per pass",
    "ensemble_chunked": f"Ensemble + FusedSGDWD (stats on), {CPU_CHUNK} members per pass",
    "eager_loop": "eager loop of M models + torch SGD",
    "vmap": "torch.func vmap(grad) + torch SGD",
}


#: model name -> (factory taking the norm kind, one sample's shape)
MODELS = {
    "cnn": (lambda norm: functools.partial(normalized_cnn, norm=norm), (1, HW, HW)),
    "resnet20": (lambda norm: functools.partial(normalized_resnet, blocks_per_stage=3),
                 (3, 32, 32)),
}


def _data(m: int, device: str = "cpu", seed: int = 0,
          model: str = "cnn") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, BATCH, *MODELS[model][1], generator=g).to(device),
            torch.randint(0, 10, (m, BATCH), generator=g).to(device))


def _model(norm: str, model: str = "cnn") -> Callable[[], torch.nn.Module]:
    if model != "cnn" and norm != "batch":
        raise ValueError(f"ensemble_cases: norm={norm!r} applies to the cnn only")
    return MODELS[model][0](norm)


def ensemble_step(m: int, conv_impl: str = "auto", chunk: int | None = None,
                  device: str = "cpu", norm: str = "batch",
                  model: str = "cnn") -> Callable[[], None]:
    """Forward + backward per chunk of ``chunk`` members (as ``EnsembleTrainer`` with
    ``chunk_size``: gradients go straight into the chunk's rows of ``p.grad``), then ONE
    optimizer step over all members."""
    ens = Ensemble(_model(norm, model), m, init="independent", seed=0,
                   conv_impl=conv_impl).to(device)
    opt = FusedSGDWD(ens.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = _data(m, device, model=model)
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


def eager_loop_step(m: int, device: str = "cpu", norm: str = "batch",
                    model: str = "cnn") -> Callable[[], None]:
    models = [_model(norm, model)().to(device) for _ in range(m)]
    opts = [torch.optim.SGD(mod.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
            for mod in models]
    x, y = _data(m, device, model=model)

    def step() -> None:
        for i, (mod, opt) in enumerate(zip(models, opts)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(mod(x[i]), y[i]).backward()
            opt.step()

    return step


def vmap_step(m: int, device: str = "cpu", norm: str = "batch",
              model: str = "cnn") -> Callable[[], None]:
    from torch.func import (
        functional_call,
        grad,
        replace_all_batch_norm_modules_,
        stack_module_state,
        vmap,
    )

    models = [_model(norm, model)().to(device) for _ in range(m)]
    for mod in models:
        replace_all_batch_norm_modules_(mod)
    params, buffers = stack_module_state(models)
    trainable = {k: v for k, v in params.items() if models[0].get_parameter(k).requires_grad}
    frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
    base = copy.deepcopy(models[0]).to("meta")
    leaves = {k: v.detach().requires_grad_() for k, v in trainable.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = _data(m, device, model=model)

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
            "ensemble_chunked": lambda m, device="cpu", norm="batch", model="cnn": ensemble_step(
                m, chunk=min(CPU_CHUNK, m), device=device, norm=norm, model=model),
            "eager_loop": eager_loop_step, "vmap": vmap_step}


def check_same_update(m: int = 2, model: str = "cnn") -> float:
    """Largest relative parameter difference after one step between the ensemble and
    the eager loop started from the same weights (a sanity check of the benchmark)."""
    ens = Ensemble(_model("batch", model), m, init="independent", seed=0)
    models = [ens.member(i) for i in range(m)]
    x, y = _data(m, model=model)
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
            if not p.requires_grad:
                continue
            q = ens.net.get_parameter(name)[i]
            worst = max(worst, float((q - p).detach().abs().max() / p.detach().abs().max()))
    return worst


def conv_flops_per_member_step(model: str = "cnn") -> float:
    """Multiply-adds ×2 of every convolution of one member's step: forward, input grad
    (not for a layer fed by the network input, which needs none) and weight grad."""
    net = _model("batch", model)()
    sample = _data(1, model=model)[0][0]
    total = [0.0]

    def count(mod, inp, out):
        fwd = 2.0 * out.numel() * mod.in_channels // mod.groups * mod.weight[0, 0].numel()
        total[0] += fwd * (2 if inp[0] is sample else 3)

    hooks = [mod.register_forward_hook(count) for mod in net.modules()
             if isinstance(mod, torch.nn.Conv2d)]
    with torch.no_grad():
        net(sample)
    for hook in hooks:
        hook.remove()
    return total[0]


