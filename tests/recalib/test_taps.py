"""Tests of recalib.onnx.taps: in-graph BN input moments against float64 NumPy references."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from recalib.drift import MomentWindow, RollingWindow, score_model
from recalib.errors import NoBatchNormError
from recalib.onnx.taps import (
    POOLED_OUTPUT,
    TAP_METADATA_KEY,
    add_drift_taps,
    read_taps,
    reference_stats,
    tap_moments,
    tap_output_names,
)

DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
ENABLE_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

# float32 reductions over at most a few hundred values per row, rows merged in float64,
# and (for output taps) Conv+BN fused by ORT: errors are ~1e-7; 1e-5 leaves headroom.
MEAN_TOL = 1e-5  # |mean error| / std
VAR_TOL = 1e-5  # |var error| / var


class Net(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU, then Linear-BN1d on the flattened features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            state = {
                "running_mean": torch.rand(c, generator=gen) * 2 - 1,
                "running_var": torch.rand(c, generator=gen) * 1.5 + 0.5,
                "weight": torch.rand(c, generator=gen) + 0.5,
                "bias": torch.rand(c, generator=gen) - 0.5,
            }
            m.load_state_dict(state, strict=False)


def _export(model: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notices
        torch.onnx.export(
            model.eval(),
            (torch.zeros(shape),),
            cast(Any, buf),  # the legacy exporter writes to a file object
            dynamo=False,
            do_constant_folding=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    return onnx.load_from_string(buf.getvalue())


def _session(
    model: onnx.ModelProto, level: ort.GraphOptimizationLevel = ENABLE_ALL
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(
    model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel = ENABLE_ALL
) -> dict[str, np.ndarray]:
    sess = _session(model, level)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))


def _bn_inputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each BN node's input X, exposed as an extra output of an unoptimised copy."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    nodes = [n for n in exposed.graph.node if n.op_type == "BatchNormalization"]
    elem = exposed.graph.input[0].type.tensor_type.elem_type
    for node in nodes:
        exposed.graph.output.append(helper.make_tensor_value_info(node.input[0], elem, None))
    outs = _run(exposed, x, DISABLE_ALL)
    return {node.name or node.output[0]: outs[node.input[0]] for node in nodes}


def _assert_moments(
    windows: dict[str, MomentWindow],
    acts: dict[str, np.ndarray],
    mean_tol: float = MEAN_TOL,
    var_tol: float = VAR_TOL,
) -> None:
    assert set(windows) == set(acts)
    for layer, x in acts.items():
        ref = MomentWindow.from_samples(x.astype(np.float64))
        got = windows[layer]
        assert float(got.count) == float(ref.count), layer
        std = np.sqrt(ref.var)
        assert np.max(np.abs(got.mean - ref.mean) / std) <= mean_tol, layer
        assert np.max(np.abs(got.var / ref.var - 1.0)) <= var_tol, layer


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.3, 1.2, size=(n, 3, 8, 8)).astype(np.float32)


def _calibrated_net(seed: int) -> Net:
    """A Net with random BN affine parameters and running statistics of ``_images``."""
    torch.manual_seed(seed)
    model = Net()
    _randomize_bn(model, seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the population stats
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(_images(512, seed=100 + seed)))
    return model.eval()


@pytest.fixture(scope="module")
def net_onnx() -> onnx.ModelProto:
    # Live data from the distribution the statistics describe: output taps map Y back to X
    # with an error relative to the live std that grows as sigma_ref / sigma_live, so a
    # tolerance test belongs in the regime the taps serve (drift is then measured, not
    # pinned to 1e-5).
    return _export(_calibrated_net(0), (2, 3, 8, 8))


def _bn_graph(
    opset: int,
    *,
    elem: int = TensorProto.FLOAT,
    mean: np.ndarray | None = None,
    var: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    channels: int = 3,
    shape: tuple[Any, ...] | None = None,
) -> onnx.ModelProto:
    """X (N, C, 4, 5) -> BatchNormalization -> Relu, written with onnx.helper (C = 3 unless
    given; ``shape``: X's declared shape instead)."""
    rng = np.random.default_rng(opset)
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    c = channels
    params = {
        "scale": rng.uniform(0.5, 1.5, c) if scale is None else scale,
        "bias": rng.uniform(-0.5, 0.5, c),
        "mean": rng.uniform(-1, 1, c) if mean is None else mean,
        "var": rng.uniform(0.5, 2, c) if var is None else var,
    }
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np_dtype), k) for k, v in params.items()]
    nodes = [
        helper.make_node("BatchNormalization", ["x", *params], ["z"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_graph",
        [helper.make_tensor_value_info("x", elem, list(shape or ("n", c, 4, 5)))],
        [helper.make_tensor_value_info("y", elem, list(shape or ("n", c, 4, 5)))],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("reduce", ["auto", "sum"])
def test_tapped_model_is_valid_and_keeps_original_outputs_first(
    net_onnx: onnx.ModelProto, reduce: str
) -> None:
    tapped = add_drift_taps(net_onnx, reduce=reduce)  # type: ignore[arg-type]
    onnx.checker.check_model(tapped, full_check=True)
    original = [o.name for o in net_onnx.graph.output]
    names = [o.name for o in tapped.graph.output]
    assert names[: len(original)] == original
    taps = read_taps(tapped)
    assert names[len(original) :] == tap_output_names(taps)
    layers = [n.name for n in net_onnx.graph.node if n.op_type == "BatchNormalization"]
    assert list(taps) == layers
    for layer, tap in taps.items():
        if tap.pooled_offset is None:
            expected = tuple(f"recalib_tap::{layer}::{s}" for s in ("count", "sum", "sumsq"))
            assert tap.outputs == expected
        else:
            assert tap.outputs == (POOLED_OUTPUT,)
    assert not any(p.key == TAP_METADATA_KEY for p in net_onnx.metadata_props)  # input untouched


def test_pooled_form_where_a_4d_float32_shape_is_fixed(net_onnx: onnx.ModelProto) -> None:
    # auto pools only channels that are a multiple of 16 (ORT's NCHWc block): none here
    assert all(t.pooled_offset is None for t in read_taps(add_drift_taps(net_onnx)).values())
    # the two BatchNorm2d of an (N, 3, 8, 8) input pooled, with L from shape inference
    taps = read_taps(add_drift_taps(net_onnx, reduce="pool", layers=_conv_bns(net_onnx)))
    pooled = [(t.pooled_offset, t.channels, t.fixed_count) for t in taps.values()]
    assert pooled == [(0, 4, 36), (8, 6, 16)]
    assert tap_output_names(taps) == [POOLED_OUTPUT]
    # the BatchNorm1d after the Linear is 2D: it cannot be pooled
    with pytest.raises(ValueError, match=r"cannot pool the tap of '/head/.*not 4D"):
        add_drift_taps(net_onnx, reduce="pool")
    with pytest.raises(ValueError, match="expected reduce 'auto', 'sum' or 'pool'"):
        add_drift_taps(net_onnx, reduce="mean")  # type: ignore[arg-type]
    # centred or float64 taps are never pooled
    assert all(
        t.pooled_offset is None for t in read_taps(add_drift_taps(net_onnx, center=True)).values()
    )
    assert all(
        t.pooled_offset is None
        for t in read_taps(add_drift_taps(net_onnx, dtype="float64")).values()
    )
    (tap,) = read_taps(add_drift_taps(_bn_graph(17, channels=16))).values()
    assert (tap.pooled_offset, tap.channels, tap.fixed_count) == (0, 16, 20)


@pytest.mark.parametrize(
    "shape", [("n", 16, -1, -1), ("n", 16, 4, -1), ("n", 16, 0, 5), ("n", 16, "h", 5)]
)
def test_a_free_or_nonpositive_spatial_dim_is_not_pooled(shape: tuple[Any, ...]) -> None:
    # older converters write -1 for a free dimension: it must not become L = 1 (or -4)
    model = _bn_graph(17, channels=16, shape=shape)
    assert [t.pooled_offset for t in read_taps(add_drift_taps(model)).values()] == [None]
    with pytest.raises(ValueError, match="spatial size open"):
        add_drift_taps(model, reduce="pool")


def test_declared_intermediate_shapes_are_not_trusted() -> None:
    # a stale value_info saying 4 x 5 for a tensor whose size is free: summed, and its
    # moments right at another size
    model = _bn_graph(17, channels=16, shape=("n", 16, "h", "w"))
    model.graph.value_info.append(
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 16, 4, 5])
    )
    model.graph.node[0].output[0] = "z"
    model.graph.node[1].input[0] = "z"
    tapped = add_drift_taps(model, source="output")
    taps = read_taps(tapped)
    assert [t.pooled_offset for t in taps.values()] == [None]
    x = np.random.default_rng(0).standard_normal((2, 16, 6, 7)).astype(np.float32)
    names = tap_output_names(taps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _session(tapped).run(names, {"x": x})
    (window,) = tap_moments(dict(zip(names, out, strict=True)), taps).values()
    assert float(window.count) == 2 * 6 * 7


def _pooled_meta(tapped: onnx.ModelProto) -> tuple[Any, dict[str, Any]]:
    prop = next(p for p in tapped.metadata_props if p.key == TAP_METADATA_KEY)
    return prop, json.loads(prop.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"offset": -2}, "offset >= 0"),
        ({"offset": 1.5}, "offset >= 0"),
        ({"channels": True}, "channels >= 1"),
        ({"channels": 8}, "expected 16 channels"),
        ({"positions": 0}, "positions >= 1"),
        ({"offset": None}, "offset >= 0"),
        ({"pooled": "elsewhere"}, "expected the pooled output"),
    ],
)
def test_malformed_pooled_metadata_is_refused(change: dict[str, Any], message: str) -> None:
    tapped = add_drift_taps(_bn_graph(17, channels=16))
    prop, payload = _pooled_meta(tapped)
    (entry,) = payload["layers"].values()
    entry["outputs"].update(change)
    prop.value = json.dumps(payload)
    with pytest.raises(ValueError, match=message):
        read_taps(tapped)


