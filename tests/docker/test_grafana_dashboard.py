"""The Grafana dashboard is valid JSON, wired to the provisioned datasource, covers what the
issue asks for, and every panel's PromQL names only metrics the service exports and is
accepted by Prometheus' parser (``promtool check rules`` on the queries as recording rules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from promhelpers import (
    DASHBOARD,
    DOCKER,
    dashboard_panels,
    dashboard_targets,
    dashboard_variable,
    grafana_to_promql,
    metric_names,
    run_promtool,
    variable_query,
)

PROVISIONED_UID = "recalib-prometheus"


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{x="y", z=~"b_c"}[5m])))'
        " / ignoring (outcome) group_left\nsum without (i) (b_total offset 1h) > bool 1e3"
        " or on(model) vector(0) and c:recorded"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded"}
    assert metric_names("label_values(recalib_x_info, model)") == {"recalib_x_info"}
    assert metric_names('sum by (model) (rate(m{model=~"$model"}[$__rate_interval]))') == {"m"}


def test_dashboard_panels_include_nested_rows() -> None:
    def panel(pid: int, expr: str) -> dict[str, Any]:
        return {
            "id": pid,
            "title": f"p{pid}",
            "type": "timeseries",
            "targets": [{"refId": "A", "expr": expr}],
        }

    collapsed: dict[str, Any] = {"id": 2, "title": "row", "type": "row", "collapsed": True}
    collapsed["panels"] = [panel(3, "b"), panel(4, "c")]
    dashboard = {"panels": [panel(1, "a"), collapsed, panel(5, "d")]}
    assert [p["id"] for p in dashboard_panels(dashboard)] == [1, 2, 3, 4, 5]
    assert dashboard_targets(dashboard) == [
        ("p1 [A]", "a"),
        ("p3 [A]", "b"),
        ("p4 [A]", "c"),
        ("p5 [A]", "d"),
    ]
    assert dashboard_variable("model")["name"] == "model"


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "recalib-overview"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == PROVISIONED_UID


def test_provisioning_points_at_the_dashboard() -> None:
    datasource = (DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text()
    assert f"uid: {PROVISIONED_UID}" in datasource
    provider = (DOCKER / "grafana/provisioning/dashboards/recalib.yml").read_text()
    compose = (DOCKER / "compose.yaml").read_text()
    mounted = "./grafana/dashboards:/etc/grafana/dashboards:ro"
    assert mounted in compose and "path: /etc/grafana/dashboards" in provider


def test_dashboard_shows_drift_traffic_batching_and_jobs() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_targets()))
    assert used >= {
        "recalib_drift_score",  # drift per model over time
        "recalib_layer_drift_score",  # per-layer heatmap
        "recalib_requests_total",  # throughput
        "recalib_request_duration_seconds_bucket",  # latency quantiles
        "recalib_batch_size_bucket",  # batch sizes
        "recalib_queue_wait_seconds_bucket",  # queue wait
        "recalib_recalibration_jobs_total",  # jobs
        "recalib_inference_phase_seconds_total",  # compute split
        "recalib_inference_successes_total",
        "recalib_model_ready",  # readiness per replica
        "recalib_model_load_failures_total",
        "process_cpu_seconds_total",  # the process collector
        "process_resident_memory_bytes",
    }
    failures = [e for _, e in dashboard_targets() if "recalib_requests_total" in e]
    assert any("by (model, outcome, reason)" in e for e in failures)
    kinds = {p["title"]: p["type"] for p in dashboard_panels()}
    assert kinds["Per-layer drift (symmetric KL)"] == "heatmap"
    quantiles = [e for _, e in dashboard_targets() if "histogram_quantile" in e]
    assert all("_bucket" in e and "le" in e for e in quantiles)


def test_dashboard_names_only_exported_metrics(exported_metrics: set[str]) -> None:
    queries = dashboard_targets()
    variable = variable_query(dashboard_variable("model"))
    for where, expr in [*queries, ("variable model", variable)]:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - exported_metrics
        assert not unknown, f"{where} uses metrics the service does not export: {unknown}"


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    rules = [
        {"record": f"recalib_dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def _query(title: str) -> str:
    (expr,) = [e for where, e in dashboard_targets() if where.startswith(f"{title} [")]
    return grafana_to_promql(expr)


def test_counter_panels_count_series_new_in_the_window(promtool: str, tmp_path: Path) -> None:
    """A labelled counter series first appears already at 1 (the first failed job, the jobs
    marked interrupted at a restart, a provider fallback at load); ``increase()`` needs two
    samples and shows 0 for it. The job and fallback panels count such a series with its
    whole value (``promtool test rules`` evaluates them on synthetic series)."""
    jobs = _query("Recalibration jobs by outcome")
    fallbacks = _query("Provider fallbacks (24 h)")
    target = 'job="recalib",instance="a:8000"'
    series = [
        # a job succeeds every minute from t=0
        (f'recalib_recalibration_jobs_total{{{target},outcome="succeeded"}}', "0+1x150"),
        # one job fails at 30m: the series appears at 1 and stays there
        (f'recalib_recalibration_jobs_total{{{target},outcome="failed"}}', "_x30 1x120"),
        # a session falls back when the version loads at 10m
        (f'recalib_provider_fallbacks_total{{{target},model="demo",version="1"}}', "_x10 1x140"),
    ]

    def case(expr: str, at: str, expected: dict[str, float]) -> dict[str, Any]:
        samples = [{"labels": labels, "value": value} for labels, value in expected.items()]
        return {"expr": expr, "eval_time": at, "exp_samples": samples}

    old_jobs = "sum by (outcome) (increase(recalib_recalibration_jobs_total[1h]))"
    cases = [
        case(jobs, "40m", {'{outcome="failed"}': 1, '{outcome="succeeded"}': 40}),
        case(jobs, "85m", {'{outcome="failed"}': 1, '{outcome="succeeded"}': 60}),
        # the failure is more than an hour ago
        case(jobs, "100m", {'{outcome="failed"}': 0, '{outcome="succeeded"}': 60}),
        # what plain increase() shows for the failure within the hour
        case(old_jobs, "85m", {'{outcome="failed"}': 0, '{outcome="succeeded"}': 60}),
        case(fallbacks, "5m", {"{}": 0}),
        case(fallbacks, "2h", {"{}": 1}),
    ]
    test = {
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": cases,
    }
    path = tmp_path / "dashboard_test.yml"  # JSON is YAML
    path.write_text(json.dumps({"rule_files": [], "tests": [test]}))
    result = run_promtool(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
