"""Tests of recalib.onnx.export: BN kept and named, ONNX Runtime parity, clear refusals."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.errors import NoBatchNormError, RecalibError
from recalib.onnx import export as export_mod
from recalib.onnx.export import (
    BatchNormFoldedError,
    ExportError,
    ExportParityError,
    bn_node_stats,
    export_onnx,
    read_bn_map,
)
from recalib.onnx.names import BN_MAP_KEY, VERSION_KEY
from recalib.renorm import BatchRenorm2d


def _running(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (running_mean, running_var)}`` of every BN layer with running stats."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None:
            out[name] = (m.running_mean, m.running_var)
    return out


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for mean, var in _running(model).values():
            mean.uniform_(-1, 1)
            var.uniform_(0.5, 2)


def _ort(path: Path, x: Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _torch64(model: nn.Module, x: Tensor) -> np.ndarray:
    """The float64 reference: a float64 copy of the model in eval mode."""
    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        out: Tensor = m64(x.double())
    return out.numpy()


def _assert_map_matches(path: Path, model: nn.Module, *, nodes_per_layer: int = 1) -> None:
    """Every BN node names a layer of ``model`` and holds exactly its running stats."""
    proto = onnx.load(str(path))
    infos = read_bn_map(proto)
    stats = bn_node_stats(proto)
    layers = _running(model)
    assert sorted(i.layer for i in infos.values()) == sorted(
        name for name in layers for _ in range(nodes_per_layer)
    )
    for key, info in infos.items():
        running_mean, running_var = layers[info.layer]
        mean, var = stats[key]
        assert mean.dtype == np.float32 and var.dtype == np.float32
        np.testing.assert_array_equal(mean, running_mean.numpy())
        np.testing.assert_array_equal(var, running_var.numpy())
        assert info.channels == running_mean.numel()
        initializers = {t.name for t in proto.graph.initializer}
        assert info.mean in initializers and info.var in initializers


def test_cnn_keeps_every_bn_with_running_stats(
    make_cnn: Callable[..., nn.Module], make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_cnn(0)
    x = make_images(4)
    path = tmp_path / "cnn.onnx"
    report = export_onnx(model, x, path)

    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") == 3 == report.bn_nodes
    assert "Conv" in ops  # BN was not folded into it
    _assert_map_matches(path, model)
    assert report.max_abs_err["output"] <= 1e-5
    # against a float64 torch reference, not only the float32 one the report uses
    np.testing.assert_allclose(_ort(path, x), _torch64(model, x), rtol=1e-4, atol=1e-5)


def test_mlp_batchnorm1d_parity(
    make_mlp: Callable[..., nn.Module], make_features: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_mlp(1, bn_first=True)
    x = make_features(6)
    path = tmp_path / "mlp.onnx"
    report = export_onnx(model, x, path)
    assert report.bn_nodes == 3
    _assert_map_matches(path, model)
    np.testing.assert_allclose(_ort(path, x), _torch64(model, x), rtol=1e-4, atol=1e-5)


def test_batchrenorm_model_exports_as_batchnorm(
    make_cnn: Callable[..., nn.Module], make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_cnn(2, norm2d=BatchRenorm2d)
    assert sum(isinstance(m, BatchRenorm2d) for m in model.modules()) == 2
    x = make_images(3)
    path = tmp_path / "renorm.onnx"
    report = export_onnx(model, x, path)
    assert report.bn_nodes == 3
    _assert_map_matches(path, model)
    renorm_layers = {n for n, m in model.named_modules() if isinstance(m, BatchRenorm2d)}
    assert renorm_layers <= {v["layer"] for v in report.bn_map.values()}
    np.testing.assert_allclose(_ort(path, x), _torch64(model, x), rtol=1e-4, atol=1e-5)


def test_exported_program_input(
    make_cnn: Callable[..., nn.Module], make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_cnn(3)
    x = make_images(4)
    program = torch.export.export(
        model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
    )
    path = tmp_path / "program.onnx"
    report = export_onnx(program, x, path)
    assert report.bn_nodes == 3
    assert report.batch_sizes == [4, 5]
    _assert_map_matches(path, model)
    x7 = make_images(7, seed=1)
    np.testing.assert_allclose(_ort(path, x7), _torch64(model, x7), rtol=1e-4, atol=1e-5)


def test_static_exported_program_needs_static_export(
    make_mlp: Callable[..., nn.Module], make_features: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_mlp(4)
    x = make_features(3)
    program = torch.export.export(model, (x,))
    with pytest.raises(ExportError, match="dynamic_batch=False"):
        export_onnx(program, x, tmp_path / "a.onnx")
    report = export_onnx(program, x, tmp_path / "b.onnx", dynamic_batch=False)
    assert report.batch_sizes == [3]
    assert report.input_shapes == [[3, 4]]


def test_training_mode_exported_program_is_refused(
    make_mlp: Callable[..., nn.Module], make_features: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_mlp(4).train()
    x = make_features(3)
    program = torch.export.export(model, (x,))
    with pytest.raises(ExportError, match="training mode"):
        export_onnx(program, x, tmp_path / "a.onnx", dynamic_batch=False)


def test_dynamic_batch_axis_runs_at_other_batch_sizes(
    make_cnn: Callable[..., nn.Module], make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_cnn(5)
    path = tmp_path / "dyn.onnx"
    report = export_onnx(model, make_images(2), path)
    assert report.batch_sizes == [2, 3]
    assert report.input_shapes == [["batch", 3, 8, 8]]
    assert report.output_shapes == [["batch", 5]]
    for n in (1, 9):
        x = make_images(n, seed=n)
        out = _ort(path, x)
        assert out.shape == (n, 5)
        np.testing.assert_allclose(out, _torch64(model, x), rtol=1e-4, atol=1e-5)


def test_static_batch_when_asked(
    make_mlp: Callable[..., nn.Module], make_features: Callable[..., Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "static.onnx"
    report = export_onnx(make_mlp(0), make_features(5), path, dynamic_batch=False)
    assert report.input_shapes == [[5, 4]] and report.output_shapes == [[5, 3]]
    assert report.batch_sizes == [5]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        _ort(path, make_features(6))


def test_metadata_and_report_are_serialisable(
    make_mlp: Callable[..., nn.Module], make_features: Callable[..., Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "m.onnx"
    report = export_onnx(make_mlp(0), make_features(4), path)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props[BN_MAP_KEY]) == report.bn_map
    assert props[VERSION_KEY]
    assert props["recalib.producer"].startswith("pytorch ")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == str(path)
    assert data["opset"] == 17
    assert data["bn_nodes"] == 2
    assert set(data["max_abs_err"]) == {"output"} and data["seconds"] > 0

    unchecked = export_onnx(make_mlp(0), make_features(4), tmp_path / "u.onnx", check=False)
    assert unchecked.batch_sizes == [] and unchecked.max_abs_err == {}
    assert unchecked.bn_map == report.bn_map


def test_training_flags_and_statistics_are_restored(
    make_cnn: Callable[..., nn.Module],
    make_images: Callable[..., Tensor],
    state_of: Callable[[nn.Module], dict[str, Tensor]],
    assert_unchanged: Callable[[nn.Module, dict[str, Tensor]], None],
    tmp_path: Path,
) -> None:
    model = make_cnn(6).train()
    model.get_submodule("bn2").eval()  # a mixed state must come back as it was
    flags = {n: m.training for n, m in model.named_modules()}
    before = state_of(model)
    export_onnx(model, make_images(4), tmp_path / "m.onnx")
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert_unchanged(model, before)


def test_statistics_are_restored_when_the_export_fails(
    make_cnn: Callable[..., nn.Module],
    make_images: Callable[..., Tensor],
    state_of: Callable[[nn.Module], dict[str, Tensor]],
    assert_unchanged: Callable[[nn.Module, dict[str, Tensor]], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_cnn(6)
    before = state_of(model)

    def broken_export(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(model, make_images(2), tmp_path / "m.onnx")
    assert_unchanged(model, before)


def test_layer_called_twice_gives_two_nodes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    _randomise(bn)
    model = nn.Sequential(bn, nn.Conv2d(3, 3, 1), bn).eval()
    path = tmp_path / "twice.onnx"
    report = export_onnx(model, torch.randn(2, 3, 4, 4), path)
    assert report.bn_nodes == 2
    assert [v["layer"] for v in report.bn_map.values()] == ["0", "0"]
    _assert_map_matches(path, nn.Sequential(bn), nodes_per_layer=2)


def test_multiple_inputs_and_outputs(tmp_path: Path) -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            self.b = nn.Sequential(nn.Conv1d(2, 5, 1), nn.BatchNorm1d(5))

        def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return self.a(x), self.b(y)

    torch.manual_seed(1)
    model = TwoHeads().eval()
    _randomise(model)
    x, y = torch.randn(3, 4), torch.randn(3, 2, 6)
    path = tmp_path / "two.onnx"
    report = export_onnx(
        model, (x, y), path, input_names=["x", "y"], output_names=["logits", "features"]
    )
    assert report.input_names == ["x", "y"] and report.output_names == ["logits", "features"]
    assert set(report.max_abs_err) == {"logits", "features"}
    assert sorted(v["layer"] for v in report.bn_map.values()) == ["a.1", "b.1"]
    _assert_map_matches(path, model)
    with pytest.raises(ExportError, match="expected 2 distinct input names"):
        export_onnx(model, (x, y), tmp_path / "bad.onnx", input_names=["x"])


def test_parity_failure_raises_and_writes_nothing(
    make_mlp: Callable[..., nn.Module],
    make_features: Callable[..., Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # If the real statistics were never written back, the file would normalise with the
    # fingerprints: the check must catch exactly that kind of bug.
    monkeypatch.setattr(export_mod, "_write_real_stats", lambda *args: None)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportParityError, match="beyond") as info:
        export_onnx(make_mlp(0), make_features(4), path)
    assert isinstance(info.value, RecalibError)
    assert info.value.report.max_abs_err["output"] > 1e-3
    assert not path.exists()


def test_parity_check_uses_the_tolerance(
    make_mlp: Callable[..., nn.Module],
    make_features: Callable[..., Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = export_mod._run_onnxruntime

    def off_by(*args: Any) -> list[np.ndarray]:
        return [o + np.float32(2e-4) for o in run(*args)]

    monkeypatch.setattr(export_mod, "_run_onnxruntime", off_by)
    model, x = make_mlp(0), make_features(4)
    with pytest.raises(ExportParityError):
        export_onnx(model, x, tmp_path / "a.onnx")  # atol 1e-5 + rtol 1e-4 * |y|
    report = export_onnx(model, x, tmp_path / "b.onnx", atol=1e-3)
    assert 1e-4 < report.max_abs_err["output"] < 1e-3


def test_folded_batchnorm_is_refused(
    make_cnn: Callable[..., nn.Module],
    make_images: Callable[..., Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_export = torch.onnx.export

    def folding_export(*args: Any, **kwargs: Any) -> Any:
        # torch's defaults, which fold BN into the preceding Conv
        kwargs.update(do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", folding_export)
    with pytest.raises(BatchNormFoldedError, match="do_constant_folding=False"):
        export_onnx(make_cnn(0), make_images(2), tmp_path / "folded.onnx")


def test_model_without_batchnorm_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(NoBatchNormError, match="nothing for the export to keep"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    no_stats = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(NoBatchNormError):
        export_onnx(no_stats, torch.randn(2, 4), tmp_path / "m.onnx", dynamic_batch=False)
    assert not (tmp_path / "m.onnx").exists()


def test_batch_statistics_layer_needs_a_static_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3)
    ).eval()
    x = torch.randn(5, 4)
    with pytest.raises(ExportError, match="track_running_stats=False"):
        export_onnx(model, x, tmp_path / "m.onnx")
    # torch's tracer warns about the batch-statistics layer's size check; harmless here
    with pytest.warns(TracerWarning):
        report = export_onnx(model, x, tmp_path / "m.onnx", dynamic_batch=False)
    assert [v["layer"] for v in report.bn_map.values()] == ["2"]


def test_bad_inputs_are_refused(make_mlp: Callable[..., nn.Module], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="tensor or a tuple of tensors"):
        export_onnx(make_mlp(0), [np.zeros((2, 4))], tmp_path / "m.onnx")  # type: ignore[list-item]


def test_fp16_model_keeps_fp16_statistics(
    make_cnn: Callable[..., nn.Module], make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_cnn(7, dropout=None).half()
    path = tmp_path / "half.onnx"
    report = export_onnx(model, make_images(2).half(), path, rtol=1e-2, atol=1e-2)
    stats = bn_node_stats(onnx.load(str(path)))
    layers = _running(model)
    for key, (mean, var) in stats.items():
        running_mean, running_var = layers[str(report.bn_map[key]["layer"])]
        assert mean.dtype == np.float16 and var.dtype == np.float16
        np.testing.assert_array_equal(mean, running_mean.numpy())
        np.testing.assert_array_equal(var, running_var.numpy())
