"""One options type for every entry point: validated once, the same refusal everywhere."""

from __future__ import annotations

import dataclasses
import inspect
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

import recalib
from recalib.errors import OptionsError, RecalibError
from recalib.options import DEFAULTS, RecalibOptions


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "median"}, "expected method in ('exact', 'ema', 'prior') (got 'median')"),
        ({"mode": "test"}, "expected mode in ('train', 'eval') (got 'test')"),
        ({"tol": -1.0}, "expected tol >= 0 (got -1.0)"),
        ({"tol": float("nan")}, "expected tol >= 0 (got nan)"),
        ({"max_passes": 0}, "expected max_passes >= 1 (got 0)"),
        ({"max_passes": 2.5}, "expected max_passes >= 1 (got 2.5)"),
        ({"batch_size": 0}, "expected batch_size >= 1 (got 0)"),
        ({"max_samples": 0}, "expected max_samples >= 1 or None (got 0)"),
        ({"momentum": 1.5}, "expected momentum in (0, 1] or None (got 1.5)"),
        ({"method": "prior"}, "method='prior' needs prior_strength"),
        ({"prior_strength": -2.0}, "expected prior_strength >= 0 (got -2.0)"),
        ({"init": "zeros"}, "expected init in ('batch', 'source') (got 'zeros')"),
        ({"anchor": -1}, "expected anchor to be an int >= 0 or None (got -1)"),
        ({"allow_unconverged": "yes"}, "expected allow_unconverged True or False"),
    ],
)
def test_bad_options_are_refused_the_same_way_by_both_entry_points(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(OptionsError) as direct:
        RecalibOptions(**change)  # type: ignore[arg-type]
    assert message in str(direct.value) and isinstance(direct.value, RecalibError)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = cast(torch.Tensor, model[1].running_mean).clone()
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recalib.recalibrate(model, torch.randn(8, 3), **change)  # type: ignore[arg-type]
    torch.testing.assert_close(model[1].running_mean, before)
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recalib.recalibrate_onnx(b"not read before the options", np.zeros((8, 3)), **change)  # type: ignore[arg-type]


# Every option the CLI and the job request expose (init stays a Python-only knob).
_SHARED = tuple(f.name for f in dataclasses.fields(RecalibOptions) if f.name != "init")


def test_one_default_for_every_entry_point() -> None:
    assert DEFAULTS.mode == "train" and DEFAULTS.method == "exact"
    for fn in (recalib.recalibrate, recalib.recalibrate_onnx):
        params = inspect.signature(fn).parameters
        for field in dataclasses.fields(RecalibOptions):
            assert params[field.name].default == getattr(DEFAULTS, field.name), (fn, field)
    from service.jobs import RecalibrationRequest

    request = RecalibrationRequest(dataset="d")
    for name in _SHARED:
        assert getattr(request, name) == getattr(DEFAULTS, name), name
    from recalib.cli import _parser

    args = _parser().parse_args(["recalibrate", "--model", "m", "--data", "d", "--out", "o"])
    for name in _SHARED:
        assert getattr(args, name) == getattr(DEFAULTS, name), name
