"""``openapi.yaml`` is the app's schema, rendered by ``scripts/export_openapi.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _exporter() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "export_openapi", ROOT / "scripts" / "export_openapi.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openapi_yaml_equals_the_app_schema() -> None:
    exporter = _exporter()
    expected = exporter.render(exporter.app_schema())
    assert (ROOT / "openapi.yaml").read_text() == expected, (
        "openapi.yaml is stale: run python scripts/export_openapi.py"
    )


def test_schema_documents_the_control_plane() -> None:
    paths = _exporter().app_schema()["paths"]
    for path, method in [
        ("/v1/models", "post"),
        ("/v1/models/{name}/versions/{version}/artifact", "get"),
        ("/v1/models/{name}/aliases/{alias}", "put"),
        ("/v1/datasets", "post"),
        ("/v1/models/{name}/recalibrations", "post"),
        ("/v1/recalibrations/{job_id}", "delete"),
        ("/v1/models/{name}/drift", "get"),
    ]:
        operation = paths[path][method]
        assert operation["security"] == [{"HTTPBearer": []}]
        error = operation["responses"]["401"]["content"]["application/json"]["schema"]
        assert error["$ref"].endswith("ErrorBody")
    upload = paths["/v1/models"]["post"]["requestBody"]["content"]
    assert list(upload) == ["multipart/form-data"]


def test_render_quotes_what_yaml_would_misread() -> None:
    render = _exporter().render
    text = render({"200": {"a": [1e-05, 2.5, True, None, "yes"], "on": {}, "$ref": "#/x"}})
    assert text.splitlines()[1:] == [
        '"200":',
        "  a:",
        "    - 1.0e-05",
        "    - 2.5",
        "    - true",
        "    - null",
        '    - "yes"',
        '  "on": {}',
        '  $ref: "#/x"',
    ]


def test_schema_leaves_health_and_metrics_open() -> None:
    paths = _exporter().app_schema()["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/metrics"):
        operation = paths[path]["get"]
        assert "security" not in operation, path
        assert "401" in operation["responses"], path  # with RECALIB_PROTECT_HEALTH/_METRICS
    for path, item in paths.items():
        if path.startswith(("/v1/", "/v2/models", "/v2/repository")):
            for method, operation in item.items():
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)
                assert "401" in operation["responses"], (method, path)


def test_path_parameters_carry_their_patterns() -> None:
    paths = _exporter().app_schema()["paths"]
    for path, item in paths.items():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    assert "pattern" in parameter["schema"], (path, parameter["name"])
