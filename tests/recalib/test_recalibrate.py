"""Tests of recalib.recalibrate: numerics against float64 references, modes, layers, data forms.

References are independent of the code under test: a float64 copy of the model whose BN
layers normalise by batch statistics (``mode="train"``) or by running statistics
(``mode="eval"``), with forward pre-hooks collecting every BN input (``reference_stats`` in
conftest), torch's own BN update loop, and ``torch.optim.swa_utils.update_bn``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from recalib.errors import DataError, NoBatchNormError, NotConvergedError
from recalib.recalibrate import recalibrate

Stats = dict[str, tuple[np.ndarray, np.ndarray]]
BN_NAMES = ("bn1", "bn2", "bn3")
HYPO = settings(max_examples=25, deadline=None, database=None)
# float32 model vs float64 reference: a few float32 ulps through three layers
F32_TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}


def assert_stats_close(got: Stats, ref: Stats, *, names: Any = None, **tol: Any) -> None:
    for name in names if names is not None else ref:
        np.testing.assert_allclose(got[name][0], ref[name][0], err_msg=f"{name} mean", **tol)
        np.testing.assert_allclose(got[name][1], ref[name][1], err_msg=f"{name} var", **tol)


def assert_stats_equal(a: Stats, b: Stats) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name][0], b[name][0]), f"{name} mean differs"
        assert np.array_equal(a[name][1], b[name][1]), f"{name} var differs"


def sizes_from_cuts(n: int, cuts: list[int]) -> list[int]:
    points = sorted({c for c in cuts if 0 < c < n})
    sizes: list[int] = np.diff([0, *points, n]).tolist()
    return sizes


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("sizes", [[7, 20, 3, 20], [50], [25, 25]])
def test_exact_train_matches_float64_reference(
    cnn: nn.Module,
    images: Tensor,
    reference_stats: Callable[..., Stats],
    stats_of: Any,
    sizes: list[int],
) -> None:
    batches = list(torch.split(images, sizes))
    ref = reference_stats(cnn, batches, normalise_by_batch=True)
    report = recalibrate(cnn, batches)
    assert [lay.name for lay in report.layers] == list(BN_NAMES)
    assert_stats_close(stats_of(cnn), ref, **F32_TOL)


def test_exact_train_mlp_matches_float64_reference(
    mlp: nn.Module, features: Tensor, reference_stats: Callable[..., Stats], stats_of: Any
) -> None:
    batches = list(torch.split(features, [16, 16, 16, 2]))
    ref = reference_stats(mlp, batches, normalise_by_batch=True)
    recalibrate(mlp, batches)
    assert_stats_close(stats_of(mlp), ref, **F32_TOL)


def test_exact_train_float64_model_is_float64_exact(
    cnn: nn.Module, images: Tensor, reference_stats: Callable[..., Stats], stats_of: Any
) -> None:
    model = cnn.double()
    batches = list(torch.split(images.double(), [13, 30, 7]))
    ref = reference_stats(model, batches, normalise_by_batch=True)
    recalibrate(model, batches)
    assert_stats_close(stats_of(model), ref, rtol=1e-10, atol=1e-10)


@HYPO
@given(cuts=st.lists(st.integers(1, 49), max_size=6))
def test_exact_first_layer_is_independent_of_split(
    make_cnn: Any, make_images: Any, reference_stats: Any, stats_of: Any, cuts: list[int]
) -> None:
    """bn1's input does not depend on any BN, so any split gives the population stats."""
    model, x = make_cnn(0), make_images(50)
    ref = reference_stats(model, [x], normalise_by_batch=True)
    recalibrate(model, list(torch.split(x, sizes_from_cuts(50, cuts))), layers="bn1")
    assert_stats_close(stats_of(model), ref, names=["bn1"], **F32_TOL)


