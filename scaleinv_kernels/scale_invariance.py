"""Scale-invariant networks.

A loss L is scale-invariant in a tensor w when L(c·w) = L(w) for every c > 0. Then the
gradient is orthogonal to w (⟨∇L, w⟩ = 0) and scales as 1/c, so what matters for
training is w's direction and the effective learning rate η/‖w‖².
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


def normalized_cnn(channels: Sequence[int] = (16, 32, 32), num_classes: int = 10,
                   in_channels: int = 1) -> nn.Sequential:
    """A small CNN whose loss is scale-invariant in every trainable tensor.

    One block per entry of ``channels``: 3×3 convolution ``conv<i>`` (padding 1, no bias) →
    ``BatchNorm2d(affine=False)`` → ReLU, with ``MaxPool2d(2)`` after each of the first
    two blocks; then global average pooling, flatten, and a ``Linear(channels[-1],
    num_classes)`` named ``fc`` whose weight and bias are frozen at their random init
    (``requires_grad=False``).

    Contract: the trainable parameters are exactly the convolution weights, each
    followed by a batch normalization without affine parameters, so in train mode
    (batch statistics) the output is unchanged when any of them is multiplied by
    c > 0 (up to BatchNorm's ``eps``). In eval mode the running statistics break exact
    invariance.
    """
    if not channels:
        raise ValueError("normalized_cnn: channels must list at least one width")
    layers: dict[str, nn.Module] = {}
    width = in_channels
    for i, out in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(width, out, kernel_size=3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(out, affine=False)
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
