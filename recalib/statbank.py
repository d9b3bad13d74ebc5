"""Statistics banks: only the BN statistics of a model, in a few kilobytes.

A bank is a safetensors file with ``<layer>.running_mean`` and ``<layer>.running_var`` per
layer (float32, or the layers' own dtype) and metadata holding the model's *layer
signature* (a digest of every stat-tracking layer's name and channel count). A domain's
calibration can then be stored and shipped as a bank, and swapped into the same network
with :meth:`StatBank.apply`; a bank from a different network is refused.

The layer signature does not say which *weights* the statistics were computed with; the
service requires that too: ``metadata={"weights_digest": ...}``
(:func:`recalib.onnx.bank_files.weights_digest`, or write the bank for an ONNX version with
:func:`recalib.onnx.bank_files.save_onnx_bank`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import StatBankMismatchError
from .layers import NormLayer, layer_signature, norm_layers_of

__all__ = ["StatBank", "apply_stat_bank", "load_stat_bank", "save_stat_bank"]

_FORMAT = "recalib.statbank/1"


@dataclass
class StatBank:
    """The running statistics of every normalization layer of one model.

    Args:
        stats: layer name -> ``(running_mean, running_var)``.
        signature: the model's layer signature (see :func:`recalib.layers.layer_signature`).
        metadata: free-form string metadata (domain, dataset id, method ...).
    """

    stats: dict[str, tuple[Tensor, Tensor]]
    signature: str
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: Any, metadata: Mapping[str, str] | None = None) -> StatBank:
        layers = norm_layers_of(model)
        stats = {lay.name: _buffers(lay) for lay in layers}
        return cls(stats, _signature(layers), dict(metadata or {}))

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        for name, (mean, var) in self.stats.items():
            tensors[f"{name}.running_mean"] = mean.detach().cpu().contiguous()
            tensors[f"{name}.running_var"] = var.detach().cpu().contiguous()
        meta = {
            "format": _FORMAT,
            "signature": self.signature,
            "layers": json.dumps(list(self.stats)),
            "metadata": json.dumps(self.metadata),
        }
        out = Path(path)
        save_file(tensors, str(out), metadata=meta)
        return out

    @classmethod
    def load(cls, path: str | Path) -> StatBank:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise StatBankMismatchError(
                    f"expected a recalib statistics bank ({_FORMAT}) (got format "
                    f"{meta.get('format')!r} in {path})"
                )
            names = json.loads(meta["layers"])
            stats = {
                n: (f.get_tensor(f"{n}.running_mean"), f.get_tensor(f"{n}.running_var"))
                for n in names
            }
        return cls(stats, meta["signature"], json.loads(meta.get("metadata", "{}")))

    def apply(self, model: Any) -> None:
        """Write the bank's statistics into ``model`` (same layer signature required)."""
        layers = norm_layers_of(model)
        sig = _signature(layers)
        if sig != self.signature:
            raise StatBankMismatchError(
                f"statistics bank is for layer signature {self.signature} (got a model with "
                f"signature {sig}: different layer names or channel counts)"
            )
        with torch.no_grad():
            for lay in layers:
                mean, var = self.stats[lay.name]
                rm, rv = lay.module.running_mean, lay.module.running_var
                if rm is None or rv is None:
                    raise StatBankMismatchError(f"layer {lay.name!r} has no running statistics")
                rm.copy_(mean.to(rm.device, rm.dtype))
                rv.copy_(var.to(rv.device, rv.dtype))


def _buffers(layer: NormLayer) -> tuple[Tensor, Tensor]:
    rm, rv = layer.module.running_mean, layer.module.running_var
    if rm is None or rv is None:
        raise StatBankMismatchError(f"layer {layer.name!r} has no running statistics")
    return rm.detach().clone(), rv.detach().clone()


def _signature(layers: list[NormLayer]) -> str:
    return layer_signature([(lay.name, lay.num_features) for lay in layers])


def save_stat_bank(
    model: Any, path: str | Path, *, metadata: Mapping[str, str] | None = None
) -> StatBank:
    """Save ``model``'s BN statistics to ``path`` (safetensors) and return the bank."""
    bank = StatBank.from_model(model, metadata)
    bank.save(path)
    return bank


def load_stat_bank(path: str | Path) -> StatBank:
    """Load a bank saved by :func:`save_stat_bank`."""
    return StatBank.load(path)


def apply_stat_bank(model: Any, bank: StatBank | str | Path) -> StatBank:
    """Swap the statistics of ``bank`` (or the bank file at that path) into ``model``."""
    b = bank if isinstance(bank, StatBank) else StatBank.load(bank)
    b.apply(model)
    return b
