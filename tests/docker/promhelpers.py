"""Helpers of the container / observability tests (tests/docker/).

* :func:`require_binary`: Debian's ``prometheus`` package provides ``prometheus`` and
  ``promtool`` (``.ci/install-system-deps.sh`` installs it in CI). A missing binary skips
  the test locally but fails it under ``CI=true``, so CI cannot go green without them.
* :func:`metric_names`: the metric names a PromQL expression selects.
* :func:`rule_exprs`: the ``expr`` of every rule in a Prometheus rules file (no YAML
  library needed), :func:`rule_label_refs`: the ``$labels.x`` its templates use;
  :func:`dashboard_panels` / :func:`dashboard_targets`: every panel (rows' nested panels
  included) and every query of the Grafana dashboard; :func:`dashboard_variable`.
* :func:`scrape_config`: job names and static target labels of ``prometheus.yml``.
* :func:`names_from_exposition`, :func:`labels_from_exposition`: sample names, and the
  label names of each sample, in a ``/metrics`` text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "recalib.json"

# Synthetic series Prometheus itself adds to every target.
PROMETHEUS_BUILTIN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Labels Prometheus puts on every scraped series (plus the static ones of prometheus.yml).
TARGET_LABELS = frozenset({"job", "instance"})

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan", "atan2"}
)
_STRING = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,")
_GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "1h", "$model": ".*"}


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL ``expr`` (Grafana variables allowed).

    Strings, label matchers, range selectors and grouping clauses are cut out first; what
    remains is a metric name unless it is a keyword or called as a function/aggregation.
    Grafana's ``label_values(metric, label)`` counts its metric only.
    """
    found = _LABEL_VALUES.match(expr.strip())
    if found:
        return {found.group(1)}
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for match in _IDENT.finditer(s):
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation: sum(...), rate(...)
        if match.group() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def grafana_to_promql(expr: str) -> str:
    """Replace the Grafana variables the dashboard uses by concrete values."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise ValueError(f"expected only the variables {sorted(_GRAFANA_VARS)} (got {expr!r})")
    return expr


def rule_exprs(path: Path) -> dict[str, str]:
    """``{alert or record name: expr}`` of a Prometheus rules file.

    Reads the two forms the shipped files use: ``expr: <one line>`` and a ``expr: |`` block
    (the lines indented deeper than ``expr:``).
    """
    lines = path.read_text().splitlines()
    out: dict[str, str] = {}
    name = None
    for i, line in enumerate(lines):
        head = re.match(r"\s*-\s*(?:alert|record):\s*(\S+)", line)
        if head:
            name = head.group(1)
        found = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not found:
            continue
        if name is None or name in out:
            raise ValueError(f"expected one expr per rule (line {i + 1} of {path})")
        indent, rest = len(found.group(1)), found.group(2).strip()
        if rest not in ("|", ">", "|-", ">-"):
            out[name] = rest
            continue
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            block.append(nxt.strip())
        out[name] = "\n".join(block).strip()
    return out


def rule_label_refs(path: Path) -> dict[str, set[str]]:
    """``{alert name: labels}`` its annotations and labels read as ``$labels.<name>``."""
    out: dict[str, set[str]] = {}
    name = None
    for line in path.read_text().splitlines():
        head = re.match(r"\s*-\s*(?:alert|record):\s*(\S+)", line)
        if head:
            name = head.group(1)
            out[name] = set()
        elif name is not None:
            out[name] |= set(re.findall(r"\$labels\.(\w+)", line))
    return out


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels(dashboard: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel of ``dashboard`` (default: the shipped one), depth first: a row's
    ``panels`` (collapsed rows keep theirs there) follow the row."""
    stack = list(reversed((dashboard or load_dashboard())["panels"]))
    while stack:
        panel = stack.pop()
        yield panel
        stack.extend(reversed(panel.get("panels", [])))


def dashboard_target_dicts(
    dashboard: dict[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``(panel title [refId], target)`` for every query of the dashboard."""
    return [
        (f"{panel['title']} [{target['refId']}]", target)
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def dashboard_targets(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """``(panel title [refId], expr)`` for every query of the Grafana dashboard."""
    return [(where, target["expr"]) for where, target in dashboard_target_dicts(dashboard)]


def dashboard_variable(name: str, dashboard: dict[str, Any] | None = None) -> dict[str, Any]:
    """The template variable called ``name``."""
    for variable in (dashboard or load_dashboard())["templating"]["list"]:
        if variable["name"] == name:
            found: dict[str, Any] = variable
            return found
    raise KeyError(f"the dashboard has no variable {name!r}")


def variable_query(variable: dict[str, Any]) -> str:
    """The query of a query variable (a string, or ``{"query": ...}`` in newer Grafana)."""
    query = variable["query"]
    text: str = query["query"] if isinstance(query, dict) else query
    return text


def scrape_config(path: Path | None = None) -> tuple[frozenset[str], frozenset[str]]:
    """``(job names, static target label names)`` of ``prometheus.yml``."""
    text = (path or PROMETHEUS_DIR / "prometheus.yml").read_text()
    jobs = frozenset(re.findall(r"^\s*-\s*job_name:\s*[\"']?([\w-]+)", text, re.MULTILINE))
    labels: set[str] = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(\s*)labels:\s*$", line)
        if not found:
            continue
        for nxt in lines[i + 1 :]:
            if len(nxt) - len(nxt.lstrip()) <= len(found.group(1)):
                break
            key = re.match(r"\s*(\w+):", nxt)
            if key:
                labels.add(key.group(1))
    return jobs, frozenset(labels)


@dataclass(frozen=True)
class Exposition:
    """A ``/metrics`` text and the ``ServiceMetrics`` methods that ran to produce it
    (the ``service_exposition`` fixture)."""

    text: str
    called: frozenset[str]
    public_methods: frozenset[str]


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` (its output captured; a non-zero exit is the caller's to check)."""
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def require_binary(name: str) -> str:
    """Path of ``name`` on PATH; skip the test without it (fail it under ``CI=true``)."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} not found on PATH (Debian: apt-get install prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI installs it with .ci/install-system-deps.sh")
    pytest.skip(reason)


def names_from_exposition(text: str) -> set[str]:
    """Every sample name in a Prometheus text exposition; histograms (and summaries) are
    expanded to their ``_bucket`` / ``_sum`` / ``_count`` series even without samples."""
    names = set()
    for line in text.splitlines():
        typed = re.match(r"# TYPE (\S+) (\w+)", line)
        if typed:
            name, kind = typed.groups()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def labels_from_exposition(text: str) -> dict[str, frozenset[str]]:
    """``{sample name: label names}`` over every sample of a Prometheus text exposition
    (parsed by prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}
