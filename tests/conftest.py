"""Shared fixtures: tiny seeded BN models, seeded data and a float64 reference for BN inputs.

Every model is built under a forked, seeded RNG and given non-trivial "source" statistics
(random running mean/var, affine parameters and ``num_batches_tracked``), so that
recalibrating on the calibration data visibly changes every layer.

Builders and the reference are session-scoped *factories* (plain functions, no state), so
hypothesis tests can use them without the function-scoped-fixture health check.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

# Every app a test starts serves gRPC on a free port (the default 8001 would collide
# between tests and with anything else on the machine); tests that need the port read
# ``app.state.grpc_port``.
os.environ.setdefault("RECALIB_GRPC_PORT", "0")

# Tiny models: one intra-op thread is several times faster than two on a loaded 2-core
# machine (thread hand-off costs more than the work), and keeps reductions deterministic.
torch.set_num_threads(1)

NUM_CLASSES = 5
IMAGE_SHAPE = (3, 8, 8)
MLP_FEATURES = 4

M = TypeVar("M", bound=nn.Module)

# name -> (population mean, unbiased variance), float64
Stats = dict[str, tuple[np.ndarray, np.ndarray]]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-Dropout-Conv-BN-ReLU-Pool-Linear-BN1d on ``(N, 3, 8, 8)`` images."""

    def __init__(self, *, dropout: float | None = 0.5, norm2d: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = norm2d(6)
        self.drop = nn.Dropout(dropout) if dropout is not None else nn.Identity()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = norm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, NUM_CLASSES)
        self.bn3 = nn.BatchNorm1d(NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        out: Tensor = self.bn3(self.fc(x.flatten(1)))
        return out


def randomise_source_stats(model: M, seed: int) -> M:
    """Give every BN layer seeded running stats, affine params and a step count."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BatchNorm):
                continue
            if m.running_mean is not None and m.running_var is not None:
                assert m.num_batches_tracked is not None
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(c, generator=gen) * 2.0 - 1.0)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(1234)
            if m.affine and m.weight is not None:
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model


def build_cnn(
    seed: int = 0, *, dropout: float | None = 0.5, norm2d: type[nn.Module] = nn.BatchNorm2d
) -> SmallCNN:
    """A seeded :class:`SmallCNN` in eval mode with random source statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(dropout=dropout, norm2d=norm2d)
    randomise_source_stats(model, seed).eval()
    return model


def build_mlp(seed: int = 0, *, bn_first: bool = False) -> nn.Sequential:
    """Linear-BN1d-ReLU-Linear-BN1d on ``(N, 4)`` (or BN1d first with ``bn_first``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.BatchNorm1d(MLP_FEATURES)] if bn_first else []
        layers += [
            nn.Linear(MLP_FEATURES, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 3),
            nn.BatchNorm1d(3),
        ]
        model = nn.Sequential(*layers)
    randomise_source_stats(model, seed).eval()
    return model


def make_images_tensor(n: int, seed: int = 0) -> Tensor:
    """``(n, 3, 8, 8)`` float32 images with per-channel scale and offset (a new domain)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 1.2]).view(1, 3, 1, 1)
    shift = torch.tensor([1.5, -0.7, 0.2]).view(1, 3, 1, 1)
    return torch.randn((n, *IMAGE_SHAPE), generator=gen) * scale + shift


def make_features_tensor(n: int, seed: int = 0) -> Tensor:
    """``(n, 4)`` float32 features with per-feature scale and offset."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 1.0, 2.5, 0.8])
    shift = torch.tensor([2.0, -1.0, 0.0, 0.5])
    return torch.randn((n, MLP_FEATURES), generator=gen) * scale + shift


def bn_input_stats_reference(
    model: nn.Module, batches: Iterable[Tensor], *, normalise_by_batch: bool
) -> Stats:
    """Population statistics of every BN layer's input, computed independently in float64.

    A float64 copy of ``model`` runs on each batch with Dropout off; every BN layer either
    normalises by its own batch statistics (``normalise_by_batch=True``: training-mode
    normalisation) or by its running statistics (eval mode). Forward pre-hooks collect the
    BN inputs, which are pooled over all batches and reduced with NumPy in float64.
    """
    ref = copy.deepcopy(model).double().eval()
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, m in ref.named_modules():
        if isinstance(m, _BatchNorm):
            m.train(normalise_by_batch)
            seen[name] = []

            def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                x = args[0].detach().numpy()
                seen[name].append(np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]))

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for xb in batches:
            ref(xb.double())
    for h in hooks:
        h.remove()
    out: Stats = {}
    for name, parts in seen.items():
        flat = np.concatenate(parts, axis=0)
        out[name] = (flat.mean(axis=0), flat.var(axis=0, ddof=1))
    return out


def running_stats(model: nn.Module) -> Stats:
    """Every stat-tracking BN layer's ``(running_mean, running_var)`` as float64 NumPy."""
    return {
        name: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A deep copy of the state dict, for bit-identity checks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"state changed: {changed}"


@pytest.fixture(scope="session")
def make_cnn() -> Callable[..., SmallCNN]:
    return build_cnn


@pytest.fixture(scope="session")
def make_mlp() -> Callable[..., nn.Sequential]:
    return build_mlp


@pytest.fixture(scope="session")
def make_images() -> Callable[..., Tensor]:
    return make_images_tensor


@pytest.fixture(scope="session")
def make_features() -> Callable[..., Tensor]:
    return make_features_tensor


@pytest.fixture(scope="session")
def reference_stats() -> Callable[..., Stats]:
    return bn_input_stats_reference


@pytest.fixture(scope="session")
def stats_of() -> Callable[[nn.Module], Stats]:
    return running_stats


@pytest.fixture(scope="session")
def state_of() -> Callable[[nn.Module], dict[str, Tensor]]:
    return snapshot


@pytest.fixture(scope="session")
def assert_unchanged() -> Callable[[nn.Module, dict[str, Tensor]], None]:
    return assert_state_unchanged


@pytest.fixture
def cnn() -> SmallCNN:
    return build_cnn(0)


@pytest.fixture
def mlp() -> nn.Sequential:
    return build_mlp(0)


@pytest.fixture
def images() -> Tensor:
    """50 images: not a multiple of the usual batch sizes, so the last batch is short."""
    return make_images_tensor(50)


@pytest.fixture
def features() -> Tensor:
    return make_features_tensor(50)