@HYPO
@given(cuts=st.lists(st.integers(1, 49), max_size=6))
def test_eval_mode_whole_model_is_independent_of_split(
    make_cnn: Any, make_images: Any, stats_of: Any, cuts: list[int]
) -> None:
    """Eval normalisation does not depend on the batch, so neither does the fixed point."""
    x = make_images(50)
    whole = make_cnn(0)
    recalibrate(whole, x, batch_size=50, mode="eval", tol=0.0, max_passes=5, allow_unconverged=True)
    split = make_cnn(0)
    recalibrate(
        split,
        list(torch.split(x, sizes_from_cuts(50, cuts))),
        mode="eval",
        tol=0.0,
        max_passes=5,
        allow_unconverged=True,
    )
    assert_stats_close(stats_of(split), stats_of(whole), **F32_TOL)


# --------------------------------------------------------------------------- vs update_bn


def test_ema_cumulative_equals_update_bn(make_cnn: Any, images: Tensor, stats_of: Any) -> None:
    """method='ema', momentum=None is update_bn (with Dropout p=0: update_bn trains it)."""
    batches = list(torch.split(images, [16, 16, 16, 2]))
    ours, theirs = make_cnn(0, dropout=0.0), make_cnn(0, dropout=0.0)
    update_bn(batches, theirs)
    recalibrate(ours, batches, method="ema", momentum=None)
    assert_stats_close(stats_of(ours), stats_of(theirs), rtol=1e-5, atol=1e-6)


