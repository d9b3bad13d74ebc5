"""Tests of recalib.onnx.recalibrate: ONNX-native recalibration.

Three kinds of reference: the torch core (``recalibrate`` then ``export_onnx``) on the same
model and data; an independent float64 NumPy computation on hand-built graphs (opsets 9,
15, 18; float32 and fp16); and the original file, byte for byte, outside the statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from recalib.errors import DataError, NoBatchNormError, NonFiniteError
from recalib.onnx.export import export_onnx
from recalib.onnx.names import BnGraphError, bn_node_stats, read_bn_map
from recalib.onnx.recalibrate import OnnxModelError, recalibrate_onnx
from recalib.recalibrate import recalibrate

# Torch and ORT compute the activations with different kernels (float32, ~1e-7 apart);
# both merge moments in float64, so the statistics agree to a few 1e-7 relative.
AGREE_RTOL, AGREE_ATOL = 1e-5, 1e-6
C_IN, C_OUT, LENGTH = 3, 4, 5


def _ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _assert_same_stats(
    got: dict[str, tuple[np.ndarray, np.ndarray]],
    want: dict[str, tuple[np.ndarray, np.ndarray]],
    rtol: float = AGREE_RTOL,
    atol: float = AGREE_ATOL,
) -> None:
    assert got.keys() == want.keys()
    for key in want:
        for g, w in zip(got[key], want[key], strict=True):
            assert g.dtype == w.dtype, key
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=key)


# --------------------------------------------------------------------------- torch agreement
@pytest.fixture(scope="module")
def exported_cnn(
    tmp_path_factory: pytest.TempPathFactory,
    make_cnn: Callable[..., nn.Module],
    make_images: Callable[..., torch.Tensor],
) -> tuple[nn.Module, Path, torch.Tensor]:
    """The conftest CNN (3 BN layers, Dropout) exported with BN kept, and 50 new images."""
    model = make_cnn(0)
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    export_onnx(model, make_images(4, seed=9), path)
    return model, path, make_images(50, seed=1)


@pytest.mark.parametrize(
    ("mode", "method"),
    [("eval", "exact"), ("eval", "prior"), ("train", "exact"), ("train", "prior"), ("eval", "ema")],
)
def test_agrees_with_torch_core_then_export(
    exported_cnn: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path, mode: str, method: str
) -> None:
    model, path, x = exported_cnn
    kwargs: dict[str, Any] = {
        "method": method,
        "mode": mode,
        "prior_strength": 30.0 if method == "prior" else None,
        "batch_size": 16,
        "tol": 1e-6,
    }
    torch_model = copy.deepcopy(model)
    torch_report = recalibrate(torch_model, x, **kwargs)
    export_onnx(torch_model, x[:4], tmp_path / "a.onnx")
    want = onnx.load(str(tmp_path / "a.onnx"))

    got, report = recalibrate_onnx(path, x.numpy(), **kwargs)

    _assert_same_stats(bn_node_stats(got), bn_node_stats(want))
    np.testing.assert_allclose(_ort_run(got, x.numpy()), _ort_run(want, x.numpy()), atol=1e-5)
    assert [lay.name for lay in report.layers] == [lay.name for lay in torch_report.layers]
    if method != "ema":
        # ema's anchor pass: torch's lockstep reaches its fixed point (an EMA over the
        # batches in order), the ONNX joined batch normalises by its population statistics
        # (a start for the ordinary passes), so the pass counts differ.
        assert report.passes == torch_report.passes
    assert report.converged == torch_report.converged
    assert (report.samples, report.batches) == (torch_report.samples, torch_report.batches)
    for ours, theirs in zip(report.layers, torch_report.layers, strict=True):
        assert (ours.samples, ours.items, ours.channels) == (
            theirs.samples,
            theirs.items,
            theirs.channels,
        )
        assert ours.sym_kl == pytest.approx(theirs.sym_kl, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("opset", [9, 15])
def test_agrees_with_torch_core_at_other_opsets(
    exported_cnn: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path, opset: int
) -> None:
    model, _, x = exported_cnn
    export_onnx(model, x[:4], tmp_path / "orig.onnx", opset=opset)
    torch_model = copy.deepcopy(model)
    recalibrate(torch_model, x, mode="train", batch_size=16)
    export_onnx(torch_model, x[:4], tmp_path / "a.onnx", opset=opset)

    got, _ = recalibrate_onnx(tmp_path / "orig.onnx", x.numpy(), mode="train", batch_size=16)

    assert got.opset_import[0].version == opset
    _assert_same_stats(bn_node_stats(got), bn_node_stats(onnx.load(str(tmp_path / "a.onnx"))))


def test_layer_called_twice_shares_one_estimator(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bn(self.fc2(torch.relu(self.bn(self.fc1(x)))))
            return out

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(40, 4) * 2 + 1
    export_onnx(model, x[:4], tmp_path / "orig.onnx")
    recalibrate(model, x, mode="eval", batch_size=8, tol=1e-6)
    export_onnx(model, x[:4], tmp_path / "a.onnx")

    got, report = recalibrate_onnx(
        tmp_path / "orig.onnx", x.numpy(), batch_size=8, tol=1e-6, mode="eval"
    )

    _assert_same_stats(bn_node_stats(got), bn_node_stats(onnx.load(str(tmp_path / "a.onnx"))))
    assert [lay.name for lay in report.layers] == ["bn"]
    assert report.layers[0].items == 80  # both calls, like the torch core
    assert report.params["untied_stats"] == 0


def test_folded_batchnorm_is_refused_with_how_to_keep_it(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), tmp_path / "f.onnx", dynamo=False)
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}

    with pytest.raises(NoBatchNormError, match="folded") as info:
        recalibrate_onnx(folded, np.zeros((2, 3, 8, 8), np.float32), mode="eval")
    assert "do_constant_folding=False" in str(info.value)
    assert "export_onnx" in str(info.value)


# --------------------------------------------------------------------------- hand-built graphs
def _chain(
    opset: int,
    dtype: type[np.floating] = np.float32,
    *,
    mean_as_input: bool = False,
) -> onnx.ModelProto:
    """``x (N, 3, L) -> BN a -> Relu -> Conv 1x1 (3 -> 4) -> BN b -> y``."""
    rng = np.random.default_rng(3)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    arrays = {
        "a.scale": rng.uniform(0.5, 1.5, C_IN),
        "a.bias": rng.normal(size=C_IN) * 0.3,
        "a.mean": rng.normal(size=C_IN),
        "a.var": rng.uniform(0.5, 2.0, C_IN),
        "w": rng.normal(size=(C_OUT, C_IN, 1)),
        "w.bias": rng.normal(size=C_OUT),
        "b.scale": rng.uniform(0.5, 1.5, C_OUT),
        "b.bias": rng.normal(size=C_OUT) * 0.3,
        "b.mean": rng.normal(size=C_OUT),
        "b.var": rng.uniform(0.5, 2.0, C_OUT),
    }
    inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in arrays.items()]
    inputs = [helper.make_tensor_value_info("x", elem, ["batch", C_IN, LENGTH])]
    if mean_as_input:
        inits = [t for t in inits if t.name != "a.mean"]
        inputs.append(helper.make_tensor_value_info("a.mean", elem, [C_IN]))
    nodes = [
        helper.make_node(
            "BatchNormalization", ["x", "a.scale", "a.bias", "a.mean", "a.var"], ["h"], name="a"
        ),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w", "w.bias"], ["z"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["z", "b.scale", "b.bias", "b.mean", "b.var"], ["y"], name="b"
        ),
    ]
    out = [helper.make_tensor_value_info("y", elem, ["batch", C_OUT, LENGTH])]
    graph = helper.make_graph(nodes, "chain", inputs, out, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset > 9 else 4
    )
    model.producer_name, model.producer_version = "handmade", "1.2.3"
    helper.set_model_props(model, {"owner": "tests"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    t = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(t).astype(np.float64)


def _population(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance over every axis but 1 (float64)."""
    flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return flat.mean(axis=0), flat.var(axis=0, ddof=1)


