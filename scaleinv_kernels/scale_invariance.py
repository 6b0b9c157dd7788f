"""Scale-invariant networks.

A loss L is scale-invariant in a tensor w when L(c·w) = L(w) for every c > 0. Then the
gradient is orthogonal to w (⟨∇L, w⟩ = 0) and scales as 1/c, so what matters for
training is w's direction and the effective learning rate η/‖w‖².
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def normalized_cnn(channels: Sequence[int] = (16, 32, 32), num_classes: int = 10,
                   in_channels: int = 1, norm: str = "batch",
                   num_groups: int = 4) -> nn.Sequential:
    """A small CNN whose loss is scale-invariant in every trainable tensor.

    One block per entry of ``channels``: 3×3 convolution ``conv<i>`` (padding 1, no bias) →
    ``BatchNorm2d(affine=False)`` named ``bn<i>`` (``norm="batch"``) or
    ``GroupNorm(num_groups, affine=False)`` named ``gn<i>`` (``norm="group"``) → ReLU, with
    ``MaxPool2d(2)`` after each of the first two blocks; then global average pooling,
    flatten, and a ``Linear(channels[-1], num_classes)`` named ``fc`` whose weight and
    bias are frozen at their random init (``requires_grad=False``).

    Contract: the trainable parameters are exactly the convolution weights, each
    followed by a normalization without affine parameters, so the output is unchanged
    when any of them is multiplied by c > 0 (up to the norm's ``eps``): with BatchNorm in
    train mode (batch statistics; in eval mode the running statistics break exact
    invariance), with GroupNorm in both modes (per-sample statistics).
    """
    if not channels:
        raise ValueError("normalized_cnn: channels must list at least one width")
    if norm not in ("batch", "group"):
        raise ValueError(f"normalized_cnn: norm must be 'batch' or 'group', got {norm!r}")
    if norm == "group" and any(c % num_groups for c in channels):
        raise ValueError(f"normalized_cnn: num_groups={num_groups} must divide every width "
                         f"in channels={tuple(channels)}")
    layers: dict[str, nn.Module] = {}
    width = in_channels
    for i, out in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(width, out, kernel_size=3, padding=1, bias=False)
        if norm == "batch":
            layers[f"bn{i}"] = nn.BatchNorm2d(out, affine=False)
        else:
            layers[f"gn{i}"] = nn.GroupNorm(num_groups, out, affine=False)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        if i <= 2:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        width = out
    layers.update(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                  fc=nn.Linear(width, num_classes))
    model = nn.Sequential(OrderedDict(layers))
    freeze_last_layer(model)
    return model


def freeze_last_layer(model: nn.Module) -> nn.Linear:
    """Set ``requires_grad=False`` on the weight and bias of the last ``nn.Linear`` of
    ``model`` (in ``model.modules()`` order) and return that layer.

    A fixed random classifier keeps the logits' scale from being learned, which is what
    makes a network of normalized layers scale-invariant in all its trainable weights.
    Raises ``ValueError`` if ``model`` has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"freeze_last_layer: {type(model).__name__} has no nn.Linear layer "
                         "to freeze; add a final nn.Linear classifier")
    last = linears[-1]
    for p in last.parameters():
        p.requires_grad_(False)
    return last


# ---------------------------------------------------------------------------------------
# Numerical check of scale invariance
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamInvariance:
    """Result of :func:`check_scale_invariance` for one trainable parameter tensor.

    ``loss_rel_change[k]`` = |L(c_k·w) − L(w)| / |L(w)| for ``scales[k]`` = c_k;
    ``grad_weight_cosine`` = ⟨∇_w L, w⟩ / (‖∇_w L‖‖w‖) (0 when either norm is 0);
    ``zero``: the tensor is all zeros (then it fails: invariance cannot be checked).
    """

    name: str
    shape: tuple[int, ...]
    loss_rel_change: tuple[float, ...]
    grad_weight_cosine: float
    ok: bool
    zero: bool = False


