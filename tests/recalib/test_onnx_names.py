"""Tests of recalib.onnx.names on hand-built ONNX graphs (no torch export involved)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from recalib.errors import RecalibError
from recalib.onnx.names import (
    BN_MAP_KEY,
    BnGraphError,
    bn_node_stats,
    read_bn_map,
    set_bn_node_stats,
    untie_bn_stats,
    write_bn_map,
)

C = 3
EPS = 1e-5


def _init(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, name=name)


def _bn_graph(
    dtype: type[np.floating] = np.float32,
    *,
    names: tuple[str, str] = ("bn_a", "bn_b"),
    share_mean: bool = False,
    mean_as_input: bool = False,
) -> onnx.ModelProto:
    """x -> BN a -> BN b -> y, with seeded statistics in ``dtype``."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = []
    for p in ("a", "b"):
        inits += [
            _init(f"{p}.scale", rng.uniform(0.5, 1.5, C).astype(dtype)),
            _init(f"{p}.bias", rng.normal(size=C).astype(dtype)),
            _init(f"{p}.mean", rng.normal(size=C).astype(dtype)),
            _init(f"{p}.var", rng.uniform(0.5, 2.0, C).astype(dtype)),
        ]
    inputs = [helper.make_tensor_value_info("x", elem, ["batch", C, 2])]
    if mean_as_input:
        inits = [t for t in inits if t.name != "a.mean"]
        inputs.append(helper.make_tensor_value_info("a.mean", elem, [C]))
    b_mean = "a.mean" if share_mean else "b.mean"
    nodes = [
        helper.make_node(
            "BatchNormalization",
            ["x", "a.scale", "a.bias", "a.mean", "a.var"],
            ["h"],
            name=names[0],
            epsilon=EPS,
        ),
        helper.make_node(
            "BatchNormalization",
            ["h", "b.scale", "b.bias", b_mean, "b.var"],
            ["y"],
            name=names[1],
            epsilon=EPS,
        ),
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", elem, ["batch", C, 2])], inits
    )
    # IR 8 goes with opset 17 (make_model defaults to the newest IR, too new for ORT)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn_reference(x: np.ndarray, model: onnx.ModelProto) -> np.ndarray:
    """Both BN nodes in float64 with NumPy, from the stored parameters."""
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = x.astype(np.float64)
    for node in model.graph.node:
        scale, bias, mean, var = (init[n].reshape(1, -1, 1) for n in node.input[1:])
        h = scale * (h - mean) / np.sqrt(var + EPS) + bias
    return h


def test_foreign_graph_without_metadata_names_layers_after_nodes() -> None:
    model = _bn_graph(names=("first", ""))
    infos = read_bn_map(model)
    assert list(infos) == ["first", "BatchNormalization_1"]
    a, b = infos.values()
    assert (a.layer, a.mean, a.var, a.channels, a.input) == ("first", "a.mean", "a.var", C, "x")
    assert (b.layer, b.input) == ("BatchNormalization_1", "h")
    assert a.epsilon == pytest.approx(EPS)


def test_stats_roundtrip_and_runtime_uses_them() -> None:
    model = _bn_graph()
    new = {
        "bn_a": (np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 1.0])),
        "bn_b": (np.array([1.0, 0.0, -0.5]), np.array([2.0, 0.5, 3.0])),
    }
    set_bn_node_stats(model, new)
    got = bn_node_stats(model)
    for key, (mean, var) in new.items():
        assert got[key][0].dtype == np.float32
        np.testing.assert_array_equal(got[key][0], mean.astype(np.float32))
        np.testing.assert_array_equal(got[key][1], var.astype(np.float32))
    x = np.random.default_rng(1).normal(size=(4, C, 2)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, _bn_reference(x, model), rtol=1e-5, atol=1e-5)


def test_fp16_statistics_stay_fp16() -> None:
    model = _bn_graph(np.float16)
    mean = np.array([0.1, -2.5, 3.0], dtype=np.float64)
    var = np.array([0.3, 1.7, 1000.0], dtype=np.float64)
    set_bn_node_stats(model, {"bn_a": (mean, var)})
    stored = {t.name: t for t in model.graph.initializer}
    assert stored["a.mean"].data_type == TensorProto.FLOAT16
    assert stored["a.var"].data_type == TensorProto.FLOAT16
    got_mean, got_var = bn_node_stats(model)["bn_a"]
    assert got_mean.dtype == np.float16 and got_var.dtype == np.float16
    np.testing.assert_array_equal(got_mean, mean.astype(np.float16))
    np.testing.assert_array_equal(got_var, var.astype(np.float16))
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(BnGraphError, match="overflows the stored dtype float16"):
        set_bn_node_stats(model, {"bn_a": (mean, var * 1e3)})
    np.testing.assert_array_equal(bn_node_stats(model)["bn_a"][1], var.astype(np.float16))


