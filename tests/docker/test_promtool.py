"""The shipped Prometheus files pass Prometheus' own checker (``promtool``), the alert rules
pass their unit tests, and every alert names only metrics the service exports."""

from __future__ import annotations

import shutil

import pytest
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
    }


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
