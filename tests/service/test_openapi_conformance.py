"""The OpenAPI document says what the server does: schemathesis ``--checks all`` over the app.

Schemathesis (its engine, as ``st run --checks all`` drives it: the examples, coverage,
fuzzing and stateful phases, every built-in check) runs in process against the ASGI app
of :func:`service.app.create_app`, over the fake runtime of ``conftest`` (no inference
is needed: no model is registered, so inference and metadata answer 404), three times:

* a token configured and sent: every check, ``ignored_auth`` included (schemathesis
  resends without the token and expects 401);
* a token configured and not sent: every operation the document marks with the
  ``HTTPBearer`` requirement answers 401 and declares it, and every operation it leaves
  open (``/v2``, ``/v2/health/*``, ``/metrics``) answers without the token;
* no token configured (the service is open, as the security scheme's description says):
  every check but the ones about the token (``ignored_auth``, and no generated or
  removed ``Authorization`` header).

Exclusions, and why: ``positive_data_acceptance`` is off for the three uploads
(``POST /v1/models``, ``POST /v1/models/{name}/versions``, ``POST /v1/datasets``).
Their ``file`` part must be a real ONNX (with BatchNormalization) or ``.pt2`` model, or an
``.npz`` / ``.npy`` / ``.safetensors`` data set, under a file name with that extension;
the document can only say "binary", and schemathesis sends random bytes named ``file``,
which the server rightly refuses (400). Every other check runs on them too.

Deterministic (``deterministic``: Hypothesis' ``derandomize``, a fixed seed, one
worker) and bounded (a few examples per operation).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from schemathesis.engine import events, from_schema
from schemathesis.python import asgi

from service.app import create_app
from service.registry import Runtime
from service.settings import Settings

TOKEN = "conformance-token"
SEED = 20240611
UPLOADS = (
    ("POST", "/v1/models"),
    ("POST", "/v1/models/{name}/versions"),
    ("POST", "/v1/datasets"),
)
"""Operations whose bodies schemathesis cannot make valid (see the module docstring)."""

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
)
"""``st run --checks all`` in schemathesis 4.32 (``max_response_time`` is a timing limit,
off without one)."""

PHASES = ("examples", "coverage", "fuzzing", "stateful")

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@dataclass
class Outcome:
    """What one schemathesis run found."""

    failures: list[str] = field(default_factory=list)
    statuses: dict[str, set[int]] = field(default_factory=dict)
    """Operation label (``"GET /v1/models"``) -> the statuses it answered."""
    protected: set[str] = field(default_factory=set)
    """Operations the document gives a security requirement."""
    operations: set[str] = field(default_factory=set)
    checks: set[str] = field(default_factory=set)
    """The checks that ran at least once."""
    elapsed: float = 0.0

    def report(self) -> str:
        return "\n\n".join(sorted(set(self.failures)))


def _project(
    *,
    headers: dict[str, str] | None,
    auth_checks: bool,
    phases: tuple[str, ...],
    max_examples: int,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "seed": SEED,
        "workers": 1,
        "checks": {name: {"enabled": auth_checks or name != "ignored_auth"} for name in CHECKS},
        "generation": {
            "max-examples": max_examples,
            "deterministic": True,
            "database": "none",
            "with-security-parameters": auth_checks,
        },
        "phases": {name: {"enabled": name in phases} for name in PHASES},
        "operations": [
            {
                "include-method": method,
                "include-path": path,
                "checks": {"positive_data_acceptance": {"enabled": False}},
            }
            for method, path in UPLOADS
        ],
    }
    if headers:
        config["headers"] = headers
    return config


def _run(
    settings: Settings,
    runtime: Runtime,
    *,
    send_token: bool,
    phases: tuple[str, ...] = PHASES,
    max_examples: int = 6,
) -> Outcome:
    """Run schemathesis with every check over an app built from ``settings``."""
    auth_checks = settings.api_token is not None
    app = create_app(settings, runtime=runtime, metrics_registry=CollectorRegistry())
    headers = {"Authorization": f"Bearer {TOKEN}"} if send_token else None
    project = _project(
        headers=headers, auth_checks=auth_checks, phases=phases, max_examples=max_examples
    )
    config = schemathesis.Config.from_dict(project)
    outcome = Outcome()
    start = time.monotonic()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
        for path, item in schema.raw_schema["paths"].items():
            for method, operation in item.items():
                if method in _METHODS:
                    label = f"{method.upper()} {path}"
                    outcome.operations.add(label)
                    if operation.get("security"):
                        outcome.protected.add(label)
        for event in from_schema(schema).execute():
            _collect(event, outcome)
    finally:
        asgi.shutdown_lifespans()  # the app's lifespan, started by schemathesis
    outcome.elapsed = time.monotonic() - start
    return outcome


def _collect(event: events.EngineEvent, outcome: Outcome) -> None:
    if isinstance(event, events.ScenarioFinished):
        recorder = event.recorder
        for case_id, node in recorder.cases.items():
            interaction = recorder.interactions.get(case_id)
            if interaction is not None and interaction.response is not None:
                label = node.value.operation.label
                outcome.statuses.setdefault(label, set()).add(interaction.response.status_code)
        for case_id, checks in recorder.checks.items():
            for check in checks:
                outcome.checks.add(check.name)
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                interaction = recorder.interactions.get(case_id)
                answer = ""
                if interaction is not None and interaction.response is not None:
                    response = interaction.response
                    answer = f"\n  -> {response.status_code} {response.content[:300]!r}"
                outcome.failures.append(
                    f"[{event.phase.value}] {failure.operation}: {check.name}: "
                    f"{failure.title}\n  {failure.message[:400]}\n"
                    f"  {check.failure_info.code_sample[:600]}{answer}"
                )
    elif isinstance(event, events.NonFatalError):
        outcome.failures.append(f"error in {event.label}: {event.value!r}")
    elif isinstance(event, events.FatalError):
        outcome.failures.append(f"fatal: {event.exception!r}")
    elif isinstance(event, events.EngineFinished):
        outcome.failures.extend(f"{f.operation}: {f.title}: {f.message}" for f in event.failures)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "home"


def _settings(home: Path, token: str | None) -> Settings:
    # public_docs: schemathesis reads /openapi.json from the app like any client
    secret = None if token is None else SecretStr(token)
    return Settings(home=home, api_token=secret, grpc=False, public_docs=True)


def test_conformance_with_the_token(home: Path, runtime: Runtime) -> None:
    outcome = _run(_settings(home, TOKEN), runtime, send_token=True)
    assert not outcome.failures, outcome.report()
    assert outcome.statuses.keys() == outcome.operations
    assert outcome.protected  # ignored_auth had something to check
    assert {
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
        "missing_required_header",
        "unsupported_method",
        "ignored_auth",
        "use_after_free",
        "ensure_resource_availability",
    } <= outcome.checks


def test_conformance_without_sending_the_configured_token(home: Path, runtime: Runtime) -> None:
    # Every protected request stops at the token gate: a few examples show it.
    outcome = _run(
        _settings(home, TOKEN),
        runtime,
        send_token=False,
        phases=("coverage", "fuzzing"),
        max_examples=2,
    )
    assert not outcome.failures, outcome.report()
    assert outcome.statuses.keys() == outcome.operations
    wrong = {
        label: sorted(statuses)
        for label, statuses in outcome.statuses.items()
        # protected: only 401 without the token; open: never 401
        if (statuses != {401} if label in outcome.protected else 401 in statuses)
    }
    assert not wrong, wrong
    assert outcome.operations - outcome.protected == {
        "GET /v2",
        "GET /v2/health/live",
        "GET /v2/health/ready",
        "GET /metrics",
    }


def test_conformance_without_a_token(home: Path, runtime: Runtime) -> None:
    # The same server as with the token, less the gate: no stateful phase again.
    outcome = _run(
        _settings(home, None),
        runtime,
        send_token=False,
        phases=("coverage", "fuzzing"),
        max_examples=4,
    )
    assert not outcome.failures, outcome.report()
    assert outcome.statuses.keys() == outcome.operations
    assert all(401 not in statuses for statuses in outcome.statuses.values())