def test_bad_values_are_refused_before_anything_is_written() -> None:
    model = _bn_graph()
    before = bn_node_stats(model)
    good = (np.zeros(C), np.ones(C))
    cases = [
        ({"bn_a": good, "nope": good}, "no inference BN node"),
        ({"bn_a": good, "bn_b": (np.zeros(C + 1), np.ones(C))}, "shape"),
        ({"bn_a": good, "bn_b": (np.full(C, np.nan), np.ones(C))}, "finite"),
        ({"bn_a": good, "bn_b": (np.zeros(C), -np.ones(C))}, "var >= 0"),
    ]
    for stats, message in cases:
        with pytest.raises(BnGraphError, match=message):
            set_bn_node_stats(model, stats)
    after = bn_node_stats(model)
    for key, (mean, var) in before.items():
        np.testing.assert_array_equal(after[key][0], mean)
        np.testing.assert_array_equal(after[key][1], var)


def test_shared_statistics_need_equal_values_or_untying() -> None:
    model = _bn_graph(share_mean=True)
    mean = np.array([1.0, 2.0, 3.0])
    var = np.ones(C)
    set_bn_node_stats(model, {"bn_a": (mean, var), "bn_b": (mean, var)})  # same: fine
    with pytest.raises(BnGraphError, match="shared"):
        set_bn_node_stats(model, {"bn_a": (mean, var), "bn_b": (-mean, var)})
    with pytest.raises(BnGraphError, match="also read outside"):
        set_bn_node_stats(model, {"bn_a": (-mean, var)})  # would change bn_b too

    assert untie_bn_stats(model) == 1
    onnx.checker.check_model(model, full_check=True)
    infos = read_bn_map(model)
    assert infos["bn_a"].mean != infos["bn_b"].mean
    set_bn_node_stats(model, {"bn_a": (-mean, var)})
    got = bn_node_stats(model)
    np.testing.assert_array_equal(got["bn_a"][0], -mean.astype(np.float32))
    np.testing.assert_array_equal(got["bn_b"][0], mean.astype(np.float32))


def test_identity_and_constant_statistics() -> None:
    model = _bn_graph()
    graph = model.graph
    a_var = next(t for t in graph.initializer if t.name == "a.var")
    graph.initializer.remove(a_var)
    graph.node.insert(0, helper.make_node("Constant", [], ["a.var"], value=a_var))
    graph.node.insert(1, helper.make_node("Identity", ["a.mean"], ["a.mean.copy"]))
    graph.node[2].input[3] = "a.mean.copy"
    onnx.checker.check_model(model, full_check=True)
    expected = bn_node_stats(model)["bn_a"]  # read through the Identity and the Constant

    new = (np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(BnGraphError, match="untie_bn_stats"):
        set_bn_node_stats(model, {"bn_a": new})
    assert untie_bn_stats(model) == 2  # both become initializers of bn_a
    assert [n.op_type for n in graph.node] == ["BatchNormalization"] * 2
    np.testing.assert_array_equal(bn_node_stats(model)["bn_a"][0], expected[0])
    set_bn_node_stats(model, {"bn_a": new})
    np.testing.assert_array_equal(bn_node_stats(model)["bn_a"][1], new[1].astype(np.float32))
    onnx.checker.check_model(model, full_check=True)


def test_statistics_fed_as_graph_input_cannot_be_set() -> None:
    model = _bn_graph(mean_as_input=True)
    assert read_bn_map(model)["bn_a"].mean == "a.mean"
    with pytest.raises(BnGraphError, match="graph input"):
        set_bn_node_stats(model, {"bn_a": (np.zeros(C), np.ones(C))})
    with pytest.raises(BnGraphError, match="graph input"):
        bn_node_stats(model)
    assert issubclass(BnGraphError, RecalibError)


def test_written_map_reads_back_and_detects_edits() -> None:
    model = _bn_graph()
    infos = write_bn_map(model, {"bn_a": "features.bn1", "bn_b": "head.bn"})
    assert read_bn_map(model) == infos
    assert infos["bn_b"].layer == "head.bn"
    stored = json.loads(next(p.value for p in model.metadata_props if p.key == BN_MAP_KEY))
    assert stored["bn_a"] == {
        "layer": "features.bn1",
        "mean": "a.mean",
        "var": "a.var",
        "channels": C,
    }

    with pytest.raises(BnGraphError, match="expected a layer for each BN node"):
        write_bn_map(model, {"bn_a": "features.bn1"})
    model.graph.node[1].name = "renamed"
    with pytest.raises(BnGraphError, match="does not match the graph"):
        read_bn_map(model)
    model.graph.node[1].name = "bn_b"
    model.graph.node[1].input[4] = "a.var"
    with pytest.raises(BnGraphError, match="edited after export"):
        read_bn_map(model)


def test_batch_statistics_nodes_are_not_listed() -> None:
    model = _bn_graph()
    graph = model.graph
    graph.node.insert(1, helper.make_node("ReduceMean", ["h"], ["h.mean"], axes=[0, 2], keepdims=0))
    graph.node[2].input[3] = "h.mean"  # bn_b now reads a statistic computed in the graph
    assert list(read_bn_map(model)) == ["bn_a"]
    assert list(bn_node_stats(model)) == ["bn_a"]
