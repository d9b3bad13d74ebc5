"""Tests of recalib.onnx.banks: many stat banks in one ONNX graph, chosen per row or routed.

References: the original ONNX model with a bank's statistics written in
(:func:`set_bn_node_stats`, float32 ONNX Runtime) and the torch model with the bank applied
in float64. The quality test trains a small CNN on a synthetic texture task for a few
seconds and serves a random-order stream of batch-1 requests from four corrupted domains.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recalib import recalibrate
from recalib.errors import (
    BankIndexError,
    DataError,
    OnnxModelError,
    OptionsError,
    StatBankMismatchError,
)
from recalib.onnx.bank_routing import bank_route_limit, route_distances
from recalib.onnx.banks import (
    AUTO,
    BANK_INDEX,
    BANK_METADATA_KEY,
    BANK_OUTPUT,
    DISTANCE_OUTPUT,
    ROUTE_LIMIT,
    ROUTE_PENALTY,
    BankTables,
    add_bank_inputs,
    read_bank_spec,
)
from recalib.onnx.export import export_onnx
from recalib.onnx.names import read_bn_map, set_bn_node_stats
from recalib.statbank import StatBank
from tests.conftest import SmallCNN, randomise_source_stats

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
# float32 ONNX Runtime vs a float64 reference: a few ulps of each activation's scale.
RTOL, ATOL = 1e-4, 1e-4


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _random_bank(model: nn.Module, seed: int) -> StatBank:
    """A bank of ``model``'s layers with seeded statistics unlike the source's."""
    gen = torch.Generator().manual_seed(seed)
    bank = StatBank.from_model(model)
    for name, (mean, _) in bank.stats.items():
        c = mean.numel()
        bank.stats[name] = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) * 2 + 0.2)
    return bank


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomise_source_stats(SmallCNN(), 0).eval()


@pytest.fixture(scope="module")
def exported(cnn: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("banks") / "cnn.onnx"
    export_onnx(cnn, torch.randn(2, 3, 8, 8), path)
    return onnx.load(path)


@pytest.fixture(scope="module")
def banked(exported: onnx.ModelProto) -> onnx.ModelProto:
    return add_bank_inputs(exported)


def _torch_reference(model: nn.Module, bank: StatBank | None, x: F32) -> F64:
    """``model`` with ``bank`` applied, in float64 (the model itself is not changed)."""
    ref = copy.deepcopy(model).double()
    if bank is not None:
        bank.apply(ref)
    with torch.no_grad():
        out: F64 = ref(torch.from_numpy(x).double()).numpy()
    return out


def _onnx_with_bank(exported: onnx.ModelProto, bank: StatBank) -> onnx.ModelProto:
    """The original ONNX model with ``bank``'s statistics written into its BN nodes."""
    patched = copy.deepcopy(exported)
    by_layer = {info.layer: key for key, info in read_bn_map(patched).items()}
    stats = {by_layer[n]: (m.numpy(), v.numpy()) for n, (m, v) in bank.stats.items()}
    set_bn_node_stats(patched, stats)
    return patched


def test_rewrite_replaces_every_bn_and_adds_the_bank_inputs(
    exported: onnx.ModelProto, banked: onnx.ModelProto
) -> None:
    assert not [n for n in banked.graph.node if n.op_type == "BatchNormalization"]
    bn = read_bn_map(exported)
    inputs = {v.name for v in banked.graph.input}
    assert {BANK_INDEX, "input"} <= inputs
    for key in bn:
        assert {f"recalib_bank::{key}::scale", f"recalib_bank::{key}::shift"} <= inputs
    assert [v.name for v in banked.graph.output] == ["output", BANK_OUTPUT, DISTANCE_OUTPUT]
    spec = read_bank_spec(banked)
    assert [lay.node for lay in spec.layers] == list(bn)
    assert spec.route == (next(iter(bn)),)  # the stem's BN: its input depends on no BN
    # the BN parameters are gone from the file: they live in the tables
    names = {t.name for t in banked.graph.initializer}
    assert not {info.mean for info in bn.values()} & names


