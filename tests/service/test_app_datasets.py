"""/v1/datasets over HTTP: uploads in every format, headers-only description, size limits
(declared, streamed and uncompressed), refused files, and deletion."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import pytest
from safetensors.numpy import save

from service.settings import Settings


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _zip(*, compression: int = zipfile.ZIP_STORED, **members: bytes) -> bytes:
    """An ``.npz``-like zip with the given raw ``<name>.npy`` members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data)
    return buf.getvalue()


_IMAGES = _npy(np.ones((10, 3, 4, 4), np.float32))  # 128-byte header + 1920 bytes of data
_NEGATIVE = _npy(np.ones((2, 3), np.float32)).replace(b"(2, 3)", b"(-2, -3)", 1)


def test_upload_npz_describes_and_hashes(api: Any, npz: Callable[..., bytes]) -> None:
    x = np.zeros((10, 3, 8, 8), np.float16)
    y = np.arange(10)
    data = npz(x=x, y=y)
    r = api.upload(data, "cal.npz")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"].startswith("ds-") and info["format"] == "npz"
    assert info["tensors"] == {
        "x": {"shape": [10, 3, 8, 8], "dtype": "float16"},
        "y": {"shape": [10], "dtype": "int64"},
    }
    assert (info["input"], info["samples"]) == ("x", 10)
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert api.client.get(f"/v1/datasets/{info['id']}").json() == info
    assert api.client.get("/v1/datasets").json() == {"datasets": [info]}


def test_upload_compressed_and_fortran_order_arrays(api: Any) -> None:
    buf = io.BytesIO()
    x = np.asfortranarray(np.ones((6, 3, 2, 2), np.float32))
    np.savez_compressed(buf, x=x, y=np.arange(6))
    r = api.upload(buf.getvalue(), "c.npz")
    assert r.status_code == 201, r.text
    assert (r.json()["input"], r.json()["samples"]) == ("x", 6)
    assert api.upload(_npy(x), "f.npy").status_code == 201


@pytest.mark.parametrize(
    ("filename", "encode", "tensors", "name"),
    [
        ("a.npy", _npy, {"x": {"shape": [5, 4], "dtype": "float32"}}, "x"),
        (
            "a.safetensors",
            lambda a: save({"images": a}),
            {"images": {"shape": [5, 4], "dtype": "float32"}},
            "images",
        ),
    ],
)
def test_upload_npy_and_safetensors(
    api: Any, filename: str, encode: Callable[[np.ndarray], bytes], tensors: Any, name: str
) -> None:
    r = api.upload(encode(np.ones((5, 4), np.float32)), filename)
    assert r.status_code == 201, r.text
    assert r.json()["tensors"] == tensors
    assert (r.json()["input"], r.json()["samples"]) == (name, 5)


@pytest.mark.parametrize(
    ("filename", "payload", "message"),
    [
        ("a.npy", _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "pickled"),
        ("a.npz", b"PK\x05\x06" + b"\0" * 18, "at least one array"),
        ("a.npz", b"not a zip file", "could not read"),
        ("a.safetensors", b"\x10\0\0\0\0\0\0\0{garbage}", "could not read"),
        ("a.npy", _npy(np.arange(6).reshape(3, 2)), "floating-point"),
        ("a.npy", _npy(np.array(1.0, np.float32)), "at least 2 dimensions"),
        ("a.pkl", b"\x80\x04K\x01.", "ending in .npz, .npy, .safetensors"),
        ("a.npy", _IMAGES[:-100], "expected 2048 bytes in the .npy"),
        ("a.npy", _IMAGES + b"\0" * 8, "(got 2056 bytes: truncated or inconsistent)"),
        ("a.npy", _NEGATIVE, "expected non-negative dimensions"),
        ("a.npz", _zip(x=_IMAGES[:-4]), "expected 2048 bytes in x.npy"),
        ("a.npz", _zip(x=_IMAGES, y=_NEGATIVE), "non-negative dimensions in y.npy"),
        (
            "a.npz",
            _zip(x=_IMAGES + b"\0", compression=zipfile.ZIP_DEFLATED),
            "(got 2049 bytes",
        ),
        ("a.safetensors", save({"x": np.ones((10, 4), np.float32)})[:-16], "could not read"),
    ],
)
def test_bad_upload_is_400_and_stores_nothing(
    api: Any, filename: str, payload: bytes, message: str
) -> None:
    r = api.upload(payload, filename)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert api.client.get("/v1/datasets").json() == {"datasets": []}
    assert api.files() == []


