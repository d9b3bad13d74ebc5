"""Adaptation plans: candidate statistics, the validation gate and the label-free guard.

The unit tests drive :func:`recalib.plans.choose_plan` with hand-made class scores; the
end-to-end tests run :func:`recalib.adapt` / :func:`recalib.adapt_onnx` on small BN models
built here (float64 references for the candidate statistics).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

import recalib
import recalib.onnx.names
from recalib.errors import DataError, OptionsError, OutputError
from recalib.plans import (
    Plan,
    PlanReport,
    candidate_plans,
    choose_plan,
    class_rows,
    plan_stats,
    probabilities,
)


def _stats(rng: np.random.Generator, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: (rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)) for n in names}


def test_candidates_run_from_full_to_source_without_repeats() -> None:
    plans = candidate_plans(num_layers=20, items=256)
    names = [p.name for p in plans]
    assert names[0] == "full" and names[-1] == "source"
    assert len(set(names)) == len(names)
    firsts = cast("list[int]", [p.first_layers for p in plans if p.kind == "first"])
    assert firsts == sorted(firsts, reverse=True) and all(1 <= k < 20 for k in firsts)
    weights = [256 / (256 + p.prior_strength) for p in plans if p.prior_strength is not None]
    assert weights == pytest.approx([0.75, 0.5, 0.25], abs=0.01)
    # one layer: no first-k plan can differ from full or source
    assert [p.kind for p in candidate_plans(1, 10)].count("first") == 0


def test_plan_statistics_match_their_definition() -> None:
    rng = np.random.default_rng(0)
    order = ["a", "b", "c"]
    source, full = _stats(rng, order), _stats(rng, order)
    first = plan_stats(Plan("first:2", "first", first_layers=2), order, source, full, 100)
    for n, ref in zip(order, (full, full, source), strict=True):
        np.testing.assert_array_equal(first[n][0], ref[n][0])
        np.testing.assert_array_equal(first[n][1], ref[n][1])
    prior = plan_stats(Plan("prior:300", "prior", prior_strength=300.0), order, source, full, 100)
    for n in order:  # Schneider et al.: weights N/(N+n) and n/(N+n)
        np.testing.assert_allclose(prior[n][0], 0.75 * source[n][0] + 0.25 * full[n][0], 1e-12)
        np.testing.assert_allclose(prior[n][1], 0.75 * source[n][1] + 0.25 * full[n][1], 1e-12)


def test_class_rows_and_probabilities() -> None:
    seg = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2)
    rows = class_rows({"out": torch.from_numpy(seg)})
    assert rows.shape == (8, 3)
    np.testing.assert_array_equal(rows[1], seg[0, :, 0, 1])
    with pytest.raises(OutputError, match=r"class scores of shape \(N, classes"):
        class_rows(np.zeros((4, 1)))
    soft = np.array([[0.2, 0.8], [0.5, 0.5]])
    np.testing.assert_array_equal(probabilities(soft), soft)  # already probabilities
    np.testing.assert_allclose(probabilities(np.log(soft)), soft, rtol=1e-12)
    logits = np.array([[0.0, np.log(4.0)]])
    np.testing.assert_allclose(probabilities(logits), [[0.2, 0.8]], rtol=1e-12)


def _onehot(pred: np.ndarray, classes: int = 3, strength: float = 5.0) -> np.ndarray:
    scores: np.ndarray = strength * np.eye(classes)[pred]
    return scores


def _choose(
    outputs: Mapping[str, tuple[np.ndarray, np.ndarray | None]], **kw: object
) -> PlanReport:
    plans = [Plan("full", "full"), Plan("first:1", "first", first_layers=1)]
    plans.append(Plan("source", "source"))
    return choose_plan(plans, lambda p: outputs[p.name], num_layers=2, items=64, **kw)  # type: ignore[arg-type]


def test_validation_picks_a_plan_only_beyond_the_paired_margin() -> None:
    y = np.arange(64) % 3
    src = y.copy()
    src[:20] = (y[:20] + 1) % 3  # source: 44 / 64 right
    full = y.copy()  # full: 64 / 64 right
    first = src.copy()
    first[:1] = y[:1]  # one more right than the source: noise, not evidence
    guard = _onehot(y)
    outs = {
        "full": (guard, _onehot(full)),
        "first:1": (guard, _onehot(first)),
        "source": (guard, _onehot(src)),
    }
    report = _choose(outs, validation_labels=y)
    assert report.criterion == "validation" and report.chosen == "full" and not report.flagged
    assert report.candidate("full").val_gain == pytest.approx(20 / 64)
    assert not report.candidate("first:1").accepted  # +1/64 is within the margin
    # every adapted plan worse: the source is kept, and the result is flagged
    worse = {"full": (guard, _onehot((y + 1) % 3)), "first:1": (guard, _onehot(src))}
    report = _choose(worse | {"source": (guard, _onehot(y))}, validation_labels=y)
    assert report.chosen == "source" and report.flagged
    assert "full" in report.table() and "<==" in report.table()


def test_a_user_metric_replaces_accuracy() -> None:
    y = np.arange(64) % 3
    guard = _onehot(y)
    outs = {
        "full": (guard, _onehot((y + 1) % 3)),  # wrong everywhere ...
        "first:1": (guard, _onehot(y)),
        "source": (guard, _onehot(y)),
    }

    def wrongness(scores: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(scores.argmax(1) != labels))  # ... which this metric rewards

    assert _choose(outs, validation_labels=y, metric=wrongness).chosen == "full"


def test_label_free_guard_keeps_what_the_source_is_sure_of() -> None:
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=200)
    src = _onehot(pred)  # confident on every item, three classes in use
    flipped = pred.copy()
    flipped[:40] = (pred[:40] + 1) % 3  # flips 20% of the confident items
    outs = {"full": (_onehot(flipped), None), "first:1": (src, None), "source": (src, None)}
    report = _choose(outs, early_drift=0.1)
    assert report.criterion == "label-free" and report.chosen == "first:1"
    assert report.candidate("full").flipped_confident == pytest.approx(0.2)
    assert not report.candidate("full").accepted


def test_label_free_guard_lets_a_collapsed_shifted_source_go() -> None:
    rng = np.random.default_rng(2)
    adapted = rng.integers(0, 3, size=200)
    collapsed = _onehot(np.zeros(200, dtype=np.int64))  # one class for everything
    outs = {
        "full": (_onehot(adapted), None),
        "first:1": (collapsed, None),
        "source": (collapsed, None),
    }
    assert _choose(outs, early_drift=50.0).chosen == "full"
    # a collapsed source on inputs the early layers know (a one-class batch): no licence
    assert _choose(outs, early_drift=0.05).chosen == "first:1"


def test_bad_plan_options_are_one_line_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.randn(16, 3)
    with pytest.raises(OptionsError, match=r"expected plan in \('auto', 'full', 'source'\)"):
        recalib.adapt(model, x, plan="best")
    with pytest.raises(OptionsError, match="expected validation=\\(inputs, labels\\)"):
        recalib.adapt(model, x, validation=x)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="expected integer class labels"):
        recalib.adapt(model, x, validation=(x, np.zeros(16)))
    with pytest.raises(DataError, match="re-iterable"):
        recalib.adapt(model, iter([x]))


def test_unclassifiable_outputs_deploy_full_adaptation_flagged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1))  # (N, 1): no class axis
    report = recalib.adapt(model, torch.randn(32, 3) * 3 + 2)
    assert report.plan is not None
    assert report.plan["chosen"] == "full" and report.plan["flagged"]
    assert "cannot run" in report.plan["reason"]


class _Chain(nn.Module):
    """Four BN layers in a chain; registration order differs from data-flow order."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.BatchNorm1d(5)  # registered first, called last
        self.fc1, self.bn1 = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.fc2, self.bn2 = nn.Linear(6, 6), nn.BatchNorm1d(6)
        self.fc3, self.bn3 = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        out: torch.Tensor = self.late(self.bn3(self.fc3(x)))
        return out


