"""The bundled demo: a small BN CNN, synthetic images, and a covariate shift.

The images are 3x16x16 pictures of four classes (horizontal bar, vertical bar, diagonal,
centred blob) at random positions with noise. The *shifted domain* is what a new camera
does: lower contrast, a brightness offset, a colour cast and more sensor noise. A network
trained on the source domain loses accuracy there; recalibrating its BN statistics on
unlabeled shifted images recovers most of it. ``scripts/make_demo_assets.py`` trains the
model and writes the assets shipped in ``recalib/demo_assets/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .modes import eval_mode

__all__ = [
    "ASSETS",
    "DemoNet",
    "accuracy",
    "make_images",
    "shift_domain",
    "train_demo_model",
]

ASSETS = Path(__file__).parent / "demo_assets"
NUM_CLASSES = 4
SIZE = 16


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` source-domain images ``(n, 3, 16, 16)`` float32 and their labels ``(n,)``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    x = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i, c in enumerate(labels):
        cy, cx = rng.integers(4, SIZE - 4, size=2)
        if c == 0:
            img = np.exp(-((yy - cy) ** 2) / 2.0)
        elif c == 1:
            img = np.exp(-((xx - cx) ** 2) / 2.0)
        elif c == 2:
            img = np.exp(-((xx - yy - (cx - cy)) ** 2) / 4.0)
        else:
            img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 6.0)
        colour = rng.uniform(0.6, 1.0, size=3)[:, None, None]
        x[i] = colour * img[None] + rng.normal(0, 0.1, size=(3, SIZE, SIZE))
    return x, labels.astype(np.int64)


def shift_domain(x: np.ndarray, seed: int) -> np.ndarray:
    """The new camera: contrast x0.35, brightness +0.9, a colour cast and sensor noise."""
    rng = np.random.default_rng(seed)
    cast = np.array([0.15, -0.1, 0.3], dtype=np.float32)[None, :, None, None]
    noise = rng.normal(0, 0.15, size=x.shape).astype(np.float32)
    return (0.35 * x + 0.9 + cast + noise).astype(np.float32)


class DemoNet(nn.Module):
    """Conv-BN-ReLU x3, global pooling, Linear-BN1d-ReLU, Linear (four BN layers)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.features = nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32, 32, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.pool(self.features(x)))
        return out


def train_demo_model(x: np.ndarray, y: np.ndarray, *, epochs: int = 4, seed: int = 0) -> DemoNet:
    """Train :class:`DemoNet` on source-domain images (a few seconds on a CPU)."""
    torch.manual_seed(seed)
    model = DemoNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    return model.eval()


def accuracy(
    model: nn.Module | torch.export.ExportedProgram, x: np.ndarray, y: np.ndarray
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``x`` with labels ``y``."""
    net = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    correct = 0
    from_program = isinstance(model, torch.export.ExportedProgram)
    with eval_mode(net, via_attribute=from_program), torch.no_grad():
        for i in range(0, len(x), 256):
            logits = net(torch.from_numpy(np.ascontiguousarray(x[i : i + 256])))
            correct += int((logits.argmax(1).numpy() == y[i : i + 256]).sum())
    return correct / len(x)