def _chain_reference(
    model: onnx.ModelProto, batches: list[np.ndarray], mode: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The exact statistics of :func:`_chain`'s BN inputs, in float64.

    ``eval``: the fixed point, every node normalizing with the final statistics; ``train``:
    every node normalizing each batch by its own (biased) batch statistics.
    """
    p = {t.name: _array(model, t.name) for t in model.graph.initializer}
    xs = [b.astype(np.float64) for b in batches]
    stats_a = _population(np.concatenate(xs))

    def bn(x: np.ndarray, mean: np.ndarray, var: np.ndarray, pre: str) -> np.ndarray:
        c = (slice(None), None)
        xhat = (x - mean[c]) / np.sqrt(var[c] + 1e-5)
        y: np.ndarray = xhat * p[f"{pre}.scale"][c] + p[f"{pre}.bias"][c]
        return y

    zs = []
    for x in xs:
        if mode == "train":
            mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
        else:
            mean, var = stats_a
        r = np.maximum(bn(x, mean, var, "a"), 0.0)
        zs.append(np.einsum("oc,ncl->nol", p["w"][:, :, 0], r) + p["w.bias"][None, :, None])
    return {"a": stats_a, "b": _population(np.concatenate(zs))}


def _data(n: int = 37, dtype: type[np.floating] = np.float32, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.array([0.5, 2.0, 1.2])[None, :, None]
    shift = np.array([1.5, -0.7, 0.2])[None, :, None]
    x: np.ndarray = (rng.normal(size=(n, C_IN, LENGTH)) * scale + shift).astype(dtype)
    return x


@pytest.mark.parametrize("opset", [9, 15, 18])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_matches_float64_reference(opset: int, mode: str) -> None:
    model, x = _chain(opset), _data()
    batches = [x[i : i + 8] for i in range(0, len(x), 8)]

    got, report = recalibrate_onnx(model, x, mode=mode, batch_size=8, tol=1e-7)

    want = _chain_reference(model, batches, mode)
    stats = bn_node_stats(got)
    for key in ("a", "b"):
        for g, w in zip(stats[key], want[key], strict=True):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{key} {mode}")
    assert report.converged
    assert [lay.name for lay in report.layers] == ["a", "b"]  # node names: no recalib map
    assert report.layers[0].samples == len(x) * LENGTH
    assert report.layers[0].items == len(x)


def test_initializers_listed_as_graph_inputs_are_stored_statistics() -> None:
    model, x = _chain(9), _data()
    model.ir_version = 3  # old exporters: every initializer is also a graph input
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))

    got, _ = recalibrate_onnx(model, x, mode="train", batch_size=8)

    want = _chain_reference(model, [x[i : i + 8] for i in range(0, len(x), 8)], "train")
    for key in ("a", "b"):
        np.testing.assert_allclose(bn_node_stats(got)[key][1], want[key][1], rtol=1e-5)


def test_fp16_model_accumulates_in_float64_and_stays_fp16() -> None:
    model, x = _chain(15, np.float16), _data(64, np.float16)

    got, report = recalibrate_onnx(model, x, mode="eval", batch_size=16, tol=1e-4)

    want = _chain_reference(model, [x], "eval")
    stats = bn_node_stats(got)
    # Layer a sees the data itself: exact up to storing the result in fp16.
    for g, w in zip(stats["a"], want["a"], strict=True):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=1e-3, atol=1e-3)
    # Layer b sees fp16 activations: fp16 rounding (~5e-4) through one layer.
    for g, w in zip(stats["b"], want["b"], strict=True):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=1e-2, atol=1e-2)
    assert report.converged


def _blanked(model: onnx.ModelProto, names: set[str]) -> bytes:
    copy_ = onnx.ModelProto()
    copy_.CopyFrom(model)
    for t in copy_.graph.initializer:
        if t.name in names:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    return bytes(copy_.SerializeToString())


@pytest.mark.parametrize("source", ["handmade", "torch"])
def test_only_the_statistics_change(
    source: str, exported_cnn: tuple[nn.Module, Path, torch.Tensor]
) -> None:
    if source == "handmade":
        original, x = _chain(15), _data()
    else:
        original, x = onnx.load(str(exported_cnn[1])), exported_cnn[2].numpy()
    before = original.SerializeToString()
    stat_names = {n for i in read_bn_map(original).values() for n in (i.mean, i.var)}

    got, _ = recalibrate_onnx(original, x, mode="eval", batch_size=16)

    assert original.SerializeToString() == before  # the input is untouched
    assert _blanked(got, stat_names) == _blanked(original, stat_names)
    old = {t.name: t.SerializeToString() for t in original.graph.initializer}
    new = {t.name: t.SerializeToString() for t in got.graph.initializer}
    assert new.keys() == old.keys()
    assert [n for n in new if new[n] != old[n]] == [
        t.name for t in original.graph.initializer if t.name in stat_names
    ]  # every statistic moved, nothing else did
    assert [n.SerializeToString() for n in got.graph.node] == [
        n.SerializeToString() for n in original.graph.node
    ]
    assert (got.ir_version, got.producer_name, got.producer_version) == (
        original.ir_version,
        original.producer_name,
        original.producer_version,
    )
    assert list(got.opset_import) == list(original.opset_import)
    assert list(got.metadata_props) == list(original.metadata_props)


# --------------------------------------------------------------------------- shared / fed stats
def _shared(*, through_identity: bool) -> onnx.ModelProto:
    """``x -> BN a -> BN b`` (3 channels) whose mean and var tensors are shared."""
    rng = np.random.default_rng(4)
    init = {
        "s": rng.uniform(0.5, 1.5, C_IN),
        "b": rng.normal(size=C_IN),
        "m": rng.normal(size=C_IN),
        "v": rng.uniform(0.5, 2.0, C_IN),
        "w": rng.normal(size=(C_IN, C_IN, 1)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()]
    b_stats = ["m2", "v2"] if through_identity else ["m", "v"]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"], name="a"),
        helper.make_node("Conv", ["h", "w"], ["z"], name="conv"),
        helper.make_node("BatchNormalization", ["z", "s", "b", *b_stats], ["y"], name="b"),
    ]
    if through_identity:  # what the TorchScript exporter writes for equal initializers
        nodes[1:1] = [
            helper.make_node("Identity", ["m"], ["m2"]),
            helper.make_node("Identity", ["v"], ["v2"]),
        ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C_IN, LENGTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C_IN, LENGTH])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


@pytest.mark.parametrize("through_identity", [False, True])
def test_shared_statistics_are_untied_when_the_values_differ(through_identity: bool) -> None:
    model, x = _shared(through_identity=through_identity), _data()

    got, report = recalibrate_onnx(model, x, mode="train", batch_size=8)

    stats = bn_node_stats(got)
    assert report.params["untied_stats"] >= 2
    assert not np.allclose(stats["a"][0], stats["b"][0])
    np.testing.assert_allclose(stats["a"][0], x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5)
    mean_names = {n.input[3] for n in got.graph.node if n.op_type == "BatchNormalization"}
    assert len(mean_names) == 2  # each node reads its own initializer now
    _ort_run(got, x)  # still a valid model


def test_shared_statistics_with_one_node_selected_are_untied() -> None:
    model, x = _shared(through_identity=False), _data()
    before = bn_node_stats(model)

    got, report = recalibrate_onnx(model, x, mode="train", layers=["a"], batch_size=8)

    stats = bn_node_stats(got)
    assert report.params["untied_stats"] >= 2
    for g, w in zip(stats["b"], before["b"], strict=True):
        np.testing.assert_array_equal(g, w)  # b keeps its (copied) statistics
    assert [lay.name for lay in report.layers] == ["a"]


def test_statistics_fed_as_graph_inputs_are_refused() -> None:
    model, x = _chain(15, mean_as_input=True), _data()

    with pytest.raises(BnGraphError, match="graph input") as info:
        recalibrate_onnx(model, x, mode="eval")
    assert "'a'" in str(info.value)

    # Excluding the node works; its fed mean is then an input like any other.
    mean_a = np.zeros(C_IN, np.float32)
    batches = [{"x": x[i : i + 8], "a.mean": mean_a} for i in range(0, len(x), 8)]
    got, report = recalibrate_onnx(model, batches, layers="b", mode="eval")
    assert [lay.name for lay in report.layers] == ["b"]
    assert "a.mean" in {i.name for i in got.graph.input}


# --------------------------------------------------------------------------- data and errors
def test_nan_is_refused_naming_batch_and_layer() -> None:
    model, x = _chain(15), _data(24)
    before = model.SerializeToString()
    x[13, 1, 2] = np.nan

    with pytest.raises(NonFiniteError) as info:
        recalibrate_onnx(model, x, batch_size=8, mode="eval")

    assert (info.value.batch, info.value.layer) == (1, "a")
    assert model.SerializeToString() == before


def test_data_forms_give_the_same_statistics() -> None:
    model, x = _chain(15), _data(32)
    forms: list[object] = [
        x,
        torch.from_numpy(x),
        [x[i : i + 8] for i in range(0, 32, 8)],
        [(torch.from_numpy(x[i : i + 8]), 0) for i in range(0, 32, 8)],
        [{"x": x[i : i + 8]} for i in range(0, 32, 8)],
    ]
    results = [
        bn_node_stats(recalibrate_onnx(model, d, batch_size=8, mode="eval")[0]) for d in forms
    ]
    for other in results[1:]:
        _assert_same_stats(other, results[0], rtol=0, atol=0)


def test_multi_input_model_takes_dict_batches() -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (("s", np.ones(2)), ("b", np.zeros(2)), ("m", np.zeros(2)), ("v", np.ones(2)))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["p", "q"], ["pq"]),
            helper.make_node("BatchNormalization", ["pq", "s", "b", "m", "v"], ["y"], name="bn"),
        ],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 2]) for n in ("p", "q")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    p, q = rng.normal(size=(20, 2)).astype(np.float32), rng.normal(size=(20, 2)).astype(np.float32)
    batches = [{"p": p[i : i + 5], "q": q[i : i + 5]} for i in range(0, 20, 5)]

    got, _ = recalibrate_onnx(model, batches, mode="eval")

    mean, var = bn_node_stats(got)["bn"]
    np.testing.assert_allclose(mean, (p + q).astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, (p + q).astype(np.float64).var(0, ddof=1), rtol=1e-5)
    with pytest.raises(DataError, match=r"inputs \['p', 'q'\]"):
        recalibrate_onnx(model, p, mode="eval")
    with pytest.raises(DataError, match=r"expected inputs \['p', 'q'\] at batch 0"):
        recalibrate_onnx(model, [{"p": p}], mode="eval")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (_data().astype(np.float64), r"expected tensor\(float\) .* \(got float64"),
        (_data()[:, :2], r"expected tensor\(float\) of shape \['batch', 3, 5\] .*got float32 of"),
    ],
)
def test_input_dtype_and_shape_mismatch_say_expected_and_got(bad: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        recalibrate_onnx(_chain(15), bad, mode="eval")


def test_unknown_input_name_is_refused() -> None:
    with pytest.raises(DataError, match=r"expected inputs \['x'\]"):
        recalibrate_onnx(_chain(15), _data(), input_name="images", mode="eval")


def test_layer_selection_keeps_the_other_nodes() -> None:
    model = _chain(15)
    got, report = recalibrate_onnx(model, _data(), layers=["b*"], batch_size=8, mode="eval")
    assert [lay.name for lay in report.layers] == ["b"]
    for g, w in zip(bn_node_stats(got)["a"], bn_node_stats(model)["a"], strict=True):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(NoBatchNormError, match="matched no BatchNormalization node"):
        recalibrate_onnx(model, _data(), layers=["nope"], mode="eval")


def test_batch_of_one_works_in_eval_and_is_refused_in_train() -> None:
    model, x = _chain(15), _data(6)
    got, report = recalibrate_onnx(model, x, mode="eval", batch_size=1, tol=1e-7)
    want = _chain_reference(model, [x], "eval")
    np.testing.assert_allclose(bn_node_stats(got)["b"][1], want["b"][1], rtol=1e-5)
    assert report.batches == 6

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (("s", np.ones(2)), ("b", np.zeros(2)), ("m", np.zeros(2)), ("v", np.ones(2)))
    ]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        inits,
    )
    flat = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    with pytest.raises(DataError, match="more than 1 value per channel"):
        recalibrate_onnx(
            flat, rng.normal(size=(3, 2)).astype(np.float32), mode="train", batch_size=1
        )


def test_eval_mode_refuses_one_shot_iterators() -> None:
    x = _data()
    with pytest.raises(DataError, match="re-iterable"):
        recalibrate_onnx(_chain(15), iter([x[:8], x[8:16]]), mode="eval")


def test_bad_files_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(OnnxModelError, match="does not exist"):
        recalibrate_onnx(tmp_path / "missing.onnx", _data(), mode="eval")
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(OnnxModelError, match="could not read junk.onnx"):
        recalibrate_onnx(tmp_path / "junk.onnx", _data(), mode="eval")
    with pytest.raises(OnnxModelError, match="expected an onnx.ModelProto"):
        recalibrate_onnx(42, _data(), mode="eval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prior_strength"):
        recalibrate_onnx(_chain(15), _data(), method="prior", mode="eval")
    with pytest.raises(ValueError, match="expected mode"):
        recalibrate_onnx(_chain(15), _data(), mode="test")


def test_model_without_batchnorm_names_the_fix() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    with pytest.raises(NoBatchNormError, match="recalib.export_onnx"):
        recalibrate_onnx(model, np.zeros((2, 2), np.float32), mode="eval")


def test_drift_tapped_model_is_refused() -> None:
    from recalib.onnx.taps import add_drift_taps

    with pytest.raises(OnnxModelError, match="drift taps"):
        recalibrate_onnx(add_drift_taps(_chain(15)), _data(), mode="eval")


def test_report_is_json_and_names_providers(tmp_path: Path) -> None:
    _, report = recalibrate_onnx(_chain(15), _data(), method="ema", momentum=None, mode="eval")
    payload = report.to_dict()
    assert payload["device"] == "CPUExecutionProvider"
    assert payload["params"]["opset"] == 15
    assert report.to_json()
