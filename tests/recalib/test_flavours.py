"""Every BN flavour, on every path: real architectures (torchvision, timm) recalibrated as an
``nn.Module``, as a ``torch.export.ExportedProgram`` and as ONNX give the same statistics;
layers that do more than normalise (timm's ``BatchNormAct2d``, an instance ``forward``) keep
doing it; frozen BN is skipped with its reason; structured outputs export as named outputs.

Networks have random weights (seeded), tiny inputs (32x32, 8 images in batches of 4) and
"source" statistics from a train-mode recalibration on other data, so that their eval
forward is well conditioned for the export's parity check.
"""

from __future__ import annotations

import collections
import copy
import importlib
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.errors import DataError, NoBatchNormError
from recalib.onnx.export import export_onnx
from recalib.onnx.names import bn_node_stats, read_bn_map
from recalib.onnx.recalibrate import recalibrate_onnx
from recalib.recalibrate import recalibrate

Stats = dict[str, tuple[np.ndarray, np.ndarray]]
M = TypeVar("M", bound=nn.Module)

BATCH = 4
SIZE = 32
# Statistics from the three paths agree to this: means in units of the layer's standard
# deviation, variances relatively (float32 forwards by different kernels: torch's oneDNN
# convolutions, ONNX Runtime's).
TOL = 1e-5


def _import_torchvision() -> Any:
    """``torchvision.models``, or a skip without torchvision.

    A torchvision wheel built for another torch variant (a CUDA wheel on a CPU torch) cannot
    load its C++ operators, and its import then fails registering their fake kernels. The
    model definitions are pure Python: import them without those registrations.
    """
    try:
        return importlib.import_module("torchvision.models")
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    return importlib.import_module("torchvision.models")


def _import_timm() -> Any:
    _import_torchvision()  # timm imports torchvision: the same workaround first
    return pytest.importorskip("timm")


# --------------------------------------------------------------------------- helpers
def _images(n: int, seed: int, *, size: int = SIZE) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 1.2]).view(1, 3, 1, 1)
    shift = torch.tensor([1.5, -0.7, 0.2]).view(1, 3, 1, 1)
    return torch.randn((n, 3, size, size), generator=gen) * scale + shift


def _prepared(model: M, seed: int, *, size: int = SIZE) -> tuple[M, Tensor]:
    """Random affine parameters, then source statistics from one batch of other images.

    Returns the model and that batch: an eval forward on it reproduces the normalisation
    the statistics came from (batch statistics), so it is well conditioned even in a deep
    random network - the export's parity check runs on it.
    """
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None and m.bias is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    model.eval()
    source = torch.randn((2 * BATCH, 3, size, size), generator=gen)
    recalibrate(model, source, mode="train", batch_size=2 * BATCH)
    return model, source