@pytest.mark.parametrize("rows", [1, 5])
def test_each_row_is_normalised_with_its_own_bank(
    cnn: nn.Module, exported: onnx.ModelProto, banked: onnx.ModelProto, rows: int
) -> None:
    banks = [_random_bank(cnn, seed) for seed in (1, 2, 3)]
    tables = BankTables(banked, banks)
    session = _session(banked)
    x = np.random.default_rng(rows).normal(size=(rows, 3, 8, 8)).astype(np.float32)
    index = np.arange(rows) % (len(banks) + 1)  # mixed banks in one batch, bank 0 included
    out, chosen = session.run(["output", BANK_OUTPUT], {"input": x, **tables.feed(index)})
    np.testing.assert_array_equal(chosen, index)
    for k, bank in enumerate([None, *banks]):
        rows_k = index == k
        if not rows_k.any():
            continue
        ref64 = _torch_reference(cnn, bank, x[rows_k])
        np.testing.assert_allclose(out[rows_k], ref64, rtol=RTOL, atol=ATOL)
        model_k = exported if bank is None else _onnx_with_bank(exported, bank)
        ref32 = _session(model_k).run(["output"], {"input": x[rows_k]})[0]
        np.testing.assert_allclose(out[rows_k], ref32, rtol=1e-5, atol=1e-5)


def test_banks_keyed_by_onnx_node_work_like_stat_banks(
    cnn: nn.Module, exported: onnx.ModelProto, banked: onnx.ModelProto
) -> None:
    bank = _random_bank(cnn, 7)
    by_layer = {info.layer: key for key, info in read_bn_map(exported).items()}
    by_node = {by_layer[n]: (m.numpy(), v.numpy()) for n, (m, v) in bank.stats.items()}
    a, b = BankTables(banked, [bank]), BankTables(banked, [by_node])
    for name, value in a.feed([1]).items():
        np.testing.assert_array_equal(value, b.feed([1])[name])


def _stem_moments(cnn: nn.Module, x: F32) -> tuple[F64, F64]:
    """Per-row, per-channel mean and population variance of the first BN's input."""
    conv = copy.deepcopy(cnn.get_submodule("conv1")).double()
    with torch.no_grad():
        h = conv(torch.from_numpy(x).double()).numpy()
    return h.mean(axis=(2, 3)), h.var(axis=(2, 3))


def _kl(mean: F64, var: F64, bank_mean: F64, bank_var: F64, eps: float) -> F64:
    """KL(N(mean, var) || N(bank mean, bank var)) averaged over channels, per row."""
    v, big_v = var + eps, bank_var + eps
    kl = 0.5 * (v / big_v - 1.0 - np.log(v / big_v) + (mean - bank_mean) ** 2 / big_v)
    out: F64 = kl.mean(axis=-1)
    return out


def test_distance_is_the_kl_of_the_row_to_the_bank_it_got(
    cnn: nn.Module, banked: onnx.ModelProto
) -> None:
    banks = [_random_bank(cnn, seed) for seed in (4, 5)]
    tables = BankTables(banked, banks)
    x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
    index = np.array([0, 1, 2, AUTO, AUTO, 2])
    chosen, dist = _session(banked).run(
        [BANK_OUTPUT, DISTANCE_OUTPUT], {"input": x, **tables.feed(index)}
    )
    mean, var = _stem_moments(cnn, x)
    layer = tables.spec.layers[0]
    stats = [(layer.mean, layer.var)] + [
        (b.stats["bn1"][0].double().numpy(), b.stats["bn1"][1].double().numpy()) for b in banks
    ]
    all_kl = np.stack([_kl(mean, var, m, v, layer.epsilon) for m, v in stats], axis=1)
    np.testing.assert_allclose(dist, all_kl[np.arange(6), chosen], rtol=1e-4, atol=1e-5)
    # routed rows: the nearest bank, bank 0 (the fallback) excluded by default
    assert chosen[3] == 1 + all_kl[3, 1:].argmin() and chosen[4] == 1 + all_kl[4, 1:].argmin()


def _domain(x: Tensor, k: int) -> Tensor:
    """Domain ``k``: a per-channel affine shift of the input, distinct per ``k``."""
    gen = torch.Generator().manual_seed(100 + k)
    scale = torch.rand(3, generator=gen) * 2.5 + 0.3
    shift = torch.randn(3, generator=gen) * 1.5
    return x * scale[:, None, None] + shift[:, None, None]