def _bn_stats(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        n: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm1d)
        and m.running_mean is not None
        and m.running_var is not None
    }


@pytest.mark.parametrize("k", [1, 3])
def test_first_k_is_recalibrating_the_first_k_layers_in_data_flow_order(k: int) -> None:
    torch.manual_seed(0)
    model = _Chain().eval()
    x = torch.randn(96, 4) * 2 + 1
    order = recalib.data_flow_order(model, x)
    assert order == ["bn1", "bn2", "bn3", "late"]
    full = copy.deepcopy(model)
    recalib.recalibrate(full, x)
    stats = plan_stats(
        Plan(f"first:{k}", "first", first_layers=k), order, _bn_stats(model), _bn_stats(full), 96
    )
    ref = copy.deepcopy(model)
    recalib.recalibrate(ref, x, layers=order[:k])
    for name, (mean, var) in _bn_stats(ref).items():
        np.testing.assert_allclose(stats[name][0], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats[name][1], var, rtol=1e-6, atol=1e-7)


def test_adapt_restores_the_source_when_scoring_fails() -> None:
    torch.manual_seed(0)

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 3:  # the recalibration pass and the order probe succeed
                raise RuntimeError("boom")
            out: torch.Tensor = self.bn(x)
            return out

    model = Fails()
    assert model.bn.running_mean is not None
    before = model.bn.running_mean.clone()
    with pytest.raises(DataError, match="boom"):
        recalib.adapt(model, torch.randn(64, 3) + 5, batch_size=32)
    torch.testing.assert_close(model.bn.running_mean, before)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    ).eval()