def test_pooled_columns_must_tile_the_declared_output() -> None:
    tapped = add_drift_taps(_bn_graph(17, channels=16))
    prop, payload = _pooled_meta(tapped)
    (entry,) = payload["layers"].values()
    entry["outputs"]["offset"] = 2  # a gap before the only layer
    prop.value = json.dumps(payload)
    with pytest.raises(ValueError, match="at column 0"):
        read_taps(tapped)
    entry["outputs"]["offset"] = 0
    prop.value = json.dumps({**payload, "format": 1})  # pooled taps came with format 2
    with pytest.raises(ValueError, match="no pooled taps in format 1"):
        read_taps(tapped)
    del entry["outputs"]["positions"]
    prop.value = json.dumps(payload)
    with pytest.raises(ValueError, match="positions >= 1"):
        read_taps(tapped)
    prop.value = json.dumps({**payload, "layers": {"bn": {"source": "input"}}})
    with pytest.raises(ValueError, match="expected drift-tap metadata of format 2"):
        read_taps(tapped)


def test_open_spatial_size_is_summed_and_format_1_is_still_read() -> None:
    model = _bn_graph(17)
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "w"  # width open
    taps = read_taps(add_drift_taps(model))
    assert [t.pooled_offset for t in taps.values()] == [None]
    with pytest.raises(ValueError, match="spatial size open"):
        add_drift_taps(model, reduce="pool")
    old = add_drift_taps(_bn_graph(17), reduce="sum")
    prop = next(p for p in old.metadata_props if p.key == TAP_METADATA_KEY)
    prop.value = json.dumps({**json.loads(prop.value), "format": 1})
    assert [t.pooled_offset for t in read_taps(old).values()] == [None]
    prop.value = json.dumps({**json.loads(prop.value), "format": 3})
    with pytest.raises(ValueError, match="expected drift-tap format 1 or 2 .got 3"):
        read_taps(old)