def test_dropout_is_off_unlike_update_bn(make_cnn: Any, images: Tensor, stats_of: Any) -> None:
    """update_bn runs Dropout(p=0.5) in train mode; recalibrate runs it in eval mode."""
    batches = list(torch.split(images, 16))
    with_dropout, without = make_cnn(0, dropout=0.5), make_cnn(0, dropout=None)
    torch.manual_seed(0)
    update_bn(batches, with_dropout)
    update_bn(batches, without)
    gap = np.abs(stats_of(with_dropout)["bn2"][1] / stats_of(without)["bn2"][1] - 1).max()
    assert gap > 0.05, "update_bn's Dropout should have changed bn2's statistics"
    ours = make_cnn(0, dropout=0.5)
    recalibrate(ours, batches, method="ema", momentum=None)
    assert_stats_close(stats_of(ours), stats_of(without), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("sizes", "offsets"),
    [
        ([40, 3], [0.0, 3.0]),  # a small, different last batch: update_bn overweights it
        ([25, 25], [0.0, 2.0]),  # equal batches, different means: update_bn misses the spread
    ],
)
def test_exact_is_population_where_update_bn_is_not(
    make_mlp: Any, make_features: Any, sizes: list[int], offsets: list[float], stats_of: Any
) -> None:
    x = make_features(sum(sizes))
    batches = [b + off for b, off in zip(torch.split(x, sizes), offsets, strict=True)]
    model = make_mlp(0)
    with torch.no_grad():
        first = np.concatenate([model[0](b).double().numpy() for b in batches])
    pop = (first.mean(0), first.var(0, ddof=1))

    theirs = make_mlp(0)
    update_bn(batches, theirs)
    ub_mean, ub_var = stats_of(theirs)["1"]
    assert np.abs(ub_mean - pop[0]).max() / np.sqrt(pop[1]).min() > 0.05 or (
        np.abs(ub_var / pop[1] - 1).max() > 0.05
    ), "the example must separate update_bn from the population statistics"

    recalibrate(model, batches, method="exact")
    got_mean, got_var = stats_of(model)["1"]
    np.testing.assert_allclose(got_mean, pop[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var, pop[1], rtol=1e-5)


# --------------------------------------------------------------------------- eval mode


def test_eval_mode_converges_and_is_eval_consistent(
    cnn: nn.Module, images: Tensor, reference_stats: Any, stats_of: Any
) -> None:
    report = recalibrate(cnn, images, mode="eval", batch_size=16)
    assert report.converged
    assert report.passes <= len(BN_NAMES) + 1
    assert report.residual is not None and report.residual <= 1e-4
    ref = reference_stats(cnn, [images], normalise_by_batch=False)
    assert_stats_close(stats_of(cnn), ref, rtol=1e-4, atol=1e-5)


def test_eval_mode_reports_non_convergence(cnn: nn.Module, images: Tensor) -> None:
    with pytest.raises(NotConvergedError, match="did not converge in 1 passes") as info:
        recalibrate(cnn, images, mode="eval", max_passes=1)
    assert info.value.report is not None and not info.value.report.converged
    report = recalibrate(cnn, images, mode="eval", max_passes=1, allow_unconverged=True)
    assert report.passes == 1
    assert not report.converged
    assert report.residual is not None and report.residual > 1e-4


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("form", ["batch_size=1", "list of single samples"])
def test_eval_mode_works_at_batch_size_one(
    make_cnn: Any,
    make_mlp: Any,
    make_images: Any,
    make_features: Any,
    reference_stats: Any,
    stats_of: Any,
    kind: str,
    form: str,
) -> None:
    make_model, x = (make_cnn, make_images(12)) if kind == "cnn" else (make_mlp, make_features(12))
    model = make_model(0)
    data: Any = x if form == "batch_size=1" else [x[i : i + 1] for i in range(12)]
    report = recalibrate(model, data, mode="eval", batch_size=1)
    assert report.converged
    assert report.batches == 12
    assert report.samples == 12
    ref = reference_stats(model, [x], normalise_by_batch=False)
    assert_stats_close(stats_of(model), ref, rtol=1e-4, atol=1e-5)
    whole = make_model(0)
    recalibrate(whole, x, mode="eval", batch_size=12)
    assert_stats_close(stats_of(model), stats_of(whole), rtol=1e-4, atol=1e-5)


def test_train_mode_batch_of_one_on_batchnorm1d_raises(
    mlp: nn.Module, features: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    before = state_of(mlp)
    with pytest.raises(DataError, match="mode='eval'"):
        recalibrate(mlp, features, batch_size=1)
    assert_unchanged(mlp, before)


# --------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dropout_before_bn_does_not_change_the_result(
    make_cnn: Any, images: Tensor, stats_of: Any, mode: str
) -> None:
    with_dropout, with_identity = make_cnn(0, dropout=0.5), make_cnn(0, dropout=None)
    with_dropout.train()  # Dropout would be active if recalibrate left it in train mode
    recalibrate(with_dropout, images, mode=mode, batch_size=16)
    recalibrate(with_identity, images, mode=mode, batch_size=16)
    assert_stats_equal(stats_of(with_dropout), stats_of(with_identity))


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_flags_are_restored(cnn: Any, images: Tensor, start: str, mode: str) -> None:
    cnn.train(start != "eval")
    if start == "mixed":
        cnn.bn2.eval()
        cnn.drop.eval()
    flags = {name: m.training for name, m in cnn.named_modules()}
    recalibrate(cnn, images, mode=mode, batch_size=16)
    assert {name: m.training for name, m in cnn.named_modules()} == flags


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_only_running_stats_change_and_no_graph(
    cnn: Any, images: Tensor, state_of: Any, mode: str
) -> None:
    cnn.bn1.momentum = 0.3
    cnn.bn2.momentum = None
    cnn.train()
    before = state_of(cnn)
    assert torch.is_grad_enabled()
    recalibrate(cnn, images, mode=mode, batch_size=16)
    assert (cnn.bn1.momentum, cnn.bn2.momentum, cnn.bn3.momentum) == (0.3, None, 0.1)
    after = cnn.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[key], value), f"{key} was not recalibrated"
        else:  # weights, biases, num_batches_tracked: bit-identical
            assert torch.equal(after[key], value), f"{key} changed"
    for name, buf in cnn.named_buffers():
        assert not buf.requires_grad, name
        assert buf.grad_fn is None, name
    for name, p in cnn.named_parameters():
        assert p.requires_grad, name
        assert p.grad is None, name
    assert torch.is_grad_enabled()


