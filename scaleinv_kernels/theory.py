"""Closed-form predictions for scale-invariant weights trained with SGD + weight decay.

Notation: learning rate η, (coupled, L2) weight decay λ, heavy-ball momentum μ as in
``torch.optim.SGD`` (no dampening, no Nesterov): ``b ← μ·b + ∇L(w) + λw``, ``w ← w − η·b``.
A loss is scale-invariant in w when L(c·w) = L(w) for c > 0; then ∇L(w) ⊥ w and
∇L(c·w) = ∇L(w)/c. ``∇̃L`` denotes the gradient at unit norm, ∇̃L = ‖w‖·∇L(w), which
depends only on the direction of w.

References
----------
* Z. Li, S. Arora, "An Exponential Learning Rate Schedule for Deep Learning", ICLR 2020
  (Theorem 1.2: SGD + momentum + WD ≡ SGD + momentum with an exponentially growing LR).
* Z. Li, K. Lyu, S. Arora, "Reconciling Modern Deep Learning with Traditional Optimization
  Analyses: The Intrinsic Learning Rate", NeurIPS 2020 (λe = ηλ).
* R. Wan, Z. Zhu, X. Zhang, J. Sun, "Spherical Motion Dynamics: Learning Dynamics of
  Normalized Neural Network using SGD and Weight Decay", NeurIPS 2021 (equilibrium angular
  update √(2ηλ/(1+μ))).
* E. Lobacheva, M. Kodryan, N. Chirkova, A. Malinin, D. Vetrov, "On the Periodic Behavior of
  Neural Network Training with Batch Normalization and Weight Decay", NeurIPS 2021.

Every function accepts Python floats or tensors (broadcast elementwise) for ``lr`` and
``weight_decay`` where stated, and raises ``ValueError`` for values outside the range where
the formula holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

Scalar = float | Tensor

__all__ = ["EquivalentHParams", "ExpLRSchedule", "equivalent_hparams", "explr_alpha",
           "explr_schedule", "intrinsic_lr", "predicted_angular_update",
           "predicted_effective_lr"]


def _check(name: str, value, *, low: float, high: float = math.inf,
           low_open: bool = False, high_open: bool = False, fn: str) -> None:
    """Range check for a float or a tensor (every element); ValueError/TypeError otherwise."""
    if isinstance(value, Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{fn}: {name} must be a real tensor, got dtype {value.dtype}")
        v = value.detach()
        bad = ~torch.isfinite(v) if high == math.inf else torch.zeros_like(v, dtype=torch.bool)
        bad = bad | ((v <= low) if low_open else (v < low))
        if high != math.inf:
            bad = bad | ((v >= high) if high_open else (v > high))
        if bool(bad.any()):
            raise ValueError(f"{fn}: every element of {name} must lie in "
                             f"{'(' if low_open else '['}{low}, {high}"
                             f"{')' if high_open else ']'}; got {value}")
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: {name} must be a float or a tensor, got "
                        f"{type(value).__name__}")
    v = float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok or math.isnan(v) or (high == math.inf and math.isinf(v)):
        raise ValueError(f"{fn}: {name} must lie in {'(' if low_open else '['}{low}, {high}"
                         f"{')' if high_open else ']'}; got {value!r}")


def _sqrt(x: Scalar) -> Scalar:
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def intrinsic_lr(lr: Scalar, weight_decay: Scalar) -> Scalar:
    """The intrinsic learning rate λe = η·λ (Li, Lyu & Arora 2020).

    For a scale-invariant weight it alone sets the speed of the dynamics of the direction
    (the pair (η, λ) matters only through ηλ up to a rescaling of the init, see
    :func:`equivalent_hparams`); equilibrium is reached after O(1/λe) steps.
    ``lr`` ≥ 0 and ``weight_decay`` ≥ 0, floats or tensors (result: same kind).
    """
    _check("lr", lr, low=0.0, fn="intrinsic_lr")
    _check("weight_decay", weight_decay, low=0.0, fn="intrinsic_lr")
    return lr * weight_decay


def predicted_angular_update(lr: Scalar, weight_decay: Scalar, momentum: float = 0.0) -> Scalar:
    """Equilibrium angular update per step of a scale-invariant weight, in radians:

        θ* = √(2ηλ / (1+μ))        (√(2ηλ) without momentum).

    Derivation without momentum (Wan et al. 2021; Li & Arora 2020): since ∇L ⊥ w,
    ‖w_{t+1}‖² = (1−ηλ)²‖w_t‖² + η²‖∇L‖²; a steady norm needs η²‖∇L‖² ≈ 2ηλ‖w‖², and the
    angle of the step is θ ≈ η‖∇L‖/‖w‖ = √(2ηλ). With momentum μ Wan et al. show the angle
    settles at √(2ηλ/(1+μ)). Holds at steady state (after ≈ 1/λe steps), to first order in
    ηλ, for any gradient noise level. ``lr``, ``weight_decay`` ≥ 0 (floats or tensors),
    0 ≤ ``momentum`` < 1.
    """
    _check("lr", lr, low=0.0, fn="predicted_angular_update")
    _check("weight_decay", weight_decay, low=0.0, fn="predicted_angular_update")
    _check("momentum", momentum, low=0.0, high=1.0, high_open=True,
           fn="predicted_angular_update")
    return _sqrt(2 * lr * weight_decay / (1 + momentum))


def predicted_effective_lr(lr: Scalar, weight_decay: Scalar, momentum: float = 0.0, *,
                           unit_grad_norm: Scalar) -> Scalar:
    """Equilibrium effective learning rate η/‖w‖² of a scale-invariant weight:

        η/‖w‖² = θ*·√(1−μ²) / ‖∇̃L‖ = √(2ηλ(1−μ)) / ‖∇̃L‖      (√(2ηλ)/‖∇̃L‖ for μ = 0),

    with θ* = √(2ηλ/(1+μ)) from :func:`predicted_angular_update` and ``unit_grad_norm`` =
    ‖∇̃L‖ = ‖w‖·‖∇L(w)‖, the gradient norm the weight would have at unit norm (measure it as
    ``grad_norm × weight_norm`` of :class:`~scaleinv_kernels.optim.LayerStats`, averaged
    over the window where you compare).

    Derivation. Without momentum the step is −η∇L with ‖∇L‖ = ‖∇̃L‖/‖w‖, so its angle is
    θ = η‖∇L‖/‖w‖ = (η/‖w‖²)·‖∇̃L‖; equating it with θ* = √(2ηλ) gives
    ‖w‖⁴ = η‖∇̃L‖²/(2λ) (Li & Arora 2020; Wan et al. 2021). With momentum the step is
    −η·b, b = Σ_k μ^k ∇L(w_{t−k}) (+ the small radial weight-decay part); when successive
    mini-batch gradients are uncorrelated, ‖b‖² ≈ ‖∇L‖²/(1−μ²), so θ = (η/‖w‖²)·‖∇̃L‖/√(1−μ²)
    and, with θ = θ*, η/‖w‖² = θ*·√(1−μ²)/‖∇̃L‖. (Naively dividing ηλ by 1+μ, i.e. using
    θ = η_eff‖∇̃L‖ also with momentum, overestimates η/‖w‖² by 1/√(1−μ²), 2.3× at μ = 0.9;
    the ``equilibrium-norm`` experiment and tests/test_theory.py measure the √(1−μ²) form.)

    Assumptions: steady state (after ≈ (1−μ)/(ηλ) steps); ‖∇̃L‖ roughly constant over the
    window; for μ > 0, gradient noise dominating the mean gradient (uncorrelated successive
    gradients; fully aligned ones would give the factor 1−μ instead of √(1−μ²), and
    anti-correlated ones a factor closer to 1). Measured: within 3 % for a BN MLP on random
    labels, but 1.6-2.5× too small for ``normalized_cnn`` on MNIST-5k at μ = 0.9 (600 steps,
    ``equilibrium-norm`` quick), so treat the μ > 0 value as an estimate. Accurate to
    O(ηλ) without momentum. ``lr``, ``weight_decay`` ≥ 0 (floats or tensors),
    0 ≤ ``momentum`` < 1, ``unit_grad_norm`` > 0.
    """
    fn = "predicted_effective_lr"
    _check("unit_grad_norm", unit_grad_norm, low=0.0, low_open=True, fn=fn)
    theta = predicted_angular_update(lr, weight_decay, momentum)
    return theta * math.sqrt(1.0 - float(momentum) ** 2) / unit_grad_norm


# ---------------------------------------------------------------------------------------
# ExpLR equivalence (Li & Arora 2020, Theorem 1.2)
# ---------------------------------------------------------------------------------------
def explr_alpha(lr: float, weight_decay: float, momentum: float) -> float:
    """The larger root α of x² − (1+μ−ηλ)x + μ = 0 (Li & Arora 2020, Theorem 1.2).

    For μ = 0 the roots are 0 and 1−ηλ, and α = 1−ηλ. Real roots need
    ηλ ≤ (1−√μ)²; ``ValueError`` otherwise (the equivalence would need complex scales),
    and for ηλ ≥ 1 without momentum (α ≤ 0).
    """
    fn = "explr_alpha"
    _check("lr", lr, low=0.0, low_open=True, fn=fn)
    _check("weight_decay", weight_decay, low=0.0, fn=fn)
    _check("momentum", momentum, low=0.0, high=1.0, high_open=True, fn=fn)
    lr, weight_decay, momentum = float(lr), float(weight_decay), float(momentum)
    b = 1.0 + momentum - lr * weight_decay
    disc = b * b - 4.0 * momentum
    if disc < 0:
        raise ValueError(f"{fn}: x² − (1+μ−ηλ)x + μ has no real root for ηλ = "
                         f"{lr * weight_decay:g}, μ = {momentum:g}; the equivalence needs "
                         f"ηλ ≤ (1−√μ)² = {(1 - math.sqrt(momentum)) ** 2:g}")
    alpha = (b + math.sqrt(disc)) / 2.0
    if alpha <= 0:
        raise ValueError(f"{fn}: ηλ = {lr * weight_decay:g} ≥ 1 + μ leaves no positive root")
    return alpha


@dataclass(frozen=True)
class ExpLRSchedule:
    """SGD+momentum without weight decay that reproduces SGD+momentum+WD (Li & Arora 2020).

    * ``alpha``: the larger root of x² − (1+μ−ηλ)x + μ = 0.
    * ``lrs``: float64 tensor [T], η̃_t = η·α^(−2t−1), the LR of step t = 0..T−1.
    * ``weight_scale``: float64 tensor [T+1], c_t = α^(−t): after t steps w̃_t = c_t·w_t,
      so the ratio ‖w̃_t‖/‖w_t‖ of every tensor is c_t.
    * ``initial_buffer_scale``: k = (α−1)/(η·α); the ExpLR run must start with the momentum
      buffer k·w₀ (see :meth:`initial_momentum_buffer`), not with an empty one.
    """

    alpha: float
    lrs: Tensor
    weight_scale: Tensor
    initial_buffer_scale: float
    lr: float
    weight_decay: float
    momentum: float

    def initial_momentum_buffer(self, w0: Tensor) -> Tensor:
        """The ``momentum_buffer`` to put in the no-WD optimizer's state before step 0:
        k·w₀ with k = (α−1)/(ηα) (a new tensor like ``w0``)."""
        if not isinstance(w0, Tensor):
            raise TypeError(f"initial_momentum_buffer: w0 must be a tensor, got "
                            f"{type(w0).__name__}")
        return w0.detach().clone().mul_(self.initial_buffer_scale)


def explr_schedule(lr: float, weight_decay: float, momentum: float, steps: int) -> ExpLRSchedule:
    """The exponential LR schedule equivalent to constant (η, λ, μ) on a scale-invariant loss.

    Theorem (Li & Arora 2020, Thm 1.2, in ``torch.optim.SGD`` form). Let w follow SGD with
    LR η, momentum μ and weight decay λ from w₀ with an empty momentum buffer, and let w̃
    follow SGD with momentum μ, no weight decay, and LR η̃_t = η·α^(−2t−1) at step t, from
    w̃₀ = w₀ with the momentum buffer pre-set to b̃₋₁ = (α−1)/(ηα)·w₀, on the same batches.
    If the loss is scale-invariant in w, then w̃_t = α^(−t)·w_t for every t, hence the two
    runs compute the same network function at every step.

    Proof sketch. With an empty buffer, w_{t+1} = (1+μ−ηλ)w_t − μw_{t−1} − η∇L(w_t) with the
    virtual w₋₁ = w₀. Put u_t = α^(−t)w_t and use 1+μ−ηλ = α+β, μ = αβ (β the other root)
    and ∇L(α^t u) = α^(−t)∇L(u): u_{t+1} − u_t = (μ/α²)(u_t − u_{t−1}) − ηα^(−2t−1)∇L(u_t).
    ``torch.optim.SGD`` with a step-dependent LR η̃_t does
    u_{t+1} − u_t = μ(η̃_t/η̃_{t−1})(u_t − u_{t−1}) − η̃_t∇L(u_t), and η̃_t/η̃_{t−1} = α^(−2).
    The paper's initial condition w̃₋₁ = α·w₋₁ = α·w₀ fixes the first step; in buffer form
    u₀ − u₋₁ = −η̃₋₁·b̃₋₁ with η̃₋₁ = ηα, i.e. b̃₋₁ = (α−1)/(ηα)·w₀. (For μ = 0 the buffer
    is irrelevant.) The paper states the theorem for any non-zero root; we take the larger
    one, so the LR grows as slowly as possible (α ≈ 1 − ηλ/(1−μ)).

    ``steps`` ≥ 0 (int); ``lr`` > 0, ``weight_decay`` ≥ 0, 0 ≤ ``momentum`` < 1 with
    ηλ ≤ (1−√μ)². Dampening and Nesterov momentum are not covered.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"explr_schedule: steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"explr_schedule: steps must be >= 0, got {steps}")
    alpha = explr_alpha(lr, weight_decay, momentum)
    t = torch.arange(steps + 1, dtype=torch.float64)
    log_alpha = math.log(alpha)
    lrs = float(lr) * torch.exp(-(2 * t[:steps] + 1) * log_alpha)
    scale = torch.exp(-t * log_alpha)
    return ExpLRSchedule(alpha=alpha, lrs=lrs, weight_scale=scale,
                         initial_buffer_scale=(alpha - 1.0) / (float(lr) * alpha),
                         lr=float(lr), weight_decay=float(weight_decay),
                         momentum=float(momentum))


