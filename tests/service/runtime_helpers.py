"""Tiny BN models exported to ONNX and seeded image data for the data-plane tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from recalib.export import export_onnx

IMAGE = (3, 8, 8)
CLASSES = 3


class TinyNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear on ``(N, 3, 8, 8)``; three outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def source_images(n: int, seed: int) -> np.ndarray:
    """``(n, 3, 8, 8)`` float32 standard-normal images (the source domain)."""
    return np.random.default_rng(seed).standard_normal((n, *IMAGE)).astype(np.float32)


def shifted_images(n: int, seed: int) -> np.ndarray:
    """The new domain: per-channel scale and offset."""
    scale = np.array([0.4, 2.0, 1.3], dtype=np.float32)[None, :, None, None]
    shift = np.array([1.5, -0.8, 0.6], dtype=np.float32)[None, :, None, None]
    return (source_images(n, seed) * scale + shift).astype(np.float32)


def make_model(seed: int = 0, calibrate_on: np.ndarray | None = None) -> TinyNet:
    """A seeded :class:`TinyNet` in eval mode whose BN statistics match ``calibrate_on``
    (source images by default), so in-domain data shows little drift."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyNet()
    data = source_images(512, seed + 1) if calibrate_on is None else calibrate_on
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for i in range(0, len(data), 128):
            model(torch.from_numpy(data[i : i + 128]))
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    """Export ``model`` with BN kept and a dynamic batch axis; returns ``path``."""
    export_onnx(model, torch.zeros(2, *IMAGE), path)
    return path


def reference_outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The torch model's float32 logits for ``x``."""
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(x)).numpy()
    return out