def test_metadata_names_the_bn_statistics(net_onnx: onnx.ModelProto) -> None:
    tapped = add_drift_taps(net_onnx)
    raw = next(p.value for p in tapped.metadata_props if p.key == TAP_METADATA_KEY)
    entries = json.loads(raw)["layers"]
    bn = {n.name: n for n in net_onnx.graph.node if n.op_type == "BatchNormalization"}
    for layer, entry in entries.items():
        assert (entry["mean"], entry["var"]) == (bn[layer].input[3], bn[layer].input[4])
        outputs = entry["outputs"]
        assert outputs.get("sum", outputs.get("pooled")) in (
            f"recalib_tap::{layer}::sum",
            POOLED_OUTPUT,
        )


def test_auto_taps_outputs_only_where_it_keeps_a_fusion(net_onnx: onnx.ModelProto) -> None:
    taps = read_taps(add_drift_taps(net_onnx))
    sources = [tap.source for tap in taps.values()]
    # Conv -> BN twice (fusable: tap the output), Gemm -> BN1d (not fused by ORT: input).
    assert sources == ["output", "output", "input"]


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("source", ["auto", "input", "output"])
@pytest.mark.parametrize(
    ("dtype", "reduce"), [("float32", "auto"), ("float32", "pool"), ("float64", "auto")]
)
def test_tap_moments_match_float64_reference(
    net_onnx: onnx.ModelProto, source: str, dtype: str, reduce: str
) -> None:
    # "pool": the two BatchNorm2d pooled (the BatchNorm1d is 2D: summed, as auto does here,
    # where 4 and 6 channels are not a multiple of ORT's NCHWc block)
    layers = _conv_bns(net_onnx) if reduce == "pool" else None
    tapped = add_drift_taps(net_onnx, source=source, dtype=dtype, reduce=reduce, layers=layers)  # type: ignore[arg-type]
    taps = read_taps(tapped)
    assert all((t.pooled_offset is not None) == (reduce == "pool") for t in taps.values())
    sess = _session(tapped)
    names = tap_output_names(taps)
    for n in (3, 9):  # one session, two batch sizes: the batch axis is dynamic
        x = _images(n, seed=n)
        windows = tap_moments(dict(zip(names, sess.run(names, {"x": x}), strict=True)), taps)
        acts = _bn_inputs(net_onnx, x)
        _assert_moments(windows, {layer: acts[layer] for layer in taps})


