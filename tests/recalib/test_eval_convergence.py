"""``mode="eval"`` on deep networks: the lockstep pass reaches the eval-consistent fixed
point in one forward at any batch size (torch and ONNX alike), refuses to write unconverged
statistics, falls back instead of deadlocking, and stops every batch when one fails.

The deep model is a random-weight ResNet-ish network (25 BN layers) with random source
statistics, on which plain eval passes do not converge in 10 passes.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from recalib import fixed_point
from recalib.errors import (
    DataError,
    DivergedError,
    NonFiniteError,
    NotConvergedError,
    OptionsError,
)
from recalib.onnx.export import export_onnx
from recalib.onnx.names import bn_node_stats, read_bn_map
from recalib.onnx.recalibrate import recalibrate_onnx
from recalib.recalibrate import recalibrate

TOL = 1e-4
Stats = dict[str, tuple[np.ndarray, np.ndarray]]
M = TypeVar("M", bound=nn.Module)


def randomise_source_stats(model: M, seed: int) -> M:
    """Seeded running statistics and affine parameters in every BN layer."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if (
                isinstance(m, _BatchNorm)
                and m.running_mean is not None
                and m.running_var is not None
            ):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(c, generator=gen) * 2.0 - 1.0)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


def deep_resnet(seed: int = 0, *, blocks: int = 12, width: int = 8) -> nn.Sequential:
    """Stem Conv-BN and ``blocks`` residual blocks: ``2 * blocks + 1`` BN layers."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *(Block(width) for _ in range(blocks)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )
    return randomise_source_stats(model, seed).eval()


def images(n: int, seed: int = 1, size: int = 8) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen) * 2.0 + 0.5


def stats(model: nn.Module) -> Stats:
    return {
        name: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def assert_stats_close(got: Stats, ref: Stats, *, rtol: float, atol: float) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(got[name][0], ref[name][0], rtol=rtol, atol=atol, err_msg=name)
        np.testing.assert_allclose(got[name][1], ref[name][1], rtol=rtol, atol=atol, err_msg=name)


def fixed_point_reference(model: nn.Module, x: Tensor) -> Stats:
    """The definition, in float64: one forward of all of ``x`` as a single batch in which
    each BN normalises with the population statistics (unbiased variance, as stored) of
    its own input."""
    ref = copy.deepcopy(model).double().eval()
    out: Stats = {}
    for name, m in ref.named_modules():
        if not isinstance(m, _BatchNorm):
            continue

        def forward(t: Tensor, m: _BatchNorm = m, name: str = name) -> Tensor:
            dims = [d for d in range(t.dim()) if d != 1]
            mean, var = t.mean(dims), t.var(dims, unbiased=True)
            out[name] = (mean.numpy().copy(), var.numpy().copy())
            return F.batch_norm(t, mean, var, m.weight, m.bias, False, 0.0, m.eps)

        m.forward = forward  # type: ignore[method-assign, assignment]
    with torch.no_grad():
        ref(x.double())
    return out


# --------------------------------------------------------------------------- the fixed point
@pytest.fixture(scope="module")
def deep_results() -> dict[int, tuple[Stats, Any]]:
    x = images(32)
    results = {}
    for batch_size in (1, 4, 64):
        model = deep_resnet()
        report = recalibrate(model, x, mode="eval", batch_size=batch_size, tol=TOL)
        results[batch_size] = (stats(model), report)
    return results


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_deep_network_converges_in_two_passes_at_any_batch_size(
    deep_results: dict[int, tuple[Stats, Any]], batch_size: int
) -> None:
    got, report = deep_results[batch_size]
    assert report.converged
    assert report.passes == 2  # the lockstep pass and the ordinary pass that checks it
    assert report.residual is not None and report.residual <= TOL
    assert report.params["anchored_items"] == 32
    assert_stats_close(got, deep_results[64][0], rtol=1e-5, atol=1e-6)


def test_deep_network_equals_the_float64_fixed_point(
    deep_results: dict[int, tuple[Stats, Any]],
) -> None:
    ref = fixed_point_reference(deep_resnet(), images(32))
    for got, _ in deep_results.values():
        assert_stats_close(got, ref, rtol=1e-4, atol=1e-5)


def test_plain_passes_do_not_converge_and_are_not_written() -> None:
    """What the lockstep pass replaces: passes where layer k is exact after k passes."""
    model = deep_resnet()
    before = stats(model)
    with pytest.raises(NotConvergedError, match="did not converge in 4 passes") as info:
        recalibrate(model, images(32), mode="eval", batch_size=4, anchor=0, max_passes=4)
    assert info.value.report is not None and not info.value.report.converged
    assert_stats_close(stats(model), before, rtol=0, atol=0)

    report = recalibrate(
        model,
        images(32),
        mode="eval",
        batch_size=4,
        anchor=0,
        max_passes=4,
        allow_unconverged=True,
    )
    assert not report.converged and report.passes == 4
    assert stats(model).keys() == before.keys()


def test_anchor_smaller_than_the_data_starts_the_ordinary_passes() -> None:
    x = images(24)
    whole = deep_resnet(blocks=2)
    recalibrate(whole, x, mode="eval", batch_size=4)
    part = deep_resnet(blocks=2)
    report = recalibrate(part, x, mode="eval", batch_size=4, anchor=8, max_passes=20)
    assert report.converged and report.params["anchored_items"] == 8
    assert report.samples == 24
    assert_stats_close(stats(part), stats(whole), rtol=1e-4, atol=1e-5)


def test_batches_of_different_shapes() -> None:
    """Not concatenated: 8x8 and 12x12 images in one calibration set."""
    batches = [images(3, seed=s, size=8 if s % 2 else 12) for s in range(6)]
    model = deep_resnet(blocks=2)
    report = recalibrate(model, batches, mode="eval")
    assert report.converged and report.passes == 2
    ref = deep_resnet(blocks=2)
    recalibrate(ref, batches, mode="eval", anchor=0, max_passes=30, tol=1e-7)
    assert_stats_close(stats(model), stats(ref), rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
    """One BN layer called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)
        self.out = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.bn(self.fc2(torch.relu(self.bn(self.fc1(x))))))
        return out


