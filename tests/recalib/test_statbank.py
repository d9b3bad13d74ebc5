"""Statistics banks: round trip, application, and refusal for another network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from recalib.errors import StatBankMismatchError
from recalib.recalibrate import recalibrate
from recalib.statbank import StatBank, apply_stat_bank, load_stat_bank, save_stat_bank


def _net(width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
        nn.BatchNorm1d(4),
    ).eval()


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_round_trip_restores_a_domain(tmp_path: Path) -> None:
    model = _net()
    source = _stats(model)
    path = tmp_path / "source.safetensors"
    save_stat_bank(model, path, metadata={"domain": "source"})
    recalibrate(model, torch.randn(40, 3, 8, 8) * 3 + 2, batch_size=10)
    shifted = _stats(model)
    assert any(not torch.equal(source[k], shifted[k]) for k in source)

    bank = apply_stat_bank(model, path)
    assert bank.metadata == {"domain": "source"}
    for k, v in _stats(model).items():
        assert torch.equal(v, source[k]), k


def test_bank_holds_only_statistics_and_is_small(tmp_path: Path) -> None:
    model = _net(64)
    path = tmp_path / "b.safetensors"
    bank = save_stat_bank(model, path)
    assert sorted(bank.stats) == ["1", "6"]
    loaded = load_stat_bank(path)
    assert loaded.signature == bank.signature
    assert path.stat().st_size < 4096
    for name, (mean, var) in bank.stats.items():
        torch.testing.assert_close(loaded.stats[name][0], mean, rtol=0, atol=0)
        torch.testing.assert_close(loaded.stats[name][1], var, rtol=0, atol=0)


def test_bank_for_another_network_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    save_stat_bank(_net(8), path)
    other = _net(16)
    before = _stats(other)
    with pytest.raises(StatBankMismatchError, match="signature"):
        apply_stat_bank(other, path)
    for k, v in _stats(other).items():
        assert torch.equal(v, before[k]), k


def test_a_file_that_is_not_a_bank_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(StatBankMismatchError, match="expected a recalib statistics bank"):
        StatBank.load(path)


def test_exported_program_bank_applies_to_the_module(tmp_path: Path) -> None:
    model = _net()
    program = torch.export.export(
        _net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    recalibrate(program, torch.randn(20, 3, 8, 8) + 1)
    path = tmp_path / "b.safetensors"
    save_stat_bank(program, path)
    apply_stat_bank(model, path)
    for k, v in _stats(model).items():
        torch.testing.assert_close(v, program.state_dict[k])
