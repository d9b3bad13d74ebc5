"""Tests of recalib.distributed: two gloo processes on CPU equal one process over all data.

Each rank recalibrates its own copy of one seeded model on its own (unequal) shard; the
sufficient statistics are all-gathered, so both ranks must end bit-identical to each other
and equal (to float32 rounding of a float64 merge) to a single process over the union.
All scenarios run in one pair of processes to pay the start-up cost once.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from recalib.distributed import all_gather_moments, distributed_active
from recalib.errors import RecalibError
from recalib.moments import ChannelMoments
from recalib.recalibrate import recalibrate

WORLD = 2
SHARD_SIZES = [30, 18]  # unequal: rank 0 has 4 batches of 8 (last 6), rank 1 has 3 (last 2)
BATCH = 8
# (name, recalibrate kwargs)
SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("exact-train", {"method": "exact", "mode": "train"}),
    ("exact-eval", {"method": "exact", "mode": "eval"}),
    ("prior-train", {"method": "prior", "mode": "train", "prior_strength": 20.0}),
]


def _model() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 5),
            nn.BatchNorm1d(5),
        )
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1.0, 1.0)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
    return model.eval()


def _data() -> Tensor:
    gen = torch.Generator().manual_seed(3)
    shift = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    return torch.randn((sum(SHARD_SIZES), 3, 6, 6), generator=gen) * 1.5 + shift


def _bn_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _worker(
    rank: int, init_file: str, out_dir: str, model: nn.Module, shards: list[Tensor]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results: dict[str, Any] = {"active": distributed_active()}
        for name, kwargs in SCENARIOS:
            local = copy.deepcopy(model)
            report = recalibrate(local, shards[rank], batch_size=BATCH, **kwargs)
            results[name] = {"state": _bn_state(local), "report": report.to_dict()}
        local = copy.deepcopy(model)
        recalibrate(local, shards[rank], batch_size=BATCH, distributed=False)
        results["local-only"] = {"state": _bn_state(local)}
        try:
            recalibrate(copy.deepcopy(model), shards[rank], batch_size=BATCH, method="ema")
            results["ema-error"] = None
        except RecalibError as exc:
            results["ema-error"] = str(exc)
        mom = ChannelMoments.of(shards[rank])
        results["gathered"] = all_gather_moments([(mom, int(shards[rank].shape[0]))])[0]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dist")
    shards = list(torch.split(_data(), SHARD_SIZES))
    mp.spawn(  # type: ignore[attr-defined,no-untyped-call]
        _worker,
        args=(str(tmp / "init"), str(tmp), _model(), shards),
        nprocs=WORLD,
        join=True,
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process(kwargs: dict[str, Any]) -> tuple[dict[str, Tensor], Any]:
    """One process over the union, with the same batches as the ranks (rank 0's first), and
    the same ordinary passes (torch.distributed makes no lockstep pass: anchor=0)."""
    model = _model()
    batches = [b for s in torch.split(_data(), SHARD_SIZES) for b in torch.split(s, BATCH)]
    report = recalibrate(model, batches, **kwargs, anchor=0)
    return _bn_state(model), report


@pytest.mark.slow
def test_process_group_is_detected(ranks: list[dict[str, Any]]) -> None:
    assert [r["active"] for r in ranks] == [True, True]
    assert not distributed_active()  # nothing leaked into the test process


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [name for name, _ in SCENARIOS])
def test_ranks_agree_with_one_process_over_all_data(
    ranks: list[dict[str, Any]], scenario: str
) -> None:
    kwargs = dict(SCENARIOS)[scenario]
    expected, report = _single_process(kwargs)
    r0, r1 = (r[scenario] for r in ranks)
    for key, value in expected.items():
        assert torch.equal(r0["state"][key], r1["state"][key]), f"ranks differ at {key}"
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for rep in (r0["report"], r1["report"]):
        assert [lay["items"] for lay in rep["layers"]] == [sum(SHARD_SIZES)] * 3
        assert rep["passes"] == report.passes
        assert rep["converged"]
        assert rep["params"]["distributed"] is True


@pytest.mark.slow
def test_unchanged_single_rank_result_with_distributed_false(ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ranks):
        model = _model()
        recalibrate(model, torch.split(_data(), SHARD_SIZES)[rank], batch_size=BATCH)
        for key, value in _bn_state(model).items():
            assert torch.equal(result["local-only"]["state"][key], value), key


@pytest.mark.slow
def test_ema_is_refused_across_processes(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        assert result["ema-error"] is not None
        assert "method='ema'" in result["ema-error"]


@pytest.mark.slow
def test_all_gather_moments_is_the_union(ranks: list[dict[str, Any]]) -> None:
    whole = ChannelMoments.of(_data().double())  # float64 reference; ranks reduce float32
    for result in ranks:
        mom, items = result["gathered"]
        assert items == sum(SHARD_SIZES)
        assert float(mom.count) == float(whole.count)
        torch.testing.assert_close(mom.mean, whole.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mom.m2, whole.m2, rtol=1e-6, atol=1e-6)
    assert torch.equal(ranks[0]["gathered"][0].pack(), ranks[1]["gathered"][0].pack())


@pytest.mark.slow
def test_report_counts_are_global(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        report = rank["exact-train"]["report"]
        assert report["samples"] == sum(SHARD_SIZES)
        assert report["batches"] == 4 + 3
