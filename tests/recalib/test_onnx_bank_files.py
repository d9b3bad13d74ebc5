"""Bank files for ONNX versions: the weights digest (same for recalibrated versions and
re-exports, different for other weights) and :func:`save_onnx_bank` round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from recalib.errors import StatBankMismatchError
from recalib.layers import layer_signature as torch_layer_signature
from recalib.onnx.bank_files import (
    ROUTE_LIMIT_KEY,
    ROUTE_LIMIT_QUANTILE_KEY,
    WEIGHTS_DIGEST_KEY,
    bn_layers,
    check_bank,
    layer_signature,
    read_bank_file,
    save_onnx_bank,
    weights_digest,
)
from recalib.onnx.export import export_onnx
from recalib.onnx.names import bn_node_stats, read_bn_map, set_bn_node_stats
from recalib.onnx.recalibrate import recalibrate_onnx
from recalib.statbank import apply_stat_bank, load_stat_bank, save_stat_bank


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        out: Tensor = torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))
        return out


def make_model(seed: int) -> _Net:
    """A seeded net in eval mode with statistics of standard-normal images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Net()
        model.train()
        with torch.no_grad():
            model(torch.randn(64, 3, 8, 8))
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    export_onnx(model, torch.zeros(2, 3, 8, 8), path)
    return path


def shifted_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, 8, 8)) * 2.0 + 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, onnx.ModelProto]:
    root = tmp_path_factory.mktemp("banks")
    out = {
        "v1": onnx.load(str(export(make_model(0), root / "v1.onnx"))),
        "v1_again": onnx.load(str(export(make_model(0), root / "v1b.onnx"))),
        "other": onnx.load(str(export(make_model(1), root / "other.onnx"))),
    }
    recal, _ = recalibrate_onnx(out["v1"], shifted_images(128, seed=3), batch_size=32)
    out["recalibrated"] = recal
    torch_recal = make_model(0)  # new statistics in torch, then exported again (a .pt2 job)
    torch_recal.train()
    with torch.no_grad():
        torch_recal(torch.from_numpy(shifted_images(64, seed=4)))
    out["torch_recalibrated"] = onnx.load(str(export(torch_recal.eval(), root / "t.onnx")))
    return out


def test_digest_is_shared_by_recalibrated_versions_and_re_exports(
    versions: dict[str, onnx.ModelProto],
) -> None:
    v1 = weights_digest(versions["v1"])
    assert len(v1) == 64
    stats = bn_node_stats(versions["recalibrated"])
    assert any(
        not np.allclose(stats[k][0], m) for k, (m, _) in bn_node_stats(versions["v1"]).items()
    )
    assert weights_digest(versions["recalibrated"]) == v1
    assert weights_digest(versions["v1_again"]) == v1
    torch_stats = bn_node_stats(versions["torch_recalibrated"])
    assert not np.allclose(next(iter(torch_stats.values()))[0], next(iter(stats.values()))[0])
    assert weights_digest(versions["torch_recalibrated"]) == v1


def test_digest_differs_for_other_weights(versions: dict[str, onnx.ModelProto]) -> None:
    assert weights_digest(versions["other"]) != weights_digest(versions["v1"])
    tuned = onnx.ModelProto()
    tuned.CopyFrom(versions["v1"])
    conv = next(t for t in tuned.graph.initializer if t.name.endswith("conv1.weight"))
    arr = onnx.numpy_helper.to_array(conv).copy()
    arr[0, 0, 0, 0] += 1e-3
    conv.CopyFrom(onnx.numpy_helper.from_array(arr, conv.name))
    assert weights_digest(tuned) != weights_digest(versions["v1"])


def _as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer moved into a ``Constant`` node (as paddle2onnx
    exports weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = [
        onnx.helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer
    ]
    del out.graph.initializer[:]
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(constants + nodes)
    return out


def test_digest_counts_every_weight_held_in_constant_nodes(
    versions: dict[str, onnx.ModelProto],
) -> None:
    """Each Constant's value counts once, every time (the digest once de-duplicated by id()
    of temporary proto wrappers and skipped some, differently from call to call)."""
    held = _as_constants(versions["v1"])
    digests = {weights_digest(held) for _ in range(50)}
    assert digests == {weights_digest(versions["v1"])}  # where the weights live is not hashed
    for node in held.graph.node:
        if node.op_type == "Constant" and node.output[0].endswith("conv2.weight"):
            arr = onnx.numpy_helper.to_array(node.attribute[0].t).copy()
            arr.flat[0] += 1e-3
            node.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(arr, node.output[0]))
    assert weights_digest(held) != weights_digest(versions["v1"])


def test_digest_ignores_tensor_names(versions: dict[str, onnx.ModelProto]) -> None:
    renamed = onnx.ModelProto()
    renamed.CopyFrom(versions["v1"])
    for t in renamed.graph.initializer:
        if t.name.endswith("conv2.weight"):
            old = t.name
            t.name = "renamed_weight"
            for node in renamed.graph.node:
                node.input[:] = ["renamed_weight" if i == old else i for i in node.input]
    assert weights_digest(renamed) == weights_digest(versions["v1"])