@dataclass(frozen=True)
class ScaleInvarianceReport:
    """Per-parameter results of :func:`check_scale_invariance`.

    ``ok`` is True when every parameter passed; ``failures`` lists the names of those that
    did not, in ``named_parameters()`` order.
    """

    params: tuple[ParamInvariance, ...]
    scales: tuple[float, ...]
    rtol: float
    loss: float

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.params)

    @property
    def failures(self) -> list[str]:
        return [p.name for p in self.params if not p.ok]

    def __str__(self) -> str:
        head = (f"scale invariance (scales {', '.join(f'{c:g}' for c in self.scales)}, "
                f"rtol {self.rtol:g}, loss {self.loss:.6g}): "
                + ("OK" if self.ok else f"FAILED for {', '.join(self.failures)}"))
        width = max([len(p.name) for p in self.params] + [9])
        lines = [head, f"  {'parameter':<{width}}  max |ΔL|/|L|   cos(∇L, w)   verdict"]
        for p in self.params:
            change = max(p.loss_rel_change) if p.loss_rel_change else 0.0
            verdict = ("ok" if p.ok else "zero tensor, cannot be checked" if p.zero
                       else "NOT scale-invariant")
            lines.append(f"  {p.name:<{width}}  {change:12.3e}  {p.grad_weight_cosine:+11.3e}"
                         f"   {verdict}")
        return "\n".join(lines)


