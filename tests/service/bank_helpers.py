"""Stat-bank test helpers: seeded input domains, banks of the tiny model recalibrated on
each, their files and :class:`BankRef` s, and float64 references (imported by bare name,
as ``runtime_helpers`` is)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from runtime_helpers import TinyNet, make_model, source_images
from torch import nn

from recalib.onnx.bank_files import save_onnx_bank
from service.runtime.bank_refs import BankRef

__all__ = ["DOMAINS", "bank_ref", "domain_images", "domain_model", "reference64", "write_bank"]

DOMAINS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "a": ((0.4, 2.0, 1.3), (1.5, -0.8, 0.6)),
    "b": ((1.8, 0.5, 1.0), (-1.2, 1.0, -0.5)),
    "c": ((1.0, 1.0, 3.0), (0.0, 2.0, 0.0)),
}
"""Domain name -> per-channel (scale, shift) of the source images."""


def domain_images(n: int, seed: int, domain: str) -> np.ndarray:
    """``(n, 3, 8, 8)`` float32 images of ``domain`` (source images, affinely shifted)."""
    scale, shift = (np.array(v, dtype=np.float32)[None, :, None, None] for v in DOMAINS[domain])
    return (source_images(n, seed) * scale + shift).astype(np.float32)


def domain_model(domain: str) -> TinyNet:
    """Version 1's weights (seed 0) with BN statistics of ``domain``."""
    return make_model(0, calibrate_on=domain_images(512, 1, domain))


def write_bank(version: onnx.ModelProto, model: nn.Module, path: Path) -> Path:
    """A bank file of ``model``'s BN statistics, stamped with ``version``'s weights."""
    stats = {
        name: (np.asarray(m.running_mean), np.asarray(m.running_var))
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }
    save_onnx_bank(version, stats, path)
    return path


def bank_ref(name: str, path: Path, versions: set[int]) -> BankRef:
    """What the registry would push for the bank file at ``path``."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return BankRef(name, path, frozenset(versions), sha)


def reference64(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """``model``'s logits for ``x`` in float64."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        out: np.ndarray = ref(torch.from_numpy(x).double()).numpy()
    return out
