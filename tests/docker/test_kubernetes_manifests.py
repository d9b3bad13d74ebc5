"""The Kubernetes manifests in ``docker/kubernetes/`` hang together.

* ``prometheusrule.yaml`` carries exactly the groups of ``docker/prometheus/alerts.yml``
  (regenerate it with ``python scripts/sync_prometheusrule.py``), and the job the alerts
  match is the one the ServiceMonitor gives the targets.
* Every Service selects the pods of exactly one workload and targets a named container
  port; the ServiceMonitor selects Services that carry its job label and port.
* The inference Deployment asks for a GPU and probes the v2 health endpoints.
* The model store: recalib-control mounts it read-write, every inference pod (the
  Deployment and KServe's ServingRuntime) read-only at the path of RECALIB_MODEL_STORE,
  with no home of its own; the InferenceService's storageUri is the store's PVC.
* autoscaling/: the HPA scales the inference Deployment on recalib_inflight_requests, the
  metric prometheus-adapter's rule exposes.
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


def test_the_per_pod_service_is_headless() -> None:
    service = _one("Service", "recalib-inference")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # scraped while not ready


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


def test_inference_deployment_has_a_gpu_and_health_probes() -> None:
    container = _container(_one("Deployment", "recalib-inference"))
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

    inference = settings("recalib-inference", "Deployment")
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


KSERVE = K8S / "kserve"
AUTOSCALING = K8S / "autoscaling"


def _configmap_store() -> str:
    store: str = _one("ConfigMap", "recalib-settings")["data"]["RECALIB_MODEL_STORE"]
    return store


def _mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> {readOnly of the mount, readOnly of the PVC, claim} of a pod spec."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out: dict[str, dict[str, Any]] = {}
    for mount in container.get("volumeMounts", []):
        pvc = volumes[mount["name"]].get("persistentVolumeClaim")
        out[mount["mountPath"]] = {
            "mount_read_only": mount.get("readOnly", False),
            "claim_read_only": None if pvc is None else pvc.get("readOnly", False),
            "claim": None if pvc is None else pvc["claimName"],
        }
    return out


def test_the_model_store_is_shared_read_write_by_control_and_read_only_by_inference() -> None:
    store = _configmap_store()
    claim = _one("PersistentVolumeClaim", "recalib-model-store")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    control = _one("Deployment", "recalib-control")
    mounts = _mounts(control["spec"]["template"]["spec"], _container(control))
    assert mounts[store] == {
        "mount_read_only": False,
        "claim_read_only": False,
        "claim": "recalib-model-store",
    }

    inference = _one("Deployment", "recalib-inference")
    container = _container(inference)
    mounts = _mounts(inference["spec"]["template"]["spec"], container)
    assert mounts[store] == {
        "mount_read_only": True,
        "claim_read_only": True,
        "claim": "recalib-model-store",
    }
    # no state of its own: every other volume is scratch
    assert all(m["claim"] is None for path, m in mounts.items() if path != store), mounts
    assert "volumeClaimTemplates" not in inference["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    traffic = {p["name"]: p["targetPort"] for p in _one("Service", "recalib")["spec"]["ports"]}
    assert traffic == {"http": "http", "grpc": "grpc"}


def test_the_configmap_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    for key, value in _one("ConfigMap", "recalib-settings")["data"].items():
        monkeypatch.setenv(key, value)  # as the pods get them: environment variables
    settings = Settings()
    assert str(settings.model_store) == "/mnt/models" and settings.store_poll_seconds > 0
    assert not settings.store_fed and Settings(role="inference").store_fed


def test_kserve_runtime_serves_the_store_read_only_on_8000_and_8001() -> None:
    from pydantic import SecretStr

    from service.settings import Settings

    runtime = _docs(KSERVE / "servingruntime.yaml")[0]
    assert (runtime["apiVersion"], runtime["kind"]) == (
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
    )
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {k: v for k, v in env.items() if k.startswith("RECALIB_") and v is not None}
    settings = Settings(
        **{k.removeprefix("RECALIB_").lower(): v for k, v in known.items()},
        api_token=SecretStr("from-the-secret"),
    )
    assert settings.store_fed and str(settings.model_store) == "/mnt/models"  # KServe's mount
    assert settings.grpc and settings.grpc_port == 8001
    assert container["args"][container["args"].index("--port") + 1] == "8000"
    assert [p["containerPort"] for p in container["ports"]] == [8000, 8001]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}

    service = _docs(KSERVE / "inferenceservice.yaml")[0]
    assert (service["apiVersion"], service["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in formats
    claim = _one("PersistentVolumeClaim", "recalib-model-store")["metadata"]["name"]
    assert model["storageUri"].rstrip("/") == f"pvc://{claim}"
    # two ports need the raw deployment mode (Knative allows one)
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_hpa_scales_inference_on_the_inflight_gauge_prometheus_adapter_exposes() -> None:
    from service.metrics import ServiceMetrics

    hpa = _docs(AUTOSCALING / "hpa.yaml")[0]
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "recalib-inference"}
    _one("Deployment", "recalib-inference")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "recalib_inflight_requests"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    ServiceMetrics(registry).inflight_add("m", 1)
    assert registry.get_sample_value(name, {"model": "m"}) == 1.0  # the service exports it

    values = yaml.safe_load((AUTOSCALING / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_optional_manifests_are_not_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert not any("/" in name for name in listed)
    for folder in (KSERVE, AUTOSCALING):
        assert sorted(p.name for p in folder.glob("*.yaml")), folder
