"""``docker/compose.yaml`` and its CPU override parse, and say what docs/deployment.md says.

No ``docker compose`` here: the files are read with PyYAML (``!reset`` / ``!override``, the
Compose merge tags, loaded as markers) and the one merge rule the override relies on is
applied by hand: ``!reset`` drops the key from the merged service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


class _Reset:
    """``!reset``: the key is removed from the merged file (its value is ignored)."""


class _Override:
    """``!override``: the value replaces the base file's instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # Any without types-PyYAML
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return _Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))  # type: ignore[arg-type]


_Loader.add_constructor("!reset", _reset)
_Loader.add_constructor("!override", _override)


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load((DOCKER / name).read_text(), Loader=_Loader)
    return loaded


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as compose.cpu.yaml needs it: mappings merge key by key,
    ``!reset`` removes a key, ``!override`` and anything else replace."""
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    return override


def test_prometheus_and_grafana_listen_on_loopback_only() -> None:
    services = _load("compose.yaml")["services"]
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_secrets_are_required_not_defaulted() -> None:
    services = _load("compose.yaml")["services"]
    assert services["recalib"]["environment"]["RECALIB_API_TOKEN"].startswith(
        "${RECALIB_API_TOKEN:?"
    )
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GF_SECURITY_ADMIN_PASSWORD:?"
    )


def test_gpu_by_default() -> None:
    recalib = _load("compose.yaml")["services"]["recalib"]
    devices = recalib["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_cpu_override_builds_cpu_without_a_gpu_reservation() -> None:
    base = _load("compose.yaml")
    override = _load("compose.cpu.yaml")
    assert set(override["services"]) == {"recalib", "recalib-inference"}
    recalib = _merge(base, override)["services"]["recalib"]
    assert "deploy" not in recalib
    assert recalib["build"]["args"]["VARIANT"] == "cpu"
    assert recalib["build"]["dockerfile"] == "docker/Dockerfile"  # merged, not replaced
    assert recalib["image"] == "recalib:cpu"
    assert recalib["environment"] == base["services"]["recalib"]["environment"]


def test_cpu_override_keeps_the_inference_replicas_without_gpus() -> None:
    inference = _merge(_load("compose.yaml"), _load("compose.cpu.yaml"))["services"][
        "recalib-inference"
    ]
    assert inference["image"] == "recalib:cpu"
    assert inference["deploy"] == {"replicas": 2}


def test_the_control_writes_the_model_store_and_inference_reads_it() -> None:
    services = _load("compose.yaml")["services"]
    control, inference = services["recalib"], services["recalib-inference"]
    store = control["environment"]["RECALIB_MODEL_STORE"]
    assert inference["environment"]["RECALIB_MODEL_STORE"] == store
    assert control["environment"].get("RECALIB_ROLE", "all") == "all"
    assert inference["environment"]["RECALIB_ROLE"] == "inference"
    assert f"model-store:{store}" in control["volumes"]  # read-write
    assert inference["volumes"] == [f"model-store:{store}:ro"]  # read-only, nothing else
    assert inference["image"] == control["image"]  # built once, by the control service
    assert inference["environment"]["RECALIB_API_TOKEN"].startswith("${RECALIB_API_TOKEN:?")
    assert "model-store" in _load("compose.yaml")["volumes"]
    ports = [str(p) for p in inference["ports"]]
    assert ports == ["8010-8011:8000"] and inference["deploy"]["replicas"] == 2


def test_prometheus_scrapes_the_control_and_every_inference_replica() -> None:
    services = _load("compose.yaml")["services"]
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "recalib"]
    static = [t for c in job["static_configs"] for t in c["targets"]]
    assert static == ["recalib:8000"] and "recalib" in services
    (dns,) = job["dns_sd_configs"]  # Docker's DNS: one A record per replica
    assert dns["names"] == ["recalib-inference"] and dns["type"] == "A"
    assert "recalib-inference" in services
    assert dns["port"] == 8000  # the port inside the network, not the host's 8010-8011
    (relabel,) = job["relabel_configs"]
    assert relabel["source_labels"] == ["__meta_dns_name"]
    assert relabel["target_label"] == "service"