def _module_stats(model: nn.Module) -> Stats:
    return {
        name: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def _program_stats(program: torch.export.ExportedProgram, names: list[str]) -> Stats:
    sd = program.state_dict
    return {
        n: (
            sd[f"{n}.running_mean"].double().numpy().copy(),
            sd[f"{n}.running_var"].double().numpy().copy(),
        )
        for n in names
    }


def _onnx_stats(model: onnx.ModelProto) -> Stats:
    layers = read_bn_map(model)
    return {layers[node].layer: stats for node, stats in bn_node_stats(model).items()}


def _errors(got: Stats, want: Stats) -> tuple[float, float]:
    """The worst mean error (in standard deviations, or relative where larger) and the
    worst relative variance error over every layer and channel."""
    assert got.keys() == want.keys()
    worst_mean = worst_var = 0.0
    for name, (wm, wv) in want.items():
        gm, gv = got[name]
        worst_mean = max(worst_mean, float((np.abs(gm - wm) / (np.sqrt(wv) + np.abs(wm))).max()))
        worst_var = max(worst_var, float((np.abs(gv - wv) / wv).max()))
    return worst_mean, worst_var


def _assert_same(got: Stats, want: Stats, *, tol: float = TOL) -> None:
    worst_mean, worst_var = _errors(got, want)
    assert worst_mean <= tol, f"means off by {worst_mean:.2e} std (tolerance {tol:.0e})"
    assert worst_var <= tol, f"variances off by {worst_var:.2e} relatively (tolerance {tol:.0e})"


def _check_three_paths(
    model: nn.Module, source: Tensor, data: Tensor, tmp_path: Path, **kwargs: Any
) -> None:
    """Recalibrate ``model`` on ``data`` as a module, a program and ONNX, and compare.

    The program runs torch's own kernels: it must agree with the module to ``TOL``. ONNX
    Runtime's float32 kernels differ from torch's, and on a deep random network float32
    itself is further than ``TOL`` from the exact statistics (variances ~3e-4 relative on
    DenseNet-121 at batch 4), so ONNX is held to the float64 module result, within
    ``TOL`` or twice the module's own float32 error, whichever is larger.

    Only the layers the eval forward calls are compared (GoogLeNet's auxiliary heads run
    in training only); the module path must leave the others unchanged and say so.
    """
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("mode", "train")
    before = _module_stats(model)
    program = torch.export.export(copy.deepcopy(model), (data[:BATCH],))
    export_onnx(model, source, tmp_path / "model.onnx", rtol=1e-3, atol=1e-3)

    module = copy.deepcopy(model)
    report = recalibrate(module, data, **kwargs)
    seen = [lay.name for lay in report.layers]
    unseen = {s["layer"] for s in report.skipped}
    assert unseen == before.keys() - set(seen)
    after = _module_stats(module)
    for name in unseen:
        np.testing.assert_array_equal(after[name][0], before[name][0])
    want = {n: after[n] for n in seen}
    exact = copy.deepcopy(model).double()
    recalibrate(exact, data.double(), **kwargs)
    truth = {n: _module_stats(exact)[n] for n in seen}
    floor = max(_errors(want, truth))
    assert floor <= 1e-3, f"float32 is {floor:.1e} off float64: an ill-conditioned test model"

    recalibrate(program, data, **kwargs)
    _assert_same(_program_stats(program, seen), want)
    recalibrated, _ = recalibrate_onnx(tmp_path / "model.onnx", data.numpy(), **kwargs)
    _assert_same(_onnx_stats(recalibrated), truth, tol=max(TOL, 2 * floor))


# --------------------------------------------------------------------------- architectures
def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(_import_torchvision(), name)(weights=None, **kwargs)


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: _import_timm().create_model(name, pretrained=False)


# name -> (builder, input size). RegNet's last stage at 1x1 with 4 values per channel is
# too ill-conditioned for float32 (variances 1e-2 off float64): 48x48 gives it 2x2.
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (_tv("resnet18"), SIZE),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), SIZE),
    "efficientnet_b0": (_tv("efficientnet_b0"), SIZE),
    "densenet121": (_tv("densenet121"), SIZE),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), 48),
    "googlenet_aux": (_tv("googlenet", aux_logits=True, init_weights=False), SIZE),
    "timm_efficientnet_b0": (_timm("efficientnet_b0"), SIZE),  # BatchNormAct2d + SiLU
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), SIZE),  # + hard-swish
}