def test_forward_methods_are_restored(cnn: nn.Module, images: Tensor) -> None:
    recalibrate(cnn, images)
    for m in cnn.modules():
        assert "forward" not in m.__dict__
    out = cnn.train()(images[:8])
    assert out.grad_fn is not None  # the model trains normally afterwards


# --------------------------------------------------------------------------- methods


def test_prior_matches_manual_mix(
    cnn: nn.Module, images: Tensor, reference_stats: Any, stats_of: Any
) -> None:
    """Weights use items along the batch axis (50), not values per channel (50 * 64)."""
    source = stats_of(cnn)["bn1"]
    target = reference_stats(cnn, [images], normalise_by_batch=True)["bn1"]
    report = recalibrate(
        cnn, images, method="prior", prior_strength=30.0, batch_size=16, layers="bn1"
    )
    w = 30.0 / (30.0 + 50.0)
    mean, var = stats_of(cnn)["bn1"]
    np.testing.assert_allclose(mean, w * source[0] + (1 - w) * target[0], **F32_TOL)
    np.testing.assert_allclose(var, w * source[1] + (1 - w) * target[1], **F32_TOL)
    assert report.layer("bn1").items == 50
    assert report.layer("bn1").samples == 50 * 8 * 8


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_prior_zero_equals_exact_and_huge_prior_keeps_source(
    make_cnn: Any, images: Tensor, stats_of: Any, mode: str
) -> None:
    exact, zero, huge = make_cnn(0), make_cnn(0), make_cnn(0)
    source = stats_of(huge)
    recalibrate(exact, images, method="exact", mode=mode, batch_size=16)
    recalibrate(zero, images, method="prior", prior_strength=0.0, mode=mode, batch_size=16)
    recalibrate(huge, images, method="prior", prior_strength=1e9, mode=mode, batch_size=16)
    assert_stats_equal(stats_of(zero), stats_of(exact))
    assert_stats_close(stats_of(huge), source, rtol=1e-6, atol=1e-6)


def test_ema_momentum_equals_batchnorm_update_loop(
    make_cnn: Any, images: Tensor, stats_of: Any
) -> None:
    """method='ema', momentum=0.1: torch BN's own training update, from the source stats."""
    batches = list(torch.split(images, [16, 16, 16, 2]))
    manual = make_cnn(0)
    manual.train()
    manual.drop.eval()
    with torch.no_grad():
        for b in batches:
            manual(b)
    ours = make_cnn(0)
    recalibrate(ours, batches, method="ema", momentum=0.1)
    assert_stats_close(stats_of(ours), stats_of(manual), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("layers", "selected"),
    [
        ("bn2", ["bn2"]),
        ("bn[12]", ["bn1", "bn2"]),
        (["bn3", "bn1"], ["bn1", "bn3"]),
        (["bn*", "bn1"], ["bn1", "bn2", "bn3"]),
    ],
)
def test_layers_selection_changes_only_selected(
    cnn: nn.Module, images: Tensor, stats_of: Any, layers: Any, selected: list[str]
) -> None:
    before = stats_of(cnn)
    report = recalibrate(cnn, images, layers=layers, batch_size=16)
    assert [lay.name for lay in report.layers] == selected
    after = stats_of(cnn)
    for name in BN_NAMES:
        unchanged = np.array_equal(after[name][0], before[name][0]) and np.array_equal(
            after[name][1], before[name][1]
        )
        assert unchanged == (name not in selected), name


def test_layers_pattern_matching_nothing_raises(
    cnn: nn.Module, images: Tensor, state_of: Any, assert_unchanged: Any
) -> None:
    before = state_of(cnn)
    with pytest.raises(
        NoBatchNormError, match=r"'layer4\.\*' matched no .*expected one of: bn1, bn2, bn3"
    ):
        recalibrate(cnn, images, layers=["bn1", "layer4.*"])
    assert_unchanged(cnn, before)


