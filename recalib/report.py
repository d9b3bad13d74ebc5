"""The JSON-serialisable report of one recalibration.

Per layer it compares the old (source) and new running statistics, channel by channel, and
summarises the comparison by averages over channels:

* standardized mean shift ``|mu_new - mu_old| / sqrt(var_old + eps)``,
* log variance ratio ``|log((var_new + eps) / (var_old + eps))|``,
* symmetric KL divergence between ``N(mu_old, var_old)`` and ``N(mu_new, var_new)``
  (the same measure the drift monitor uses, :mod:`recalib.drift`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from .drift import log_variance_ratio, standardized_mean_shift, symmetric_kl

__all__ = ["LayerReport", "RecalibrationReport", "compare_stats"]


@dataclass
class LayerReport:
    """What recalibration did to one layer (averages over channels)."""

    name: str
    kind: str
    channels: int
    samples: int
    items: int
    old_mean: float
    new_mean: float
    old_var: float
    new_var: float
    mean_shift: float
    log_var_ratio: float
    sym_kl: float
    max_sym_kl: float
    degenerate_channels: int = 0


@dataclass
class RecalibrationReport:
    """The outcome of :func:`recalib.recalibrate`.

    ``plan`` is set by :func:`recalib.adapt` / :func:`recalib.adapt_onnx`: every candidate
    plan, its scores and the chosen one (:class:`recalib.plans.PlanReport` as a dict).

    ``residual`` is the eval-consistency residual: the largest relative difference between
    the statistics stored at the end and those the model reproduces in eval mode on the
    calibration data (``mode="eval"`` only; ``None`` otherwise).
    """

    method: str
    mode: str
    layers: list[LayerReport]
    skipped: list[dict[str, str]] = field(default_factory=list)
    passes: int = 1
    converged: bool = True
    residual: float | None = None
    samples: int = 0
    batches: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None

    @property
    def mean_sym_kl(self) -> float:
        return float(np.mean([lay.sym_kl for lay in self.layers])) if self.layers else 0.0

    @property
    def max_sym_kl(self) -> float:
        return max((lay.sym_kl for lay in self.layers), default=0.0)

    def layer(self, name: str) -> LayerReport:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"no layer {name!r} in the report")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = {
            "layers": len(self.layers),
            "mean_sym_kl": self.mean_sym_kl,
            "max_sym_kl": self.max_sym_kl,
        }
        out: dict[str, Any] = _finite(d)
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecalibrationReport:
        d = {k: v for k, v in d.items() if k != "totals"}
        d["layers"] = [LayerReport(**lay) for lay in d.get("layers", [])]
        return cls(**d)


def _finite(obj: Any) -> Any:
    """Replace NaN/Inf by None so the report is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def compare_stats(
    old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], eps: float
) -> dict[str, float]:
    """Channel-averaged shift measures between old and new ``(mean, var)``."""
    om, ov = (t.detach().cpu().double().numpy() for t in old)
    nm, nv = (t.detach().cpu().double().numpy() for t in new)
    kl = symmetric_kl(nm, nv, om, ov, eps=eps)
    return {
        "old_mean": float(om.mean()),
        "new_mean": float(nm.mean()),
        "old_var": float(ov.mean()),
        "new_var": float(nv.mean()),
        "mean_shift": float(np.abs(standardized_mean_shift(nm, om, ov, eps=eps)).mean()),
        "log_var_ratio": float(np.abs(log_variance_ratio(nv, ov, eps=eps)).mean()),
        "sym_kl": float(kl.mean()),
        "max_sym_kl": float(kl.max()),
    }