# DenseNet-121 is a fifth of the file's time (120 BN layers; torch.export alone ~5 s).
SLOW = {"densenet121"}


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=[pytest.mark.slow] if a in SLOW else []) for a in ARCHITECTURES]
)
def test_module_program_and_onnx_agree_in_train_mode(arch: str, tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build, size = ARCHITECTURES[arch]
        model, source = _prepared(build(), seed=1, size=size)
    _check_three_paths(model, source, _images(2 * BATCH, 2, size=size), tmp_path)


@pytest.mark.parametrize("arch", ["timm_mobilenetv3_small_050"])
def test_module_program_and_onnx_agree_in_eval_mode(arch: str, tmp_path: Path) -> None:
    # Two ordinary passes (no lockstep pass, anchor=0): the first normalises by batch
    # statistics, the second by the first's estimates (running statistics) - both
    # normalisations on each path, through BatchNormAct2d (plain BN in eval mode: see
    # test_onnx_recalibrate.py); tol=0 is never reached, so allow_unconverged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build, size = ARCHITECTURES[arch]
        model, source = _prepared(build(), seed=3, size=size)
    data = _images(2 * BATCH, 4, size=size)
    _check_three_paths(
        model,
        source,
        data,
        tmp_path,
        mode="eval",
        max_passes=2,
        tol=0.0,
        anchor=0,
        allow_unconverged=True,
    )


# --------------------------------------------------------------------------- own forwards
def _float64_reference(model: nn.Module, batches: list[Tensor], *, by_batch: bool) -> Stats:
    """Pooled float64 statistics of every BN input, each layer running its own forward
    in training mode (``by_batch``) or eval mode (momentum 0: buffers stay)."""
    ref = copy.deepcopy(model).double().eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name, m in ref.named_modules():
        if isinstance(m, _BatchNorm):
            m.train(by_batch)
            m.momentum = 0.0
            seen[name] = []

            def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                x = args[0].detach().numpy()
                seen[name].append(np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]))

            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        for xb in batches:
            ref(xb.double())
    flat = {n: np.concatenate(p) for n, p in seen.items()}
    return {n: (x.mean(0), x.var(0, ddof=1)) for n, x in flat.items()}


def _small_bn_act_net() -> nn.Module:
    timm = _import_timm()
    norm_act = timm.layers.BatchNormAct2d
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            norm_act(6, act_layer=nn.ReLU),
            nn.Conv2d(6, 8, 3, padding=1),
            norm_act(8, act_layer=nn.SiLU),
            nn.Conv2d(8, 4, 1),
            nn.BatchNorm2d(4),
        )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_act_keeps_its_activation(mode: str) -> None:
    # The tap used to normalise with F.batch_norm in place of the layer's forward: the
    # ReLU/SiLU of BatchNormAct2d vanished and every later layer saw the wrong input.
    model, _ = _prepared(_small_bn_act_net(), seed=6, size=8)
    x = _images(16, 7, size=8)
    batches = list(torch.split(x, BATCH))
    if mode == "train":
        recalibrate(model, batches, mode="train")
        want = _float64_reference(model, batches, by_batch=True)
    else:
        ref = copy.deepcopy(model)
        recalibrate(
            model,
            batches,
            mode="eval",
            max_passes=1,
            init="source",
            anchor=0,
            allow_unconverged=True,
        )
        want = _float64_reference(ref, batches, by_batch=False)
    _assert_same(_module_stats(model), want, tol=1e-6)


def test_forward_set_on_the_instance_is_kept() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)
        )
    model, _ = _prepared(model, seed=8, size=8)

    def doubled(self: nn.BatchNorm2d, x: Tensor) -> Tensor:
        return nn.BatchNorm2d.forward(self, x) * 2.0 + 1.0

    model[1].forward = types.MethodType(doubled, model[1])
    batches = list(torch.split(_images(12, 9, size=8), BATCH))
    want = _float64_reference(model, batches, by_batch=True)
    recalibrate(model, batches, mode="train")
    _assert_same(_module_stats(model), want, tol=1e-6)
    assert model[1].forward.__func__ is doubled  # type: ignore[attr-defined]


def test_buffers_come_back_when_the_layer_forward_fails() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    bn = cast(nn.BatchNorm2d, model[1])
    assert bn.running_mean is not None and bn.running_var is not None
    buffers = (bn.running_mean, bn.running_var)
    before = (buffers[0].clone(), buffers[1].clone())

    def broken(self: nn.BatchNorm2d, x: Tensor) -> Tensor:
        raise RuntimeError("broken layer")

    bn.forward = types.MethodType(broken, bn)  # type: ignore[method-assign]
    with pytest.raises(DataError, match="broken layer"):
        recalibrate(model, _images(8, 16, size=8), batch_size=BATCH)
    assert bn.running_mean is buffers[0] and bn.running_var is buffers[1]  # not copies
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.forward.__func__ is broken  # type: ignore[attr-defined]


