"""Finding the normalization layers whose running statistics recalib re-estimates.

A layer qualifies when it is a :class:`torch.nn.modules.batchnorm._BatchNorm` (BatchNorm1d/2d/3d,
SyncBatchNorm, the lazy variants, recalib's BatchRenorm1d/2d/3d, and any user subclass) that
tracks running statistics. Layers that do not track them are reported and skipped, and so
is frozen BN (torchvision's ``FrozenBatchNorm2d``, detectron2's, timm's
``FrozenBatchNormAct2d``): no ``_BatchNorm``, its statistics are fixed on purpose and it
exports as a scale and shift, so neither an exported program nor ONNX could recalibrate it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer

from .errors import NoBatchNormError

__all__ = [
    "NormLayer",
    "find_norm_layers",
    "layer_signature",
    "norm_layers_of",
    "select_by_name",
]

T = TypeVar("T")


@dataclass(frozen=True)
class NormLayer:
    """One normalization layer found in a model.

    Args:
        name: the module's qualified name in the model (``"layer1.0.bn1"``).
        module: the layer itself.
    """

    name: str
    module: _BatchNorm

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def num_features(self) -> int:
        rm = self.module.running_mean
        if rm is None or isinstance(rm, UninitializedBuffer):
            return 0
        return int(rm.numel())


def _has_running_stats(m: _BatchNorm) -> bool:
    return bool(m.track_running_stats) and m.running_mean is not None


def _is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision's / detectron2's / timm's ``FrozenBatchNorm*``: BN statistics held as
    plain buffers of a module that is no ``_BatchNorm``."""
    buffers = m._buffers
    return (
        not isinstance(m, _BatchNorm)
        and type(m).__name__.startswith("FrozenBatchNorm")
        and isinstance(buffers.get("running_mean"), torch.Tensor)
        and isinstance(buffers.get("running_var"), torch.Tensor)
    )


def _frozen_reason(m: nn.Module) -> str:
    kind = type(m).__name__
    return (
        f"{kind}: frozen by design (fixed statistics; it exports as Mul/Add, not as "
        "BatchNormalization), so not recalibrated; to recalibrate it, replace it by "
        "nn.BatchNorm2d holding its weight, bias and statistics"
    )


def select_by_name(
    items: Sequence[T],
    patterns: str | Sequence[str] | None,
    names: Callable[[T], Sequence[str]],
    *,
    what: str,
) -> list[T]:
    """The ``items`` any of whose ``names`` equals or ``fnmatch``-es one of ``patterns``.

    Items keep their order; ``None`` selects everything. A pattern that matches nothing is
    an error listing the first name of every item.

    Raises:
        NoBatchNormError: a pattern matched no item.
    """
    if patterns is None:
        return list(items)
    chosen: set[int] = set()
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        hits = [
            i
            for i, item in enumerate(items)
            if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names(item))
        ]
        if not hits:
            listing = ", ".join(dict.fromkeys(names(item)[0] for item in items))
            raise NoBatchNormError(
                f"layers pattern {pattern!r} matched no {what}; expected one of: {listing}"
            )
        chosen.update(hits)
    return [item for i, item in enumerate(items) if i in chosen]


def find_norm_layers(
    model: nn.Module, layers: str | Sequence[str] | None = None
) -> tuple[list[NormLayer], list[tuple[str, str]]]:
    """Find the layers to recalibrate.

    Args:
        model: the network.
        layers: optional selection: layer names or ``fnmatch`` globs (``"layer4.*"``).

    Returns:
        ``(selected, skipped)``: the layers in module order, and ``(name, reason)`` for
        normalization layers that have no running statistics and for frozen BN
        (``FrozenBatchNorm2d`` and kin), whose statistics are fixed by design.

    Raises:
        NoBatchNormError: the model has no such layer, or a pattern matched none.
    """
    found: list[NormLayer] = []
    skipped: list[tuple[str, str]] = []
    frozen = 0
    for name, module in model.named_modules():
        if _is_frozen_batchnorm(module):
            skipped.append((name, _frozen_reason(module)))
            frozen += 1
        elif not isinstance(module, _BatchNorm):
            continue
        elif _has_running_stats(module):
            found.append(NormLayer(name, module))
        else:
            skipped.append((name, "track_running_stats=False: no running statistics"))
    if not found:
        counts = [f"{frozen} frozen"] if frozen else []
        if len(skipped) > frozen:
            counts.append(f"{len(skipped) - frozen} without running statistics")
        extra = f" ({', '.join(counts)})" if counts else ""
        raise NoBatchNormError(
            "expected a model with BatchNorm/BatchRenorm layers that track running statistics "
            f"(got {type(model).__name__} with none{extra})"
        )
    found = select_by_name(found, layers, lambda lay: [lay.name], what="normalization layer")
    return found, skipped


def layer_signature(layers: Sequence[tuple[str, int]]) -> str:
    """A short digest of ``(name, channels)`` pairs: a bank fits a model with the same one."""
    payload = json.dumps([[n, int(c)] for n, c in layers]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def current_stats(layer: NormLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's running mean and (unbiased) variance as float64 copies."""
    m = layer.module
    if m.running_mean is None or m.running_var is None:
        raise NoBatchNormError(f"layer {layer.name!r} has no running statistics")
    return m.running_mean.detach().double().clone(), m.running_var.detach().double().clone()


def norm_layers_of(model: object) -> list[NormLayer]:
    """Every stat-tracking layer of an ``nn.Module`` or ``ExportedProgram``, in order."""
    if isinstance(model, torch.export.ExportedProgram):
        from .exported import module_with_norm_layers

        wrapped = module_with_norm_layers(model)
        return [NormLayer(n, m) for n, m in wrapped.named_norm_layers()]  # type: ignore[operator]
    if not isinstance(model, nn.Module):
        raise NoBatchNormError(
            f"expected an nn.Module or torch.export.ExportedProgram (got {type(model).__name__})"
        )
    return find_norm_layers(model)[0]
