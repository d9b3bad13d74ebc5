"""The benchmark scripts still run (tiny sizes, CPU): the GPU runs of docs/benchmarks.md
use the same scripts with bigger arguments, on machines where there is no time to debug
them. Numbers are not checked here: benchmarks print ratios, tests never time anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import run_script as _run

pytestmark = pytest.mark.slow


def test_recalib_speed_prints_its_table_and_the_cpu_comparison() -> None:
    out = _run(
        "recalib_speed.py",
        *("--batches", "2", "--batch-size", "4", "--size", "16", "--repeats", "1"),
        *("--threads", "1", "--verify", "1"),
    )
    for case in ("eval forward", "update_bn", "exact/train", "exact/eval"):
        assert case in out
    # The same weights and data on the same device: identical statistics.
    line = next(li for li in out.splitlines() if li.startswith("default"))
    assert [float(v) for v in line.split()[1:]] == [0.0, 0.0]


def test_serve_batches_compares_in_process_and_http() -> None:
    out = _run(
        "serve_batches.py",
        *("--model", "resnet", "--size", "16", "--batch-sizes", "1,4"),
        *("--concurrency", "1", "--seconds", "0.2", "--rounds", "1", "--threads", "1"),
    )
    rows = [li.split() for li in out.splitlines() if li[:5].strip() in ("1", "4")]
    assert [(r[0], r[2]) for r in rows] == [
        ("1", "in-process"),
        ("1", "HTTP"),
        ("4", "in-process"),
        ("4", "HTTP"),
    ]
    assert all(float(r[3]) > 0 for r in rows)  # images/s measured in every cell


def _small_bn_onnx(path: Path) -> Path:
    """Conv -> BatchNorm -> Relu -> GlobalAveragePool -> Gemm on 3x8x8, batch first, made
    with onnx.helper: no torch export in a smoke test."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    var = numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "var")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"]),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "fc", "fb"], ["output"], transB=1),
        ],
        "small_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        [init("w", 4, 3, 3, 3), init("b", 4), init("g", 4), init("beta", 4), init("mean", 4)]
        + [var, init("fc", 2, 4), init("fb", 2)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_data_plane_measures_in_process_and_recalib_and_names_missing_peers(
    tmp_path: Path,
) -> None:
    model = _small_bn_onnx(tmp_path / "small_bn.onnx")
    out = _run(
        "data_plane.py",
        *("--model", str(model), "--seconds", "0.1", "--rounds", "1", "--threads", "1"),
        *("--mlserver-python", "/nonexistent/python"),
    )
    lines = out.splitlines()
    measured = [li for li in lines if li.split()[-1:] and li.split()[-1].isdigit()]
    setups = {li[:34].strip() for li in measured}
    assert {
        "in-process ORT",
        "recalib REST JSON",
        "recalib REST binary, batching off",
        "recalib REST binary, batching on",
        "recalib gRPC, batching on",
        "recalib gRPC stream, batching on",
        "floor: bare ASGI, uvicorn, binary",
    } <= setups
    for li in measured:  # conc, req/s, p50, p99, x ORT, server ms/req, client ms/req, RSS
        fields = li[34:].split()
        assert fields[0] in ("1", "16") and float(fields[1]) > 0 and float(fields[-1]) > 0
    assert "KServe REST JSON                   skipped: --kserve-python not given" in lines
    assert any(li.startswith("MLServer gRPC") and "/nonexistent/python" in li for li in lines)
    # the target lines, pass or fail: the torch check, RSS, CPU, ratios; KServe's unmeasured
    targets = [li.strip() for li in lines if li.strip().startswith("[")]
    assert len(targets) == 8
    assert targets[0].startswith("[PASS] inference role imports no torch")
    # the RSS line also gives the libraries' own share: a session after the server's imports
    floor = targets[1].split("third-party packages (")[1]
    assert {"fastapi", "grpc", "onnxruntime"} <= set(floor.split(")")[0].split(", "))
    assert float(floor.split("): ")[1].split(" MB")[0]) > 0
    assert "[not measured] REST JSON >= 3x KServe" in targets[-2]
    # the unbatched CPU lines give the bare ASGI floor's own excess beside recalib's
    cpu = [t for t in targets if "server CPU per request" in t]
    assert [("a bare ASGI callable on uvicorn: +" in t) for t in cpu] == [True, True, False]
    assert "one stream with 16 in flight: " in targets[-1]  # the stream's ratio, measured


def test_stat_banks_prints_every_case_and_the_memory_line() -> None:
    out = _run(
        "stat_banks.py",
        *("--size", "16", "--banks", "1,4", "--seconds", "0.05", "--rounds", "1"),
        *("--concurrency", "1,2"),
    )
    cases = ("original", "banks K=1 ", "banks K=4 ", "K=4, auto", "K=4, no routing", "same bank")
    for case in cases:
        assert any(li.startswith(case) or case in li for li in out.splitlines()), case
    assert "RSS growth with 4 banks" in out


def test_bank_serving_puts_banks_and_prints_every_case_and_the_ratios(tmp_path: Path) -> None:
    model = _small_bn_onnx(tmp_path / "small_bn.onnx")
    out = _run(
        "bank_serving.py",
        *("--model", str(model), "--banks", "3", "--seconds", "0.1", "--rounds", "1"),
    )
    lines = out.splitlines()
    for case in ("no bank", "explicit bank (K=1)", "random explicit bank (K=3)", "auto routing"):
        cells = [li for li in lines if case in li and li.startswith(("one:", "many:"))]
        assert len(cells) == 2, case  # concurrency 1 and 16
        assert all(float(li.split()[-4]) > 0 for li in cells), cells  # req/s measured
    assert sum(li.strip().startswith(("c=1:", "c=16:")) for li in lines) == 2
    assert "after 2 banks put and served" in out
    assert "an auto request's answer: {'bank': " in out  # a bank, or "none" (fallback)
