"""Models the benchmark scripts share (random weights; benchmarks need shapes, not skill)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "ResBlock", "resnet", "resnet50", "shortcut"]


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """A residual block's identity, or a 1x1 Conv-BN where the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResBlock(nn.Module):
    """A ResNet basic block: two 3x3 Conv-BN, a 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def resnet(
    blocks: list[tuple[int, int, int]], *, stem: int = 32, classes: int = 10
) -> nn.Sequential:
    """Stem Conv-BN-ReLU, the given ``(cin, cout, stride)`` blocks, pooling and a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, stem, 3, 1, 1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(),
        *(ResBlock(cin, cout, s) for cin, cout, s in blocks),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(blocks[-1][1], classes),
    )


class Bottleneck(nn.Module):
    """A ResNet-50 bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand to
    ``4 * width``, each Conv-BN; a 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.down(x))


def resnet50(classes: int = 1000) -> nn.Sequential:
    """ResNet-50's shape (torchvision's layout: 7x7/2 stem, max-pool, bottleneck stages of
    3, 4, 6, 3 blocks at widths 64-512, stride on the 3x3): 53 BN layers, 25.6 M
    parameters, ~4.1 GFLOPs per 224x224 image. Random weights."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)