@pytest.fixture
def small_limit(make_api: Callable[..., Any], settings: Settings) -> Any:
    return make_api(settings.model_copy(update={"max_upload_bytes": 4096}))


def test_oversized_upload_declared_413(small_limit: Any, npz: Callable[..., bytes]) -> None:
    r = small_limit.upload(npz(x=np.zeros((64, 16), np.float32)))
    assert r.status_code == 413 and "at most 4096 bytes" in r.json()["error"]
    assert small_limit.files() == []
    assert small_limit.upload(npz(x=np.zeros((4, 16), np.float32))).status_code == 201


def test_oversized_upload_streamed_413(small_limit: Any, npz: Callable[..., bytes]) -> None:
    """Without Content-Length (chunked), the body is counted as it arrives."""
    payload = npz(x=np.zeros((64, 16), np.float32))
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = small_limit.client.post(
        "/v1/datasets",
        content=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413 and "at most 4096 bytes" in r.json()["error"]
    assert small_limit.client.get("/v1/datasets").json() == {"datasets": []}


def test_oversized_json_body_413(make_api: Callable[..., Any], settings: Settings) -> None:
    app = make_api(settings.model_copy(update={"max_request_bytes": 100}))
    r = app.client.post("/v1/models/m/recalibrations", json={"dataset": "x" * 200})
    assert r.status_code == 413 and "at most 100 bytes" in r.json()["error"]


def test_delete_dataset(api: Any, npz: Callable[..., bytes]) -> None:
    ds = api.upload(npz(x=np.zeros((4, 2), np.float32))).json()["id"]
    assert api.client.delete(f"/v1/datasets/{ds}").status_code == 204
    assert api.client.get(f"/v1/datasets/{ds}").status_code == 404
    assert api.client.delete(f"/v1/datasets/{ds}").status_code == 404
    assert api.files() == []


@pytest.mark.parametrize("bad", ["-x", "a b", "x" * 65, ".npz"])
def test_malformed_dataset_id_400(api: Any, bad: str) -> None:
    r = api.client.get(f"/v1/datasets/{bad}")
    assert r.status_code == 400 and "dataset id" in r.json()["error"]


def test_an_over_long_multipart_file_name_says_so(api: Any) -> None:
    r = api.client.post("/v1/datasets", files={"file": ("x" * 200_000 + ".npz", b"x")})
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert "file name" in message and "bytes" in message, message


def _compressed_npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **cast("dict[str, Any]", arrays))
    return buf.getvalue()


def test_an_npz_of_huge_zeros_is_413_with_the_numbers(
    make_api: Callable[..., Any], settings: Settings
) -> None:
    limit = 1 << 20
    api = make_api(settings.model_copy(update={"max_dataset_uncompressed_bytes": limit}))
    data = _compressed_npz(x=np.zeros((64, 3, 32, 32), np.float32))  # 786 KiB of arrays
    assert len(data) < 10_000
    assert api.upload(data).status_code == 201
    bomb = _compressed_npz(x=np.zeros((256, 3, 32, 32), np.float32))  # 3 MiB of arrays
    assert len(bomb) < 20_000
    before = api.files()
    r = api.upload(bomb)
    assert r.status_code == 413, r.text
    message = r.json()["error"]
    assert str(limit) in message, message
    got = re.search(r"got (\d+) bytes", message)
    assert got is not None and int(got.group(1)) >= 256 * 3 * 32 * 32 * 4, message
    assert api.files() == before  # nothing stored


def test_the_default_limit_refuses_a_4_gib_array() -> None:
    assert Settings().max_dataset_uncompressed_bytes < 4 << 30
    assert Settings().max_dataset_uncompressed_bytes >= Settings().max_upload_bytes
