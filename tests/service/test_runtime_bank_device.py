"""Stat-bank tables resident on the device (the IOBinding path CUDA uses), run on CPU
``OrtValue`` s: the same answers as host-fed runs, one copy of the tables per change of the
banks (not per run), a bank added or retired reaches the device copy at the next run.

References: the host-fed bank session (``uses_binding`` off) on the same inputs; both are
float32 ONNX Runtime on one graph, so they agree to float32 rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from bank_helpers import bank_ref, domain_images, domain_model, write_bank
from runtime_helpers import export, make_model, runtime_settings

from recalib.onnx.banks import AUTO, BANK_INDEX
from service.runtime.bank_refs import BankRef
from service.runtime.bank_serving import VersionBanks
from service.runtime.sessions import ModelSession, TensorSpec


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, BankRef]]:
    root = tmp_path_factory.mktemp("bank_device")
    v1 = export(make_model(0), root / "v1.onnx")
    proto = onnx.load(v1)
    refs = {
        d: bank_ref(d, write_bank(proto, domain_model(d), root / f"{d}.st"), {1}) for d in "abc"
    }
    return v1, refs


def _build(path: Path, home: Path, *, binding: bool) -> tuple[VersionBanks, list[int]]:
    settings = runtime_settings(home, warmup_batch_sizes=[1])
    inputs = [TensorSpec("input", "FP32", (-1, 3, 8, 8))]
    banks = VersionBanks.build(path, settings, label="model 'm' version 1", inputs=inputs)
    copies: list[int] = []
    for attr in ("session", "tapped"):
        host = getattr(banks, attr)
        if host is None:
            continue
        session = ModelSession(host.session, "cpu", False, binding=binding)
        original = session.to_device

        def counted(value: Any, original: Any = original) -> Any:
            copies.append(value.shape[0] if value.ndim else 0)
            return original(value)

        session.to_device = counted  # type: ignore[method-assign]
        setattr(banks, attr, session)
    return banks, copies


def _answers(banks: VersionBanks, x: np.ndarray, index: list[int], sample: bool) -> list[Any]:
    feed = {"input": x, BANK_INDEX: np.asarray(index, dtype=np.int64)}
    return banks.run(feed, ["output"], sample=sample)


def test_device_tables_answer_like_host_tables_and_are_copied_once_per_change(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path
) -> None:
    path, refs = parts
    host, _ = _build(path, tmp_path / "host", binding=False)
    device, copies = _build(path, tmp_path / "device", binding=True)
    assert device.drift is not None  # drift sampled on every run: the tapped twin too
    for banks in (host, device):
        assert banks.sync([refs["a"], refs["b"]]) == []
    x = np.concatenate([domain_images(2, 3, d) for d in "ab"])
    index = [1, 1, 2, 2]
    for sample in (False, True):
        want = _answers(host, x, index, sample)
        got = _answers(device, x, index, sample)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    tables = len([n for n in host.tables.feed([0]) if n.startswith("recalib_bank::")])
    assert tables > 0 and 0 < len(copies) <= len(host.tables.feed([0]))  # copied once
    before = len(copies)
    for _ in range(5):
        _answers(device, x, index, False)
    assert len(copies) == before  # not per run

    # a bank added: the next run copies K=4 tables and can use it
    assert device.sync([refs["a"], refs["b"], refs["c"]]) == []
    host.sync([refs["a"], refs["b"], refs["c"]])
    xc = domain_images(2, 4, "c")
    np.testing.assert_allclose(
        _answers(device, xc, [3, 3], False)[0],
        _answers(host, xc, [3, 3], False)[0],
        rtol=1e-6,
        atol=1e-6,
    )
    assert len(copies) > before and max(copies) == 4
    # routed: each domain's rows to its bank, on the device copy
    xs = np.concatenate([domain_images(1, 10 + i, d) for i, d in enumerate("abc")])
    routed = _answers(device, xs, [AUTO] * 3, False)[1]
    assert routed.tolist() == [1, 2, 3]
    # b retired: the device copy is refreshed, routing never picks it again
    after_add = len(copies)
    assert device.sync([refs["a"], refs["c"]]) == []
    xb = domain_images(4, 11, "b")
    assert 2 not in _answers(device, xb, [AUTO] * 4, False)[1].tolist()
    assert len(copies) > after_add


def test_resident_inputs_need_a_binding_session(
    parts: tuple[Path, dict[str, BankRef]], tmp_path: Path
) -> None:
    path, _ = parts
    banks, _ = _build(path, tmp_path, binding=False)
    with pytest.raises(ValueError, match="expected resident inputs only on a session with"):
        banks.session.run({"input": np.zeros((1, 3, 8, 8), np.float32)}, resident={"x": 0})