def test_bad_validation_is_refused_before_any_work() -> None:
    x = torch.randn(32, 3, 8, 8) * 2 + 1
    xv = torch.randn(16, 3, 8, 8)
    model = _net()
    before = cast(torch.Tensor, model[1].running_mean).clone()
    with pytest.raises(OptionsError, match=r"expected class labels >= 0 \(got min -1\)"):
        recalib.adapt(model, x, validation=(xv, -torch.ones(16, dtype=torch.long)))
    with pytest.raises(OptionsError, match="one label per validation input"):
        recalib.adapt(model, x, plan="full", validation=(xv, torch.zeros(15, dtype=torch.long)))
    with pytest.raises(OptionsError, match=r"expected validation labels in \[0, 3\)"):
        recalib.adapt(model, x, validation=(xv, torch.full((16,), 7)))
    with pytest.raises(OptionsError, match="expected batch_size >= 1"):
        recalib.adapt(model, x, batch_size=0)
    with pytest.raises(DataError, match="forward failed on batch 0"):
        recalib.adapt(model, x, validation=(torch.randn(16, 2, 8, 8), torch.zeros(16).long()))
    torch.testing.assert_close(model[1].running_mean, before)


def test_lazy_layers_take_part_in_the_plan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.Linear(4 * 36, 3)
    ).eval()
    recalib.adapt(model, torch.randn(32, 3, 8, 8) * 3 + 2, plan="source")
    torch.testing.assert_close(model[1].running_mean, torch.zeros(4))  # its fresh source
    torch.testing.assert_close(model[1].running_var, torch.ones(4))


def test_non_finite_candidates_are_rejected() -> None:
    y = np.zeros(64, dtype=np.int64)
    good = _onehot(y)
    nan = np.full_like(good, np.nan)
    outs = {"full": (nan, nan), "first:1": (good, good), "source": (good, good)}
    report = _choose(outs, validation_labels=y)
    assert report.chosen != "full"
    assert report.candidate("full").note == "non-finite outputs"
    with pytest.raises(DataError, match="finite outputs of the source"):
        _choose(
            {"full": (good, good), "first:1": (good, good), "source": (nan, nan)},
            validation_labels=y,
        )


def test_onnx_plans_move_a_layer_called_twice_as_one(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.b(self.c1(x))
            x = self.b(torch.relu(x))  # the same layer again
            out: torch.Tensor = self.fc(self.b2(self.c2(x)).mean((2, 3)))
            return out

    torch.manual_seed(0)
    model = Twice().eval()
    recalib.export_onnx(model, torch.randn(4, 3, 8, 8), tmp_path / "twice.onnx")
    x = (torch.randn(64, 3, 8, 8) * 2 + 1).numpy()
    out, report = recalib.adapt_onnx(str(tmp_path / "twice.onnx"), x, plan="full")
    assert report.plan is not None
    assert [c["plan"] for c in report.plan["candidates"]] == ["full"]
    names = sorted(lay.name for lay in report.layers)
    assert names == ["b", "b2"]
    stats = recalib.onnx.names.bn_node_stats(out)
    b_nodes = [k for k, info in recalib.onnx.names.read_bn_map(out).items() if info.layer == "b"]
    assert len(b_nodes) == 2
    np.testing.assert_array_equal(stats[b_nodes[0]][0], stats[b_nodes[1]][0])
    assert all(lay.sym_kl > 0 for lay in report.layers)
