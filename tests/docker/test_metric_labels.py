"""Alert rules and dashboard queries use only labels, and label values, the service exports.

The name checks (test_promtool.py, test_grafana_dashboard.py) see metric names only: a
renamed label (``outcome``, ``requested``, ``provider``, ``layer``...) or a literal value
the service never sets (``outcome=~"failed|crashed"``) would pass them and leave an alert
that never fires or a panel that stays empty. Here every expression is parsed
(:mod:`promql`) and checked against the label sets of a real ``/metrics`` (the
``service_exposition`` fixture: a served model after every ``ServiceMetrics`` method ran)
plus the labels Prometheus adds, and literal values against the value sets in the code
(``REQUEST_OUTCOMES``, ``JOB_OUTCOMES``, the ``execution_provider`` setting's choices, the
provider names, the job names of ``prometheus.yml``). Negative tests rename every label
reference and every literal value of every shipped expression, one at a time, and expect
the check to fail.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families
from promhelpers import (
    PROMETHEUS_BUILTIN,
    PROMETHEUS_DIR,
    TARGET_LABELS,
    Exposition,
    dashboard_target_dicts,
    dashboard_variable,
    load_dashboard,
    metric_names,
    rule_exprs,
    rule_label_refs,
    scrape_config,
    variable_query,
)
from promql import PromQLSyntaxError, Schema, check, parse

ALERTS = PROMETHEUS_DIR / "alerts.yml"
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def value_domains() -> dict[tuple[str, str], Collection[str]]:
    """Label values the service (and the shipped Prometheus config) can produce, from the
    code's own constants."""
    from service.metrics import (
        JOB_OUTCOMES,
        LOAD_FAILURE_REASONS,
        PHASES,
        REQUEST_OUTCOMES,
        REQUEST_REASONS,
    )
    from service.runtime.sessions import CPU, CUDA
    from service.settings import Settings

    requested = get_args(Settings.model_fields["execution_provider"].annotation)
    assert requested, "expected execution_provider to be a Literal"
    jobs, _ = scrape_config()
    return {
        ("recalib_requests_total", "outcome"): REQUEST_OUTCOMES,
        ("recalib_requests_total", "reason"): REQUEST_REASONS,
        ("recalib_model_load_failures_total", "reason"): LOAD_FAILURE_REASONS,
        ("recalib_inference_phase_seconds_total", "phase"): PHASES,
        ("recalib_recalibration_jobs_total", "outcome"): JOB_OUTCOMES,
        ("recalib_execution_provider_info", "requested"): requested,
        # ModelSession.provider: the first provider the session runs; create_session
        # asks ONNX Runtime for CUDA and/or CPU only.
        ("recalib_execution_provider_info", "provider"): (CPU, CUDA),
        ("*", "job"): jobs,
    }


def _schema(exported_labels: dict[str, frozenset[str]], variables: Collection[str]) -> Schema:
    _, static = scrape_config()
    target = TARGET_LABELS | static
    metrics = {name: labels | target for name, labels in exported_labels.items()}
    metrics |= dict.fromkeys(PROMETHEUS_BUILTIN, target)
    return Schema(metrics, value_domains(), variables)


def _dashboard_variables() -> list[str]:
    return [v["name"] for v in load_dashboard()["templating"]["list"]]


@pytest.fixture(scope="session")
def alert_schema(exported_labels: dict[str, frozenset[str]]) -> Schema:
    return _schema(exported_labels, variables=())  # no Grafana variables in alerts


@pytest.fixture(scope="session")
def dashboard_schema(exported_labels: dict[str, frozenset[str]]) -> Schema:
    return _schema(exported_labels, variables=_dashboard_variables())


def _alerts() -> list[tuple[str, str]]:
    return list(rule_exprs(ALERTS).items())


def _dashboard() -> list[tuple[str, str]]:
    return [(where, target["expr"]) for where, target in dashboard_target_dicts()]


# -- the exposition the checks run against ---------------------------------------------


def test_every_service_metrics_method_ran(service_exposition: Exposition) -> None:
    assert service_exposition.public_methods >= {"observe_request", "set_drift"}
    missing = service_exposition.public_methods - service_exposition.called
    assert not missing, f"service_exposition never called ServiceMetrics.{sorted(missing)}"
    empty = [
        family.name
        for family in text_string_to_metric_families(service_exposition.text)
        if family.name.startswith("recalib_") and not family.samples
    ]
    assert not empty, f"metrics without a sample (their labels are unknown): {empty}"


