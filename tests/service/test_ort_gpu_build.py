"""The real onnxruntime-gpu build where CUDA cannot run (no GPU, no driver, or no CUDA 13 /
cuDNN 9 libraries): the build *lists* ``CUDAExecutionProvider``, ONNX Runtime creates the
session on CPU without raising, and the service must notice, say so and apply its policy.

Runs only in such an environment (``scripts/verify_docker_steps.sh gpu`` builds one: the GPU
image's pip steps in a fresh venv on a machine without a GPU); skipped with the CPU build
(``onnxruntime``) and where CUDA really works (the ``gpu`` tests cover that).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry
from runtime_helpers import export, make_model, runtime_settings, source_images

from service.metrics import ServiceMetrics
from service.runtime.runtime import ServingRuntime
from service.runtime.sessions import CPU, CUDA, ProviderUnavailable, create_session, cuda_usable
from service.settings import Settings

pytestmark = pytest.mark.skipif(
    CUDA not in ort.get_available_providers() or cuda_usable(),
    reason="needs an onnxruntime-gpu build on a machine where CUDA cannot run",
)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(make_model(0), tmp_path_factory.mktemp("ortgpu") / "tiny.onnx")


def test_auto_asks_for_cuda_and_reports_the_silent_fallback(onnx_path: Path) -> None:
    session = create_session(onnx_path, Settings(execution_provider="auto", intra_op_threads=1))
    assert session.requested == "auto"
    assert session.provider == CPU and session.fell_back
    assert not session.uses_binding  # IOBinding is for device memory only
    x = source_images(4, 3)
    cpu = create_session(onnx_path, Settings(execution_provider="cpu", intra_op_threads=1))
    np.testing.assert_array_equal(session.run({"input": x})[0], cpu.run({"input": x})[0])


def test_cuda_with_policy_fail_refuses(onnx_path: Path) -> None:
    settings = Settings(execution_provider="cuda", provider_fallback="fail")
    with pytest.raises(ProviderUnavailable) as err:
        create_session(onnx_path, settings, label="m v1")
    message = err.value.message
    assert "m v1: expected a session on CUDAExecutionProvider" in message
    assert "runs on CPUExecutionProvider" in message and "CUDAExecutionProvider'" in message


def test_runtime_serves_on_cpu_and_exports_the_fallback(onnx_path: Path, tmp_path: Path) -> None:
    metrics = ServiceMetrics(CollectorRegistry())

    async def body() -> None:
        runtime = ServingRuntime(runtime_settings(tmp_path, execution_provider="cuda"), metrics)
        await runtime.serve("m", 1, onnx_path)
        parameters = runtime.metadata("m")["parameters"]
        assert parameters["execution_provider"] == CPU
        assert parameters["provider_fallback"] is True
        info = {**labels, "requested": "cuda", "provider": CPU}
        assert metrics.registry.get_sample_value("recalib_execution_provider_info", info) == 1
        await runtime.close()

    labels = {"model": "m", "version": "1"}
    asyncio.run(body())
    assert metrics.registry.get_sample_value("recalib_provider_fallbacks_total", labels) == 1
