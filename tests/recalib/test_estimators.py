"""Tests of recalib.estimators against NumPy references and torch's own BN update."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from recalib.estimators import (
    EmaEstimator,
    ExactEstimator,
    PriorEstimator,
    make_estimator,
)
from recalib.moments import ChannelMoments

F64 = torch.float64
TIGHT: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-12}
SIZES = (9, 4, 17, 2)  # unequal batches, a small one last


def _batches(seed: int = 0, sizes: tuple[int, ...] = SIZES) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shift = torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1)
    return [torch.randn((n, 3, 5), generator=gen, dtype=F64) * 2.0 + shift for n in sizes]


def _source() -> tuple[Tensor, Tensor]:
    return torch.tensor([0.2, -0.4, 1.0], dtype=F64), torch.tensor([1.5, 0.7, 2.0], dtype=F64)


def _feed(est: ExactEstimator, batches: list[Tensor]) -> ExactEstimator:
    for b in batches:
        est.update(ChannelMoments.of(b), b.shape[0])
    return est


def _population(batches: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.concatenate([np.moveaxis(b.numpy(), 1, -1).reshape(-1, 3) for b in batches])
    return flat.mean(axis=0), flat.var(axis=0, ddof=1)


def test_exact_is_population_unbiased() -> None:
    batches = _batches()
    est = _feed(ExactEstimator(3), batches)
    mean, var = est.finalize()
    ref_mean, ref_var = _population(batches)
    np.testing.assert_allclose(mean.numpy(), ref_mean, **TIGHT)
    np.testing.assert_allclose(var.numpy(), ref_var, **TIGHT)
    assert est.num_items == sum(SIZES)
    assert float(est.moments.count) == sum(SIZES) * 5


def test_exact_set_moments_replaces_state() -> None:
    est = _feed(ExactEstimator(3), _batches(1))
    other = _batches(2)
    merged = ChannelMoments.merge_all([ChannelMoments.of(b) for b in other])
    est.set_moments(merged, 99)
    assert est.num_items == 99
    np.testing.assert_allclose(est.finalize()[1].numpy(), _population(other)[1], **TIGHT)


def test_ema_with_momentum_is_bn_update_loop() -> None:
    """stat <- (1 - m) stat + m batch_stat, from the source, with the unbiased batch var."""
    batches = _batches()
    src_mean, src_var = _source()
    est = _feed(EmaEstimator(src_mean, src_var, 0.1), batches)
    mean, var = src_mean.numpy().copy(), src_var.numpy().copy()
    for b in batches:
        flat = np.moveaxis(b.numpy(), 1, -1).reshape(-1, 3)
        mean = 0.9 * mean + 0.1 * flat.mean(axis=0)
        var = 0.9 * var + 0.1 * flat.var(axis=0, ddof=1)
    got_mean, got_var = est.finalize()
    np.testing.assert_allclose(got_mean.numpy(), mean, **TIGHT)
    np.testing.assert_allclose(got_var.numpy(), var, **TIGHT)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, None])
def test_ema_equals_torch_batchnorm_running_stats(momentum: float | None) -> None:
    batches = _batches(3)
    src_mean, src_var = _source()
    bn = nn.BatchNorm1d(3, momentum=momentum, dtype=F64).train()
    if momentum is None:
        bn.reset_running_stats()  # the cumulative average starts from nothing (update_bn)
    else:
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(src_mean)
        bn.running_var.copy_(src_var)
    with torch.no_grad():
        for b in batches:
            bn(b)
    mean, var = _feed(EmaEstimator(src_mean, src_var, momentum), batches).finalize()
    torch.testing.assert_close(mean, bn.running_mean, **TIGHT)
    torch.testing.assert_close(var, bn.running_var, **TIGHT)


def test_ema_cumulative_is_unweighted_average_of_batches() -> None:
    """momentum=None: every batch counts once, whatever its size (update_bn's estimate)."""
    batches = _batches(4)
    mean, var = _feed(EmaEstimator(*_source(), None), batches).finalize()
    flats = [np.moveaxis(b.numpy(), 1, -1).reshape(-1, 3) for b in batches]
    np.testing.assert_allclose(mean.numpy(), np.mean([f.mean(0) for f in flats], 0), **TIGHT)
    np.testing.assert_allclose(var.numpy(), np.mean([f.var(0, ddof=1) for f in flats], 0), **TIGHT)
    # ...which is not the population statistic when batches differ in size
    assert not np.allclose(var.numpy(), _population(batches)[1], rtol=1e-3)


def test_ema_tracks_exact_moments_too() -> None:
    batches = _batches(5)
    est = _feed(EmaEstimator(*_source(), 0.1), batches)
    np.testing.assert_allclose(
        est.moments.var(unbiased=True).numpy(), _population(batches)[1], **TIGHT
    )


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_ema_rejects_bad_momentum(momentum: float) -> None:
    with pytest.raises(ValueError, match=r"expected momentum in \(0, 1\]"):
        EmaEstimator(*_source(), momentum)


@pytest.mark.parametrize("strength", [0.0, 7.0, 50.0, 1e4])
def test_prior_mix_uses_items_along_batch_axis(strength: float) -> None:
    batches = _batches(6)
    src_mean, src_var = _source()
    mean, var = _feed(PriorEstimator(src_mean, src_var, strength), batches).finalize()
    n = float(sum(SIZES))  # items, not items * spatial positions (that would be 5x more)
    w = strength / (strength + n)
    tgt_mean, tgt_var = _population(batches)
    np.testing.assert_allclose(mean.numpy(), w * src_mean.numpy() + (1 - w) * tgt_mean, **TIGHT)
    np.testing.assert_allclose(var.numpy(), w * src_var.numpy() + (1 - w) * tgt_var, **TIGHT)


def test_prior_zero_is_exact_and_huge_is_source() -> None:
    batches = _batches(7)
    src_mean, src_var = _source()
    exact = _feed(ExactEstimator(3), batches).finalize()
    zero = _feed(PriorEstimator(src_mean, src_var, 0.0), batches).finalize()
    huge = _feed(PriorEstimator(src_mean, src_var, 1e12), batches).finalize()
    for a, b in zip(zero, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(huge[0], src_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(huge[1], src_var, rtol=1e-9, atol=1e-9)


def test_prior_without_data_is_source() -> None:
    src_mean, src_var = _source()
    mean, var = PriorEstimator(src_mean, src_var, 0.0).finalize()
    torch.testing.assert_close(mean, src_mean)
    torch.testing.assert_close(var, src_var)


def test_prior_rejects_negative_strength() -> None:
    with pytest.raises(ValueError, match="expected prior_strength >= 0"):
        PriorEstimator(*_source(), -1.0)


def test_make_estimator_dispatch_and_errors() -> None:
    src_mean, src_var = _source()
    kw: dict[str, Any] = {"source_mean": src_mean, "source_var": src_var}
    assert type(make_estimator("exact", **kw)) is ExactEstimator
    assert type(make_estimator("ema", **kw)) is EmaEstimator
    assert type(make_estimator("prior", prior_strength=3.0, **kw)) is PriorEstimator
    with pytest.raises(ValueError, match="needs prior_strength"):
        make_estimator("prior", **kw)
    with pytest.raises(ValueError, match="expected method in"):
        make_estimator("median", **kw)
