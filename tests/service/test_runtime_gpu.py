"""The serving runtime on ONNX Runtime's CUDA execution provider (``gpu``: skipped unless
CUDA really runs here). Same model, same requests on CPU and CUDA: outputs and drift
scores agree; the provider is verified, not assumed; requests of several sizes are batched
together through IOBinding."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from runtime_helpers import export_versions, runtime_settings, shifted_images, source_images

from service.api.v2_codec import decode_request, encode_request
from service.metrics import ServiceMetrics
from service.runtime.runtime import ServingRuntime
from service.runtime.sessions import CUDA, cuda_usable
from service.runtime.tensors import InferRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_usable(), reason="needs onnxruntime-gpu and a CUDA GPU"),
]


def _request(x: np.ndarray) -> InferRequest:
    return decode_request(*encode_request({"input": x}, binary=True, binary_output=True))


def _serve_and_infer(path: Path, home: Path, provider: str) -> tuple[list[Any], dict[str, Any]]:
    """Outputs of requests of sizes 1, 3, 8 and 16 (sent concurrently) and the drift report."""
    metrics = ServiceMetrics(CollectorRegistry())
    settings = runtime_settings(
        home, execution_provider=provider, provider_fallback="fail", max_batch_size=32
    )
    batches = [shifted_images(n, seed) for seed, n in enumerate((1, 3, 8, 16))]

    async def body() -> tuple[list[Any], dict[str, Any]]:
        runtime = ServingRuntime(settings, metrics)
        await runtime.start()
        await runtime.serve("m", 1, path)
        params = runtime.metadata("m")["parameters"]
        assert params["provider_fallback"] is False
        if provider == "cuda":
            assert params["execution_provider"] == CUDA
        responses = await asyncio.gather(*(runtime.infer("m", None, _request(x)) for x in batches))
        drift = runtime.drift("m")
        await runtime.close()
        return [r.outputs[0].data for r in responses], drift

    return asyncio.run(body())


def test_cuda_serving_matches_cpu_outputs_and_drift(tmp_path: Path) -> None:
    path = export_versions(tmp_path)[1][1]
    cpu_out, cpu_drift = _serve_and_infer(path, tmp_path / "cpu", "cpu")
    gpu_out, gpu_drift = _serve_and_infer(path, tmp_path / "gpu", "cuda")
    for got, want in zip(gpu_out, cpu_out, strict=True):
        # ORT's CUDA convolutions may use TF32: float32-ish, not bit-equal.
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)
    assert gpu_drift["samples"] == cpu_drift["samples"] == 28
    assert gpu_drift["score"] == pytest.approx(cpu_drift["score"], rel=1e-2)
    assert gpu_drift["exceeded"] == cpu_drift["exceeded"]


def test_cuda_in_domain_traffic_shows_little_drift(tmp_path: Path) -> None:
    path = export_versions(tmp_path)[1][1]
    metrics = ServiceMetrics(CollectorRegistry())
    settings = runtime_settings(tmp_path, execution_provider="cuda", provider_fallback="fail")

    async def body() -> tuple[float, float]:
        runtime = ServingRuntime(settings, metrics)
        await runtime.serve("m", 1, path)
        await runtime.infer("m", None, _request(source_images(64, 5)))
        same = runtime.drift("m")["score"]
        runtime.reset_drift("m")
        await runtime.infer("m", None, _request(shifted_images(64, 5)))
        shifted = runtime.drift("m")["score"]
        await runtime.close()
        return same, shifted

    same, shifted = asyncio.run(body())
    assert same < shifted / 10


def test_cuda_stat_banks_match_cpu_with_device_resident_tables(tmp_path: Path) -> None:
    """Banks on CUDA: explicit and routed rows answer as on CPU, the tables are copied to
    the device once (not per run)."""
    import onnx
    from bank_helpers import bank_ref, domain_images, domain_model, write_bank

    from recalib.onnx.banks import AUTO, BANK_INDEX
    from service.runtime.bank_serving import VersionBanks
    from service.runtime.sessions import TensorSpec

    path = export_versions(tmp_path)[1][1]
    proto = onnx.load(path)
    refs = [
        bank_ref(d, write_bank(proto, domain_model(d), tmp_path / f"{d}.st"), {1}) for d in "ab"
    ]
    x = np.concatenate([domain_images(2, 5, d) for d in "ab"])
    answers = {}
    for provider in ("cpu", "cuda"):
        settings = runtime_settings(
            tmp_path / provider, execution_provider=provider, provider_fallback="fail"
        )
        banks = VersionBanks.build(
            path, settings, label="m", inputs=[TensorSpec("input", "FP32", (-1, 3, 8, 8))]
        )
        assert banks.session.uses_binding == (provider == "cuda")
        assert banks.sync(refs) == []
        runs = []
        for index in ([1, 1, 2, 2], [AUTO] * 4):
            feed = {"input": x, BANK_INDEX: np.asarray(index, dtype=np.int64)}
            runs.append(banks.run(feed, ["output"], sample=False))
        answers[provider] = runs
        if provider == "cuda":
            assert banks._device is not None  # noqa: SLF001 - the resident copy exists
    for cpu_run, gpu_run in zip(answers["cpu"], answers["cuda"], strict=True):
        np.testing.assert_allclose(gpu_run[0], cpu_run[0], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(gpu_run[1], cpu_run[1])  # the bank of each row
