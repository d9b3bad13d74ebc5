"""Inference runtime: ONNX Runtime sessions, dynamic batching, the v2 codec, drift.

* :mod:`.sessions` - provider selection, thread settings, signatures, warm-up.
* :mod:`.tensors` - protocol-neutral inference requests, responses and their checks.
* :mod:`.batching` - the dynamic batcher.
* :mod:`.drift_monitor` - rolling BN-statistics drift per model version.
* :mod:`.bank_refs`, :mod:`.bank_serving` - stat banks per request: what is pushed to the
  runtime, and each version's bank session, tables and routing (``parameters.bank``).
* :mod:`.versions` - the loaded versions and their lifecycle (load, retire, drop, sweep).
* :mod:`.runtime` - :class:`ServingRuntime`, what the app and the v2 router use: the
  served pointer, unloading, inference, metadata and drift, over :mod:`.versions`.
"""

from .runtime import ServingRuntime

__all__ = ["ServingRuntime"]
