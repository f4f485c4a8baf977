"""Networks of the published protocol (van de Ven 2025): an MLP and a reduced ResNet-18.

Both have one output layer with a unit per class of the whole benchmark; the task-incremental
module activates only the current task's units (multi-head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs (784-400-400-10 for Split MNIST)."""

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (400, 400), n_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and a (projected) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def basic_stages(width: int, planes: Sequence[int]) -> nn.Sequential:
    """ResNet-18's stages: two basic blocks of ``planes[i]`` channels each; every stage after the
    first halves the resolution."""
    stages = []
    for i, out in enumerate(planes):
        stages.append(
            nn.Sequential(BasicBlock(width, out, 1 if i == 0 else 2), BasicBlock(out, out))
        )
        width = out
    return nn.Sequential(*stages)


class ReducedResNet18(nn.Module):
    """The reduced ResNet-18 of GEM / van de Ven: a 3x3 stem and four stages of two basic blocks.

    ``channels=(20, 20, 40, 80, 160)`` are the stem's and the four stages' widths; stages 2-4
    halve the resolution; global average pooling feeds one linear output layer. BatchNorm, no
    pretraining.
    """

    def __init__(
        self,
        channels: Sequence[int] = (20, 20, 40, 80, 160),
        n_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ValueError(
                f"channels must give the stem and four stages (5 widths); got {channels}."
            )
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.stages = basic_stages(channels[0], channels[1:])
        self.classifier = nn.Linear(channels[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
