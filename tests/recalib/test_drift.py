"""Tests of recalib.drift: divergences, mergeable windows, rolling windows, model scores."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recalib.drift import (
    LayerDrift,
    MomentWindow,
    RollingWindow,
    layer_drift,
    log_variance_ratio,
    score_model,
    standardized_mean_shift,
    symmetric_kl,
)

FAST = settings(max_examples=30, derandomize=True, deadline=None)

means = st.floats(-50.0, 50.0, allow_nan=False)
variances = st.floats(1e-3, 1e3, allow_nan=False)
channels = st.lists(st.tuples(means, variances, means, variances), min_size=1, max_size=6)


def _columns(rows: list[tuple[float, float, float, float]]) -> list[np.ndarray]:
    return [np.array(col) for col in zip(*rows, strict=True)]


def _gaussian_kl(
    mu_p: np.ndarray, v_p: np.ndarray, mu_q: np.ndarray, v_q: np.ndarray
) -> np.ndarray:
    """KL(N(mu_p, v_p) || N(mu_q, v_q)), the textbook form."""
    kl: np.ndarray = 0.5 * (np.log(v_q / v_p) + (v_p + (mu_p - mu_q) ** 2) / v_q - 1.0)
    return kl


# ---------------------------------------------------------------- divergences


def test_symmetric_kl_matches_sum_of_directed_kls() -> None:
    rng = np.random.default_rng(0)
    mu_l, mu_r = rng.normal(size=8), rng.normal(size=8)
    v_l, v_r = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    eps = 1e-5
    expected = _gaussian_kl(mu_l, v_l + eps, mu_r, v_r + eps) + _gaussian_kl(
        mu_r, v_r + eps, mu_l, v_l + eps
    )
    np.testing.assert_allclose(symmetric_kl(mu_l, v_l, mu_r, v_r, eps), expected, rtol=1e-12)


def test_symmetric_kl_known_value() -> None:
    # Unit variances, means one apart: 1/2 * 1 * (1 + 1) = 1 (up to eps).
    kl = symmetric_kl([1.0], [1.0], [0.0], [1.0], eps=1e-12)
    np.testing.assert_allclose(kl, [1.0], rtol=1e-11)


@FAST
@given(channels)
def test_symmetric_kl_is_zero_for_identical_statistics(
    rows: list[tuple[float, float, float, float]],
) -> None:
    mu, var, _, _ = _columns(rows)
    assert np.all(symmetric_kl(mu, var, mu, var) == 0.0)


@FAST
@given(channels)
def test_symmetric_kl_is_symmetric_and_non_negative(
    rows: list[tuple[float, float, float, float]],
) -> None:
    mu_l, v_l, mu_r, v_r = _columns(rows)
    forward = symmetric_kl(mu_l, v_l, mu_r, v_r)
    np.testing.assert_array_equal(forward, symmetric_kl(mu_r, v_r, mu_l, v_l))
    assert np.all(forward >= 0.0)


@FAST
@given(means, variances, variances, st.floats(0.01, 10.0), st.floats(1.01, 5.0))
def test_symmetric_kl_grows_with_mean_shift(
    mu: float, v_l: float, v_r: float, shift: float, factor: float
) -> None:
    small = symmetric_kl([mu + shift], [v_l], [mu], [v_r])
    large = symmetric_kl([mu + shift * factor], [v_l], [mu], [v_r])
    assert large[0] > small[0]


def test_zero_variance_is_guarded_by_eps() -> None:
    kl = symmetric_kl([0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], eps=1e-5)
    assert np.all(np.isfinite(kl))
    # Both variances zero: only the mean term remains, divided by eps.
    np.testing.assert_allclose(kl[1], 0.5 * 1.0 * (2.0 / 1e-5))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0.0], [-1.0], [0.0], [1.0]), "var_live >= 0"),
        (([0.0, 1.0], [1.0, 1.0, 1.0], [0.0], [1.0]), "broadcastable"),
        (([np.nan], [1.0], [0.0], [1.0]), "finite"),
    ],
)
def test_symmetric_kl_rejects_bad_moments(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        symmetric_kl(*args)


def test_symmetric_kl_rejects_non_positive_eps() -> None:
    with pytest.raises(ValueError, match="eps > 0"):
        symmetric_kl([0.0], [1.0], [0.0], [1.0], eps=0.0)


def test_standardized_shift_and_log_ratio() -> None:
    shift = standardized_mean_shift([3.0, -1.0], [1.0, 0.0], [4.0, 1.0], eps=1e-12)
    np.testing.assert_allclose(shift, [1.0, -1.0], rtol=1e-10)
    ratio = log_variance_ratio([4.0, 1.0], [1.0, 4.0], eps=1e-12)
    np.testing.assert_allclose(ratio, [np.log(4.0), -np.log(4.0)], rtol=1e-10)


# ---------------------------------------------------------------- MomentWindow


def test_from_samples_matches_numpy() -> None:
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(5, 4, 3, 3))
    w = MomentWindow.from_samples(x)
    assert float(w.count) == 5 * 3 * 3
    np.testing.assert_allclose(w.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(w.var, x.var(axis=(0, 2, 3)), rtol=1e-12)


def test_from_samples_channel_axis() -> None:
    x = np.random.default_rng(2).normal(size=(6, 7, 3))
    w = MomentWindow.from_samples(x, channel_axis=-1)
    np.testing.assert_allclose(w.var, x.var(axis=(0, 1)), rtol=1e-12)


@FAST
@given(
    st.integers(2, 40),
    st.lists(st.integers(1, 39), max_size=5),
    st.integers(0, 2**31 - 1),
)
def test_merge_is_invariant_to_batch_split(n: int, cuts: list[int], seed: int) -> None:
    x = np.random.default_rng(seed).normal(5.0, 0.5, size=(n, 3, 4))
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    merged = MomentWindow.empty(3)
    for part in parts:
        merged = merged.merge(MomentWindow.from_samples(part))
    whole = MomentWindow.from_samples(x)
    assert float(merged.count) == float(whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10)


def test_merge_all_equals_pairwise_merges() -> None:
    rng = np.random.default_rng(8)
    parts = [MomentWindow.from_samples(rng.normal(i, 1.0 + i, size=(3 + i, 4))) for i in range(5)]
    parts.append(MomentWindow.empty(4))
    folded = parts[0]
    for part in parts[1:]:
        folded = folded.merge(part)
    merged = MomentWindow.merge_all(parts)
    assert merged.count.shape == ()
    assert float(merged.count) == float(folded.count)
    np.testing.assert_allclose(merged.mean, folded.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.m2, folded.m2, rtol=1e-12)
    per_channel = MomentWindow(np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), np.zeros(4))
    assert MomentWindow.merge_all([parts[0], per_channel]).count.shape == (4,)
    with pytest.raises(ValueError, match="at least one"):
        MomentWindow.merge_all([])


def test_add_with_shift_equals_from_samples() -> None:
    x = np.random.default_rng(3).normal(10.0, 2.0, size=(8, 3, 5))
    shift = np.array([9.0, 10.0, 11.0])
    d = x - shift[None, :, None]
    w = MomentWindow.empty(3)
    w.add(x.shape[0] * x.shape[2], d.sum(axis=(0, 2)), (d**2).sum(axis=(0, 2)), shift=shift)
    ref = MomentWindow.from_samples(x)
    np.testing.assert_allclose(w.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(w.var, ref.var, rtol=1e-10)


def test_shifted_float32_sums_avoid_cancellation() -> None:
    # Mean 1e3, std 1e-1: float32 sum/sumsq around 0 keep no correct digit of the variance;
    # around the (stored running) mean they keep almost all of them.
    x = np.random.default_rng(4).normal(1000.0, 0.1, size=(4096, 1))
    ref = MomentWindow.from_samples(x)
    x32 = x.astype(np.float32)

    def window(shift: float) -> MomentWindow:
        d = x32 - np.float32(shift)
        return MomentWindow.from_sums(len(x), d.sum(0), (d * d).sum(0), shift=shift)

    shifted_err = abs(window(1000.0).var[0] / ref.var[0] - 1.0)
    plain_err = abs(window(0.0).var[0] / ref.var[0] - 1.0)
    assert shifted_err < 1e-4
    assert plain_err > 1e-2  # the caveat is real, so the test above is meaningful


def test_per_channel_counts_and_empty_channels() -> None:
    a = MomentWindow(np.array([2.0, 0.0]), np.array([1.0, 0.0]), np.array([2.0, 0.0]))
    b = MomentWindow(np.array([2.0, 4.0]), np.array([3.0, 5.0]), np.array([2.0, 4.0]))
    assert a.is_empty
    m = a.merge(b)
    assert not m.is_empty
    np.testing.assert_array_equal(m.count, [4.0, 4.0])
    np.testing.assert_allclose(m.mean, [2.0, 5.0])
    # Channel 0: m2 = 2 + 2 + (3 - 1)^2 * 2 * 2 / 4 = 8; channel 1 is b's alone.
    np.testing.assert_allclose(m.m2, [8.0, 4.0])


def test_empty_window_is_merge_identity() -> None:
    w = MomentWindow.from_samples(np.random.default_rng(5).normal(size=(4, 2)))
    for merged in (MomentWindow.empty(2).merge(w), w.merge(MomentWindow.empty(2))):
        np.testing.assert_array_equal(merged.mean, w.mean)
        np.testing.assert_array_equal(merged.m2, w.m2)


def test_window_validation() -> None:
    with pytest.raises(ValueError, match="2 channels"):
        MomentWindow.empty(2).merge(MomentWindow.empty(3))
    with pytest.raises(ValueError, match="count of shape"):
        MomentWindow.from_sums(np.ones(3), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="sumsq >= 0"):
        MomentWindow.from_sums(4.0, np.zeros(2), -np.ones(2))
    with pytest.raises(ValueError, match="at least 2D"):
        MomentWindow.from_samples(np.zeros(3))


# ---------------------------------------------------------------- RollingWindow


def _batch(seed: int, loc: float = 0.0) -> MomentWindow:
    return MomentWindow.from_samples(np.random.default_rng(seed).normal(loc, 1.0, size=(4, 2)))


def test_rolling_window_drops_old_buckets_by_age() -> None:
    rw = RollingWindow(max_age=10.0, bucket_seconds=1.0)
    rw.add({"bn": _batch(0)}, now=0.5, samples=4)
    rw.add({"bn": _batch(1)}, now=5.2, samples=4)
    rw.add({"bn": _batch(2)}, now=5.7, samples=4)  # same bucket as 5.2
    assert len(rw) == 2
    assert rw.samples(now=6.0) == 12
    assert rw.bounds(now=6.0) == (0.5, 5.7)
    # At 11.0 the first bucket (newest sample 0.5) is 10.5 s old: gone.
    assert rw.samples(now=11.0) == 8
    expected = _batch(1).merge(_batch(2))
    total = rw.total(now=11.0)["bn"]
    np.testing.assert_allclose(total.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(total.m2, expected.m2, rtol=1e-12)
    assert rw.bounds(now=100.0) is None
    assert rw.total(now=100.0) == {}


def test_rolling_window_keeps_at_least_max_samples() -> None:
    rw = RollingWindow(max_samples=8, bucket_seconds=1.0)
    for t in range(5):
        rw.add({"bn": _batch(t)}, now=float(t), samples=4)
    assert rw.samples(now=5.0) == 8
    assert rw.bounds(now=5.0) == (3.0, 4.0)


def test_rolling_window_counts_late_timestamps_in_newest_bucket() -> None:
    rw = RollingWindow(max_age=60.0)
    rw.add({"bn": _batch(0)}, now=10.0, samples=1)
    rw.add({"bn": _batch(1)}, now=9.0, samples=1)
    assert len(rw) == 1
    assert rw.bounds(now=10.0) == (10.0, 10.0)


def test_rolling_window_layers_share_buckets_and_reset() -> None:
    rw = RollingWindow(max_age=60.0)
    rw.add({"a": _batch(0), "b": _batch(1, loc=3.0)}, now=1.0, samples=4)
    total = rw.total(now=2.0)
    assert set(total) == {"a", "b"}
    rw.reset()
    assert rw.samples(now=2.0) == 0
    assert len(rw) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_age": 0.0}, {"max_samples": 0}, {"max_age": 1.0, "bucket_seconds": 0.0}],
)
def test_rolling_window_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="expected"):
        RollingWindow(**kwargs)


def test_rolling_window_rejects_bad_add() -> None:
    rw = RollingWindow(max_age=1.0)
    with pytest.raises(ValueError, match="samples >= 1"):
        rw.add({}, now=0.0, samples=0)
    with pytest.raises(ValueError, match="finite timestamp"):
        rw.add({}, now=float("nan"), samples=1)


# ---------------------------------------------------------------- scores


def test_score_model_finds_the_drifted_layer() -> None:
    rng = np.random.default_rng(6)
    ref = {"a": (np.zeros(3), np.ones(3)), "b": (np.zeros(3), np.ones(3))}
    windows = {
        "a": MomentWindow.from_samples(rng.normal(0.0, 1.0, size=(4000, 3))),
        "b": MomentWindow.from_samples(rng.normal(1.0, 2.0, size=(4000, 3))),
    }
    drift = score_model(windows, ref)
    assert drift.worst_layer == "b"
    layer_a, layer_b = drift.layers
    assert layer_a.symmetric_kl < 0.01 < layer_b.symmetric_kl
    np.testing.assert_allclose(layer_b.mean_abs_shift, 1.0, rtol=0.1)
    np.testing.assert_allclose(layer_b.mean_abs_log_var_ratio, np.log(4.0), rtol=0.1)
    assert drift.max_score == layer_b.symmetric_kl
    np.testing.assert_allclose(drift.score, (layer_a.symmetric_kl + layer_b.symmetric_kl) / 2)
    payload = json.loads(json.dumps(drift.to_dict()))
    assert payload["worst_layer"] == "b"
    assert [layer["name"] for layer in payload["layers"]] == ["a", "b"]


def test_score_is_zero_when_live_equals_reference() -> None:
    w = MomentWindow.from_samples(np.random.default_rng(7).normal(size=(50, 4)))
    drift = score_model({"bn": w}, {"bn": (w.mean, w.var)})
    assert drift.score == 0.0
    assert drift.layers[0] == LayerDrift("bn", 4, 50.0, 0.0, 0.0, 0.0, 0.0)


def test_score_model_validation() -> None:
    w = MomentWindow.from_samples(np.ones((3, 2)))
    with pytest.raises(ValueError, match="at least one layer"):
        score_model({}, {})
    with pytest.raises(ValueError, match="missing"):
        score_model({"bn": w}, {})
    with pytest.raises(ValueError, match="samples in the live window"):
        layer_drift("bn", MomentWindow.empty(2), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="reference statistics of shape"):
        layer_drift("bn", w, np.zeros(3), np.ones(3))
