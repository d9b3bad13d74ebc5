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
