"""Adaptation plans: which statistics to deploy, chosen by evidence.

Whole-network recalibration is not always an improvement: on real pretrained networks it
can lower accuracy (a model that was already right on the new domain, calibration data
narrower than the training data). So recalib builds a *family* of candidate statistics from
one recalibration and picks one:

* ``source`` - the model's statistics unchanged (always a candidate);
* ``full`` - every selected layer recalibrated;
* ``first:k`` - the first ``k`` layers in data-flow order recalibrated, the rest kept. In
  ``mode="train"`` and ``mode="eval"`` alike a layer's statistics depend only on the layers
  upstream of it, so these are exactly what recalibrating those ``k`` layers alone gives;
* ``prior:N`` - Schneider et al.'s mix of source and target with a pseudo sample size
  ``N`` for the source (target weight ``n / (N + n)`` for ``n`` calibration items), per
  layer from the same moments (in ``mode="eval"`` an approximation: the fixed point of the
  mixed model would see slightly different inputs downstream).

:func:`choose_plan` scores them:

* with labels (``validation``): by accuracy (or a user metric). An adapted plan wins only
  when it beats the source by more than ``z`` standard errors of the paired difference
  (McNemar's ``(b - c) > z * sqrt(b + c)`` over the discordant items ``b``, ``c``; a
  seeded paired bootstrap for a user metric), so a 64-item validation set cannot promote a
  plan on noise. When none does, the plans that lose nothing on the validation set go to
  the label-free guard below, which may pick one (a gain too small for 64 labels to show);
  otherwise the source stays and the result is flagged;
* without labels: the *confident-agreement guard*. The items on which the source model is
  confident (max probability >= ``confidence``) are, on a domain the model still handles,
  mostly right; a plan that flips many of them is breaking the model. A plan is accepted
  when the share of calibration items it flips among the source-confident ones is small
  against the room for improvement::

      flipped_confident / n <= tolerance * (1 - confident / n)

  so with a source confident on 97% of the new domain a plan may flip at most a few
  confident items, and with a source confident on 30% (a severe shift) it may flip many.
  The most adapted accepted plan is chosen (``full`` first, then the prior mixes from
  the most to the least target weight interleaved with ``first:k`` from the deepest).
  Entropy / confidence of the adapted model are *not* used: adapted models become
  confidently wrong (lower entropy, lower accuracy) on real networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .drift import symmetric_kl
from .errors import DataError, OptionsError, OutputError

__all__ = [
    "PLAN_CHOICES",
    "CandidateScore",
    "FloatArray",
    "Metric",
    "Plan",
    "PlanReport",
    "Stats",
    "candidate_plans",
    "check_plan_args",
    "choose_plan",
    "class_rows",
    "effective_classes",
    "plan_stats",
    "probabilities",
    "select_plan",
    "target_weight",
]

FloatArray = npt.NDArray[np.float64]
Stats = dict[str, tuple[FloatArray, FloatArray]]
Metric = Callable[[np.ndarray, np.ndarray], float]
PlanKind = Literal["source", "full", "first", "prior"]

PLAN_CHOICES = ("auto", "full", "source")
"""``plan=`` values: ``auto`` chooses by evidence, ``full`` / ``source`` force one."""

_FIRST_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
_TARGET_WEIGHTS = (0.75, 0.5, 0.25)
_COLLAPSE_RATIO = 0.5
_EARLY_DRIFT = 1.0  # the drift monitor's default threshold (mean symmetric KL)
_EARLY_FRACTION = 0.125


@dataclass(frozen=True)
class Plan:
    """One candidate: which layers take target statistics, and how much of them.

    Attributes:
        name: ``"source"``, ``"full"``, ``"first:<k>"`` or ``"prior:<N>"``.
        kind: the family it belongs to.
        first_layers: ``k`` for ``first:k``.
        prior_strength: ``N`` for ``prior:N`` (source pseudo sample size).
    """

    name: str
    kind: PlanKind
    first_layers: int | None = None
    prior_strength: float | None = None


def candidate_plans(num_layers: int, items: int) -> list[Plan]:
    """The candidate family, in preference order (most adapted first, ``source`` last).

    Args:
        num_layers: the selected layers (``first:k`` takes ``k`` < this).
        items: calibration items ``n`` (prior strengths are ``n / 3``, ``n``, ``3 n``).
    """
    firsts = sorted(
        {k for f in _FIRST_FRACTIONS if 1 <= (k := max(1, round(f * num_layers))) < num_layers},
        reverse=True,
    )
    priors = [float(max(1, round(items * (1.0 - w) / w))) for w in _TARGET_WEIGHTS]
    plans = [Plan("full", "full")]
    # Interleave: prior 0.75, first deepest, prior 0.5, next first, prior 0.25, the rest.
    for i in range(max(len(priors), len(firsts))):
        if i < len(priors):
            plans.append(Plan(f"prior:{priors[i]:g}", "prior", prior_strength=priors[i]))
        if i < len(firsts):
            plans.append(Plan(f"first:{firsts[i]}", "first", first_layers=firsts[i]))
    plans.append(Plan("source", "source"))
    seen: set[str] = set()
    return [p for p in plans if not (p.name in seen or seen.add(p.name))]  # type: ignore[func-returns-value]


def plan_stats(plan: Plan, order: Sequence[str], source: Stats, full: Stats, items: int) -> Stats:
    """The statistics ``plan`` deploys for every layer in ``order`` (float64 copies).

    Args:
        plan: the candidate.
        order: the selected layers in data-flow order.
        source: each layer's statistics before recalibration.
        full: each layer's fully recalibrated statistics.
        items: calibration items ``n`` (weights of the prior mix).
    """
    out: Stats = {}
    for i, name in enumerate(order):
        sm, sv = source[name]
        fm, fv = full[name]
        if plan.kind == "full" or (plan.kind == "first" and i < (plan.first_layers or 0)):
            out[name] = (fm.copy(), fv.copy())
        elif plan.kind == "prior":
            big_n = float(plan.prior_strength or 0.0)
            w = items / (items + big_n) if items + big_n > 0 else 0.0
            out[name] = (w * fm + (1 - w) * sm, w * fv + (1 - w) * sv)
        else:
            out[name] = (sm.copy(), sv.copy())
    return out


def target_weight(plan: Plan, num_layers: int, items: int) -> float:
    """How much of the target statistics ``plan`` deploys, 0 (source) to 1 (full)."""
    if plan.kind == "full":
        return 1.0
    if plan.kind == "first":
        return (plan.first_layers or 0) / max(num_layers, 1)
    if plan.kind == "prior":
        return items / (items + float(plan.prior_strength or 0.0))
    return 0.0


def class_rows(output: Any) -> FloatArray:
    """Class scores ``(rows, K)`` from a model output ``(N, K, *)`` (class axis 1).

    Tuples/lists and dicts give their first item; spatial positions become rows
    (segmentation). Raises :class:`~recalib.errors.OutputError` when the output has no
    class axis.
    """
    while isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping) and output:
        output = next(iter(output.values()))
    if hasattr(output, "detach"):
        output = output.detach().cpu().double().numpy()
    arr = np.asarray(output, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[1] < 2:
        raise OutputError(
            f"expected class scores of shape (N, classes, *) with >= 2 classes "
            f"(got shape {tuple(arr.shape)})"
        )
    return np.moveaxis(arr, 1, -1).reshape(-1, arr.shape[1])


def effective_classes(pred: np.ndarray, classes: int) -> float:
    """``exp(entropy)`` of the predicted-class histogram: how many classes are in use."""
    hist = np.bincount(pred, minlength=classes).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def probabilities(rows: FloatArray) -> FloatArray:
    """Class probabilities from scores: rows that already are probabilities (non-negative,
    summing to 1, as from a softmax inside the graph) are kept, log-probabilities are
    exponentiated, anything else goes through a softmax."""
    sums = rows.sum(axis=1)
    if np.all(rows >= 0.0) and np.allclose(sums, 1.0, atol=1e-3):
        return rows
    if np.all(rows <= 0.0) and np.allclose(np.exp(rows).sum(axis=1), 1.0, atol=1e-3):
        return np.exp(rows)
    e = np.exp(rows - rows.max(axis=1, keepdims=True))
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass
class CandidateScore:
    """One row of the candidates table."""

    plan: str
    kind: str
    target_weight: float
    first_layers: int | None = None
    prior_strength: float | None = None
    val_score: float | None = None
    val_gain: float | None = None
    val_margin: float | None = None
    flipped_confident: float | None = None
    changed: float | None = None
    accepted: bool = False
    note: str = ""


@dataclass
class PlanReport:
    """How the deployed plan was chosen: every candidate, its scores, the choice.

    Attributes:
        criterion: ``"validation"``, ``"label-free"`` or ``"fixed"`` (``plan="full"`` /
            ``"source"`` asked for, or no usable signal).
        chosen: the chosen plan's name.
        reason: one line saying why.
        flagged: the guard or the gate rejected every adapted plan, or could not be
            applied (the service does not promote such a result).
        candidates: one :class:`CandidateScore` per plan.
        validation_samples: labeled items scored (0 without validation).
        scored_items: calibration items the label-free guard looked at.
        source_confident: share of those on which the source is confident.
        params: the selection's settings.
    """

    criterion: str
    chosen: str
    reason: str
    flagged: bool = False
    candidates: list[CandidateScore] = field(default_factory=list)
    validation_samples: int = 0
    scored_items: int = 0
    source_confident: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanReport:
        body = dict(d)
        body["candidates"] = [CandidateScore(**c) for c in body.get("candidates", [])]
        return cls(**body)

    def candidate(self, name: str) -> CandidateScore:
        for c in self.candidates:
            if c.plan == name:
                return c
        raise KeyError(f"no candidate {name!r}")

    def table(self) -> str:
        """The candidates as a short text table (what the CLI prints)."""

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines = [f"{'plan':<14}{'target':>7}{'val':>8}{'gain':>8}{'flip-conf':>10}  chosen"]
        for c in self.candidates:
            mark = "<==" if c.plan == self.chosen else ("ok" if c.accepted else "")
            lines.append(
                f"{c.plan:<14}{c.target_weight:>7.2f}{num(c.val_score, '.3f'):>8}"
                f"{num(c.val_gain, '+.3f'):>8}{num(c.flipped_confident, '.3f'):>10}  {mark}"
            )
        lines.append(f"{self.criterion}: {self.reason}")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class _Scored:
    plan: Plan
    rows: FloatArray  # class scores on the guard's items
    val_rows: FloatArray | None  # class scores on the validation items


def _paired_margin(correct: np.ndarray, base: np.ndarray, z: float) -> tuple[float, float]:
    """``(gain, margin)`` in items: net wins over the source and ``z`` paired std errors."""
    wins = int(np.sum(correct & ~base))
    losses = int(np.sum(~correct & base))
    return float(wins - losses), z * math.sqrt(wins + losses)


def _bootstrap_margin(
    metric: Metric, rows: FloatArray, base_rows: FloatArray, y: np.ndarray, z: float, seed: int
) -> tuple[float, float]:
    """``(gain, margin)`` of a user metric: observed gain and ``z`` bootstrap std errors."""
    rng = np.random.default_rng(seed)
    gain = float(metric(rows, y)) - float(metric(base_rows, y))
    diffs = []
    for _ in range(200):
        idx = rng.integers(0, len(y), size=len(y))
        diffs.append(float(metric(rows[idx], y[idx])) - float(metric(base_rows[idx], y[idx])))
    return gain, z * float(np.std(diffs))


def _choose_by_validation(
    scored: list[_Scored],
    y: np.ndarray,
    metric: Metric | None,
    z: float,
    num_layers: int,
    items: int,
    seed: int,
) -> tuple[list[CandidateScore], str, str, bool]:
    source = next(s for s in scored if s.plan.kind == "source")
    assert source.val_rows is not None  # noqa: S101 - set whenever validation is given
    y_rows = np.asarray(y).reshape(-1)
    if y_rows.shape[0] != source.val_rows.shape[0]:
        raise OptionsError(
            f"expected {source.val_rows.shape[0]} validation labels, one per output row "
            f"(got {y_rows.shape[0]})"
        )
    classes = source.val_rows.shape[1]
    if y_rows.max() >= classes:
        raise OptionsError(
            f"expected validation labels in [0, {classes}) for a {classes}-class output "
            f"(got max {y_rows.max()})"
        )
    base_correct = source.val_rows.argmax(axis=1) == y_rows
    rows: list[CandidateScore] = []
    best: tuple[float, int] | None = None
    chosen = "source"
    for i, s in enumerate(scored):
        assert s.val_rows is not None  # noqa: S101
        if metric is None:
            correct = s.val_rows.argmax(axis=1) == y_rows
            score = float(correct.mean())
            gain, margin = _paired_margin(correct, base_correct, z)
            gain_rate, margin_rate = gain / len(y_rows), margin / len(y_rows)
        else:
            score = float(metric(s.val_rows, y_rows))
            gain_rate, margin_rate = _bootstrap_margin(
                metric, s.val_rows, source.val_rows, y_rows, z, seed
            )
        is_source = s.plan.kind == "source"
        accepted = is_source or gain_rate > margin_rate
        row = _row(s.plan, num_layers, items)
        row.val_score, row.accepted = score, accepted
        if not is_source:
            row.val_gain, row.val_margin = gain_rate, margin_rate
            if not accepted:
                row.note = "does not beat the source by the margin"
        rows.append(row)
        # Highest score wins; ties go to the earlier (more adapted) plan.
        if accepted and not is_source and (best is None or score > best[0]):
            best, chosen = (score, i), s.plan.name
    if chosen == "source":
        return rows, chosen, "no adapted plan beat the source on the validation set", True
    pick = next(r for r in rows if r.plan == chosen)
    reason = (
        f"{chosen} scored {pick.val_score:.3f} on {len(y_rows)} labeled items, "
        f"{pick.val_gain:+.3f} over the source (margin {pick.val_margin:.3f})"
    )
    return rows, chosen, reason, False


def _row(plan: Plan, num_layers: int, items: int) -> CandidateScore:
    return CandidateScore(
        plan=plan.name,
        kind=plan.kind,
        target_weight=target_weight(plan, num_layers, items),
        first_layers=plan.first_layers,
        prior_strength=plan.prior_strength,
    )


def _choose_label_free(
    scored: list[_Scored],
    confidence: float,
    tolerance: float,
    num_layers: int,
    items: int,
    inputs_shifted: bool,
) -> tuple[list[CandidateScore], str, str, bool, float]:
    source = next(s for s in scored if s.plan.kind == "source")
    probs = probabilities(source.rows)
    pred0 = probs.argmax(axis=1)
    confident = probs.max(axis=1) >= confidence
    share = float(confident.mean())
    budget = tolerance * (1.0 - share)
    classes = source.rows.shape[1]
    src_spread = effective_classes(pred0, classes)
    rows: list[CandidateScore] = []
    chosen: str | None = None
    for s in scored:
        pred = s.rows.argmax(axis=1)
        flipped = float(np.mean(confident & (pred != pred0)))
        spread = effective_classes(pred, classes)
        row = _row(s.plan, num_layers, items)
        row.flipped_confident = flipped
        row.changed = float(np.mean(pred != pred0))
        collapsed = inputs_shifted and src_spread <= _COLLAPSE_RATIO * spread
        row.accepted = s.plan.kind == "source" or flipped <= budget or collapsed
        if collapsed and flipped > budget:
            row.note = (
                f"source predictions collapsed onto {src_spread:.1f} classes "
                f"(this plan: {spread:.1f}): its confidence is no evidence"
            )
        elif not row.accepted:
            row.note = f"flips {flipped:.3f} of the items the source is sure of (> {budget:.3f})"
        if row.accepted and chosen is None:
            chosen = s.plan.name
        rows.append(row)
    assert chosen is not None  # noqa: S101 - the source is always accepted
    if chosen == "source":
        reason = (
            f"every adapted plan flips too many of the {share:.0%} of items the source is "
            "confident on"
        )
        return rows, chosen, reason, True, share
    pick = next(r for r in rows if r.plan == chosen)
    if pick.note:
        return rows, chosen, f"{chosen}: {pick.note}", False, share
    reason = (
        f"{chosen} is the most adapted plan that keeps the source's confident predictions "
        f"(flips {pick.flipped_confident:.3f} <= {budget:.3f}; source confident on {share:.0%})"
    )
    return rows, chosen, reason, False, share


def choose_plan(
    plans: Sequence[Plan],
    outputs: Callable[[Plan], tuple[FloatArray, FloatArray | None]],
    *,
    num_layers: int,
    items: int,
    validation_labels: np.ndarray | None = None,
    metric: Metric | None = None,
    z: float = 1.0,
    confidence: float = 0.8,
    tolerance: float = 0.1,
    early_drift: float | None = None,
    seed: int = 0,
) -> PlanReport:
    """Score every plan and pick one (see the module docstring).

    Args:
        plans: the candidates in preference order, ``source`` among them.
        outputs: ``outputs(plan) -> (rows, val_rows)``: the class scores of the model
            deploying ``plan`` on the guard's calibration items, and on the validation
            inputs (``None`` without validation).
        num_layers: layers in the selection.
        items: calibration items.
        validation_labels: labels of the validation items, one per output row.
        metric: ``metric(scores, labels) -> float`` (higher is better) replacing accuracy.
        z: standard errors an adapted plan must beat the source by (validation).
        confidence: the source probability that counts as confident (label-free).
        tolerance: the label-free guard's ``tolerance``.
        early_drift: mean symmetric KL between the source and target statistics of the
            first layers; a collapsed source counts as broken only when it is >= 1.
        seed: the bootstrap's seed (user metrics).
    """
    if not any(p.kind == "source" for p in plans):
        raise OptionsError("expected the source among the candidate plans")
    scored = [_Scored(p, *outputs(p)) for p in plans]
    finite = [
        s
        for s in scored
        if np.isfinite(s.rows).all() and (s.val_rows is None or np.isfinite(s.val_rows).all())
    ]
    if not any(s.plan.kind == "source" for s in finite):
        raise DataError(
            "expected finite outputs of the source model on the calibration and validation "
            "data (got NaN/Inf)"
        )
    broken = [s.plan for s in scored if s not in finite]
    report = _choose(
        finite,
        validation_labels,
        metric,
        z,
        confidence,
        tolerance,
        early_drift,
        num_layers,
        items,
        seed,
    )
    for plan in broken:
        row = _row(plan, num_layers, items)
        row.note = "non-finite outputs"
        report.candidates.append(row)
    return report


def _choose(
    scored: list[_Scored],
    validation_labels: np.ndarray | None,
    metric: Metric | None,
    z: float,
    confidence: float,
    tolerance: float,
    early_drift: float | None,
    num_layers: int,
    items: int,
    seed: int,
) -> PlanReport:
    params = {"z": z, "confidence": confidence, "tolerance": tolerance, "early_drift": early_drift}
    scored_items = int(scored[0].rows.shape[0])
    shifted = early_drift is None or early_drift >= _EARLY_DRIFT
    if validation_labels is not None:
        rows, chosen, reason, flagged = _choose_by_validation(
            scored, validation_labels, metric, z, num_layers, items, seed
        )
        share = None
        if chosen == "source":
            # Nothing beat the source by the margin. Among the plans that lose nothing on
            # the validation set, the label-free guard may still pick one (a gain too small
            # for the labeled sample to show, e.g. +2 points on 64 items).
            ties = [
                s
                for s, r in zip(scored, rows, strict=True)
                if s.plan.kind == "source" or (r.val_gain is not None and r.val_gain >= 0.0)
            ]
            guard_rows, tie_pick, _, _, share = _choose_label_free(
                ties, confidence, tolerance, num_layers, items, shifted
            )
            by_plan = {r.plan: r for r in guard_rows}
            for r in rows:
                if r.plan in by_plan:
                    r.flipped_confident = by_plan[r.plan].flipped_confident
                    r.changed = by_plan[r.plan].changed
            if tie_pick != "source":
                chosen, flagged = tie_pick, False
                pick = next(r for r in rows if r.plan == tie_pick)
                pick.accepted, pick.note = True, "ties the source; passes the label-free guard"
                reason = (
                    f"no plan beat the source by the margin on {np.asarray(validation_labels).size}"
                    f" labeled items; {tie_pick} loses nothing there and passes the label-free "
                    "guard"
                )
        return PlanReport(
            criterion="validation",
            chosen=chosen,
            reason=reason,
            flagged=flagged,
            candidates=rows,
            validation_samples=int(np.asarray(validation_labels).size),
            scored_items=scored_items,
            source_confident=share,
            params=params | {"metric": "accuracy" if metric is None else "custom"},
        )
    rows, chosen, reason, flagged, share = _choose_label_free(
        scored, confidence, tolerance, num_layers, items, shifted
    )
    return PlanReport(
        criterion="label-free",
        chosen=chosen,
        reason=reason,
        flagged=flagged,
        candidates=rows,
        scored_items=scored_items,
        source_confident=share,
        params=params,
    )


def select_plan(
    order: Sequence[str],
    source: Stats,
    full: Stats,
    items: int,
    evaluate: Callable[[Stats], tuple[FloatArray, FloatArray | None]],
    *,
    plan: str = "auto",
    validation_labels: np.ndarray | None = None,
    metric: Metric | None = None,
    z: float = 1.0,
    confidence: float = 0.8,
    tolerance: float = 0.1,
    eps: Mapping[str, float] | None = None,
) -> tuple[PlanReport, Stats]:
    """Build the candidates from one recalibration, score them, return the choice.

    Args:
        order: the recalibrated layers in data-flow order.
        source / full: their statistics before and after full recalibration (float64).
        items: calibration items behind ``full``.
        evaluate: ``evaluate(stats) -> (rows, val_rows)``: class scores of the model
            deploying ``stats`` on the guard's items and on the validation inputs.
        plan: ``"auto"`` (choose), ``"full"`` or ``"source"`` (forced; not scored).
        validation_labels, metric, z, confidence, tolerance: see :func:`choose_plan`.
        eps: each layer's ``eps`` (for the early-layer drift; default ``1e-5``).

    Returns:
        ``(report, stats)``: the :class:`PlanReport` and the statistics to deploy.
    """
    check_plan_args(plan, z, confidence, tolerance)
    eps = {} if eps is None else eps
    num = len(order)
    if plan != "auto":
        forced = Plan(plan, "full" if plan == "full" else "source")
        report = PlanReport(
            criterion="fixed",
            chosen=plan,
            reason=f"plan={plan!r} was asked for",
            flagged=False,
            candidates=[_accepted_row(forced, num, items)],
        )
        return report, plan_stats(forced, order, source, full, items)
    plans = candidate_plans(num, items)
    by_name = {p.name: plan_stats(p, order, source, full, items) for p in plans}
    early = order[: max(1, round(_EARLY_FRACTION * num))]
    drift = float(
        np.mean([np.mean(symmetric_kl(*full[n], *source[n], eps=eps.get(n, 1e-5))) for n in early])
    )
    try:
        report = choose_plan(
            plans,
            lambda p: evaluate(by_name[p.name]),
            num_layers=num,
            items=items,
            validation_labels=validation_labels,
            metric=metric,
            z=z,
            confidence=confidence,
            tolerance=tolerance,
            early_drift=drift,
        )
    except OutputError as exc:
        if validation_labels is not None:
            raise
        # No class scores to guard with: deploy full adaptation, flagged (not promoted).
        report = PlanReport(
            criterion="fixed",
            chosen="full",
            reason=f"the label-free guard cannot run ({exc}): full adaptation, unguarded",
            flagged=True,
            candidates=[_accepted_row(plans[0], num, items)],
        )
    return report, by_name[report.chosen]


def _accepted_row(plan: Plan, num_layers: int, items: int) -> CandidateScore:
    row = _row(plan, num_layers, items)
    row.accepted = True
    return row


def check_plan_args(plan: str, z: float, confidence: float, tolerance: float) -> None:
    """Raise :class:`OptionsError` naming what was expected and what arrived."""
    if plan not in PLAN_CHOICES:
        raise OptionsError(f"expected plan in {PLAN_CHOICES} (got {plan!r})")
    if not (isinstance(z, (int, float)) and z >= 0 and math.isfinite(z)):
        raise OptionsError(f"expected z >= 0 (got {z!r})")
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise OptionsError(f"expected confidence in (0, 1) (got {confidence!r})")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
        raise OptionsError(f"expected tolerance >= 0 (got {tolerance!r})")
