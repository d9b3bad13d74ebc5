"""The Kubernetes manifests in ``docker/kubernetes/`` hang together.

* ``prometheusrule.yaml`` carries exactly the groups of ``docker/prometheus/alerts.yml``
  (regenerate it with ``python scripts/sync_prometheusrule.py``), and the job the alerts
  match is the one the ServiceMonitor gives the targets.
* Every Service selects the pods of exactly one workload and targets a named container
  port; the ServiceMonitor selects Services that carry its job label and port.
* The inference StatefulSet asks for a GPU and probes the v2 health endpoints.
* kustomization.yaml lists every plain manifest; the Prometheus Operator's objects (CRDs
  needed) are kept out of it together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "kubernetes"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _objects() -> list[dict[str, Any]]:
    return [
        d
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for d in _docs(path)
    ]


def _of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [d for d in _objects() if d["kind"] in kinds]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]  # type: ignore[no-any-return]


def _selected_services(monitor: dict[str, Any]) -> list[dict[str, Any]]:
    selector = monitor["spec"]["selector"]["matchLabels"]
    return [s for s in _of_kind("Service") if _matches(selector, s["metadata"].get("labels", {}))]


def test_prometheusrule_has_the_alert_groups() -> None:
    rule = _one("PrometheusRule", "recalib")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load(ALERTS.read_text())
    assert set(alerts) == {"groups"}
    assert rule["spec"]["groups"] == alerts["groups"], (
        "docker/kubernetes/prometheusrule.yaml differs from docker/prometheus/alerts.yml: "
        "run python scripts/sync_prometheusrule.py"
    )


def test_alert_job_matchers_are_the_servicemonitor_job() -> None:
    monitor = _one("ServiceMonitor", "recalib")
    job_label = monitor["spec"]["jobLabel"]
    services = _selected_services(monitor)
    # jobLabel reads the label off the Service itself: it must be in the manifest, not
    # only added by kustomize's `labels:`.
    jobs = {s["metadata"]["labels"].get(job_label) for s in services}
    assert jobs == {"recalib"}, f"Services {[s['metadata']['name'] for s in services]}: {jobs}"
    matchers = set(re.findall(r'\bjob\s*=~?\s*"([^"]*)"', ALERTS.read_text()))
    assert matchers, "no job matcher in alerts.yml: drop this test's premise"
    assert matchers <= jobs, f"alerts match job {matchers}, the ServiceMonitor gives {jobs}"


@pytest.mark.parametrize("name", ["recalib-control", "recalib-inference", "recalib"])
def test_service_selects_one_workload_and_its_port(name: str) -> None:
    service = _one("Service", name)
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "recalib"
    selector = service["spec"]["selector"]
    workloads = [
        w
        for w in _of_kind(*WORKLOAD_KINDS)
        if _matches(selector, w["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(workloads) == 1, f"Service/{name} selects {len(workloads)} workloads"
    ports = {p["name"]: p["containerPort"] for p in _container(workloads[0]).get("ports", [])}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        if isinstance(target, str):
            assert target in ports, f"Service/{name}: no container port named {target!r}"
        else:
            assert target in ports.values(), f"Service/{name}: no container port {target}"


@pytest.mark.parametrize("kind", sorted(WORKLOAD_KINDS))
def test_workload_selector_matches_its_template(kind: str) -> None:
    for workload in _of_kind(kind):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _matches(workload["spec"]["selector"]["matchLabels"], labels)


def test_statefulset_service_is_headless() -> None:
    inference = _one("StatefulSet", "recalib-inference")
    service = _one("Service", inference["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"


def test_servicemonitor_scrapes_each_pod_once() -> None:
    monitor = _one("ServiceMonitor", "recalib")
    services = _selected_services(monitor)
    assert sorted(s["metadata"]["name"] for s in services) == [
        "recalib-control",
        "recalib-inference",
    ]
    for service in services:
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names, (service["metadata"]["name"], endpoint["port"])
            assert endpoint["path"] == "/metrics"


def test_inference_statefulset_has_a_gpu_and_health_probes() -> None:
    container = _container(_one("StatefulSet", "recalib-inference"))
    resources = container["resources"]
    # An extended resource is requested through its limit (requests default to it).
    gpus = {**resources.get("limits", {}), **resources.get("requests", {})}.get("nvidia.com/gpu")
    assert gpus is not None and int(gpus) >= 1, resources
    port_names = {p["name"] for p in container["ports"]}
    for probe, path in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ]:
        get = container[probe]["httpGet"]
        assert get["path"] == path, (probe, get)
        assert get["port"] in port_names, (probe, get)


def test_only_the_control_replica_takes_jobs_and_inference_waits_for_its_models() -> None:
    from service.settings import Settings

    def settings(name: str, kind: str) -> Settings:
        env = {e["name"]: e.get("value") for e in _container(_one(kind, name)).get("env", [])}
        known = {k: v for k, v in env.items() if k in ("RECALIB_ROLE", "RECALIB_EXPECT_MODELS")}
        fields = {k.removeprefix("RECALIB_").lower(): v for k, v in known.items()}
        if "expect_models" in fields:
            fields["expect_models"] = yaml.safe_load(fields["expect_models"])
        return Settings(**fields)

    inference = settings("recalib-inference", "StatefulSet")
    assert inference.role == "inference" and inference.expect_models
    control = settings("recalib-control", "Deployment")
    assert control.role == "all" and control.expect_models == []


def test_kustomization_lists_the_plain_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    operator_files = {
        path.name
        for path in K8S.glob("*.yaml")
        if any(d["kind"] in OPERATOR_KINDS for d in _docs(path))
    }
    assert operator_files == {"servicemonitor.yaml", "prometheusrule.yaml"}
    # Both in (a cluster with the operator's CRDs) or both out (applied separately).
    assert not (operator_files & listed) or operator_files <= listed
    plain = {p.name for p in K8S.glob("*.yaml")} - operator_files - {"kustomization.yaml"}
    assert plain <= listed, f"not in kustomization.yaml: {sorted(plain - listed)}"
