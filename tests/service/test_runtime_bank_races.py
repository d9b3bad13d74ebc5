"""Stat banks in the serving runtime under races and failures found in review: a version is
ready only with its banks, an unload racing a push leaves nothing behind, a bank file
missing for a moment is read again at the next push, messages stay short, and monitors
sharing the drift thread do not wait in turn."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from bank_helpers import bank_ref, domain_images, domain_model, write_bank
from prometheus_client import CollectorRegistry
from runtime_helpers import export, make_model, runtime_settings

from recalib.onnx.taps import add_drift_taps
from service.api.v2_codec import decode_request, encode_request
from service.errors import NotFound
from service.metrics import ServiceMetrics
from service.runtime.bank_refs import BankRef
from service.runtime.bank_serving import ModelBanks, VersionBanks
from service.runtime.drift_monitor import DriftMonitor
from service.runtime.runtime import ServingRuntime
from service.runtime.sessions import TensorSpec


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, BankRef]]:
    root = tmp_path_factory.mktemp("bank_races")
    v1 = export(make_model(0), root / "v1.onnx")
    proto = onnx.load(v1)
    refs = {d: bank_ref(d, write_bank(proto, domain_model(d), root / f"{d}.st"), {1}) for d in "ab"}
    return v1, refs


def _runtime(home: Path) -> tuple[ServingRuntime, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = runtime_settings(home, warmup_batch_sizes=[1])
    return ServingRuntime(settings, ServiceMetrics(registry)), registry


def _blocked_build(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the bank-session build wait for ``release`` (``entered`` set when it starts)."""
    entered, release = asyncio.Event(), asyncio.Event()
    original = ModelBanks._build

    async def build(self: ModelBanks, entry: Any) -> VersionBanks | None:
        entered.set()
        await release.wait()
        return await original(self, entry)

    monkeypatch.setattr(ModelBanks, "_build", build)
    return entered, release


