"""The Grafana dashboard is valid JSON, wired to the provisioned datasource, covers what the
issue asks for, and every panel's PromQL names only metrics the service exports and is
accepted by Prometheus' parser (``promtool check rules`` on the queries as recording rules).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from promhelpers import (
    DASHBOARD,
    DOCKER,
    dashboard_targets,
    grafana_to_promql,
    metric_names,
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


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    panels = dashboard["panels"]
    assert isinstance(panels, list) and panels
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


def test_dashboard_covers_the_issue() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_targets()))
    assert used >= {
        "recalib_drift_score",  # drift per model over time
        "recalib_layer_drift_score",  # per-layer heatmap
        "recalib_requests_total",  # throughput
        "recalib_request_duration_seconds_bucket",  # latency quantiles
        "recalib_batch_size_bucket",  # batch sizes
        "recalib_queue_wait_seconds_bucket",  # queue wait
        "recalib_recalibration_jobs_total",  # jobs
    }
    kinds = {p["title"]: p["type"] for p in _dashboard()["panels"]}
    assert kinds["Per-layer drift (symmetric KL)"] == "heatmap"
    quantiles = [e for _, e in dashboard_targets() if "histogram_quantile" in e]
    assert all("_bucket" in e and "le" in e for e in quantiles)


def test_dashboard_names_only_exported_metrics(exported_metrics: set[str]) -> None:
    queries = dashboard_targets()
    variable = _dashboard()["templating"]["list"][1]["query"]["query"]
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
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