def test_save_onnx_bank_round_trip(versions: dict[str, onnx.ModelProto], tmp_path: Path) -> None:
    model = versions["v1"]
    stats = bn_node_stats(versions["recalibrated"])  # node-keyed
    written = save_onnx_bank(model, stats, tmp_path / "b.safetensors", name="site_b")
    bank = read_bank_file(tmp_path / "b.safetensors")
    assert bank.digest == weights_digest(model) == written.metadata[WEIGHTS_DIGEST_KEY]
    assert bank.metadata["name"] == "site_b"
    assert bank.layers == bn_layers(model) == {"bn1": 6, "bn2": 8}
    infos = read_bn_map(model)
    for key, (mean, var) in stats.items():
        np.testing.assert_array_equal(bank.stats[infos[key].layer][0], mean)
        np.testing.assert_array_equal(bank.stats[infos[key].layer][1], var)
    check_bank(versions["recalibrated"], bank)  # a recalibrated version takes it too
    with pytest.raises(StatBankMismatchError, match="statistics of other weights"):
        check_bank(versions["other"], bank)
    # the file is a StatBank: torch reads it and applies it to the torch model
    torch_model = make_model(0)
    loaded = load_stat_bank(tmp_path / "b.safetensors")
    assert loaded.signature == bank.signature
    apply_stat_bank(torch_model, loaded)
    running = torch_model.bn1.running_mean
    assert running is not None
    np.testing.assert_array_equal(running.numpy(), bank.stats["bn1"][0])
    # ... and the recalibrated ONNX model with these statistics is what the bank describes
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    set_bn_node_stats(copy, stats)
    check_bank(copy, bank)


def test_torch_banks_stamped_by_hand_and_unstamped_ones(
    versions: dict[str, onnx.ModelProto], tmp_path: Path
) -> None:
    digest = weights_digest(versions["v1"])
    save_stat_bank(make_model(0), tmp_path / "t.safetensors", metadata={WEIGHTS_DIGEST_KEY: digest})
    check_bank(versions["v1"], read_bank_file(tmp_path / "t.safetensors"))
    save_stat_bank(make_model(0), tmp_path / "u.safetensors")
    unstamped = read_bank_file(tmp_path / "u.safetensors")
    assert unstamped.digest is None
    with pytest.raises(StatBankMismatchError, match="save_onnx_bank"):
        check_bank(versions["v1"], unstamped)
    assert layer_signature([("bn1", 6), ("bn2", 8)]) == torch_layer_signature(
        [("bn1", 6), ("bn2", 8)]
    )


def test_bad_banks_are_refused(versions: dict[str, onnx.ModelProto], tmp_path: Path) -> None:
    model = versions["v1"]
    stats = {k: (m.copy(), v.copy()) for k, (m, v) in bn_node_stats(model).items()}
    first = next(iter(stats))
    with pytest.raises(StatBankMismatchError, match="missing"):
        save_onnx_bank(model, {first: stats[first]}, tmp_path / "x.safetensors")
    stats[first][1][0] = np.nan
    with pytest.raises(StatBankMismatchError, match="finite"):
        save_onnx_bank(model, stats, tmp_path / "x.safetensors")
    stats[first][1][0] = -1.0
    with pytest.raises(StatBankMismatchError, match="var >= 0"):
        save_onnx_bank(model, stats, tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(StatBankMismatchError, match="expected a recalib stat bank"):
        read_bank_file(tmp_path / "junk.safetensors")
    torch_bank = {"bn1": (torch.zeros(6), torch.ones(6)), "bn2": (torch.zeros(8), torch.ones(8))}
    assert save_onnx_bank(model, torch_bank, tmp_path / "t.safetensors").layers == {
        "bn1": 6,
        "bn2": 8,
    }


def test_a_bank_file_carries_its_route_limit(
    versions: dict[str, onnx.ModelProto], tmp_path: Path
) -> None:
    model = versions["v1"]
    stats = bn_node_stats(versions["recalibrated"])
    path = tmp_path / "r.safetensors"
    meta = {ROUTE_LIMIT_KEY: 0.25, ROUTE_LIMIT_QUANTILE_KEY: 0.99}
    save_onnx_bank(model, stats, path, metadata=meta)
    bank = read_bank_file(path)
    assert bank.route_limit == 0.25 and bank.metadata[ROUTE_LIMIT_QUANTILE_KEY] == 0.99
    bank.check_values()
    check_bank(model, bank)
    save_onnx_bank(model, stats, path)
    assert read_bank_file(path).route_limit == float("inf")  # none: only the threshold
    save_onnx_bank(model, stats, path, metadata={ROUTE_LIMIT_KEY: float("inf")})
    assert read_bank_file(path).route_limit == float("inf")
    for bad in ("0.5", -1.0, float("nan"), None, True):
        save_onnx_bank(model, stats, path, metadata={ROUTE_LIMIT_KEY: bad})
        bank = read_bank_file(path)
        with pytest.raises(StatBankMismatchError, match="'route_limit' to be a number >= 0"):
            bank.check_values()
        with pytest.raises(StatBankMismatchError, match="'route_limit'"):
            check_bank(model, bank)