@dataclass(frozen=True)
class EquivalentHParams:
    """Hyper-parameters with the same intrinsic LR: train with ``lr``, ``weight_decay``
    from the original init multiplied by ``init_scale``."""

    lr: float
    weight_decay: float
    init_scale: float
    intrinsic_lr: float


def equivalent_hparams(lr: float, weight_decay: float, factor: float) -> EquivalentHParams:
    """(η·f, λ/f) with the init scaled by √f: the same trajectory of network functions.

    For a loss scale-invariant in w, SGD (with or without momentum μ, buffer starting
    empty) from (η, λ, w₀) and from (c²η, λ/c², c·w₀) give w'_t = c·w_t at every step:
    with ∇L(cw) = ∇L(w)/c, the direction c²η·(∇L(cw) + (λ/c²)·cw) = c·η(∇L(w) + λw) of
    every step (and every momentum buffer, scaled by 1/c) is c times the original one.
    Hence only the intrinsic LR ηλ (and the direction of w₀) matter. ``factor`` = f = c² > 0,
    ``lr`` ≥ 0, ``weight_decay`` ≥ 0.
    """
    fn = "equivalent_hparams"
    _check("lr", lr, low=0.0, fn=fn)
    _check("weight_decay", weight_decay, low=0.0, fn=fn)
    _check("factor", factor, low=0.0, low_open=True, fn=fn)
    return EquivalentHParams(lr=float(lr) * factor, weight_decay=float(weight_decay) / factor,
                             init_scale=math.sqrt(factor),
                             intrinsic_lr=float(lr) * float(weight_decay))
