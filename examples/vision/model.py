"""A ResNet-50-like classifier in plain PyTorch (no torchvision), with random weights.

The layout of ResNet-50 v1.5 (bottleneck blocks [3, 4, 6, 3], stride on the 3x3
convolution, 25.6 M parameters, about 4.1 GFLOPs per 224x224 image): the same kernels a
real ResNet-50 runs, so its speed stands for the real one's. No weights can be fetched
here, so they are random (He initialisation, as torchvision's); classes are numbers.

Only engine processes import this module (the service names it as a string).
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 1000
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, plus the shortcut."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        stages: tuple[tuple[int, int, int], ...] = STAGES,
        num_classes: int = NUM_CLASSES,
        stem: int = 64,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        in_ch = stem
        for width, count, stride in stages:
            for i in range(count):
                blocks.append(Bottleneck(in_ch, width, stride if i == 0 else 1))
                in_ch = width * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet50() -> ResNet:
    """The factory the service names: ``examples.vision.model:resnet50``."""
    with torch.random.fork_rng(devices=[]):  # the same weights in every engine process
        torch.manual_seed(0)
        return ResNet()


def tiny_resnet() -> ResNet:
    """A two-block, narrow variant with the same structure, for fast CPU tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ResNet(stages=((8, 1, 1), (16, 1, 2)), num_classes=10, stem=8)
