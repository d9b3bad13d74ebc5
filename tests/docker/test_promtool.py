"""The shipped Prometheus files pass Prometheus' own checker (``promtool``), the alert rules
pass their unit tests, and every alert names only metrics the service exports."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from promhelpers import (
    PROMETHEUS_BUILTIN,
    PROMETHEUS_DIR,
    metric_names,
    require_binary,
    rule_exprs,
    run_promtool,
)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"


def test_config_is_valid(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # alerts.yml is wired in, and checked too


def test_rules_are_valid(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_exprs(ALERTS))} rules found" in result.stdout


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_drift_errors_fallbacks_and_failed_jobs() -> None:
    assert set(rule_exprs(ALERTS)) >= {
        "RecalibDriftThresholdExceeded",
        "RecalibHighServerErrorRatio",
        "RecalibCpuFallback",
        "RecalibProviderFallback",
        "RecalibRecalibrationJobFailed",
        "RecalibModelNotReady",
        "RecalibModelLoadFailures",
    }


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_a_runbook_section() -> None:
    anchors = _anchors(RUNBOOK.read_text())
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert rules
    for rule in rules:
        url = rule["annotations"].get("runbook_url")
        assert url == f"docs/runbook.md#{rule['alert'].lower()}", rule["alert"]
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no section in {RUNBOOK}"
        section = RUNBOOK.read_text().split(f"## {rule['alert']}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Meaning.**", "**First checks.**", "**Fixes.**"):
            assert part in section, f"{rule['alert']}: the runbook section has no {part}"
    assert len(anchors) - 1 == len(rules), "a runbook section for an alert that is gone"


def test_alerts_name_only_exported_metrics(exported_metrics: set[str]) -> None:
    for alert, expr in rule_exprs(ALERTS).items():
        names = metric_names(expr)
        assert names, f"{alert}: no metric found in {expr!r}"
        unknown = names - exported_metrics - PROMETHEUS_BUILTIN
        assert not unknown, f"{alert} uses metrics the service does not export: {unknown}"


def test_missing_promtool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_binary("promtool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install-system-deps"):
        require_binary("promtool")
