"""Tests of service.runtime.bank_drift: drift per stat bank, from one bank session's taps.

The graph is tapped at BN inputs and then rewritten for banks; each bank comes from
:func:`recalib.recalibrate` on its own domain. Rows a bank answers on its own domain score
near zero against that bank; rows of another domain served with it score high; the
per-row split is checked against a float64 reference of the same moments.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

from recalib import recalibrate
from recalib.onnx.banks import BANK_INDEX, BANK_OUTPUT, BankTables, add_bank_inputs
from recalib.onnx.export import export_onnx
from recalib.onnx.names import read_bn_map
from recalib.onnx.taps import add_drift_taps, read_taps
from recalib.statbank import StatBank
from service.runtime.bank_drift import BankDrift
from tests.conftest import SmallCNN, randomise_source_stats

Reference = dict[str, tuple[np.ndarray, np.ndarray]]


def _domain(x: Tensor, k: int) -> Tensor:
    gen = torch.Generator().manual_seed(200 + k)
    scale = torch.rand(3, generator=gen) * 2.5 + 0.3
    shift = torch.randn(3, generator=gen) * 1.5
    return x * scale[:, None, None] + shift[:, None, None]


@pytest.fixture(scope="module", params=["sum", "pool"])
def setup(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]]:
    """Every test twice: the bank graph's taps summed (as the service builds them for this
    model's 6 and 8 channels) and its BatchNorm2d taps pooled (one shared output, sliced
    by rows; the BatchNorm1d stays summed)."""
    torch.manual_seed(0)
    cnn = randomise_source_stats(SmallCNN(), 0).eval()
    path = tmp_path_factory.mktemp("bank_drift") / "cnn.onnx"
    export_onnx(cnn, torch.randn(2, 3, 8, 8), path)
    model = onnx.load(path)
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "pool":  # auto, with any channel count pooled: bn1, bn2 pooled
            patch.setattr("recalib.onnx.taps._POOL_BLOCK", 1)
        graph = add_bank_inputs(add_drift_taps(model, source="input"))
    pooled = [t.pooled_offset is not None for t in read_taps(graph).values()]
    assert pooled == ([True, True, False] if request.param == "pool" else [False] * 3)
    node_of = {info.layer: key for key, info in read_bn_map(model).items()}
    gen = torch.Generator().manual_seed(1)
    banks, references = [], []
    for k in range(2):
        fitted = copy.deepcopy(cnn)
        recalibrate(fitted, _domain(torch.randn(512, 3, 8, 8, generator=gen), k), batch_size=64)
        bank = StatBank.from_model(fitted)
        banks.append(bank)
        references.append(
            {
                node_of[layer]: (mean.double().numpy(), var.double().numpy())
                for layer, (mean, var) in bank.stats.items()
            }
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        graph.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return graph, session, BankTables(graph, banks), references


def _drift(graph: onnx.ModelProto, limit: int = 8) -> BankDrift:
    return BankDrift(
        graph, window_seconds=3600.0, threshold=1.0, sample_fraction=1.0, min_rows=16, limit=limit
    )


def _run(
    setup: tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]],
    drift: BankDrift,
    x: np.ndarray,
    banks: list[int],
) -> np.ndarray:
    _, session, tables, _ = setup
    names = ["output", BANK_OUTPUT, *drift.tap_names]
    values = session.run(names, {"input": x, **tables.feed(banks)})
    drift.submit(values[2:], values[1])
    answered: np.ndarray = values[1]
    return answered


def _x(k: int, n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return _domain(torch.randn(n, 3, 8, 8, generator=gen), k).numpy()


def test_each_bank_is_scored_on_its_own_rows_against_its_own_statistics(
    setup: tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]],
) -> None:
    graph, _, _, references = setup
    drift = _drift(graph)
    assert drift.track(1, "a", references[0]) and drift.track(2, "b", references[1])
    assert drift.should_sample()
    # each domain with its own bank, and rows with bank 0 (the version monitor's: ignored)
    assert _run(setup, drift, _x(0, 64, 5), [1] * 64).tolist() == [1] * 64
    _run(setup, drift, _x(1, 64, 6), [2] * 64)
    _run(setup, drift, _x(0, 8, 7), [0] * 8)
    reports = drift.reports()
    assert set(reports) == {"a", "b"}
    assert reports["a"]["samples"] == 64 and reports["b"]["samples"] == 64
    assert reports["a"]["score"] < 0.2 and reports["b"]["score"] < 0.2
    assert not reports["a"]["exceeded"]

    wrong = _drift(graph)
    wrong.track(1, "a", references[0])
    _run(setup, wrong, _x(1, 64, 8), [1] * 64)  # domain 1 answered by bank a
    report = wrong.reports()["a"]
    assert report["score"] > 1.0 and report["exceeded"]


def test_a_mixed_run_is_split_by_the_bank_that_answered_each_row(
    setup: tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]],
) -> None:
    graph, _, _, references = setup
    x = np.concatenate([_x(0, 32, 11), _x(1, 32, 12)])
    mixed = _drift(graph)
    separate = _drift(graph)
    for d in (mixed, separate):
        d.track(1, "a", references[0])
        d.track(2, "b", references[1])
    _run(setup, mixed, x, [1] * 32 + [2] * 32)
    _run(setup, separate, x[:32], [1] * 32)
    _run(setup, separate, x[32:], [2] * 32)
    got, want = mixed.reports(), separate.reports()
    for name in ("a", "b"):
        assert got[name]["samples"] == want[name]["samples"] == 32
        np.testing.assert_allclose(got[name]["score"], want[name]["score"], rtol=1e-9, atol=1e-12)


def test_banks_beyond_the_limit_are_counted_not_scored_and_forget_stops_scoring(
    setup: tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]],
) -> None:
    graph, _, _, references = setup
    drift = _drift(graph, limit=1)
    assert drift.track(1, "a", references[0])
    assert not drift.track(2, "b", references[1])
    _run(setup, drift, _x(1, 16, 13), [2] * 16)
    assert drift.untracked_rows == 16 and set(drift.reports()) == {"a"}
    assert drift.forget(1) == "a" and drift.reports() == {}
    assert not drift.should_sample()  # nothing tracked: no tapped runs
    assert drift.forget(1) is None


def test_a_reference_without_every_tapped_layer_is_refused(
    setup: tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]],
) -> None:
    graph, _, _, references = setup
    partial = dict(list(references[0].items())[:1])
    with pytest.raises(ValueError, match="expected reference statistics for every tapped layer"):
        _drift(graph).track(1, "a", partial)


def test_reset_empties_every_window_and_samples_the_next_batch(
    setup: tuple[onnx.ModelProto, ort.InferenceSession, BankTables, list[Reference]],
) -> None:
    graph, _, _, references = setup
    drift = BankDrift(
        graph, window_seconds=3600.0, threshold=1.0, sample_fraction=0.25, min_rows=1, limit=4
    )
    drift.track(1, "a", references[0])
    assert [drift.should_sample() for _ in range(8)] == [True, False, False, False] * 2
    _run(setup, drift, _x(0, 4, 14), [1] * 4)
    assert drift.reports()["a"]["samples"] == 4
    drift.reset()
    assert drift.reports()["a"]["samples"] == 0
    assert drift.should_sample()


# -- through the serving runtime -----------------------------------------------------------


def test_the_runtime_reports_drift_per_bank_and_forgets_a_retired_bank(tmp_path: Path) -> None:
    from bank_helpers import bank_ref, domain_images, domain_model, write_bank
    from prometheus_client import CollectorRegistry
    from runtime_helpers import export, make_model, runtime_settings

    from service.api.v2_codec import decode_request, encode_request
    from service.metrics import ServiceMetrics
    from service.runtime.runtime import ServingRuntime

    v1 = export(make_model(0), tmp_path / "v1.onnx")
    proto = onnx.load(v1)
    refs = {
        d: bank_ref(d, write_bank(proto, domain_model(d), tmp_path / f"{d}.st"), {1}) for d in "ab"
    }
    registry = CollectorRegistry()
    settings = runtime_settings(
        tmp_path,
        drift_min_rows=16,
        drift_threshold=0.2,
        warmup_batch_sizes=[1],
        dynamic_batching=False,
    )
    runtime = ServingRuntime(settings, ServiceMetrics(registry))

    async def infer(x: np.ndarray, bank: str | None) -> np.ndarray:
        request = decode_request(*encode_request({"input": x}))
        if bank is not None:
            request.parameters["bank"] = bank
        answer = await runtime.infer("m", None, request)
        out: np.ndarray = answer.outputs[0].data
        return out

    def gauge(bank: str) -> float | None:
        labels = {"model": "m", "version": "1", "bank": bank}
        return registry.get_sample_value("recalib_bank_drift_score", labels)

    async def body() -> None:
        await runtime.serve("m", 1, v1)
        await runtime.set_banks("m", [refs["a"], refs["b"]], None)
        entry = runtime._versions[("m", 1)]  # noqa: SLF001 - the sessions under test
        assert entry.banks is not None and entry.banks.drift is not None
        assert entry.banks.tapped is not None
        x_a, x_c = domain_images(4, 31, "a"), domain_images(4, 32, "c")
        sampled = await infer(x_a, "a")  # every run sampled (fraction 1): the tapped session
        unsampled = await asyncio.to_thread(
            entry.banks.run,
            {"input": x_a, BANK_INDEX: np.full(4, 1, dtype=np.int64)},
            entry.output_names,
            sample=False,
        )
        np.testing.assert_allclose(sampled, unsampled[0], rtol=1e-5, atol=1e-5)
        for i in range(5):
            await infer(domain_images(4, 40 + i, "a"), "a")
            await infer(x_c, "b")  # another domain answered by bank b
        await infer(x_a, None)  # plain: the version's own monitor
        report = await asyncio.to_thread(runtime.drift, "m")
        banks = report["banks"]
        assert set(banks) == {"a", "b"}
        assert banks["a"]["samples"] == 24 and banks["b"]["samples"] == 20
        # its own domain ~0.003 against bank a; another domain ~0.46 against bank b
        assert banks["a"]["score"] < 0.05 and banks["b"]["score"] > 0.2
        assert not banks["a"]["exceeded"] and banks["b"]["exceeded"]  # threshold 0.2
        assert report["samples"] == 4  # the version's monitor saw only the plain request
        assert gauge("a") is not None and gauge("b") is not None
        await runtime.set_banks("m", [refs["a"]], None)  # b deleted
        assert set(runtime.drift("m")["banks"]) == {"a"} and gauge("b") is None
        await asyncio.to_thread(runtime.reset_drift, "m")
        assert runtime.drift("m")["banks"]["a"]["samples"] == 0
        await runtime.close()

    asyncio.run(asyncio.wait_for(body(), 60.0))