def _conv_bns(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "BatchNormalization"][:2]


@pytest.mark.parametrize("source", ["auto", "input", "output"])
def test_original_outputs_are_bit_identical_without_optimisation(
    net_onnx: onnx.ModelProto, source: str
) -> None:
    x = _images(5)
    plain = _run(net_onnx, x, DISABLE_ALL)["y"]
    tapped = _run(add_drift_taps(net_onnx, source=source), x, DISABLE_ALL)["y"]  # type: ignore[arg-type]
    np.testing.assert_array_equal(tapped, plain)


@pytest.mark.parametrize("source", ["auto", "output"])
def test_output_taps_keep_outputs_bit_identical_under_ort_fusion(
    net_onnx: onnx.ModelProto, source: str
) -> None:
    x = _images(5)
    plain = _run(net_onnx, x)["y"]
    tapped = _run(add_drift_taps(net_onnx, source=source), x)["y"]  # type: ignore[arg-type]
    np.testing.assert_array_equal(tapped, plain)


def _bn_left_after_fusion(model: onnx.ModelProto, tmp_path: Path) -> int:
    path = tmp_path / "optimized.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def test_output_taps_keep_ort_conv_bn_fusion(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    _randomize_bn(model)
    base = _export(model, (1, 3, 8, 8))
    assert _bn_left_after_fusion(base, tmp_path) == 0
    assert _bn_left_after_fusion(add_drift_taps(base, source="auto"), tmp_path) == 0
    assert _bn_left_after_fusion(add_drift_taps(base, source="input"), tmp_path) == 2


