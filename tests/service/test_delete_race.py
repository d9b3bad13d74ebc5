"""A deleted model stays deleted while alias moves and inference race it.

Each round registers ``m`` (versions 1 and 2) on the real serving runtime, then threads mix
``PUT /v1/models/m/aliases/production``, unversioned and versioned inference and one
``DELETE /v1/models/m``. Once the DELETE has answered, every later request for ``m`` is 404;
nothing ever answers 5xx or shows a filesystem path. The last tests put the DELETE at the
worst moment on purpose: after an alias move or a version load has resolved the model's file.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import source_images
from service_helpers import Api, real_api

from service.api.v2_codec import HEADER_LENGTH, encode_request
from service.settings import Settings

ROUNDS = 30
INFERERS = 10
ALIAS_MOVERS = 5
AFTER_DELETE = 4
"""Requests each thread sends once the DELETE has answered."""

_INFER_URLS = (
    "/v2/models/m/infer",
    "/v2/models/m/infer",
    "/v2/models/m/versions/1/infer",
    "/v2/models/m/versions/2/infer",
    "/v2/models/m/versions/production/infer",
)


@dataclass(frozen=True)
class _Answer:
    what: str
    after_delete: bool
    status: int
    text: str


def _body() -> tuple[bytes, dict[str, str]]:
    body, header = encode_request({"input": source_images(1, 0)})
    return body, {} if header is None else {HEADER_LENGTH: str(header)}


def _round(api: Api, bn_onnx: bytes, seed: int) -> list[_Answer]:
    assert api.register("m", bn_onnx).status_code == 201
    added = api.client.post("/v1/models/m/versions", files={"file": ("m.onnx", bn_onnx)})
    assert added.status_code == 201, added.text
    body, headers = _body()
    deleted = threading.Event()
    served = threading.Semaphore(0)  # one release per successful inference
    answers: list[_Answer] = []
    lock = threading.Lock()
    start = threading.Barrier(INFERERS + ALIAS_MOVERS + 1)

    def record(what: str, after: bool, response: object) -> None:
        status = getattr(response, "status_code", 0)
        with lock:
            answers.append(_Answer(what, after, status, getattr(response, "text", "")))

    def infer(rng: random.Random) -> None:
        start.wait()
        left = AFTER_DELETE
        while left > 0:
            after = deleted.is_set()
            url = rng.choice(_INFER_URLS)
            response = api.client.post(url, content=body, headers=headers)
            record(url, after, response)
            if response.status_code == 200:
                served.release()
            left -= after

    def move_alias(rng: random.Random) -> None:
        start.wait()
        left = AFTER_DELETE
        while left > 0:
            after = deleted.is_set()
            version = rng.choice((1, 2))
            response = api.client.put("/v1/models/m/aliases/production", json={"version": version})
            record(f"PUT production -> {version}", after, response)
            left -= after

    def delete(rng: random.Random) -> None:
        start.wait()
        for _ in range(rng.randint(2, 12)):  # delete while inference is under way
            served.acquire(timeout=5.0)
        response = api.client.delete("/v1/models/m")
        record("DELETE", False, response)
        deleted.set()

    rng = random.Random(seed)
    roles = [infer] * INFERERS + [move_alias] * ALIAS_MOVERS + [delete]
    threads = [
        threading.Thread(target=role, args=(random.Random(rng.random()),), daemon=True)
        for role in roles
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30.0)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    return answers


def test_a_deleted_model_never_answers_again(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    api = make_api(
        settings.model_copy(
            update={
                "execution_provider": "cpu",
                "intra_op_threads": 1,
                "warmup_batch_sizes": [1],
                "drift_sample_fraction": 0.0,
            }
        ),
        runtime=None,  # the real serving runtime
    )
    home = str(api.home)
    began = time.monotonic()
    problems: list[str] = []
    served = 0
    body, headers = _body()
    for seed in range(ROUNDS):
        answers = _round(api, bn_onnx, seed)
        assert [a.status for a in answers if a.what == "DELETE"] == [204]
        for a in answers:
            if a.status >= 500 or a.status == 0:
                problems.append(f"round {seed}: {a.what} answered {a.status}: {a.text[:200]}")
            if home in a.text or "No such file" in a.text:
                problems.append(f"round {seed}: {a.what} showed a path: {a.text[:200]}")
            if a.after_delete and a.status != 404:
                problems.append(
                    f"round {seed}: {a.what} after the DELETE answered {a.status}: {a.text[:200]}"
                )
        assert api.client.get("/v1/models/m").status_code == 404
        for url in _INFER_URLS:
            late = api.client.post(url, content=body, headers=headers)
            if late.status_code != 404:
                problems.append(f"round {seed}: {url} once all was done: {late.status_code}")
        served += sum(a.status == 200 and a.what.endswith("infer") for a in answers)
    elapsed = time.monotonic() - began
    bad = sorted({p.split(":")[0] for p in problems}, key=lambda r: int(r.split()[1]))
    assert not problems, f"{len(bad)} of {ROUNDS} rounds went wrong:\n" + "\n".join(problems[:20])
    assert served > ROUNDS, f"expected inference to answer before the deletes (got {served})"
    assert elapsed < 60.0, f"{ROUNDS} rounds took {elapsed:.1f} s"


def test_alias_move_racing_a_delete_is_404_without_a_path(
    make_api: Callable[..., Api],
    settings: Settings,
    bn_onnx: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = real_api(make_api, settings, bn_onnx)
    registry = api.app.state.registry
    model_id = registry._model_row("m")["id"]
    artifact = registry.artifact

    def deleted_after_resolving(name: str, ref: Any, fmt: str) -> Path:
        path = artifact(name, ref, fmt)
        registry._remove_model(model_id)  # what a concurrent DELETE does under the lock
        return Path(path)

    monkeypatch.setattr(registry, "artifact", deleted_after_resolving)
    r = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert r.status_code in (404, 409), r.text
    assert set(r.json()) == {"error"}
    assert str(api.home) not in r.text and model_id not in r.text
    assert "No such file" not in r.text


# metadata, not the versioned ready probe: that one answers without loading the version
@pytest.mark.parametrize("route", ["infer", "metadata"])
def test_version_load_racing_a_delete_is_404_without_a_path(
    make_api: Callable[..., Api],
    settings: Settings,
    bn_onnx: bytes,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
) -> None:
    api = real_api(make_api, settings, bn_onnx)
    registry = api.app.state.registry
    model_id = registry._model_row("m")["id"]
    resolve = registry.resolve

    def deleted_after_resolving(name: str, ref: str | None) -> tuple[int, Path]:
        version, path = resolve(name, ref)
        Path(path).unlink()  # the model's files go first
        return version, path

    monkeypatch.setattr(registry, "resolve", deleted_after_resolving)
    if route == "infer":
        r = api.client.post("/v2/models/m/versions/2/infer", json={"inputs": []})
    else:
        r = api.client.get("/v2/models/m/versions/2")
    assert r.status_code in (404, 409), r.text
    assert set(r.json()) == {"error"}
    assert str(api.home) not in r.text and model_id not in r.text
    assert "No such file" not in r.text


def test_an_unloaded_model_is_loaded_back_for_requests_racing_the_unload(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    """The repository extension's unload is not a delete: inference racing it (versioned
    or not) is served, never told the model was deleted (404). Before, a load overtaken by
    an unload answered 404 "was deleted or unloaded" for a model still registered. Under
    this storm (an unload every 20 ms) a request whose loads are overtaken three times in a
    row answers 503 "retry", which a client may retry; never 404."""
    api = real_api(make_api, settings, bn_onnx)
    added = api.client.post("/v1/models/m/versions", files={"file": ("m.onnx", bn_onnx)})
    assert added.status_code == 201, added.text
    body, headers = _body()
    stop = threading.Event()
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def infer(url: str) -> None:
        while not stop.is_set():
            response = api.client.post(url, content=body, headers=headers)
            with lock:
                statuses.append(response.status_code)
                retry = response.status_code == 503 and "retry" in response.text
                if response.status_code != 200 and not retry:
                    failures.append(f"{url}: {response.text}")

    urls = ["/v2/models/m/infer", "/v2/models/m/versions/2/infer"] * 2
    threads = [threading.Thread(target=infer, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 8.0
        for i in range(40):
            if time.monotonic() > deadline:
                break
            assert api.client.post("/v2/repository/models/m/unload").status_code == 200
            if i % 2:
                assert api.client.post("/v2/repository/models/m/load").status_code == 200
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    assert statuses.count(200) > len(statuses) // 2, statuses.count(200)
