"""recalib's HTTP service (FastAPI, ONNX Runtime, drift monitoring)."""

__all__: list[str] = []
