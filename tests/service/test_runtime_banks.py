"""ServingRuntime with stat banks (issue 13): a bank per request, mixed banks in one
batched run, auto routing and its fallback, banks pushed to loaded versions without a
session rebuild, retired banks, defaults, metadata and metrics.

References: the torch model with each bank's statistics in float64 (the bank graph runs
float32, unfused: RTOL/ATOL as in tests/recalib/test_onnx_banks.py)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
from bank_helpers import bank_ref, domain_images, domain_model, reference64, write_bank
from prometheus_client import CollectorRegistry
from runtime_helpers import export, make_model, runtime_settings, source_images

from recalib.onnx.banks import BANK_INDEX
from service.api.v2_codec import decode_request, encode_request
from service.errors import InvalidInput, NotFound
from service.metrics import ServiceMetrics
from service.runtime.bank_refs import BankRef
from service.runtime.runtime import ServingRuntime
from service.runtime.tensors import InferRequest, InferResponse
from service.runtime.versions import LoadedVersion

T = TypeVar("T")
RTOL, ATOL = 1e-4, 1e-4


def _run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, 60.0)

    return asyncio.run(main())


@dataclass
class World:
    v1: Path
    v2: Path
    refs: dict[str, BankRef]  # a, b, c (valid for 1); broken, alien (skipped)
    models: dict[str, Any]  # domain -> torch model with that bank's statistics


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("banks")
    v1 = export(make_model(0), root / "v1.onnx")
    v2 = export(make_model(1), root / "v2.onnx")
    proto1, proto2 = onnx.load(v1), onnx.load(v2)
    models = {d: domain_model(d) for d in "abc"}
    refs = {d: bank_ref(d, write_bank(proto1, models[d], root / f"{d}.st"), {1}) for d in "abc"}
    broken = root / "broken.st"
    broken.write_bytes(b"not a bank")
    refs["broken"] = bank_ref("broken", broken, {1})
    # statistics stamped with version 2's weights, pushed as if valid for version 1
    refs["alien"] = bank_ref("alien", write_bank(proto2, models["a"], root / "alien.st"), {1})
    return World(v1, v2, refs, models)


def _request(x: np.ndarray, bank: Any = None) -> InferRequest:
    request = decode_request(*encode_request({"input": x}))
    if bank is not None:
        request.parameters["bank"] = bank
    return request


def _runtime(tmp_path: Path, **settings: Any) -> tuple[ServingRuntime, CollectorRegistry]:
    registry = CollectorRegistry()
    base = {"bank_metric_limit": 2, "warmup_batch_sizes": [1]}
    runtime = ServingRuntime(
        runtime_settings(tmp_path, **{**base, **settings}), ServiceMetrics(registry)
    )
    return runtime, registry


def _entry(runtime: ServingRuntime, version: int = 1) -> LoadedVersion:
    return runtime._versions[("m", version)]  # noqa: SLF001 - the sessions under test


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def _infer(runtime: ServingRuntime, x: np.ndarray, bank: Any = None) -> InferResponse:
    return await runtime.infer("m", None, _request(x, bank))


def test_explicit_banks_answer_with_their_statistics_and_plain_requests_are_unchanged(
    world: World, tmp_path: Path
) -> None:
    x = domain_images(3, 7, "a")

    async def body() -> None:
        runtime, registry = _runtime(tmp_path)
        await runtime.serve("m", 1, world.v1)
        before = await _infer(runtime, x)
        entry = _entry(runtime)
        sessions = (entry.plain, entry.tapped)
        await runtime.set_banks("m", [world.refs["a"], world.refs["b"]], None)
        assert entry.banks is not None and entry.banks.names == ["a", "b"]
        for bank in ("a", "b"):
            got = await _infer(runtime, x, bank)
            np.testing.assert_allclose(
                got.outputs[0].data, reference64(world.models[bank], x), rtol=RTOL, atol=ATOL
            )
            assert got.parameters is not None
            assert got.parameters["bank"] == f"{bank},{bank},{bank}"
            assert got.parameters["bank_fallback"] is False
            distances = [float(d) for d in got.parameters["bank_distance"].split(",")]
            assert len(distances) == 3 and all(math.isfinite(d) and d >= 0 for d in distances)
        # without a bank (no default), and with "none": the plain session, bit for bit
        after = await _infer(runtime, x)
        assert after.parameters is None
        np.testing.assert_array_equal(after.outputs[0].data, before.outputs[0].data)
        none = await _infer(runtime, x, "none")
        assert none.parameters == {"bank": "none", "bank_fallback": False}
        np.testing.assert_array_equal(none.outputs[0].data, before.outputs[0].data)
        assert (entry.plain, entry.tapped) == sessions
        # drift keeps sampling plain requests only (the bank session has no taps)
        assert entry.monitor is not None
        await asyncio.to_thread(entry.monitor.flush)
        assert entry.monitor.report()["samples"] == 3 * 3  # before, after, none
        meta = runtime.metadata("m")["parameters"]
        assert (meta["stat_banks"], meta["default_bank"]) == (2, "none")
        assert _value(registry, "recalib_bank_requests_total", model="m", bank="a") == 1
        assert _value(registry, "recalib_bank_requests_total", model="m", bank="none") == 1
        assert _value(registry, "recalib_stat_banks", model="m", version="1") == 2
        await runtime.close()

    _run(body())


def test_mixed_banks_in_one_batched_run_answer_like_separate_runs(
    world: World, tmp_path: Path
) -> None:
    banks = ["a", "b", "c", "a", "b", "c"]
    xs = [domain_images(1 + i % 2, 20 + i, bank) for i, bank in enumerate(banks)]

    async def body() -> None:
        runtime, _ = _runtime(tmp_path, max_queue_delay_ms=50.0, bank_metric_limit=8)
        await runtime.serve("m", 1, world.v1)
        await runtime.set_banks("m", [world.refs[d] for d in "abc"], None)
        entry = _entry(runtime)
        assert entry.banks is not None
        alone = [await _infer(runtime, x, b) for x, b in zip(xs, banks, strict=True)]
        runs: list[list[int]] = []
        original = entry.banks.run

        def recording(feed: Mapping[str, Any], names: Sequence[str]) -> list[Any]:
            runs.append(feed[BANK_INDEX].tolist())
            return original(feed, names)

        entry.banks.run = recording  # type: ignore[method-assign,assignment]
        executed = entry.stats.execution_count
        together = await asyncio.gather(
            *(_infer(runtime, x, b) for x, b in zip(xs, banks, strict=True))
        )
        assert entry.stats.execution_count - executed == len(runs) < len(banks)
        assert max(len(set(r)) for r in runs) == 3  # one run gathered all three banks
        for one, batched, bank in zip(alone, together, banks, strict=True):
            np.testing.assert_allclose(
                batched.outputs[0].data, one.outputs[0].data, rtol=1e-6, atol=1e-6
            )
            assert batched.parameters is not None and one.parameters is not None
            assert batched.parameters["bank"] == one.parameters["bank"]
            assert set(batched.parameters["bank"].split(",")) == {bank}
        await runtime.close()

    _run(body())


def test_auto_routes_each_request_to_its_domain_and_far_rows_fall_back(
    world: World, tmp_path: Path
) -> None:
    async def body() -> None:
        runtime, registry = _runtime(tmp_path, bank_metric_limit=8)
        await runtime.serve("m", 1, world.v1)
        await runtime.set_banks("m", [world.refs[d] for d in "abc"], None)
        for i in range(4):
            for domain in "abc":
                x = domain_images(1, 100 + i, domain)
                got = await _infer(runtime, x, "auto")
                assert got.parameters is not None
                assert got.parameters["bank"] == domain, (i, domain, got.parameters)
                assert got.parameters["bank_fallback"] is False
                assert 0.0 <= got.parameters["bank_distance"] < 2.0
                np.testing.assert_allclose(
                    got.outputs[0].data,
                    reference64(world.models[domain], x),
                    rtol=RTOL,
                    atol=ATOL,
                )
        assert _value(registry, "recalib_bank_route_distance_count", model="m") == 12
        assert _value(registry, "recalib_bank_requests_total", model="m", bank="b") == 4
        # far from every bank: the version's statistics, said and counted
        far = source_images(2, 5) * 6.0 + 5.0
        plain = await _infer(runtime, far)
        got = await _infer(runtime, far, "auto")
        assert got.parameters is not None
        assert got.parameters["bank"] == "none,none" and got.parameters["bank_fallback"] is True
        np.testing.assert_allclose(got.outputs[0].data, plain.outputs[0].data, rtol=RTOL, atol=ATOL)
        assert _value(registry, "recalib_bank_fallbacks_total", model="m") == 2
        assert _value(registry, "recalib_bank_route_distance_count", model="m") == 12
        await runtime.close()

    _run(body())


def test_pushed_banks_change_loaded_versions_without_a_rebuild(
    world: World, tmp_path: Path
) -> None:
    refs = world.refs
    x_b = domain_images(1, 40, "b")
    x_c = domain_images(2, 41, "c")

    async def body() -> None:
        runtime, registry = _runtime(tmp_path)
        await runtime.serve("m", 1, world.v1)
        await runtime.load("m", 2, world.v2)
        await runtime.set_banks("m", [refs["a"], refs["b"], refs["broken"], refs["alien"]], None)
        entry = _entry(runtime)
        assert entry.banks is not None and entry.banks.names == ["a", "b"]
        assert _value(registry, "recalib_bank_load_failures_total", model="m") == 2
        sessions = (entry.plain, entry.tapped, entry.banks.session)
        # a bank added: served at once by the same sessions
        await runtime.set_banks("m", [refs["a"], refs["b"], refs["c"]], None)
        assert (entry.plain, entry.tapped, entry.banks.session) == sessions
        got = await _infer(runtime, x_c, "c")
        np.testing.assert_allclose(
            got.outputs[0].data, reference64(world.models["c"], x_c), rtol=RTOL, atol=ATOL
        )
        # the skipped files are not read (nor counted) again
        assert _value(registry, "recalib_bank_load_failures_total", model="m") == 2
        # bank b taken away: 404 for new requests, never routed to
        await runtime.set_banks("m", [refs["a"], refs["c"]], None)
        with pytest.raises(NotFound, match=r"version 1 has no stat bank 'b' \(its banks: a, c\)"):
            await _infer(runtime, x_b, "b")
        routed = await _infer(runtime, x_b, "auto")
        assert routed.parameters is not None and routed.parameters["bank"] in ("a", "c", "none")
        assert entry.banks.session is sessions[2]
        # version 2 (other weights): no bank is valid for it
        assert _entry(runtime, 2).banks is None
        with pytest.raises(NotFound, match=r"version 2 has no stat bank 'a' \(its banks: none\)"):
            await runtime.infer("m", 2, _request(x_c, "a"))
        auto2 = await runtime.infer("m", 2, _request(x_c, "auto"))
        assert auto2.parameters == {"bank": "none", "bank_fallback": True}
        with pytest.raises(InvalidInput, match=r"expected a stat bank name.*got int 3"):
            await _infer(runtime, x_c, 3)
        # a default applies to requests that name no bank; a default bank a version lacks
        # answers with its statistics
        await runtime.set_banks("m", [refs["a"], refs["c"]], "c")
        defaulted = await _infer(runtime, x_c)
        assert defaulted.parameters is not None and defaulted.parameters["bank"] == "c,c"
        assert (await runtime.infer("m", 2, _request(x_c))).parameters == {
            "bank": "none",
            "bank_fallback": False,
        }
        assert runtime.metadata("m")["parameters"]["default_bank"] == "c"
        # unloading keeps the pushed banks: a reload gets them
        await runtime.unload_model("m")
        await runtime.serve("m", 1, world.v1)
        reloaded = _entry(runtime)
        assert reloaded is not entry and reloaded.banks is not None
        assert reloaded.banks.names == ["a", "c"]
        # bank label cardinality: the first two names, then "other"
        await _infer(runtime, x_c, "a")
        await runtime.set_banks("m", [refs["a"], refs["b"], refs["c"]], None)
        for bank in "acb":
            await _infer(runtime, x_c, bank)
        labels = {
            s.labels["bank"]
            for f in registry.collect()
            if f.name == "recalib_bank_requests"
            for s in f.samples
        }
        assert labels == {"a", "c", "other"}
        # the model deleted: its banks are forgotten
        await runtime.set_banks("m", [], None)
        await runtime.unload_model("m")
        await runtime.serve("m", 1, world.v1)
        assert _entry(runtime).banks is None
        with pytest.raises(NotFound, match="its banks: none"):
            await _infer(runtime, x_c, "a")
        await runtime.close()

    _run(body())
