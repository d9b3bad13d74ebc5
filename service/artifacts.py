"""Artifact ingestion: what an uploaded or produced version's files are, checked.

A version directory holds :data:`ARTIFACT_FILES`: ``model.onnx`` always; ``model.pt2``
and ``stats.safetensors`` when it came from an ExportedProgram; ``report.json``. This
module turns an upload into such a directory (:func:`prepare_upload`: an ``.onnx`` is
loaded, checked and searched for BatchNormalization nodes; a ``.pt2`` is loaded with
``torch.export.load`` only, exported to ONNX with the parity check and its statistics
saved as a stat bank), reads signatures (:func:`onnx_signature`), compares them
(:func:`check_signature`), hashes the files (:func:`hash_artifacts`) and names a version's
weights (:func:`weights_identity`: the weights digest and BN layers that stat banks are
checked against, :mod:`recalib.onnx.bank_files`).

It is the only part of the registry that needs torch and onnx; both are imported inside
the functions that use them, so importing the registry (and the service) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Literal

from .errors import Incompatible, InvalidInput
from .registry_models import ArtifactInfo, Signature, TensorSpec
from .uploads import Upload, copy_upload

__all__ = [
    "ARTIFACT_FILES",
    "MODEL_SUFFIXES",
    "ArtifactFormat",
    "check_signature",
    "hash_artifacts",
    "model_identity",
    "onnx_signature",
    "prepare_upload",
    "read_signature",
    "signature_difference",
    "weights_identity",
]

ArtifactFormat = Literal["onnx", "pt2", "stats", "report"]

ARTIFACT_FILES: dict[str, str] = {
    "onnx": "model.onnx",
    "pt2": "model.pt2",
    "stats": "stats.safetensors",
    "report": "report.json",
}
"""Artifact format -> file name inside a version directory."""

MODEL_SUFFIXES = (".onnx", ".pt2")
"""The suffixes of an uploaded model file."""

_convert_lock = threading.Lock()  # one torch export at a time (global exporter state)


def _dtype_name(elem_type: int) -> str:
    import numpy as np
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


def _spec(value: Any) -> TensorSpec:
    tensor = value.type.tensor_type
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorSpec(name=value.name, dtype=_dtype_name(tensor.elem_type), shape=dims)


def onnx_signature(model: Any) -> Signature:
    """The inputs (initializers excluded) and outputs of an ``onnx.ModelProto``."""
    inits = {i.name for i in model.graph.initializer}
    return Signature(
        inputs=[_spec(v) for v in model.graph.input if v.name not in inits],
        outputs=[_spec(v) for v in model.graph.output],
    )


def read_signature(path: Path) -> Signature:
    """The signature of the ONNX file at ``path`` (its external data is not read)."""
    import onnx

    return onnx_signature(onnx.load(str(path), load_external_data=False))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_artifacts(directory: Path) -> dict[str, ArtifactInfo]:
    """Name, size and sha256 of each of :data:`ARTIFACT_FILES` present in ``directory``.

    Returns:
        Artifact format -> its :class:`ArtifactInfo`.
    """
    return {
        fmt: ArtifactInfo(file=file, bytes=p.stat().st_size, sha256=_sha256(p))
        for fmt, file in ARTIFACT_FILES.items()
        if (p := directory / file).is_file()
    }


def model_identity(model: Any) -> dict[str, Any]:
    """``{"digest": weights digest, "bn_layers": {layer: channels}}`` of an
    ``onnx.ModelProto`` (see :mod:`recalib.onnx.bank_files`)."""
    from recalib.onnx.bank_files import bn_layers, weights_digest

    return {"digest": weights_digest(model), "bn_layers": bn_layers(model)}


def weights_identity(path: Path) -> dict[str, Any]:
    """:func:`model_identity` of the ONNX file at ``path`` (external data loaded)."""
    import onnx

    return model_identity(onnx.load(str(path)))


def _check_onnx(path: Path) -> tuple[Signature, list[str], dict[str, Any]]:
    """Load an uploaded ONNX file, check it, find its BN nodes: (signature, BN layers,
    weights identity)."""
    import onnx
    from google.protobuf.message import DecodeError

    from recalib.onnx.names import read_bn_map

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise InvalidInput(
            f"expected a valid ONNX model (got one that fails to load: {exc})"
        ) from exc
    bn = read_bn_map(model)
    if not bn:
        raise InvalidInput(
            "expected an ONNX model with inference BatchNormalization nodes reading stored "
            "statistics (got none: was BN fused into Conv at export? export with "
            "`recalib export` or torch.onnx.export(..., do_constant_folding=False))"
        )
    return onnx_signature(model), [info.layer for info in bn.values()], model_identity(model)


def _example_inputs(program: Any) -> tuple[Any, ...]:
    """A batch of 2 per user input, shaped and typed from the program's placeholders."""
    import torch

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor):
            raise InvalidInput(
                f"expected an ExportedProgram whose inputs are tensors (got input {name!r} "
                f"of type {type(val).__name__})"
            )
        shape = []
        for axis, d in enumerate(val.shape):
            if isinstance(d, int):
                shape.append(d)
            elif axis == 0:
                shape.append(2)
            else:
                raise InvalidInput(
                    f"expected only the batch axis of input {name!r} to be dynamic (got a "
                    f"dynamic axis {axis}: {d})"
                )
        if val.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(val.dtype))
        else:
            out.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(out)


