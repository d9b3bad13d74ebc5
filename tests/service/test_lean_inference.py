"""The serving process imports no torch: an inference replica registers an ONNX model,
serves it with drift taps and answers REST and gRPC inference without ever importing torch
(about 300 MB of resident memory it would never use)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runtime_helpers import export_versions

_SCRIPT = """
import sys
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

home, model = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings(home=home, role="inference", execution_provider="cpu",
                    intra_op_threads=1, drift_sample_fraction=1.0, grpc_port=0)
with TestClient(create_app(settings)) as client:
    r = client.post("/v1/models", data={"name": "m"},
                    files={"file": ("model.onnx", model.read_bytes())})
    assert r.status_code == 201, r.text
    x = np.zeros((2, 3, 8, 8), np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 3, 8, 8], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    r = client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 200, r.text
    assert client.get("/v1/models/m/drift").status_code == 200
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
print("ok")
"""


def test_an_inference_replica_never_imports_torch(tmp_path: Path) -> None:
    _, path = export_versions(tmp_path)[1]
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "home"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
