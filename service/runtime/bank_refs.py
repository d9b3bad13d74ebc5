"""What the serving runtime is told about a model's stat banks (no torch, no onnx).

The registry (:class:`service.banks.BankStore` on the control role) and the model-store
watcher (:class:`service.store_replica.StoreWatcher` on an inference replica) *push* a
model's banks to the runtime with ``ServingRuntime.set_banks(name, banks, default)``
whenever they change and once at start-up; the runtime keeps them per model, gives every
loaded version the banks valid for it (added without a session rebuild) and uses them
for requests that name a bank in ``parameters.bank``.

Request words (never bank names: :func:`service.banks.check_bank_name` refuses them):
:data:`AUTO_BANK` routes each row to the nearest bank in the same ONNX Runtime run;
:data:`NO_BANK` asks for the version's own statistics (overriding a model default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["AUTO_BANK", "NO_BANK", "RESERVED_BANK_WORDS", "BankRef"]

AUTO_BANK = "auto"
"""``parameters.bank`` that routes each row to the nearest bank."""

NO_BANK = "none"
"""``parameters.bank`` for the version's own statistics (also what a routed row that
fell back, or a request without a bank, is answered with)."""

RESERVED_BANK_WORDS = frozenset({AUTO_BANK, NO_BANK})


@dataclass(frozen=True)
class BankRef:
    """One stat bank of a model, as the runtime needs it.

    Attributes:
        name: the bank's name (a registry name, never a reserved word).
        path: its safetensors file (:mod:`recalib.onnx.bank_files`), read when a version
            it is valid for loads or when it is added.
        versions: the model versions whose weights it was computed with (the only ones
            it may serve).
        sha256: the file's digest: a bank pushed again under the same name and digest is
            the same bank (banks are immutable; a new digest means delete + put).
    """

    name: str
    path: Path
    versions: frozenset[int]
    sha256: str