def _convert_pt2(staging: Path) -> tuple[Signature, list[str], dict[str, Any], dict[str, Any]]:
    """Load ``model.pt2``, export it to ``model.onnx`` (parity-checked), save its stat bank."""
    import onnx
    import torch

    from recalib.onnx.export import export_onnx
    from recalib.statbank import save_stat_bank

    try:
        program = torch.export.load(str(staging / ARTIFACT_FILES["pt2"]))
    # torch.export.load reports a bad archive with many exception types (zip, json,
    # RuntimeError from the C++ reader ...): all mean "not a loadable ExportedProgram".
    except Exception as exc:
        raise InvalidInput(
            f"expected a .pt2 ExportedProgram (torch.export.save) (got one that "
            f"torch.export.load refuses: {exc})"
        ) from exc
    with _convert_lock, torch.no_grad():
        report = export_onnx(program, _example_inputs(program), staging / ARTIFACT_FILES["onnx"])
        save_stat_bank(program, staging / ARTIFACT_FILES["stats"], metadata={"source": "upload"})
    model = onnx.load(str(staging / ARTIFACT_FILES["onnx"]))
    layers = [str(entry["layer"]) for entry in report.bn_map.values()]
    export = report.to_dict() | {"path": ARTIFACT_FILES["onnx"]}
    return onnx_signature(model), layers, export, model_identity(model)


def prepare_upload(
    upload: Upload,
    staging: Path,
    suffix: str,
    max_bytes: int,
    *,
    kind: Literal["registration", "upload"] = "registration",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write and validate the files of an uploaded version in ``staging``.

    Args:
        upload: the uploaded ``.onnx`` or ``.pt2``.
        staging: an empty directory; it receives the version's files and ``report.json``.
        suffix: the upload's suffix (``.onnx`` or ``.pt2``, see
            :func:`service.uploads.upload_suffix`).
        max_bytes: the upload's size limit.
        kind: version 1 of a registration, or a pushed version (``upload``).
        metadata: a pushed version's metadata, kept in its report.

    Returns:
        The version's report (``kind``, ``source_format``, ``bn_layers``, ``export``,
        ``signature``, ``weights``: :func:`model_identity`; ``metadata`` for a push).

    Raises:
        InvalidInput: not a valid ONNX model with BN nodes, or not a loadable .pt2;
        PayloadTooLarge: above ``max_bytes``; RecalibError: export failures.
    """
    fmt = suffix[1:]
    copy_upload(upload.file, staging / ARTIFACT_FILES[fmt], max_bytes=max_bytes)
    export: dict[str, Any] | None = None
    if fmt == "onnx":
        signature, layers, weights = _check_onnx(staging / ARTIFACT_FILES["onnx"])
    else:
        signature, layers, export, weights = _convert_pt2(staging)
    report: dict[str, Any] = {
        "kind": kind,
        "source_format": fmt,
        "bn_layers": layers,
        "export": export,
        "signature": signature.model_dump(),
        "weights": weights,
    }
    if kind == "upload":
        report["metadata"] = metadata or {}
    (staging / ARTIFACT_FILES["report"]).write_text(json.dumps(report, indent=2))
    return report


def _shape_text(shape: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _same_shape(a: list[int | str | None], b: list[int | str | None]) -> bool:
    """Same rank; each axis the same size, or dynamic in both (dimension names may differ)."""
    return len(a) == len(b) and all(
        x == y if isinstance(x, int) or isinstance(y, int) else True
        for x, y in zip(a, b, strict=True)
    )


def signature_difference(expected: Signature, got: Signature) -> str | None:
    """How ``got`` differs from ``expected`` (first difference only), or ``None``.

    Inputs and outputs must have the same names (in any order), dtypes and shapes.
    """
    for what, want, have in (
        ("input", expected.inputs, got.inputs),
        ("output", expected.outputs, got.outputs),
    ):
        new = {spec.name: spec for spec in have}
        for spec in want:
            other = new.pop(spec.name, None)
            if other is None:
                return f"{what} {spec.name!r} is missing"
            if other.dtype != spec.dtype or not _same_shape(spec.shape, other.shape):
                return (
                    f"{what} {spec.name!r} is {other.dtype} {_shape_text(other.shape)}, "
                    f"expected {spec.dtype} {_shape_text(spec.shape)}"
                )
        if new:
            return f"{what} {next(iter(new))!r} is new"
    return None


def check_signature(expected: Signature, got: Signature, *, model: str, version: int) -> None:
    """Refuse a new version of ``model`` whose signature is not that of its ``version``.

    Raises:
        Incompatible: the signatures differ (see :func:`signature_difference`).
    """
    difference = signature_difference(expected, got)
    if difference is not None:
        raise Incompatible(
            f"expected the signature of version {version} of model {model!r} (got one whose "
            f"{difference}): all versions of a model take the same inputs and give the same "
            "outputs; register a new model for another signature"
        )