class _Frozen(nn.Module):
    """A frozen BN as detectron2 writes it: statistics and affine as buffers."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((c,), value))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(
            1, -1, 1, 1
        )


def _frozen_kinds() -> list[type[nn.Module]]:
    frozen = type("FrozenBatchNorm2d", (_Frozen,), {})
    kinds: list[type[nn.Module]] = [frozen]
    try:
        _import_torchvision()
    except pytest.skip.Exception:
        return kinds
    from torchvision.ops.misc import FrozenBatchNorm2d

    return [*kinds, FrozenBatchNorm2d]


@pytest.mark.parametrize("kind", _frozen_kinds(), ids=lambda k: k.__module__.split(".")[0])
def test_frozen_batchnorm_is_skipped_with_its_reason(kind: type[nn.Module]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), kind(4), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    model.eval()
    frozen_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    report = recalibrate(model, _images(8, 10, size=8), batch_size=BATCH)
    assert [lay.name for lay in report.layers] == ["3"]
    (skip,) = report.skipped
    assert skip["layer"] == "1"
    assert "FrozenBatchNorm2d" in skip["reason"] and "frozen" in skip["reason"]
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, frozen_before[k])
    with pytest.raises(NoBatchNormError, match="1 frozen"):
        recalibrate(nn.Sequential(nn.Conv2d(3, 4, 3), kind(4)), _images(8, 10, size=8))


# --------------------------------------------------------------------------- structured outputs
class _Pair(NamedTuple):
    logits: Tensor
    features: Tensor


class _Heads(nn.Module):
    """One BN trunk and three output structures: a dict, a namedtuple, nested tuples."""

    def __init__(self, structure: str) -> None:
        super().__init__()
        self.structure = structure
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.aux = nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Any:
        y = F.relu(self.bn(self.conv(x)))
        out, aux = self.head(y), self.aux(y)
        if self.structure == "dict":
            return collections.OrderedDict(out=out, aux=aux)
        if self.structure == "namedtuple":
            return _Pair(out.mean((2, 3)), y)
        return out, (aux, (y.sum(1), x.mean(1)))


STRUCTURES = {
    "dict": ["out", "aux"],
    "namedtuple": ["logits", "features"],
    "nested": ["output_0", "output_1.0", "output_1.1.0", "output_1.1.1"],
}


def _leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [leaf for v in values for leaf in _leaves(v)]


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("as_program", [False, True], ids=["module", "program"])
def test_structured_outputs_are_named_and_each_checked(
    structure: str, as_program: bool, tmp_path: Path
) -> None:
    import onnxruntime as ort

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model, _ = _prepared(_Heads(structure), seed=11, size=8)
    x = _images(BATCH, 12, size=8)
    target: Any = model
    if as_program:
        target = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    report = export_onnx(target, x, tmp_path / "m.onnx")

    names = STRUCTURES[structure]
    assert report.output_names == names
    assert sorted(report.max_abs_err) == sorted(names)  # the parity check saw every output
    assert report.batch_sizes == [BATCH, BATCH + 1]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    got = session.run(names, feed)
    with torch.no_grad():
        want = _leaves(model(x))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
    new, _ = recalibrate_onnx(tmp_path / "m.onnx", _images(8, 13, size=8).numpy(), mode="train")
    assert [o.name for o in new.graph.output] == names


def test_segmentation_model_dict_output(tmp_path: Path) -> None:
    tvm = _import_torchvision()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(14)
        model = tvm.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    model, source = _prepared(model, seed=14)
    report = export_onnx(model, source, tmp_path / "seg.onnx", rtol=1e-3, atol=1e-3)
    assert report.output_names == ["out"]
    assert set(report.max_abs_err) == {"out"}