def test_output_taps_keep_ort_matmul_bn_fusion(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w")]
    inits += [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), name)
        for name in ("s", "b", "m", "v")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"]),
        helper.make_node("BatchNormalization", ["z", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    assert _bn_left_after_fusion(model, tmp_path) == 0
    tapped = add_drift_taps(model)
    assert read_taps(tapped)["bn"].source == "output"
    assert _bn_left_after_fusion(tapped, tmp_path) == 0
    x = rng.normal(size=(7, 6)).astype(np.float32)
    windows = tap_moments(_run(tapped, x), read_taps(tapped))
    _assert_moments(windows, _bn_inputs(model, x))


@pytest.mark.parametrize("opset", [9, 11, 13, 15, 17, 18])
def test_opsets_with_attribute_and_input_axes(opset: int) -> None:
    model = _bn_graph(opset)
    tapped = add_drift_taps(model)
    onnx.checker.check_model(tapped, full_check=True)
    x = np.random.default_rng(opset).normal(0.5, 2.0, size=(6, 3, 4, 5)).astype(np.float32)
    windows = tap_moments(_run(tapped, x), read_taps(tapped))
    _assert_moments(windows, {"bn": x})


@pytest.mark.parametrize("source", ["input", "output"])
def test_float16_model_is_reduced_in_float32(source: str) -> None:
    model = _bn_graph(17, elem=TensorProto.FLOAT16)
    tapped = add_drift_taps(model, source=source)  # type: ignore[arg-type]
    onnx.checker.check_model(tapped, full_check=True)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in tapped.graph.output[2::3])
    x = np.random.default_rng(2).normal(0.5, 2.0, size=(6, 3, 4, 5)).astype(np.float16)
    windows = tap_moments(_run(tapped, x), read_taps(tapped))
    if source == "input":  # the float16 input itself, reduced in float32
        _assert_moments(windows, {"bn": x})
    else:  # Y is rounded to float16 (relative 2**-11) before it is mapped back
        _assert_moments(windows, {"bn": x}, mean_tol=5e-3, var_tol=5e-3)


def test_ill_conditioned_layer_is_centred() -> None:
    # Mean 500, std 0.1: uncentred float32 sums lose every digit of the variance.
    model = _bn_graph(18, mean=np.full(3, 500.0), var=np.full(3, 0.01))
    x = np.random.default_rng(3).normal(500.02, 0.1, size=(16, 3, 4, 5)).astype(np.float32)
    auto = add_drift_taps(model)
    raw = next(p.value for p in auto.metadata_props if p.key == TAP_METADATA_KEY)
    assert json.loads(raw)["layers"]["bn"]["centered"] is True
    _assert_moments(tap_moments(_run(auto, x), read_taps(auto)), {"bn": x}, var_tol=1e-4)
    forced = add_drift_taps(model, center=False)
    windows = tap_moments(_run(forced, x), read_taps(forced))
    with pytest.raises(AssertionError):  # the data is hard enough to need centring
        _assert_moments(windows, {"bn": x}, var_tol=1e-2)


def test_well_conditioned_layer_is_not_centred(net_onnx: onnx.ModelProto) -> None:
    raw = next(
        p.value for p in add_drift_taps(net_onnx).metadata_props if p.key == TAP_METADATA_KEY
    )
    assert not any(entry["centered"] for entry in json.loads(raw)["layers"].values())


def test_output_tap_needs_non_zero_scale() -> None:
    model = _bn_graph(18, scale=np.array([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="scale is zero in channels \\[1\\]"):
        add_drift_taps(model, source="output")
    # auto never picks an output tap it cannot invert
    assert read_taps(add_drift_taps(model))["bn"].source == "input"


# ---------------------------------------------------------------- API


def test_read_taps_resolves_the_affine_map(net_onnx: onnx.ModelProto) -> None:
    taps = read_taps(add_drift_taps(net_onnx, source="output"))
    inits = {
        t.name: numpy_helper.to_array(t).astype(np.float64) for t in net_onnx.graph.initializer
    }
    bn = next(n for n in net_onnx.graph.node if n.op_type == "BatchNormalization")
    tap = taps[bn.name]
    stats = reference_stats(net_onnx, taps)[bn.name]
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    expected_gain = np.sqrt(stats[1] + eps) / inits[bn.input[1]]
    np.testing.assert_allclose(tap.gain, expected_gain, rtol=1e-15)
    np.testing.assert_array_equal(tap.offset, inits[bn.input[2]])
    np.testing.assert_array_equal(tap.base, stats[0])


def test_reference_stats_match_torch_buffers() -> None:
    torch.manual_seed(2)
    model = Net()
    _randomize_bn(model, seed=3)
    tapped = add_drift_taps(_export(model, (2, 3, 8, 8)))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = reference_stats(tapped)
    assert len(stats) == len(bns)
    for (mean, var), module in zip(stats.values(), bns, strict=True):
        assert module.running_mean is not None and module.running_var is not None
        np.testing.assert_array_equal(mean, module.running_mean.double().numpy())
        np.testing.assert_array_equal(var, module.running_var.double().numpy())


def test_layer_selection(net_onnx: onnx.ModelProto) -> None:
    first = next(n.name for n in net_onnx.graph.node if n.op_type == "BatchNormalization")
    tapped = add_drift_taps(net_onnx, layers=[first])
    assert list(read_taps(tapped)) == [first]
    assert len(tapped.graph.output) == len(net_onnx.graph.output) + 3
    pooled = add_drift_taps(net_onnx, layers=[first], reduce="pool")
    assert len(pooled.graph.output) == len(net_onnx.graph.output) + 1
    with pytest.raises(NoBatchNormError, match="nope"):
        add_drift_taps(net_onnx, layers=["nope"])


def test_errors(net_onnx: onnx.ModelProto) -> None:
    no_bn = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    with pytest.raises(NoBatchNormError):
        add_drift_taps(no_bn)
    with pytest.raises(ValueError, match="without drift taps"):
        read_taps(net_onnx)
    tapped = add_drift_taps(net_onnx)
    with pytest.raises(ValueError, match="already has them"):
        add_drift_taps(tapped)
    with pytest.raises(ValueError, match="source"):
        add_drift_taps(net_onnx, source="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        tap_moments({}, read_taps(tapped))


# ---------------------------------------------------------------- end to end


def test_drift_score_separates_shifted_traffic() -> None:
    tapped = add_drift_taps(_export(_calibrated_net(3), (2, 3, 8, 8)))
    taps = read_taps(tapped)
    reference = reference_stats(tapped)
    sess = _session(tapped)
    names = tap_output_names(taps)

    def score(images: np.ndarray) -> float:
        window = RollingWindow(max_samples=10_000)
        for i, batch in enumerate(np.split(images, 4)):
            outs = dict(zip(names, sess.run(names, {"x": batch}), strict=True))
            window.add(tap_moments(outs, taps), now=float(i), samples=len(batch))
        return score_model(window.total(now=4.0), reference).score

    same = score(_images(256, seed=11))
    shifted = score(_images(256, seed=12) * 2.0 + 1.0)
    assert same < 0.05
    assert shifted > 10 * same
    assert shifted > 0.5