def test_layers_without_running_stats_are_skipped(make_images: Any, stats_of: Any) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
    )
    report = recalibrate(model, make_images(20))
    assert [lay.name for lay in report.layers] == ["3"]
    assert len(report.skipped) == 1
    assert report.skipped[0]["layer"] == "1"
    assert "track_running_stats=False" in report.skipped[0]["reason"]
    assert model[1].running_mean is None


def _conv_output_stats(conv: nn.Module, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        y = conv.double()(x.double()).numpy()
    flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return flat.mean(0), flat.var(0, ddof=1)


def test_lazy_batchnorm_is_initialised_and_recalibrated(make_images: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    x = make_images(20)
    report = recalibrate(model, x, batch_size=8)
    assert type(model[1]) is nn.BatchNorm2d
    assert report.layers[0].channels == 4
    ref = _conv_output_stats(copy.deepcopy(model[0]), x)
    bn: Any = model[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), ref[0], **F32_TOL)
    np.testing.assert_allclose(bn.running_var.numpy(), ref[1], **F32_TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sync_batchnorm_on_cpu_equals_batchnorm(
    cnn: nn.Module, images: Tensor, stats_of: Any, mode: str
) -> None:
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(cnn))  # type: ignore[no-untyped-call]
    assert isinstance(synced.bn1, nn.SyncBatchNorm) and isinstance(synced.bn3, nn.SyncBatchNorm)
    report = recalibrate(synced, images, mode=mode, batch_size=16)
    recalibrate(cnn, images, mode=mode, batch_size=16)
    assert {lay.kind for lay in report.layers} == {"SyncBatchNorm"}
    assert_stats_equal(stats_of(synced), stats_of(cnn))
    with torch.no_grad():
        torch.testing.assert_close(synced(images), cnn(images), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_renorm_is_recalibrated_like_batchnorm(
    make_cnn: Any, images: Tensor, stats_of: Any, mode: str
) -> None:
    try:
        from recalib.renorm import BatchRenorm2d
    except ImportError:
        pytest.skip("recalib.renorm is not importable")
    plain = make_cnn(0)
    renorm = make_cnn(0, norm2d=BatchRenorm2d)
    renorm.load_state_dict(plain.state_dict())
    report = recalibrate(renorm, images, mode=mode, batch_size=16)
    recalibrate(plain, images, mode=mode, batch_size=16)
    assert [lay.kind for lay in report.layers] == ["BatchRenorm2d", "BatchRenorm2d", "BatchNorm1d"]
    assert_stats_close(stats_of(renorm), stats_of(plain), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- data forms


class _KeywordNet(nn.Module):
    """A model whose forward takes keyword arguments (dict batches)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *, image: Tensor, gain: Tensor) -> Tensor:
        out: Tensor = self.net(image * gain)
        return out


class _Opaque:
    """A batch type recalib knows nothing about (needs ``forward=``)."""

    def __init__(self, pixels: Tensor) -> None:
        self.pixels = pixels


def _data_forms(x: Tensor) -> dict[str, tuple[Any, dict[str, Any]]]:
    y = torch.arange(x.shape[0]) % 5
    chunks = list(torch.split(x, 16))
    labels = list(torch.split(y, 16))
    return {
        "tensor": (x, {"batch_size": 16}),
        "numpy": (x.numpy(), {"batch_size": 16}),
        "list of tensors": (chunks, {}),
        "list of numpy": ([c.numpy() for c in chunks], {}),
        "list of (x, y)": (list(zip(chunks, labels, strict=True)), {}),
        "list of [x, y]": ([[c, lab] for c, lab in zip(chunks, labels, strict=True)], {}),
        "generator": ((c for c in chunks), {}),
        "DataLoader (x, y)": (DataLoader(TensorDataset(x, y), batch_size=16), {}),
        "DataLoader (x,)": (DataLoader(TensorDataset(x), batch_size=16), {}),
        "forward=": (
            [_Opaque(c) for c in chunks],
            {"forward": lambda model, batch: model(batch.pixels)},
        ),
    }


FORMS = list(_data_forms(torch.zeros(1, 1)))


# mode='eval' needs re-iterable data: a generator is tested in test_recalibrate_errors
FORM_MODES = [(f, m) for m in ("train", "eval") for f in FORMS if (f, m) != ("generator", "eval")]


@pytest.mark.parametrize(("form", "mode"), FORM_MODES)
def test_data_forms_give_identical_statistics(
    make_cnn: Any, images: Tensor, stats_of: Any, form: str, mode: str
) -> None:
    reference = make_cnn(0)
    recalibrate(reference, images, batch_size=16, mode=mode)
    data, kwargs = _data_forms(images)[form]
    model = make_cnn(0)
    report = recalibrate(model, data, mode=mode, **kwargs)
    assert_stats_equal(stats_of(model), stats_of(reference))
    assert report.batches == 4
    if form != "forward=":  # an opaque batch counts as one item
        assert report.samples == 50


def test_dict_batches_are_keyword_arguments(make_cnn: Any, images: Tensor, stats_of: Any) -> None:
    reference = make_cnn(0)
    recalibrate(reference, images * 2.0, batch_size=16)
    model = _KeywordNet(make_cnn(0))
    gain = torch.tensor(2.0)
    data = [{"image": c, "gain": gain} for c in torch.split(images, 16)]
    report = recalibrate(model, data)
    assert [lay.name for lay in report.layers] == ["net.bn1", "net.bn2", "net.bn3"]
    assert report.samples == 50
    got = {k.removeprefix("net."): v for k, v in stats_of(model).items()}
    assert_stats_equal(got, stats_of(reference))


@pytest.mark.parametrize("max_samples", [37, 32, 1000])
@pytest.mark.parametrize("form", ["tensor", "list of (x, y)", "DataLoader (x, y)"])
def test_max_samples_caps_the_data(
    make_cnn: Any, images: Tensor, stats_of: Any, max_samples: int, form: str
) -> None:
    used = min(max_samples, 50)
    reference = make_cnn(0)
    recalibrate(reference, images[:used], batch_size=16)
    data, kwargs = _data_forms(images)[form]
    model = make_cnn(0)
    report = recalibrate(model, data, max_samples=max_samples, **kwargs)
    assert report.samples == used
    assert report.batches == -(-used // 16)
    assert all(lay.items == used for lay in report.layers)
    assert report.layer("bn1").samples == used * 8 * 8
    assert_stats_equal(stats_of(model), stats_of(reference))


def test_device_and_progress_options(cnn: nn.Module, images: Tensor, capsys: Any) -> None:
    report = recalibrate(cnn, images, device="cpu", progress=True, batch_size=16)
    assert report.device == "cpu"
    assert report.batches == 4
    assert "recalibrate" in capsys.readouterr().err


# --------------------------------------------------------------------------- ExportedProgram


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_exported_program_is_updated_in_place(
    make_cnn: Any, images: Tensor, stats_of: Any, mode: str
) -> None:
    batches = list(torch.split(images[:48], 16))
    module = make_cnn(0)
    program = torch.export.export(make_cnn(0).eval(), (batches[0],))
    report = recalibrate(program, batches, mode=mode)
    recalibrate(module, batches, mode=mode)
    assert [lay.name for lay in report.layers] == list(BN_NAMES)
    state = program.state_dict
    for name in BN_NAMES:
        for stat in ("running_mean", "running_var"):
            key = f"{name}.{stat}"
            torch.testing.assert_close(
                state[key], getattr(getattr(module, name), stat), rtol=1e-6, atol=1e-7
            )
    out = program.module()(batches[0])
    with torch.no_grad():
        torch.testing.assert_close(out, module(batches[0]), rtol=1e-5, atol=1e-6)


def test_exported_program_with_dynamic_batch_takes_any_split(
    make_cnn: Any, images: Tensor, stats_of: Any
) -> None:
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        make_cnn(0).eval(), (images[:16],), dynamic_shapes={"x": {0: batch}}
    )
    module = make_cnn(0)
    recalibrate(program, images, batch_size=16, mode="eval")  # last batch: 2 items
    recalibrate(module, images, batch_size=16, mode="eval")
    for name in BN_NAMES:
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(
                program.state_dict[f"{name}.{stat}"],
                getattr(getattr(module, name), stat),
                rtol=1e-6,
                atol=1e-7,
            )


def test_exported_program_shape_guard_is_a_data_error(make_cnn: Any, images: Tensor) -> None:
    program = torch.export.export(make_cnn(0).eval(), (images[:16],))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    with pytest.raises(DataError, match="batch 3"):
        recalibrate(program, images, batch_size=16)  # batches of 16, 16, 16, 2
    for key, value in program.state_dict.items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- report


LAYER_FIELDS = {
    "name",
    "kind",
    "channels",
    "samples",
    "items",
    "old_mean",
    "new_mean",
    "old_var",
    "new_var",
    "mean_shift",
    "log_var_ratio",
    "sym_kl",
    "max_sym_kl",
    "degenerate_channels",
}


def test_report_is_json_and_complete(cnn: nn.Module, images: Tensor) -> None:
    report = recalibrate(
        cnn, images, method="prior", prior_strength=10.0, mode="eval", batch_size=16
    )
    d = json.loads(json.dumps(report.to_dict()))
    assert d["method"] == "prior" and d["mode"] == "eval"
    assert d["samples"] == 50 and d["batches"] == 4
    assert d["params"]["prior_strength"] == 10.0
    assert d["totals"]["layers"] == 3
    assert [lay["name"] for lay in d["layers"]] == list(BN_NAMES)
    for lay in d["layers"]:
        assert set(lay) == LAYER_FIELDS
    assert d["layers"][0]["channels"] == 6 and d["layers"][2]["channels"] == 5
    assert d["layers"][0]["kind"] == "BatchNorm2d" and d["layers"][2]["kind"] == "BatchNorm1d"
    assert json.loads(report.to_json()) == d
    again = type(report).from_dict(d)
    assert again.layers == report.layers
    assert again.mean_sym_kl == pytest.approx(report.mean_sym_kl)
    with pytest.raises(KeyError, match="no layer 'bn9'"):
        report.layer("bn9")


def test_report_stats_describe_the_change(cnn: nn.Module, images: Tensor, stats_of: Any) -> None:
    before = stats_of(cnn)
    report = recalibrate(cnn, images, batch_size=16)
    after = stats_of(cnn)
    for lay in report.layers:
        assert lay.old_mean == pytest.approx(before[lay.name][0].mean(), rel=1e-6)
        assert lay.new_var == pytest.approx(after[lay.name][1].mean(), rel=1e-6)
        assert lay.sym_kl > 0.01
        assert lay.max_sym_kl >= lay.sym_kl
    assert report.max_sym_kl >= report.mean_sym_kl > 0.01


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_report_shows_no_drift_when_recalibrated_twice(
    cnn: nn.Module, images: Tensor, mode: str
) -> None:
    first = recalibrate(cnn, images, batch_size=16, mode=mode)
    second = recalibrate(cnn, images, batch_size=16, mode=mode)
    assert first.mean_sym_kl > 0.01
    assert second.max_sym_kl < 1e-8
    for lay in second.layers:
        assert lay.mean_shift < 1e-4
        assert lay.log_var_ratio < 1e-4