def test_auto_routes_each_row_to_its_domain_and_falls_back_past_the_threshold(
    cnn: nn.Module, banked: onnx.ModelProto
) -> None:
    gen = torch.Generator().manual_seed(0)
    banks = []
    for k in range(3):
        model = copy.deepcopy(cnn)
        recalibrate(model, _domain(torch.randn(128, 3, 8, 8, generator=gen), k), batch_size=32)
        banks.append(StatBank.from_model(model))
    tables = BankTables(banked, banks)
    session = _session(banked)
    truth = np.tile(np.arange(3), 8)
    x = torch.cat([_domain(torch.randn(1, 3, 8, 8, generator=gen), int(k)) for k in truth]).numpy()
    auto = np.full(len(truth), AUTO)
    chosen, dist = session.run([BANK_OUTPUT, DISTANCE_OUTPUT], {"input": x, **tables.feed(auto)})
    np.testing.assert_array_equal(chosen, truth + 1)
    # at batch 1 the same rows route the same way
    for i in (0, 1, 2):
        one = session.run([BANK_OUTPUT], {"input": x[i : i + 1], **tables.feed([AUTO])})[0]
        assert one.tolist() == [truth[i] + 1]
    # a threshold below every distance sends every routed row to bank 0, explicit rows stay
    mixed = auto.copy()
    mixed[0] = 2
    low = float(dist.min()) / 2
    fallback = session.run([BANK_OUTPUT], {"input": x, **tables.feed(mixed, threshold=low)})[0]
    assert fallback[0] == 2 and not fallback[1:].any()


def test_route_source_false_keeps_bank_0_out_of_the_argmin(
    cnn: nn.Module, banked: onnx.ModelProto
) -> None:
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    far = _random_bank(cnn, 9)
    feed = {"input": x}
    with_source = BankTables(banked, [far], route_source=True).feed(np.full(4, AUTO))
    without = BankTables(banked, [far], route_source=False).feed(np.full(4, AUTO))
    session = _session(banked)
    # rows from the source's own distribution: nearest to bank 0 unless it is excluded
    assert session.run([BANK_OUTPUT], {**feed, **with_source})[0].tolist() == [0, 0, 0, 0]
    assert session.run([BANK_OUTPUT], {**feed, **without})[0].tolist() == [1, 1, 1, 1]


def test_adding_a_bank_needs_no_new_session(cnn: nn.Module, banked: onnx.ModelProto) -> None:
    tables = BankTables(banked, capacity=1)
    session = _session(banked)
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    session.run(None, {"input": x, **tables.feed([0, 0])})
    for seed in (11, 12, 13):  # capacity 1 -> 2 -> 4: the tables grow, the session stays
        bank = _random_bank(cnn, seed)
        k = tables.add(bank, name=f"bank{seed}")
        out = session.run(["output"], {"input": x, **tables.feed([k, 0])})[0]
        np.testing.assert_allclose(
            out[:1], _torch_reference(cnn, bank, x[:1]), rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            out[1:], _torch_reference(cnn, None, x[1:]), rtol=RTOL, atol=ATOL
        )
    assert len(tables) == 4 and tables.index("bank12") == 2
    assert tables.names == ["source", "bank11", "bank12", "bank13"]


def test_feed_hands_out_contiguous_views_of_the_tables(banked: onnx.ModelProto) -> None:
    tables = BankTables(banked, capacity=8)
    feed = tables.feed([0])
    key = tables.spec.layers[0].scale_input
    table = feed[key]
    assert table.shape[0] == 1 and table.flags.c_contiguous and table.dtype == np.float32
    assert table.base is not None  # a view [:K] of the preallocated rows, not a copy
    per_bank = sum(lay.channels for lay in tables.spec.layers) * 2 * 4
    assert tables.nbytes >= per_bank


