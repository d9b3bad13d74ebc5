"""Tests of recalib.moments: ChannelMoments against NumPy float64 references."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recalib.moments import ChannelMoments, reduce_dims

TIGHT: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-10}
HYPO = settings(max_examples=40, deadline=None, database=None)


def _numpy_moments(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """count, mean and m2 per channel (axis 1) in float64."""
    flat = np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, x.shape[1])
    mean = flat.mean(axis=0)
    return float(flat.shape[0]), mean, ((flat - mean) ** 2).sum(axis=0)


def _data(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 10.0, size=(1, shape[1]) + (1,) * (len(shape) - 2))
    return rng.normal(0.0, 3.0, size=shape) + offsets


def _close(m: ChannelMoments, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
    assert m.count.dtype == m.mean.dtype == m.m2.dtype == torch.float64
    assert float(m.count) == count
    np.testing.assert_allclose(m.mean.numpy(), mean, **TIGHT)
    np.testing.assert_allclose(m.m2.numpy(), m2, **TIGHT)


@pytest.mark.parametrize("shape", [(7, 3), (5, 4, 6), (3, 2, 4, 5), (2, 3, 2, 3, 4)])
def test_of_matches_numpy_float64(shape: tuple[int, ...]) -> None:
    x = _data(0, shape)
    _close(ChannelMoments.of(torch.from_numpy(x)), *_numpy_moments(x))


def test_of_float32_is_reduced_to_float64_moments() -> None:
    x = _data(1, (16, 3, 5, 5)).astype(np.float32)
    m = ChannelMoments.of(torch.from_numpy(x))
    count, mean, m2 = _numpy_moments(x)
    assert float(m.count) == count
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.m2.numpy(), m2, rtol=1e-5)


def test_of_upcasts_half_precision() -> None:
    x = torch.from_numpy(_data(2, (8, 3, 4)).astype(np.float16))
    m = ChannelMoments.of(x)
    _, mean, m2 = _numpy_moments(x.float().numpy())
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.m2.numpy(), m2, rtol=1e-5)


def test_of_channel_dim_last() -> None:
    x = _data(3, (6, 5, 4))
    m = ChannelMoments.of(torch.from_numpy(x), channel_dim=2)
    _close(m, *_numpy_moments(np.moveaxis(x, 2, 1)))


def test_of_rejects_1d_input() -> None:
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        ChannelMoments.of(torch.zeros(5))


def test_reduce_dims() -> None:
    assert reduce_dims(2) == (0,)
    assert reduce_dims(4) == (0, 2, 3)
    assert reduce_dims(3, channel_dim=2) == (0, 1)


@HYPO
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 40),
    cuts=st.lists(st.integers(1, 39), max_size=6),
    shuffle=st.booleans(),
)
def test_merge_of_any_split_is_exact(seed: int, n: int, cuts: list[int], shuffle: bool) -> None:
    x = _data(seed, (n, 3, 2))
    points = sorted({c for c in cuts if c < n})
    parts = [ChannelMoments.of(torch.from_numpy(p)) for p in np.split(x, points)]
    if shuffle:
        parts = parts[::-1]
    _close(ChannelMoments.merge_all(parts), *_numpy_moments(x))


@HYPO
@given(seed=st.integers(0, 2**16), sizes=st.tuples(*[st.integers(1, 12)] * 3))
def test_merge_is_associative_and_commutative(seed: int, sizes: tuple[int, int, int]) -> None:
    a, b, c = (
        ChannelMoments.of(torch.from_numpy(_data(seed + i, (k, 4)))) for i, k in enumerate(sizes)
    )
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    swapped = c.merge(a).merge(b)
    for other in (right, swapped):
        assert float(other.count) == float(left.count)
        np.testing.assert_allclose(other.mean.numpy(), left.mean.numpy(), **TIGHT)
        np.testing.assert_allclose(other.m2.numpy(), left.m2.numpy(), **TIGHT)


def test_merge_with_empty_is_identity() -> None:
    m = ChannelMoments.of(torch.from_numpy(_data(4, (9, 3))))
    for merged in (m.merge(ChannelMoments.empty(3)), ChannelMoments.empty(3).merge(m)):
        _close(merged, float(m.count), m.mean.numpy(), m.m2.numpy())
    both_empty = ChannelMoments.empty(3).merge(ChannelMoments.empty(3))
    assert float(both_empty.count) == 0.0
    assert torch.equal(both_empty.mean, torch.zeros(3, dtype=torch.float64))


def test_merge_all_rejects_empty_sequence() -> None:
    with pytest.raises(ValueError, match="expected at least one"):
        ChannelMoments.merge_all([])


def test_var_population_and_unbiased() -> None:
    x = _data(5, (11, 3, 3))
    m = ChannelMoments.of(torch.from_numpy(x))
    flat = np.moveaxis(x, 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(m.var().numpy(), flat.var(axis=0, ddof=0), **TIGHT)
    np.testing.assert_allclose(m.var(unbiased=True).numpy(), flat.var(axis=0, ddof=1), **TIGHT)


def test_var_of_single_sample_is_zero_not_nan() -> None:
    m = ChannelMoments.of(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert torch.equal(m.var(unbiased=True), torch.zeros(2, dtype=torch.float64))


def test_from_sums_matches_numpy() -> None:
    x = _data(6, (13, 4))
    t = torch.from_numpy(x)
    m = ChannelMoments.from_sums(torch.tensor(13.0), t.sum(0), (t * t).sum(0))
    count, mean, m2 = _numpy_moments(x)
    assert float(m.count) == count
    np.testing.assert_allclose(m.mean.numpy(), mean, **TIGHT)
    # sum-of-squares cancels catastrophically for offsets >> spread: a looser tolerance
    np.testing.assert_allclose(m.m2.numpy(), m2, rtol=1e-8)


def test_from_sums_of_nothing_is_empty_and_m2_never_negative() -> None:
    empty = ChannelMoments.from_sums(torch.tensor(0.0), torch.zeros(2), torch.zeros(2))
    assert float(empty.count) == 0.0
    assert torch.equal(empty.mean, torch.zeros(2, dtype=torch.float64))
    # three copies of v: the rounded sum of squares falls below mean * sum (by 5.7e-14)
    total, total_sq = 28.412428893877266, 269.0887052165439
    assert total_sq - (total / 3) * total < 0.0
    f64 = torch.float64
    const = ChannelMoments.from_sums(
        torch.tensor(3.0), torch.tensor([total], dtype=f64), torch.tensor([total_sq], dtype=f64)
    )
    assert bool((const.m2 >= 0).all())


def test_from_var_mean() -> None:
    m = ChannelMoments.from_var_mean(torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0]), 10)
    assert float(m.count) == 10.0
    assert torch.equal(m.m2, torch.tensor([20.0, 5.0], dtype=torch.float64))


def test_pack_unpack_roundtrip_and_independence() -> None:
    m = ChannelMoments.of(torch.from_numpy(_data(7, (6, 5, 2))))
    packed = m.pack()
    assert packed.shape == (1 + 2 * 5,)
    assert packed.dtype == torch.float64
    back = ChannelMoments.unpack(packed)
    assert torch.equal(back.count, m.count)
    assert torch.equal(back.mean, m.mean)
    assert torch.equal(back.m2, m.m2)
    packed.fill_(0.0)
    assert torch.equal(back.mean, m.mean), "unpack must copy, not view"


def test_num_channels_and_to() -> None:
    m = ChannelMoments.empty(7, device="cpu")
    assert m.num_channels == 7
    moved = m.to("cpu")
    assert moved.mean.device.type == "cpu"