def _forward_loss(model: nn.Module, loss_fn: Callable, batch, rng_state) -> torch.Tensor:
    """The loss with the RNG reset to ``rng_state``, so that stochastic layers (dropout)
    draw the same masks in every evaluation and only the weights differ."""
    inputs, target = batch
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        loss = loss_fn(model(inputs), target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("check_scale_invariance: loss_fn must return a scalar tensor, got "
                        f"{type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                           else ""))
    return loss.reshape(())


def check_scale_invariance(model: nn.Module, loss_fn: Callable, batch: tuple, *,
                           scales: Sequence[float] = (0.5, 2.0, 10.0),
                           rtol: float = 1e-4) -> ScaleInvarianceReport:
    """Check numerically, tensor by tensor, that the loss is scale-invariant.

    ``batch`` = ``(inputs, target)`` and the loss is ``loss_fn(model(inputs), target)``
    (a scalar tensor). The check runs on a deep copy of ``model`` in train mode (batch
    statistics for normalization layers; the user's model, its mode, weights and running
    statistics are not touched). For every parameter tensor w with ``requires_grad``:

    * L(c·w) = L(w) for each c in ``scales`` (only w scaled, the other tensors as they are),
      within |ΔL| ≤ rtol·|L(w)|;
    * the gradient is orthogonal to w: |⟨∇_w L, w⟩| ≤ rtol·‖∇_w L‖‖w‖, or the derivative
      of the loss along w, d/dc L(c·w)|_{c=1} = ⟨∇_w L, w⟩, is negligible:
      |⟨∇_w L, w⟩| ≤ rtol·|L(w)| (for tensors the loss does not depend on, whose gradient
      is rounding noise).

    A tensor passes when both hold. An all-zero tensor fails: scaling it changes nothing,
    so its invariance cannot be checked (typically a zero-initialized bias or shift).
    Stochastic layers see the same random draws in every evaluation (the RNG is reset
    before each forward; the caller's RNG state is kept).
    Note that a bias right before a normalization over the same axis (e.g. ``Conv2d`` with
    bias → ``BatchNorm2d``) is cancelled by the mean subtraction, so the loss does not
    depend on it and it passes (its gradient is zero); so does the weight of that layer.
    Normalization's ``eps`` makes invariance approximate: keep the scales moderate.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_scale_invariance: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("check_scale_invariance: loss_fn must be callable(output, target)")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("check_scale_invariance: batch must be a pair (inputs, target)")
    scales = tuple(float(c) for c in scales)
    if not scales or any(not math.isfinite(c) or c <= 0 for c in scales):
        raise ValueError(f"check_scale_invariance: scales must be positive and finite, got "
                         f"{scales}")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"check_scale_invariance: rtol must be > 0, got {rtol!r}")

    net = copy.deepcopy(model).train()
    rng = torch.get_rng_state()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = None
    loss0 = _forward_loss(net, loss_fn, batch, rng)
    loss0.backward()
    ref = abs(loss0.item())
    denom_loss = ref if ref > 0 else 1.0
    results = []
    with torch.no_grad():
        for name, p in named:
            w = p.detach().double().flatten()
            g = (torch.zeros_like(w) if p.grad is None else p.grad.detach().double().flatten())
            norms = float(w.norm() * g.norm())
            dot = float(torch.dot(w, g))
            cos = dot / norms if norms > 0 else 0.0
            original = p.detach().clone()
            changes = []
            for c in scales:
                p.mul_(c)
                loss = _forward_loss(net, loss_fn, batch, rng)
                p.copy_(original)
                changes.append(abs(loss.item() - loss0.item()) / denom_loss)
            # The gradient test passes when ∇L ⊥ w, or when the derivative of L along w,
            # d/dc L(c·w) at c = 1 = ⟨∇L, w⟩, is negligible against L itself: a tensor the
            # loss does not depend on (a bias before BatchNorm) has a gradient of pure
            # rounding noise, whose cosine with w means nothing.
            grad_ok = abs(cos) <= rtol or abs(dot) <= rtol * denom_loss
            zero = float(w.norm()) == 0.0  # L(c·0) = L(0) says nothing about invariance
            ok = (all(math.isfinite(d) and d <= rtol for d in changes) and grad_ok
                  and not zero)
            results.append(ParamInvariance(name=name, shape=tuple(p.shape),
                                           loss_rel_change=tuple(changes),
                                           grad_weight_cosine=cos, ok=ok, zero=zero))
    return ScaleInvarianceReport(params=tuple(results), scales=scales, rtol=float(rtol),
                                 loss=loss0.item())


def make_scale_invariant(model: nn.Module, inputs: torch.Tensor, *, rtol: float = 1e-4,
                         seed: int = 0) -> nn.Module:
    """Freeze the last ``nn.Linear`` of ``model`` and verify that the network is then
    scale-invariant in every remaining trainable tensor; returns ``model``.

    The check is :func:`check_scale_invariance` on ``inputs`` (one batch, train mode)
    with a loss-agnostic probe L = mean((model(inputs) − R)²), R a fixed standard normal
    tensor drawn from ``seed`` (positive and O(1), so relative changes are meaningful; it
    changes with a tensor exactly when the output does, and an invariant output makes
    every loss of it invariant). Every trainable tensor must therefore
    act only through a normalization (e.g. conv without affine bias → BatchNorm(affine=
    False)). Raises ``ValueError`` naming the tensors that are not scale-invariant (e.g.
    affine parameters of normalization layers, biases after the last normalization); in
    that case the last layer's ``requires_grad`` flags are restored and the model is left
    as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_scale_invariant: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    saved = ([(p, p.requires_grad) for p in linears[-1].parameters()] if linears else [])
    last = freeze_last_layer(model)
    was_training = model.training
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = copy.deepcopy(model).train()(inputs)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    report = check_scale_invariance(model, lambda o, r: (o - r).pow(2).mean(), (inputs, probe),
                                    rtol=rtol)
    model.train(was_training)
    if not report.ok:
        for p, flag in saved:
            p.requires_grad_(flag)
        raise ValueError(f"make_scale_invariant: with the last linear layer "
                         f"({type(last).__name__} {last.in_features}→{last.out_features}) "
                         f"frozen, these trainable tensors are not scale-invariant: "
                         f"{', '.join(report.failures)}. Remove them (bias=False, "
                         f"affine=False) or freeze them.\n{report}")
    return model