def _mutated(
    bank: StatBank, layer: str, fn: Callable[[Tensor, Tensor], tuple[Any, Any]]
) -> StatBank:
    stats = dict(bank.stats)
    stats[layer] = fn(*stats[layer])
    return StatBank(stats, bank.signature)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda b: StatBank({k: v for k, v in b.stats.items() if k != "bn2"}, ""),
            "missing \\['bn2'\\]",
        ),
        (lambda b: StatBank({**b.stats, "extra": b.stats["bn1"]}, ""), "unexpected \\['extra'\\]"),
        (lambda b: _mutated(b, "bn2", lambda m, v: (m[:-1], v[:-1])), "shape \\(8,\\)"),
        (lambda b: _mutated(b, "bn1", lambda m, v: (m * float("nan"), v)), "finite"),
        (lambda b: _mutated(b, "bn3", lambda m, v: (m, -v)), "var >= 0"),
    ],
)
def test_banks_that_do_not_fit_the_model_are_refused(
    cnn: nn.Module, banked: onnx.ModelProto, change: Callable[[StatBank], StatBank], message: str
) -> None:
    tables = BankTables(banked)
    with pytest.raises(StatBankMismatchError, match=message):
        tables.add(change(_random_bank(cnn, 1)))
    assert len(tables) == 1  # nothing half-added


def test_bad_bank_indices_and_bad_rewrites_are_refused(
    exported: onnx.ModelProto, banked: onnx.ModelProto
) -> None:
    tables = BankTables(banked)
    with pytest.raises(BankIndexError, match="\\[-1, 1\\)"):
        tables.feed([1])
    with pytest.raises(BankIndexError, match="1-D integer"):
        tables.feed([[0]])
    with pytest.raises(BankIndexError, match="1-D integer"):
        tables.feed(np.array([0.0]))
    plain = BankTables(add_bank_inputs(exported, route_layers=0))
    with pytest.raises(BankIndexError, match="route_layers >= 1"):
        plain.feed([AUTO])
    with pytest.raises(OnnxModelError, match="route_layers=2 needs 2"):
        add_bank_inputs(exported, route_layers=2)
    with pytest.raises(OnnxModelError, match="rewritten already"):
        add_bank_inputs(banked)
    with pytest.raises(OnnxModelError, match="without stat-bank inputs"):
        BankTables(exported)


def test_without_routing_the_graph_has_no_routing_inputs(
    cnn: nn.Module, exported: onnx.ModelProto
) -> None:
    model = add_bank_inputs(exported, route_layers=0)
    assert [v.name for v in model.graph.output] == ["output", BANK_OUTPUT]
    tables = BankTables(model, [_random_bank(cnn, 3)])
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = _session(model).run(["output"], {"input": x, **tables.feed([1, 1])})[0]
    np.testing.assert_allclose(
        out, _torch_reference(cnn, _random_bank(cnn, 3), x), rtol=RTOL, atol=ATOL
    )


# --------------------------------------------------------------------------- quality

SIZE = 16
DOMAINS = ("noise", "blur", "contrast", "colour")


def _textures(n: int, rng: np.random.Generator) -> tuple[F32, npt.NDArray[np.int64]]:
    """Two-colour stripes at one of four orientations (the label), random frequency, phase
    and colours, plus a little pixel noise: ``(n, 3, SIZE, SIZE)`` images."""
    label = rng.integers(0, 4, n)
    ii, jj = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    angle = label * np.pi / 4 + rng.normal(0.0, 0.1, n)
    freq, phase = rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 2 * np.pi, n)
    proj = np.cos(angle)[:, None, None] * ii + np.sin(angle)[:, None, None] * jj
    mask = (np.sin(freq[:, None, None] * proj + phase[:, None, None]) > 0)[:, None]
    hi, lo = rng.uniform(0.65, 1.0, (n, 3)), rng.uniform(0.0, 0.35, (n, 3))
    swap = rng.random((n, 3)) < 0.5
    fg, bg = np.where(swap, lo, hi), np.where(swap, hi, lo)
    img = np.where(mask, fg[:, :, None, None], bg[:, :, None, None])
    img = img + rng.normal(0.0, 0.05, img.shape)
    return img.astype(np.float32), label


