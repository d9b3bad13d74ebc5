"""ORT sessions: provider selection and fallback policy (no GPU needed), options, warm-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from runtime_helpers import export, make_model

from service.errors import InvalidInput
from service.runtime import sessions
from service.runtime.sessions import (
    CPU,
    CUDA,
    ModelSession,
    ProviderUnavailable,
    choose_providers,
    create_session,
    session_options,
    warmup_sizes,
)
from service.settings import Settings


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(make_model(0), tmp_path_factory.mktemp("sessions") / "tiny.onnx")


class _Arg:
    def __init__(self, name: str, type_: str, shape: list[Any]) -> None:
        self.name, self.type, self.shape = name, type_, shape


class _FakeOrtValue:
    """Stands in for ``OrtValue``: an array and the device it was staged on."""

    def __init__(self, value: np.ndarray, device: str) -> None:
        self.value, self.device = value, device

    @classmethod
    def ortvalue_from_numpy(cls, value: np.ndarray, device: str, device_id: int) -> _FakeOrtValue:
        return cls(value.copy(), device)

    def numpy(self) -> np.ndarray:
        return self.value


class _FakeBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, _FakeOrtValue] = {}
        self.outputs: list[tuple[str, str]] = []

    def bind_ortvalue_input(self, name: str, value: _FakeOrtValue) -> None:
        self.inputs[name] = value

    def bind_output(self, name: str, device: str, device_id: int) -> None:
        self.outputs.append((name, device))

    def get_outputs(self) -> list[_FakeOrtValue]:
        x = self.inputs["x"]
        return [_FakeOrtValue(x.value * 2.0, device) for _, device in self.outputs]


class _FakeSession:
    """Stands in for ``InferenceSession``: records what it was asked for and reports the
    providers a test chooses (as ORT does after a silent fallback)."""

    created: list[dict[str, Any]] = []
    actual: list[str] = [CPU]

    def __init__(self, model: Any, sess_options: Any = None, providers: Any = None) -> None:
        type(self).created.append({"providers": list(providers)})
        self.binding = _FakeBinding()
        self.ran_with_binding = False

    def get_providers(self) -> list[str]:
        return list(type(self).actual)

    def get_inputs(self) -> list[_Arg]:
        return [_Arg("x", "tensor(float)", ["batch", 2])]

    def get_outputs(self) -> list[_Arg]:
        return [_Arg("y", "tensor(float)", ["batch", 2])]

    def io_binding(self) -> _FakeBinding:
        return self.binding

    def run_with_iobinding(self, binding: _FakeBinding) -> None:
        self.ran_with_binding = True

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feed["x"] * 2.0]


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> type[_FakeSession]:
    _FakeSession.created = []
    _FakeSession.actual = [CPU]
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(ort, "OrtValue", _FakeOrtValue)
    return _FakeSession


def _available(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))


@pytest.mark.parametrize(
    ("requested", "available", "providers", "wants_cuda"),
    [
        ("auto", [CUDA, CPU], (CUDA, CPU), True),
        ("auto", [CPU], (CPU,), False),
        ("cpu", [CUDA, CPU], (CPU,), False),
        ("cuda", [CUDA, CPU], (CUDA, CPU), True),
        ("cuda", [CPU], (CPU,), True),
    ],
)
def test_choose_providers(
    requested: str, available: list[str], providers: tuple[str, ...], wants_cuda: bool
) -> None:
    choice = choose_providers(requested, available)
    assert choice.providers == providers
    assert choice.wants_cuda is wants_cuda


def test_choose_providers_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="expected execution provider 'auto', 'cpu' or 'cuda'"):
        choose_providers("tpu", [CPU])


def test_auto_without_cuda_is_cpu_and_no_fallback(
    monkeypatch: pytest.MonkeyPatch, fake_ort: type[_FakeSession]
) -> None:
    _available(monkeypatch, [CPU])
    session = create_session(b"model", Settings(execution_provider="auto"))
    assert fake_ort.created == [{"providers": [CPU]}]
    assert session.provider == CPU and not session.fell_back


def test_auto_with_cuda_uses_cuda_and_iobinding(
    monkeypatch: pytest.MonkeyPatch, fake_ort: type[_FakeSession]
) -> None:
    _available(monkeypatch, [CUDA, CPU])
    fake_ort.actual = [CUDA, CPU]
    session = create_session(
        b"model", Settings(execution_provider="auto", provider_fallback="fail")
    )
    assert fake_ort.created == [{"providers": [CUDA, CPU]}]
    assert session.provider == CUDA and not session.fell_back
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    (y,) = session.run({"x": x})
    np.testing.assert_array_equal(y, x * 2.0)
    assert session.session.ran_with_binding and session.uses_binding
    # Inputs staged on the device before the run, outputs left on the device by the run.
    assert {k: v.device for k, v in session.session.binding.inputs.items()} == {"x": "cuda"}
    assert session.session.binding.outputs == [("y", "cuda")]


def test_silent_cuda_fallback_fails_with_policy_fail(
    monkeypatch: pytest.MonkeyPatch, fake_ort: type[_FakeSession]
) -> None:
    _available(monkeypatch, [CUDA, CPU])
    fake_ort.actual = [CPU]  # ORT created the session on CPU without telling
    settings = Settings(execution_provider="cuda", provider_fallback="fail")
    with pytest.raises(
        ProviderUnavailable, match="expected a session on CUDAExecutionProvider"
    ) as err:
        create_session(b"model", settings, label="m v1")
    assert "runs on CPUExecutionProvider" in err.value.message
    assert err.value.status == 503


def test_silent_cuda_fallback_warns_with_policy_warn(
    monkeypatch: pytest.MonkeyPatch, fake_ort: type[_FakeSession], caplog: pytest.LogCaptureFixture
) -> None:
    _available(monkeypatch, [CUDA, CPU])
    fake_ort.actual = [CPU]
    settings = Settings(execution_provider="auto", provider_fallback="warn")
    with caplog.at_level(logging.WARNING, logger=sessions.__name__):
        session = create_session(b"model", settings, label="m v1")
    assert session.fell_back and session.provider == CPU and session.requested == "auto"
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_cuda_not_built_in(
    monkeypatch: pytest.MonkeyPatch, fake_ort: type[_FakeSession], caplog: pytest.LogCaptureFixture
) -> None:
    _available(monkeypatch, [CPU])
    with pytest.raises(ProviderUnavailable, match="does not provide it"):
        create_session(b"model", Settings(execution_provider="cuda", provider_fallback="fail"))
    assert fake_ort.created == []  # refused before trying
    with caplog.at_level(logging.WARNING, logger=sessions.__name__):
        session = create_session(b"model", Settings(execution_provider="cuda"))
    assert fake_ort.created == [{"providers": [CPU]}]  # CUDA never passed: ORT would warn
    assert session.fell_back and session.requested == "cuda"
    assert caplog.records


def test_real_session_on_cpu(onnx_path: Path) -> None:
    session = create_session(onnx_path, Settings(execution_provider="cpu", intra_op_threads=1))
    assert session.provider == CPU and not session.fell_back
    assert [s.to_dict() for s in session.inputs] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}
    ]
    assert session.outputs[0].shape == (-1, 3) and session.outputs[0].batched
    (out,) = session.run({"input": np.zeros((2, 3, 8, 8), np.float32)})
    assert out.shape == (2, 3)


def test_iobinding_path_on_cpu_matches_plain_run(onnx_path: Path) -> None:
    """The IOBinding code CUDA uses, run with CPU OrtValues: same outputs as ``run``,
    any output order, a non-contiguous input."""
    settings = Settings(execution_provider="cpu", intra_op_threads=1)
    plain = create_session(onnx_path, settings)
    bound = ModelSession(plain.session, "cpu", False, binding=True)
    assert bound.uses_binding and not plain.uses_binding
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 16)).astype(np.float32)[..., ::2]
    assert not x.flags.c_contiguous
    (want,) = plain.run({"input": x})
    (got,) = bound.run({"input": x})
    np.testing.assert_array_equal(got, want)
    assert bound.warm_up([1, 2]) == 2


def test_cuda_usable_is_false_without_cuda_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    sessions.cuda_usable.cache_clear()
    _available(monkeypatch, [CPU])
    assert sessions.cuda_usable() is False
    sessions.cuda_usable.cache_clear()


def test_cuda_usable_sees_a_silent_fallback(
    monkeypatch: pytest.MonkeyPatch, fake_ort: type[_FakeSession]
) -> None:
    """Listed is not usable: the probe session is created and came out on CPU."""
    _available(monkeypatch, [CUDA, CPU])
    for actual, usable in (([CPU], False), ([CUDA, CPU], True)):
        sessions.cuda_usable.cache_clear()
        fake_ort.actual = actual
        assert sessions.cuda_usable() is usable
    assert fake_ort.created[-1] == {"providers": [CUDA, CPU]}
    sessions.cuda_usable.cache_clear()


def test_bad_model_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="ONNX Runtime cannot load the model"):
        create_session(b"not an onnx model", Settings(execution_provider="cpu"), label="m v1")


def test_session_options() -> None:
    opts = session_options(Settings(intra_op_threads=3), spinning=False)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spin = session_options(Settings(), spinning=True)
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_warmup_sizes_clipped_and_deduplicated() -> None:
    settings = Settings(warmup_batch_sizes=[1, 8, 32, 64], max_batch_size=16)
    assert warmup_sizes(settings) == [1, 8, 16]
    assert warmup_sizes(Settings(dynamic_batching=False, warmup_batch_sizes=[4, 8])) == [1]


def test_warm_up_runs_each_size(onnx_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = create_session(onnx_path, Settings(execution_provider="cpu", intra_op_threads=1))
    seen: list[tuple[int, ...]] = []
    real = session.run

    def spy(feed: dict[str, np.ndarray], names: Any = None) -> list[np.ndarray]:
        seen.append(feed["input"].shape)
        return real(feed, names)

    monkeypatch.setattr(session, "run", spy)
    assert session.warm_up([1, 4]) == 2
    assert seen == [(1, 3, 8, 8), (4, 3, 8, 8)]


@pytest.mark.gpu
@pytest.mark.skipif(not sessions.cuda_usable(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_session_with_iobinding_matches_cpu(onnx_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    cpu = create_session(onnx_path, Settings(execution_provider="cpu"))
    gpu = create_session(onnx_path, Settings(execution_provider="cuda", provider_fallback="fail"))
    assert gpu.provider == CUDA and not gpu.fell_back
    assert gpu.warm_up([1, 4]) == 2
    (want,) = cpu.run({"input": x})
    (got,) = gpu.run({"input": x})  # through IOBinding
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_sessions_share_one_cpu_arena_and_answer_as_a_private_one(onnx_path: Path) -> None:
    settings = Settings(execution_provider="cpu", intra_op_threads=1)
    opts = sessions.session_options(settings, spinning=False)
    assert opts.get_session_config_entry("session.use_env_allocators") == "1"
    private = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((4, 3, 8, 8)).astype(np.float32)
    (want,) = private.run(None, {"input": x})
    first, second = (create_session(onnx_path, settings) for _ in range(2))
    for n in (1, 4, 2):  # runs of several sizes from two sessions on the one arena
        for session in (first, second):
            (got,) = session.run({"input": x[:n]})
            np.testing.assert_array_equal(got, want[:n])
    sessions.share_cpu_arena()  # registered once per process: a second call is a no-op