def test_layer_called_twice_synchronises_per_call() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 4) * 2 + 1
    model = randomise_source_stats(Shared(), 0).eval()
    ref = copy.deepcopy(model)
    report = recalibrate(model, x, mode="eval", batch_size=1, tol=1e-6, max_passes=30)
    assert report.converged
    recalibrate(ref, x, mode="eval", batch_size=8, anchor=0, tol=1e-6, max_passes=100)
    assert_stats_close(stats(model), stats(ref), rtol=1e-4, atol=1e-5)


def test_method_prior_reaches_its_fixed_point_too() -> None:
    x = images(16)
    model = deep_resnet(blocks=3)
    report = recalibrate(model, x, mode="eval", method="prior", prior_strength=8.0, batch_size=2)
    assert report.converged and report.passes == 2


# --------------------------------------------------------------------------- no deadlock
class Branchy(nn.Module):
    """Calls an extra BN layer only for batches whose mean is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.extra, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv(x)))
        if float(x.mean()) > 0:
            y = self.extra(y)
        out: Tensor = self.bn2(y)
        return out


def test_data_dependent_control_flow_falls_back_with_a_warning() -> None:
    torch.manual_seed(0)
    model = randomise_source_stats(Branchy(), 0).eval()
    batches = [images(4, seed=s) * (1 if s % 2 else -1) for s in range(6)]
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="falling back to ordinary passes"):
        report = recalibrate(model, batches, mode="eval")
    assert report.converged and report.params["anchored_items"] == 0
    recalibrate(ref, batches, mode="eval", anchor=0)
    assert_stats_close(stats(model), stats(ref), rtol=0, atol=0)


class Locked(nn.Module):
    """Holds a lock shared by all batches across its BN calls (so the batches of a
    lockstep pass would wait for each other forever)."""

    lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        with self.lock:
            out: Tensor = self.bn2(torch.relu(self.bn1(self.conv(x))))
            return out


def test_a_stalled_lockstep_pass_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixed_point, "STALL_SECONDS", 0.5)
    torch.manual_seed(0)
    model = randomise_source_stats(Locked(), 0).eval()
    with pytest.warns(RuntimeWarning, match="no batch reached its next normalization layer"):
        report = recalibrate(model, images(12), mode="eval", batch_size=3)
    assert report.converged


# --------------------------------------------------------------------------- errors
class FailsOnMarkedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = deep_resnet(blocks=2)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.body[:5](x)  # stem and two blocks: every BN layer
        if bool((x == 123.0).any()):
            raise ValueError("marked batch")
        return y


def test_an_error_in_one_batch_stops_all_and_leaves_the_model_unchanged() -> None:
    model = FailsOnMarkedBatch().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [images(2, seed=s) for s in range(8)]
    batches[5][0, 0, 0, 0] = 123.0
    with pytest.raises(DataError, match="forward failed on batch 5: marked batch"):
        recalibrate(model, batches, mode="eval")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not [t for t in threading.enumerate() if t.name.startswith("recalib-lockstep")]


def test_nan_in_one_batch_names_it() -> None:
    model = deep_resnet(blocks=2)
    batches = [images(2, seed=s) for s in range(6)]
    batches[3][1, 2, 3, 4] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        recalibrate(model, batches, mode="eval")
    assert info.value.batch == 3 and info.value.layer == "1"


def test_nan_after_finite_passes_is_divergence_not_garbage() -> None:
    model = deep_resnet(blocks=2)
    before = stats(model)
    good = images(8)
    bad = good.clone()
    bad[0, 0, 0, 0] = float("inf")

    class SecondPassGoesBad:
        passes = 0

        def __iter__(self) -> Iterator[Tensor]:
            self.passes += 1
            return iter([good] if self.passes <= 2 else [bad])  # 1: the re-iterable check

    with pytest.raises(DivergedError, match="diverged in pass 2") as info:
        recalibrate(model, SecondPassGoesBad(), mode="eval", anchor=0)
    assert isinstance(info.value, NotConvergedError) and isinstance(info.value, NonFiniteError)
    assert_stats_close(stats(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("anchor", [-1, 2.5, True])
def test_bad_anchor_is_refused(anchor: Any) -> None:
    with pytest.raises(OptionsError, match="anchor"):
        recalibrate(deep_resnet(blocks=1), images(4), mode="eval", anchor=anchor)


# --------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def deep_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("deep") / "deep.onnx"
    export_onnx(deep_resnet(), images(2, seed=9), path)
    return path


def _onnx_layer_stats(model: Any) -> Stats:
    """Stored statistics by torch layer name (recalib's name map)."""
    layer_of = {key: info.layer for key, info in read_bn_map(model).items()}
    return {
        layer_of[key]: (mean.astype(np.float64), var.astype(np.float64))
        for key, (mean, var) in bn_node_stats(model).items()
    }


@pytest.mark.parametrize("batch_size", [1, 4])
def test_onnx_deep_network_agrees_with_torch(
    deep_onnx: Path, deep_results: dict[int, tuple[Stats, Any]], batch_size: int
) -> None:
    """ONNX Runtime at batch size 1 or 4: one joined anchor batch, then one checking pass."""
    got, report = recalibrate_onnx(
        deep_onnx, images(32).numpy(), batch_size=batch_size, tol=TOL, mode="eval"
    )
    assert report.converged and report.passes == 2
    assert_stats_close(_onnx_layer_stats(got), deep_results[batch_size][0], rtol=1e-5, atol=1e-5)


def test_onnx_unconverged_is_refused(deep_onnx: Path) -> None:
    with pytest.raises(NotConvergedError, match="did not converge"):
        recalibrate_onnx(
            deep_onnx, images(32).numpy(), batch_size=4, anchor=0, max_passes=3, mode="eval"
        )
    _, report = recalibrate_onnx(
        deep_onnx,
        images(32).numpy(),
        batch_size=4,
        anchor=0,
        max_passes=3,
        allow_unconverged=True,
        mode="eval",
    )
    assert not report.converged
