"""Models the benchmark scripts share (random weights; benchmarks need shapes, not skill)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResBlock", "resnet"]


class ResBlock(nn.Module):
    """A ResNet basic block: two 3x3 Conv-BN, a 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

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
