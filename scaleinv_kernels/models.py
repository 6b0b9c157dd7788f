"""Scale-invariant models for the experiments, beyond ``normalized_cnn``.

Every trainable tensor of these models is a convolution weight followed by a
``BatchNorm2d(affine=False)``, and the last linear layer is frozen, so in train mode the
loss is invariant to multiplying any trainable tensor by c > 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scaleinv_kernels.scale_invariance import freeze_last_layer, normalized_cnn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                                   bias=False),
                         nn.BatchNorm2d(cout, affine=False))


class NormalizedBasicBlock(nn.Module):
    """ResNet basic block, ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, with a
    1×1 conv → BatchNorm shortcut when the shape changes (identity otherwise)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True),
                                    _conv_bn(cout, cout, 3, 1))
        self.shortcut = (_conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


def normalized_resnet(widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 1,
                      num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """A small CIFAR ResNet whose loss is scale-invariant in every trainable tensor.

    Stem conv 3×3 → BN → ReLU at ``widths[0]``; one stage per width of
    ``blocks_per_stage`` :class:`NormalizedBasicBlock` (stride 2 at the first block of
    every stage but the first); global average pooling; ``Linear(widths[-1],
    num_classes)`` frozen at its random init. Every BatchNorm is ``affine=False`` and every
    convolution has no bias. Raises ``ValueError`` for empty ``widths`` or
    ``blocks_per_stage`` < 1.
    """
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"normalized_resnet: widths must be positive ints, got {widths}")
    if blocks_per_stage < 1:
        raise ValueError(f"normalized_resnet: blocks_per_stage must be >= 1, "
                         f"got {blocks_per_stage}")
    layers: list[nn.Module] = [_conv_bn(in_channels, widths[0], 3, 1), nn.ReLU(inplace=True)]
    cin = widths[0]
    for s, w in enumerate(widths):
        for b in range(blocks_per_stage):
            layers.append(NormalizedBasicBlock(cin, w, 2 if s > 0 and b == 0 else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    freeze_last_layer(model)
    return model


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., "Identity Mappings in Deep Residual
    Networks", 2016): ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)``, the
    shortcut a 1×1 convolution of ``x`` where the shape changes (identity otherwise)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class PreResNet(nn.Module):
    """CIFAR pre-activation ResNet of depth 6n + 2 (PreResNet32: n = 5): conv 3×3 →
    three stages of n :class:`PreActBlock` at widths ``width``, 2·``width``,
    4·``width`` (stride 2 at the first block of stages 2 and 3) → BN → ReLU → global
    average pool → linear. The layout of the PreResNet in the SWA code base (Izmailov et
    al., 2018) that the scale-invariance papers train; global average pooling instead of
    ``AvgPool2d(8)``, so inputs other than 32×32 work too.

    Raises ``ValueError`` when ``depth`` is not 6n + 2 with n >= 1 or ``width`` < 1.
    """

    def __init__(self, depth: int = 32, width: int = 16, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"PreResNet: depth must be 6n + 2 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"PreResNet: width must be >= 1, got {width}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        blocks, cin = [], width
        for stage in range(3):
            cout = width * 2 ** stage
            blocks.append(nn.Sequential(*[
                PreActBlock(cin if b == 0 else cout, cout, 2 if stage and b == 0 else 1)
                for b in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = blocks
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.view(x.size(0), -1))


def pre_resnet32(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> PreResNet:
    """PreResNet32: :class:`PreResNet` with 5 blocks per stage."""
    return PreResNet(32, width, num_classes, in_channels)


def scale_classifier(model: nn.Module, factor: float) -> nn.Linear:
    """Multiply the frozen last ``nn.Linear`` of ``model`` (weight and bias) by ``factor``.

    A fixed factor is a softmax temperature: the trainable tensors stay scale-invariant,
    but the logits can grow ``factor`` times larger, so the loss can get close to zero.
    (PyTorch's default init of a 32→10 layer gives logits of order 0.5, which caps the
    attainable margin and makes the gradients small.) Returns the layer.
    """
    if not (isinstance(factor, (int, float)) and factor > 0):
        raise ValueError(f"scale_classifier: factor must be a positive number, got {factor!r}")
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"scale_classifier: {type(model).__name__} has no nn.Linear layer")
    with torch.no_grad():
        for p in last[-1].parameters():
            p.mul_(factor)
    return last[-1]


def model_for(data: str | None, fc_scale: float = 1.0) -> nn.Module:
    """The experiments' scale-invariant model for a data set: ``normalized_cnn`` (1 input
    channel) for ``"mnist5k"``/``"mnist"``, ``normalized_resnet`` for ``"cifar10"``; the
    frozen classifier multiplied by ``fc_scale``. Uses the global torch RNG for the init."""
    if data in (None, "mnist5k", "mnist"):
        model = normalized_cnn()
    elif data == "cifar10":
        model = normalized_resnet()
    else:
        raise ValueError(f"model_for: unknown data set {data!r}")
    if fc_scale != 1.0:
        scale_classifier(model, fc_scale)
    return model