def test_value_sets_match_what_the_service_exported(
    service_exposition: Exposition, exported_labels: dict[str, frozenset[str]]
) -> None:
    seen: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(service_exposition.text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                seen.setdefault((sample.name, label), set()).add(value)
    for (metric, label), domain in value_domains().items():
        if metric == "*":
            continue
        assert label in exported_labels[metric], (metric, label)
        assert seen[metric, label] <= set(domain), (metric, label, seen[metric, label])


# -- the shipped alerts and dashboard ----------------------------------------------------


@pytest.mark.parametrize(("alert", "expr"), _alerts(), ids=[a for a, _ in _alerts()])
def test_alert_labels_exist(alert: str, expr: str, alert_schema: Schema) -> None:
    labels, problems = check(expr, alert_schema)
    assert not problems, f"{alert}: {problems}"
    assert labels is not None, f"{alert}: the expression is a scalar"
    templated = rule_label_refs(ALERTS)[alert]
    assert templated <= labels, (
        f"{alert}: its templates use $labels.{sorted(templated - labels)}, "
        f"the alert has only {sorted(labels)}"
    )


def test_dashboard_labels_exist(dashboard_schema: Schema) -> None:
    failures = []
    for where, target in dashboard_target_dicts():
        labels, problems = check(target["expr"], dashboard_schema)
        legend = set(_LEGEND_LABEL.findall(target.get("legendFormat", "")))
        if labels is not None and not legend <= labels:
            problems.append(f"legend uses {sorted(legend - labels)}, has {sorted(labels)}")
        failures += [f"{where}: {p}" for p in problems]
    assert not failures, "\n".join(failures)


def test_dashboard_variable_label_exists(dashboard_schema: Schema) -> None:
    query = variable_query(dashboard_variable("model"))
    found = re.fullmatch(r"label_values\((.+),\s*(\w+)\s*\)", query.strip())
    assert found, query
    labels, problems = check(found.group(1), dashboard_schema)
    assert not problems and labels is not None and found.group(2) in labels, (query, labels)


# -- the checks catch renamed labels and values ------------------------------------------


def _mutations(expr: str, schema: Schema) -> list[tuple[str, str]]:
    """``(what, mutated expr)``: every label reference renamed, and every literal value (or
    regex alternative) with a known value set changed, one at a time."""
    parsed = parse(expr)
    out = []
    for label in parsed.labels:
        new = f"{label.name}_renamed"
        out.append(
            (f"label {label.name}@{label.start}", expr[: label.start] + new + expr[label.end :])
        )
    for matcher in parsed.matchers:
        assert matcher.metric is not None
        if schema.domain(matcher.metric, matcher.label.name) is None or "$" in matcher.value:
            continue
        alternatives = matcher.value.split("|")
        for i, alternative in enumerate(alternatives):
            changed = "|".join([*alternatives[:i], f"{alternative}_x", *alternatives[i + 1 :]])
            what = f'{matcher.label.name}{matcher.op}"{matcher.value}" -> "{changed}"'
            out.append((what, expr[: matcher.start] + changed + expr[matcher.end :]))
    return out


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_label_and_value_mutation_is_caught(
    source: str, alert_schema: Schema, dashboard_schema: Schema
) -> None:
    schema, exprs = (
        (alert_schema, _alerts()) if source == "alerts" else (dashboard_schema, _dashboard())
    )
    tried, unnoticed = 0, []
    for where, expr in exprs:
        for what, mutated in _mutations(expr, schema):
            tried += 1
            # The name-only check cannot see the difference...
            assert metric_names(mutated) == metric_names(expr), (where, what)
            # ...this one must.
            _, problems = check(mutated, schema)
            if not problems:
                unnoticed.append(f"{where}: {what}")
    assert tried >= 10, f"expected label references in the {source} (found {tried})"
    assert not unnoticed, "mutations the label check misses:\n" + "\n".join(unnoticed)


_SERVER_ERRORS = 'rate(recalib_requests_total{outcome="server_error"}[5m])'


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        # label matchers: names
        ('sum(rate(recalib_requests_total{result="server_error"}[5m]))', "no label 'result'"),
        ('recalib_execution_provider_info{requested_provider="cuda"}', "no label"),
        ('recalib_layer_drift_score{bn_layer="bn1"}', "no label 'bn_layer'"),
        # label matchers: values
        ('recalib_recalibration_jobs_total{outcome=~"failed|crashed"}', "outcome='crashed'"),
        ('recalib_recalibration_jobs_total{outcome="server_error"}', "never sets"),
        ('recalib_requests_total{outcome!="success"}', "outcome='success'"),
        ('recalib_execution_provider_info{requested="gpu"}', "requested='gpu'"),
        ('recalib_execution_provider_info{provider!="CUDA"}', "provider='CUDA'"),
        ('recalib_requests_total{outcome=~"fail.*"}', "matches none"),
        ('up{job="recalib-service"}', "job='recalib-service'"),
        ('recalib_drift_score{model=~"$model"}', "unknown variables ['model']"),
        # grouping
        (f"sum by (model, status) ({_SERVER_ERRORS})", "no label 'status'"),
        ("max without (layer) (recalib_drift_score)", "no label 'layer'"),
        (
            "sum by (outcome) (increase(recalib_recalibration_job_duration_seconds_count[1h]))",
            "outcome",
        ),
        ("max by (model, provider) (recalib_provider_fallbacks_total)", "no label 'provider'"),
        # vector matching
        (
            "max by (model) (recalib_drift_score) and on (model, version) "
            "(recalib_drift_threshold_exceeded > 0)",
            "left side has no label 'version'",
        ),
        (
            f"sum by (model, outcome) ({_SERVER_ERRORS}) / sum by (model) ({_SERVER_ERRORS})",
            "differ",
        ),
        (
            f"sum by (model, outcome) ({_SERVER_ERRORS}) / ignoring (state) group_left "
            f"sum by (model) ({_SERVER_ERRORS})",
            "neither side",
        ),
        (
            f"sum by (model) ({_SERVER_ERRORS}) / on (model) group_left (version) "
            f"sum by (model) ({_SERVER_ERRORS})",
            "one side has no label 'version'",
        ),
        # functions
        ("histogram_quantile(0.9, sum by (model) (rate(recalib_batch_size_bucket[5m])))", "'le'"),
        ('label_replace(recalib_drift_score, "m", "$1", "model_name", "(.*)")', "'model_name'"),
    ],
)
def test_label_check_rejects(expr: str, message: str, alert_schema: Schema) -> None:
    _, problems = check(expr, alert_schema)
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize(
    "expr",
    [
        f"sum by (model) ({_SERVER_ERRORS}) / sum by (model) (rate(recalib_requests_total[5m]))",
        'recalib_requests_total{outcome=~"server_.*|client_error"}',
        'max by (model, version, provider) (recalib_execution_provider_info{requested="cuda"})',
        'label_replace(recalib_drift_score, "m", "$1", "model", "(.*)")',
        "topk(3, max by (model, layer) (recalib_layer_drift_score)) > bool 1",
        "sum(recalib_provider_fallbacks_total offset 1h) or vector(0)",
        'count_values("value", recalib_loaded_versions)',
        "-recalib_drift_score ^ 2 * on (model, version) group_left recalib_drift_window_samples",
    ],
)
def test_label_check_accepts(expr: str, alert_schema: Schema) -> None:
    _, problems = check(expr, alert_schema)
    assert not problems