def test_a_version_is_ready_only_once_it_has_its_banks(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, refs = parts

    async def body() -> None:
        runtime, _ = _runtime(tmp_path)
        entered, release = _blocked_build(monkeypatch)
        await runtime.set_banks("m", [refs["a"]], None)  # nothing loaded yet: kept
        load = asyncio.create_task(runtime.load("m", 1, v1))
        await asyncio.wait_for(entered.wait(), 30)
        assert not runtime.is_ready("m", 1)  # its bank session is still being built
        release.set()
        await load
        assert runtime.is_ready("m", 1)
        request = decode_request(*encode_request({"input": domain_images(1, 3, "a")}))
        request.parameters["bank"] = "a"
        answer = await runtime.infer("m", 1, request)
        assert answer.parameters is not None and answer.parameters["bank"] == "a"
        await runtime.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_an_unload_racing_a_push_leaves_no_banks_or_series_behind(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, refs = parts

    async def body() -> None:
        runtime, registry = _runtime(tmp_path)
        await runtime.serve("m", 1, v1)
        entry = runtime._versions[("m", 1)]  # noqa: SLF001 - the version under test
        entered, release = _blocked_build(monkeypatch)
        push = asyncio.create_task(runtime.set_banks("m", [refs["a"], refs["b"]], None))
        await asyncio.wait_for(entered.wait(), 30)
        await runtime.unload_model("m")
        release.set()
        await push
        assert entry.closed and entry.banks is None
        labels = {"model": "m", "version": "1"}
        assert registry.get_sample_value("recalib_stat_banks", labels) is None
        await runtime.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_bank_file_missing_for_a_moment_is_read_again_at_the_next_push(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path
) -> None:
    v1, refs = parts
    settings = runtime_settings(tmp_path, warmup_batch_sizes=[1])
    inputs = [TensorSpec("input", "FP32", (-1, 3, 8, 8))]
    banks = VersionBanks.build(v1, settings, label="model 'm' version 1", inputs=inputs)
    moved = tmp_path / "a.st"
    ref = BankRef("a", moved, frozenset({1}), refs["a"].sha256)
    problems = banks.sync([ref])
    assert len(problems) == 1 and banks.names == []
    moved.write_bytes(refs["a"].path.read_bytes())
    assert banks.sync([ref]) == [] and banks.names == ["a"]
    # what a file holds is not read again: a bank of other weights stays skipped
    other = write_bank(
        onnx.load(export(make_model(1), tmp_path / "v2.onnx")), make_model(1), tmp_path / "o.st"
    )
    alien = bank_ref("o", other, {1})
    assert len(banks.sync([ref, alien])) == 1
    assert banks.sync([ref, alien]) == [] and banks.names == ["a"]


def test_an_unknown_bank_is_answered_in_a_short_message(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path
) -> None:
    v1, refs = parts

    async def body() -> None:
        runtime, _ = _runtime(tmp_path)
        await runtime.serve("m", 1, v1)
        await runtime.set_banks("m", [refs["a"], refs["b"]], None)
        request = decode_request(*encode_request({"input": domain_images(1, 3, "a")}))
        request.parameters["bank"] = "x" * 100_000
        with pytest.raises(NotFound) as caught:
            await runtime.infer("m", None, request)
        message = str(caught.value)
        assert len(message) < 300 and "(100000 characters)" in message and "a, b" in message
        await runtime.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_monitors_sharing_the_drift_thread_do_not_wait_in_turn(
    parts: tuple[Path, dict[str, BankRef]],
) -> None:
    """Each monitor gathers for ``process_every`` from its first queued run: one behind
    another on the single drift thread is processed when the first is, not a full wait
    later (which a 1 s flush would miss)."""
    v1, _ = parts
    tapped = add_drift_taps(onnx.load(v1))
    with ThreadPoolExecutor(1) as pool:
        monitors = [
            DriftMonitor(
                tapped, window_seconds=3600.0, threshold=1.0, executor=pool, process_every=0.6
            )
            for _ in range(2)
        ]
        import onnxruntime as ort

        session = ort.InferenceSession(
            tapped.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        x = domain_images(4, 9, "a")
        for monitor in monitors:
            values = session.run(monitor.tap_names, {"input": x})
            monitor.submit(values, 4)
        started = time.monotonic()
        report = monitors[1].report()  # flushes the second; the first holds the thread
        assert report["samples"] == 4, report
        assert time.monotonic() - started < 1.0
        assert np.isfinite(report["score"])


def test_a_banks_own_route_limit_sends_far_rows_to_the_version_statistics(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path
) -> None:
    """A bank file's ``route_limit`` (what bank jobs store) applies under the global
    threshold: a tiny limit makes every routed row fall back, explicit rows still get it."""
    from recalib.onnx.bank_files import ROUTE_LIMIT_KEY, save_onnx_bank
    from service.runtime.bank_refs import BankRef as Ref

    v1, refs = parts
    model = domain_model("a")
    stats = {
        name: (np.asarray(m.running_mean), np.asarray(m.running_var))
        for name, m in model.named_modules()
        if hasattr(m, "running_mean") and m.running_mean is not None
    }
    tight = tmp_path / "tight.st"
    save_onnx_bank(onnx.load(v1), stats, tight, metadata={ROUTE_LIMIT_KEY: 1e-9})
    tight_ref = Ref("tight", tight, frozenset({1}), "sha-tight")

    async def body() -> None:
        runtime, registry = _runtime(tmp_path)
        await runtime.serve("m", 1, v1)
        x = domain_images(1, 21, "a")

        async def ask(bank: str) -> dict[str, Any]:
            request = decode_request(*encode_request({"input": x}))
            request.parameters["bank"] = bank
            answer = await runtime.infer("m", None, request)
            assert answer.parameters is not None
            return answer.parameters

        await runtime.set_banks("m", [refs["a"]], None)  # no limit of its own
        assert (await ask("auto"))["bank"] == "a"
        await runtime.set_banks("m", [tight_ref], None)  # the same statistics, tight limit
        routed = await ask("auto")
        assert routed["bank"] == "none" and routed["bank_fallback"] is True
        explicit = await ask("tight")
        assert explicit["bank"] == "tight" and explicit["bank_fallback"] is False
        fallbacks = registry.get_sample_value("recalib_bank_fallbacks_total", {"model": "m"})
        assert fallbacks == 1.0
        await runtime.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_an_unload_during_a_loads_bank_build_leaves_no_task_running(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, refs = parts

    async def body() -> None:
        runtime, _ = _runtime(tmp_path)
        await runtime.set_banks("m", [refs["a"]], None)
        entered, release = _blocked_build(monkeypatch)
        load = asyncio.create_task(runtime.load("m", 1, v1))
        await asyncio.wait_for(entered.wait(), 30)
        await runtime.unload_model("m")  # cancels the load while its banks are built
        release.set()
        with pytest.raises(NotFound):  # GenerationMoved: the model was unloaded meanwhile
            await load
        assert not runtime.is_ready("m", 1) and runtime.loaded_versions("m") == []
        await runtime.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not [t for t in others if not t.done()], others  # no batcher left behind

    asyncio.run(body())  # not under wait_for: its own task would be the one left


def test_a_bank_file_that_makes_the_reader_fail_oddly_is_skipped_not_the_version(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error reading one bank skips that bank; the version and its other banks serve."""
    from recalib.onnx.bank_files import read_bank_file as original
    from service.runtime import bank_serving

    v1, refs = parts

    def read(path: Any) -> Any:
        if Path(path) == refs["b"].path:
            raise OverflowError("int too large to convert to float")
        return original(path)

    monkeypatch.setattr(bank_serving, "read_bank_file", read)

    async def body() -> None:
        runtime, _ = _runtime(tmp_path)
        await runtime.set_banks("m", [refs["a"], refs["b"]], None)
        await runtime.serve("m", 1, v1)
        entry = runtime._versions[("m", 1)]  # noqa: SLF001 - the version under test
        assert entry.banks is not None and entry.banks.names == ["a"]
        await runtime.close()

    asyncio.run(asyncio.wait_for(body(), 60))
