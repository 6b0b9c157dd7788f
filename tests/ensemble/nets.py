"""Small networks used by the ensemble tests and benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision-style ResNet BasicBlock with an optional downsample shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class BNMLP(nn.Module):
    def __init__(self, d_in: int = 20, hidden: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden, affine=False)
        self.out = nn.Linear(hidden, num_classes)
        self.out.requires_grad_(False)  # scale-invariant net: fixed last layer

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = torch.relu(self.bn1(self.fc1(x)))
        x = nn.functional.gelu(self.bn2(self.fc2(x)))
        return self.out(x)


class Bottleneck(nn.Module):
    """torchvision-style ResNet Bottleneck (1×1 → 3×3 → 1×1, expansion 4)."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BottleneckResNet(nn.Module):
    """torchvision's ResNet layout (stem conv → BN → ReLU → MaxPool2d(3, 2, 1)) with two
    Bottleneck stages."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(8, 4))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_act(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3):
    """torchvision's Conv2dNormActivation with ReLU6 (MobileNetV2)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand → depthwise 3×3 (groups = channels) → 1×1
    project, residual add when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn_act(cin, hidden, k=1)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class SmallMobileNetV2(nn.Module):
    """MobileNetV2's layout in miniature; forward as torchvision writes it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, stride=2), InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 6), InvertedResidual(12, 12, 1, 6),
            conv_bn_act(12, 32, k=1))
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze 1×1, then 1×1 and 3×3 expands concatenated along
    the channels."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SmallSqueezeNet(nn.Module):
    """SqueezeNet 1.1's layout in miniature (ceil-mode pools, conv classifier)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 4, 8, 8), Fire(16, 4, 8, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 8, 16, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(32, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class FakeEnsemble(nn.Module):
    """M linear classifiers: weight [M, K, F], bias [M, K]; logits = x @ W_iᵀ + b_i."""

    def __init__(self, M: int, F: int, K: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(M, K, F, generator=g))
        self.bias = nn.Parameter(torch.randn(M, K, generator=g))
        self.calls: list[tuple[slice, int, bool, bool]] = []  # (members, B, training, grad)

    @property
    def n_members(self) -> int:
        return self.weight.shape[0]

    def _sel(self, members: slice | None) -> slice:
        return slice(None) if members is None else members

    def forward(self, x: torch.Tensor, members: slice | None = None) -> torch.Tensor:
        s = self._sel(members)
        return torch.einsum("mbf,mkf->mbk", x, self.weight[s]) + self.bias[s][:, None]

    def forward_shared(self, x: torch.Tensor, members: slice | None = None) -> torch.Tensor:
        s = self._sel(members)
        self.calls.append((s, x.shape[0], self.training, torch.is_grad_enabled()))
        return torch.einsum("bf,mkf->mbk", x, self.weight[s]) + self.bias[s][:, None]

    def member(self, i: int) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[2], self.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(self.weight[i])
            lin.bias.copy_(self.bias[i])
        return lin