def test_result_labels_follow_the_expression(alert_schema: Schema) -> None:
    def labels(expr: str) -> Any:
        result, problems = check(expr, alert_schema)
        assert not problems, problems
        return result

    target = {"job", "instance", "service"}
    assert labels("recalib_drift_score") == {"model", "version"} | target
    assert labels("sum by (model) (recalib_drift_score)") == {"model"}
    assert labels("sum without (instance) (recalib_drift_score)") == {"model", "version"} | (
        target - {"instance"}
    )
    assert labels(
        "histogram_quantile(0.5, sum by (le, model) (rate(recalib_batch_size_bucket[5m])))"
    ) == {"model"}
    assert labels(
        'label_replace(sum by (model) (recalib_drift_score), "m", "$1", "model", "(.*)")'
    ) == {
        "model",
        "m",
    }
    assert labels("sum(recalib_loaded_versions) > 1") == frozenset()
    assert labels("time()") is None


def test_parser_records_labels_and_matchers() -> None:
    expr = (
        'sum by (model, le) (rate(m_bucket{a="x", b=~"y|z"}[5m] offset 1h))'
        " / ignoring (c) group_left (d) n"
    )
    parsed = parse(expr)
    assert [label.name for label in parsed.labels] == ["model", "le", "a", "b", "c", "d"]
    for label in parsed.labels:
        assert expr[label.start : label.end] == label.name
    assert [(m.metric, m.label.name, m.op, m.value) for m in parsed.matchers] == [
        ("m_bucket", "a", "=", "x"),
        ("m_bucket", "b", "=~", "y|z"),
    ]
    assert [expr[m.start : m.end] for m in parsed.matchers] == ["x", "y|z"]
    with pytest.raises(PromQLSyntaxError):
        parse("sum by (model (x)")
    with pytest.raises(PromQLSyntaxError):
        parse('x{a="b"')