def _corrupt(x: F32, domain: str, rng: np.random.Generator) -> F32:
    if domain == "noise":
        return (x + rng.normal(0.0, 0.3, x.shape)).astype(np.float32)
    if domain == "blur":  # a 3x3 box filter, twice
        t, box = torch.from_numpy(x), torch.ones(3, 1, 3, 3) / 9.0
        for _ in range(2):
            t = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), box, groups=3)
        return t.numpy()
    if domain == "contrast":
        return ((x - 0.5) * 0.15 + 0.5).astype(np.float32)
    shift = np.array([0.8, -0.6, 0.5], dtype=np.float32)[:, None, None]  # colour
    return (x + shift).astype(np.float32)


class TextureNet(nn.Module):
    """Three Conv-BN-ReLU (the last two strided), global pooling, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        out: Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


def _trained(rng: np.random.Generator) -> TextureNet:
    torch.manual_seed(0)
    net = TextureNet()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(120):
        x, y = _textures(64, rng)
        loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return net.eval()


def _accuracy(model: nn.Module, x: F32, y: npt.NDArray[np.int64]) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_quality_on_a_mixed_domain_stream_of_batch_1_requests(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    net = _trained(rng)
    calib = {d: _corrupt(_textures(256, rng)[0], d, rng) for d in DOMAINS}
    test = {d: (_corrupt(x, d, rng), y) for d in DOMAINS for x, y in [_textures(150, rng)]}
    banks, per_domain = [], []
    for d in DOMAINS:  # per-domain banks from unlabeled data
        model = copy.deepcopy(net)
        recalibrate(model, calib[d], batch_size=64)
        banks.append(StatBank.from_model(model, {"domain": d}))
        per_domain.append(_accuracy(model, *test[d]))
    pooled = copy.deepcopy(net)
    recalibrate(pooled, np.concatenate(list(calib.values())), batch_size=64)
    pooled_acc = float(np.mean([_accuracy(pooled, *test[d]) for d in DOMAINS]))
    source_acc = float(np.mean([_accuracy(net, *test[d]) for d in DOMAINS]))

    export_onnx(net, torch.from_numpy(test["noise"][0][:2]), tmp_path / "net.onnx")
    graph = add_bank_inputs(onnx.load(tmp_path / "net.onnx"))
    session = _session(graph)
    stream = rng.permutation([(k, i) for k in range(len(DOMAINS)) for i in range(150)])
    results: dict[str, list[float]] = {}
    for route_source in (False, True):
        tables = BankTables(graph, banks, route_source=route_source)
        explicit = auto = right_bank = 0
        for k, i in stream:
            x, y = test[DOMAINS[k]][0][i : i + 1], test[DOMAINS[k]][1][i]
            named = session.run(["output"], {"input": x, **tables.feed([k + 1])})[0]
            routed, bank = session.run(["output", BANK_OUTPUT], {"input": x, **tables.feed([AUTO])})
            explicit += int(named.argmax() == y)
            auto += int(routed.argmax() == y)
            right_bank += int(bank[0] == k + 1)
        results[f"route_source={route_source}"] = [
            explicit / len(stream),
            auto / len(stream),
            right_bank / len(stream),
        ]
    print(  # noqa: T201 - the numbers docs/design.md records (pytest -s)
        f"source {source_acc:.3f} pooled {pooled_acc:.3f} per-domain "
        f"{np.mean(per_domain):.3f} {per_domain}; [explicit, auto, right bank]: {results}"
    )
    explicit_acc, auto_acc, right = results["route_source=False"]
    assert abs(explicit_acc - float(np.mean(per_domain))) <= 0.005
    assert right >= 0.95
    assert abs(auto_acc - explicit_acc) <= 0.01
    assert min(explicit_acc, auto_acc) >= pooled_acc + 0.1


def test_a_retired_bank_keeps_its_rows_but_is_never_routed_to_nor_named(
    cnn: nn.Module, banked: onnx.ModelProto
) -> None:
    x = np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32)
    first, second = _random_bank(cnn, 21), _random_bank(cnn, 22)
    tables = BankTables(banked)
    a, b = tables.add(first, name="a"), tables.add(second, name="b")
    session = _session(banked)

    def routed() -> list[int]:
        out: list[int] = session.run([BANK_OUTPUT], {"input": x, **tables.feed(np.full(4, AUTO))})[
            0
        ].tolist()
        return out

    tables.retire(a)
    assert routed() == [b] * 4
    assert tables.names == ["source", None, "b"]
    with pytest.raises(BankIndexError):
        tables.index("a")
    tables.retire(b)
    assert routed() == [0] * 4  # nothing left to route to: the version's statistics
    # the rows stay: an index handed out before the bank was retired still answers with it
    out = session.run(["output"], {"input": x, **tables.feed(np.full(4, a))})[0]
    np.testing.assert_allclose(out, _torch_reference(cnn, first, x), rtol=RTOL, atol=ATOL)
    with pytest.raises(BankIndexError, match=r"in \[1, 3\) \(got 0\)"):
        tables.retire(0)
    with pytest.raises(BankIndexError):
        tables.retire(3)


# --------------------------------------------------------------------------- route limits


@pytest.fixture(scope="module")
def domain_banks(cnn: nn.Module) -> tuple[list[StatBank], list[F32]]:
    """Three banks recalibrated on domains 0, 1, 2 (:func:`_domain`) and their data."""
    gen = torch.Generator().manual_seed(1)
    banks, data = [], []
    for k in range(3):
        model = copy.deepcopy(cnn)
        x = _domain(torch.randn(128, 3, 8, 8, generator=gen), k)
        recalibrate(model, x, batch_size=32)
        banks.append(StatBank.from_model(model))
        data.append(x.numpy())
    return banks, data


def _stream(seed: int, n: int = 8) -> tuple[F32, npt.NDArray[np.int64]]:
    """``3 n`` rows from domains 0, 1, 2 in turn: the rows and their domain."""
    gen = torch.Generator().manual_seed(seed)
    truth = np.tile(np.arange(3), n)
    rows = [_domain(torch.randn(1, 3, 8, 8, generator=gen), int(k)) for k in truth]
    return torch.cat(rows).numpy(), truth


def test_a_route_limit_sends_exactly_the_routed_rows_beyond_it_to_bank_0(
    cnn: nn.Module, banked: onnx.ModelProto, domain_banks: tuple[list[StatBank], list[F32]]
) -> None:
    banks, _ = domain_banks
    x, _ = _stream(2)
    session = _session(banked)
    auto = np.full(len(x), AUTO)
    outputs = ["output", BANK_OUTPUT, DISTANCE_OUTPUT]
    plain = BankTables(banked, banks)
    out0, chosen0, dist0 = session.run(outputs, {"input": x, **plain.feed(auto)})
    assert set(chosen0.tolist()) == {1, 2, 3}
    # an infinite limit is no limit: the same outputs, bit for bit
    inf_tables = BankTables(banked)
    for bank in banks:
        inf_tables.add(bank, route_limit=float("inf"))
    for got, want in zip(
        session.run(outputs, {"input": x, **inf_tables.feed(auto)}),
        (out0, chosen0, dist0),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    # a limit on bank 2 between two of its rows' distances: exactly the rows beyond it fall back
    mine = np.sort(dist0[chosen0 == 2].astype(np.float64))
    assert len(mine) >= 4
    limit = float((mine[len(mine) // 2 - 1] + mine[len(mine) // 2]) / 2)
    limited = BankTables(banked)
    for k, bank in enumerate(banks, start=1):
        limited.add(bank, route_limit=limit if k == 2 else math.inf)
    assert limited.route_limits[0] == math.inf and limited.route_limits[2] >= limit
    out, chosen, _ = session.run(outputs, {"input": x, **limited.feed(auto)})
    beyond = (chosen0 == 2) & (dist0.astype(np.float64) > limit)
    assert 0 < beyond.sum() < (chosen0 == 2).sum()
    np.testing.assert_array_equal(chosen, np.where(beyond, 0, chosen0))
    np.testing.assert_array_equal(out[~beyond], out0[~beyond])
    np.testing.assert_allclose(
        out[beyond], _torch_reference(cnn, None, x[beyond]), rtol=RTOL, atol=ATOL
    )
    # the threshold and the limit: the smaller of the two applies
    low = float(np.sort(dist0.astype(np.float64))[len(x) // 2])
    both = session.run([BANK_OUTPUT], {"input": x, **limited.feed(auto, threshold=low)})[0]
    far = (dist0.astype(np.float64) > low) | beyond
    np.testing.assert_array_equal(both, np.where(far, 0, chosen0))
    high = session.run([BANK_OUTPUT], {"input": x, **limited.feed(auto, threshold=1e9)})[0]
    np.testing.assert_array_equal(high, chosen)


def test_explicit_rows_and_bank_0_never_fall_back(
    banked: onnx.ModelProto, domain_banks: tuple[list[StatBank], list[F32]]
) -> None:
    banks, _ = domain_banks
    x, truth = _stream(3)
    tables = BankTables(banked, route_source=True)
    for bank in banks:
        tables.add(bank, route_limit=0.0)  # every routed row to banks 1..3 falls back
    assert tables.route_limits == [math.inf, 0.0, 0.0, 0.0]
    session = _session(banked)
    explicit = np.arange(len(x)) % 4  # bank 0 included
    chosen, dist = session.run(
        [BANK_OUTPUT, DISTANCE_OUTPUT], {"input": x, **tables.feed(explicit, threshold=0.0)}
    )
    np.testing.assert_array_equal(chosen, explicit)
    assert (dist > 0).all()  # they are farther than the limits, and answered all the same
    routed = session.run([BANK_OUTPUT], {"input": x, **tables.feed(np.full(len(x), AUTO))})[0]
    assert not routed.any()


def test_route_limits_survive_growth_and_retire_and_bad_ones_are_refused(
    banked: onnx.ModelProto, domain_banks: tuple[list[StatBank], list[F32]]
) -> None:
    banks, _ = domain_banks
    tables = BankTables(banked, capacity=1)
    for k, bank in enumerate(banks, start=1):  # capacity 1 -> 2 -> 4
        tables.add(bank, name=f"d{k}", route_limit=0.5 * k)
    assert tables.route_limits == [math.inf, 0.5, 1.0, 1.5]
    feed = tables.feed([AUTO])
    view = feed[ROUTE_LIMIT]
    assert view.shape == (4,) and view.dtype == np.float32 and view.flags.c_contiguous
    assert view.base is not None  # a view of the preallocated rows, like the other tables
    tables.retire(2)
    assert tables.route_limits == [math.inf, 0.5, 1.0, 1.5]  # its rows stay, the limit too
    assert feed[ROUTE_PENALTY][2] == math.inf  # the live view sees the retirement
    k = tables.add(banks[0], route_limit=0.1)
    assert tables.route_limits[k] >= 0.1 and np.float32(tables.route_limits[k]) >= 0.1
    for bad, message in [
        (float("nan"), "route limit >= 0"),
        (-1.0, "route limit >= 0"),
        ("1", "number >= 0"),
        (True, "number >= 0"),
    ]:
        with pytest.raises(StatBankMismatchError, match=message):
            tables.add(banks[0], route_limit=bad)  # type: ignore[arg-type]
    assert len(tables) == k + 1  # nothing half-added


def test_a_graph_of_the_previous_format_is_refused(banked: onnx.ModelProto) -> None:
    old = copy.deepcopy(banked)
    for prop in old.metadata_props:
        if prop.key == BANK_METADATA_KEY:
            payload = json.loads(prop.value)
            payload["format"] = 1
            prop.value = json.dumps(payload)
    with pytest.raises(OnnxModelError, match="format 2 \\(got 1: .*rebuild it"):
        read_bank_spec(old)


def test_bank_route_limit_is_the_quantile_of_the_calibration_rows_distance(
    cnn: nn.Module,
    exported: onnx.ModelProto,
    banked: onnx.ModelProto,
    domain_banks: tuple[list[StatBank], list[F32]],
) -> None:
    banks, data = domain_banks
    bank, calib = banks[0], data[0]
    limit = bank_route_limit(exported, bank, calib, batch_size=50)
    # the float64 reference: KL of each calibration row's stem moments from the bank
    layer = read_bank_spec(banked).layers[0]
    mean, var = _stem_moments(cnn, calib)
    bank_mean, bank_var = (t.double().numpy() for t in bank.stats["bn1"])
    ref = _kl(mean, var, bank_mean, bank_var, layer.epsilon)
    assert limit == pytest.approx(float(np.quantile(ref, 0.99)), rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(
        route_distances(banked, bank, calib, batch_size=7), ref, rtol=1e-4, atol=1e-6
    )
    assert bank_route_limit(banked, bank, calib) == limit  # a bank graph already: the same
    # fresh rows of the bank's domain are within it, a shifted domain's rows beyond it
    gen = torch.Generator().manual_seed(9)
    own = _domain(torch.randn(64, 3, 8, 8, generator=gen), 0).numpy()
    shifted = _domain(torch.randn(64, 3, 8, 8, generator=gen), 1).numpy()
    assert (route_distances(exported, bank, own) <= limit).mean() >= 0.9
    assert (route_distances(exported, bank, shifted) > limit).all()
    # served with that limit: the shifted rows fall back, the own ones mostly stay
    tables = BankTables(banked)
    tables.add(bank, route_limit=limit)
    session = _session(banked)
    x = np.concatenate([own, shifted])
    chosen = session.run([BANK_OUTPUT], {"input": x, **tables.feed(np.full(len(x), AUTO))})[0]
    assert (chosen[:64] == 1).mean() >= 0.9 and not chosen[64:].any()
    # quantile 1: the largest distance, rounded up to float32: no calibration row falls back
    top = bank_route_limit(exported, bank, calib, quantile=1.0)
    assert top >= float(ref.max()) * (1 - 1e-4) and np.float32(top) == top
    tables.add(bank, route_limit=top)
    penalty = np.array([np.inf, np.inf, 0.0], dtype=np.float32)  # route to the second copy
    feed = {"input": calib, **tables.feed(np.full(len(calib), AUTO)), ROUTE_PENALTY: penalty}
    assert (session.run([BANK_OUTPUT], feed)[0] == 2).all()


def test_bank_route_limit_refuses_bad_arguments(
    exported: onnx.ModelProto, domain_banks: tuple[list[StatBank], list[F32]]
) -> None:
    banks, data = domain_banks
    bank, calib = banks[0], data[0]
    for q in (0.0, 1.5, True):
        with pytest.raises(OptionsError, match="quantile in \\(0, 1\\]"):
            bank_route_limit(exported, bank, calib, quantile=q)
    with pytest.raises(OptionsError, match="batch_size >= 1"):
        bank_route_limit(exported, bank, calib, batch_size=0)
    with pytest.raises(DataError, match="N >= 1"):
        bank_route_limit(exported, bank, calib[:0])
    bad = calib[:4].copy()
    bad[2] = np.nan
    with pytest.raises(DataError, match="1 of 4 NaN/Inf, first at row 2"):
        bank_route_limit(exported, bank, bad)
    with pytest.raises(DataError, match="ONNX Runtime failed on rows 0..3"):
        bank_route_limit(exported, bank, calib[:4, :2])
    with pytest.raises(OnnxModelError, match="route_layers=0"):
        bank_route_limit(add_bank_inputs(exported, route_layers=0), bank, calib)
    with pytest.raises(StatBankMismatchError, match="missing"):
        bank_route_limit(exported, StatBank({"bn1": bank.stats["bn1"]}, ""), calib)
    # a 0.99 quantile needs 100 rows: from fewer it would keep out most of the own domain
    with pytest.raises(DataError, match=r"expected at least 100 calibration rows .*\(got 99\)"):
        bank_route_limit(exported, bank, calib[:99])
    assert bank_route_limit(exported, bank, calib[:10], quantile=0.9) >= 0.0


def test_bank_route_limit_is_never_negative(cnn: nn.Module, exported: onnx.ModelProto) -> None:
    """Rows equal to the bank's statistics: float32 rounding puts their distance a few ulps
    below 0; the limit (of a KL) is 0, not negative (a negative one is refused on upload)."""
    x = np.full((128, 3, 8, 8), 0.5, dtype=np.float32)
    model = copy.deepcopy(cnn)
    recalibrate(model, torch.from_numpy(x), batch_size=32)
    limit = bank_route_limit(exported, StatBank.from_model(model), x)
    assert limit >= 0.0 and limit < 1e-3
