"""Tests of recalib.recalibrate on bad input: a clear error, and the model left untouched.

Every failing call is followed by a bit-identity check of the whole state dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from recalib.errors import (
    DataError,
    LayerMismatchError,
    NoBatchNormError,
    NonFiniteError,
    RecalibError,
)
from recalib.recalibrate import recalibrate


def _poisoned(x: Tensor, batch: int, value: float) -> list[Tensor]:
    batches = [b.clone() for b in torch.split(x, 10)]
    batches[batch][1, 2, 3, 4] = value
    return batches


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_non_finite_input_names_batch_and_layer(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any, value: float, mode: str
) -> None:
    before = state_of(cnn)
    with pytest.raises(NonFiniteError, match=r"in the input of layer 'bn1' at batch 3") as info:
        recalibrate(cnn, _poisoned(images, 3, value), mode=mode)
    assert info.value.batch == 3
    assert info.value.layer == "bn1"
    assert isinstance(info.value, DataError)
    assert_unchanged(cnn, before)


def test_non_finite_inside_the_model_names_the_deeper_layer(
    cnn: Any, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    with torch.no_grad():
        cnn.fc.weight[0, 0] = float("inf")  # bn1 and bn2 see finite inputs, bn3 does not
    before = state_of(cnn)
    with pytest.raises(NonFiniteError, match="layer 'bn3' at batch 0"):
        recalibrate(cnn, images)
    assert_unchanged(cnn, before)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "at least one batch"),
        (torch.zeros(0, 3, 8, 8), "at least one batch"),
        (np.zeros((0, 3, 8, 8), dtype=np.float32), "at least one batch"),
        ([torch.zeros(0, 3, 8, 8)], r"non-empty batch at batch 0 \(got 0 items\)"),
        ([()], "non-empty tuple/list batch"),
        (torch.tensor(1.0), "batch axis"),
        ({"x": torch.zeros(2, 3, 8, 8)}, "wrap it in a list"),
        (5, "expected a tensor, array or iterable"),
        (np.array([[1, "a"]], dtype=object), "numeric array"),
        ([torch.tensor(1.0)], "batched input tensor at batch 0"),
    ],
    ids=[
        "empty list",
        "empty tensor",
        "empty array",
        "empty batch",
        "empty tuple",
        "scalar",
        "bare dict",
        "int",
        "object array",
        "scalar batch",
    ],
)
def test_unusable_data_raises_data_error(
    cnn: nn.Module, state_of: Any, assert_unchanged: Any, data: Any, match: str
) -> None:
    before = state_of(cnn)
    with pytest.raises(DataError, match=match):
        recalibrate(cnn, data)
    assert_unchanged(cnn, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_float_input_raises(
    cnn: nn.Module, state_of: Any, assert_unchanged: Any, dtype: torch.dtype
) -> None:
    before = state_of(cnn)
    with pytest.raises(
        DataError, match=rf"expected a floating-point input at batch 0 \(got {dtype}\)"
    ):
        recalibrate(cnn, torch.ones(4, 3, 8, 8, dtype=dtype))
    assert_unchanged(cnn, before)


def test_wrong_channels_into_conv_raises_data_error(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    before = state_of(cnn)
    with pytest.raises(DataError, match=r"forward failed on batch 0: .*expected input.*3 channels"):
        recalibrate(cnn, images[:, :2])
    assert_unchanged(cnn, before)


def test_wrong_channels_into_bn_raises_layer_mismatch(
    make_mlp: Any, state_of: Any, assert_unchanged: Any
) -> None:
    model = make_mlp(0, bn_first=True)
    before = state_of(model)
    with pytest.raises(
        LayerMismatchError, match=r"layer '0' expected input \(N, 4, \*\).*got shape \(8, 5\)"
    ):
        recalibrate(model, torch.randn(8, 5))
    assert_unchanged(model, before)


def test_wrong_rank_into_bn_raises_data_error(
    make_mlp: Any, state_of: Any, assert_unchanged: Any
) -> None:
    model = make_mlp(0, bn_first=True)
    before = state_of(model)
    with pytest.raises(DataError, match=r"expected 2D or 3D input \(got 4D input\)"):
        recalibrate(model, torch.randn(8, 4, 2, 2))
    assert_unchanged(model, before)


def test_failure_in_a_later_batch_leaves_the_model_untouched(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    batches: list[Any] = list(torch.split(images, 10))
    batches[4] = batches[4][:, :2]
    before = state_of(cnn)
    with pytest.raises(DataError, match="batch 4"):
        recalibrate(cnn, batches, mode="eval")
    assert_unchanged(cnn, before)


def test_model_without_batchnorm_raises(images: Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4))
    with pytest.raises(
        NoBatchNormError, match=r"expected a model with BatchNorm.*got Sequential with none\)"
    ):
        recalibrate(model, images)


def test_model_with_only_untracked_batchnorm_raises(images: Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(NoBatchNormError, match=r"1 without running statistics"):
        recalibrate(model, images)


def test_not_a_model_raises(images: Tensor) -> None:
    with pytest.raises(
        RecalibError, match=r"expected an nn.Module or torch.export.ExportedProgram \(got dict\)"
    ):
        recalibrate({"bn": nn.BatchNorm2d(3)}, images)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "median"}, r"expected method in \('exact', 'ema', 'prior'\) \(got 'median'\)"),
        ({"mode": "inference"}, r"expected mode in \('train', 'eval'\) \(got 'inference'\)"),
        ({"max_passes": 0}, r"expected max_passes >= 1 \(got 0\)"),
        ({"tol": -1.0}, r"expected tol >= 0 \(got -1.0\)"),
        ({"tol": float("nan")}, r"expected tol >= 0 \(got nan\)"),
        ({"batch_size": 0}, r"expected batch_size >= 1 \(got 0\)"),
        ({"max_samples": 0}, r"expected max_samples >= 1 or None \(got 0\)"),
    ],
)
def test_bad_arguments_raise_value_error(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any, kwargs: Any, match: str
) -> None:
    before = state_of(cnn)
    with pytest.raises(ValueError, match=match):
        recalibrate(cnn, images, **kwargs)
    assert_unchanged(cnn, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "prior"}, "needs prior_strength"),
        ({"method": "prior", "prior_strength": -1.0}, "expected prior_strength >= 0"),
        ({"method": "ema", "momentum": 1.5}, r"expected momentum in \(0, 1\]"),
    ],
)
def test_bad_estimator_arguments_raise_value_error(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any, kwargs: Any, match: str
) -> None:
    before = state_of(cnn)
    with pytest.raises(ValueError, match=match):
        recalibrate(cnn, images, **kwargs)
    assert_unchanged(cnn, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "prior"},
        {"method": "prior", "prior_strength": -1.0},
        {"method": "ema", "momentum": 1.5},
    ],
)
def test_bad_estimator_arguments_are_not_blamed_on_the_data(cnn: nn.Module, kwargs: Any) -> None:
    read: list[int] = []

    def data() -> Iterator[Tensor]:
        read.append(1)
        yield torch.randn(4, 3, 8, 8)

    with pytest.raises(ValueError) as info:
        recalibrate(cnn, data(), **kwargs)
    assert not isinstance(info.value, DataError)
    assert "forward failed" not in str(info.value)
    assert not read, "arguments should be checked before the data is read"


def test_one_shot_generator_in_eval_mode_raises_and_restores(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    """mode='eval' makes several passes; a one-shot generator is refused before any work."""
    before = state_of(cnn)
    with pytest.raises(DataError, match="expected a re-iterable"):
        recalibrate(cnn, (b for b in torch.split(images, 10)), mode="eval")
    assert_unchanged(cnn, before)


def test_interrupt_during_a_later_pass_restores(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    calls = 0

    def forward(model: nn.Module, batch: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 7:  # second pass (5 batches each), batch index 1
            raise KeyboardInterrupt
        out: Tensor = model(batch)
        return out

    before = state_of(cnn)
    with pytest.raises(KeyboardInterrupt):
        recalibrate(cnn, list(torch.split(images, 10)), mode="eval", forward=forward)
    assert calls == 7
    assert_unchanged(cnn, before)


def test_forward_type_error_is_wrapped(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    before = state_of(cnn)
    with pytest.raises(DataError, match="forward failed on batch 0"):
        recalibrate(cnn, [{"image": images}])  # SmallCNN.forward takes no keyword 'image'
    assert_unchanged(cnn, before)


def test_lazy_layer_materialised_by_a_failed_call_has_fresh_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()).eval()
    good = torch.randn(8, 3, 6, 6) + 3
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")

    class SecondPassGoesBad:
        """Clean on the first pass (statistics get written), NaN on the second."""

        passes = 0

        def __iter__(self) -> Iterator[Tensor]:
            self.passes += 1
            return iter([good] if self.passes == 1 else [bad])

    with pytest.raises(DataError):
        recalibrate(model, SecondPassGoesBad(), mode="eval", init="source")
    bn = cast(nn.BatchNorm2d, model[1])
    assert bn.running_mean is not None and bn.running_var is not None
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
