"""The shared model store: promoted versions published as a Triton model repository.

The control replica (``RECALIB_ROLE=all`` with ``RECALIB_MODEL_STORE``) *publishes*, the
only writer; inference replicas (``RECALIB_ROLE=inference`` with the same store) read it,
with no database of their own (:mod:`service.store_replica`). Layout (Triton's, plus
recalib's metadata beside it)::

    <store>/<model>/config.pbtxt          Triton ModelConfig (parses in a real Triton)
    <store>/<model>/recalib.json          {"uid", "name", "production", "versions": {...},
                                           "banks": {...}, "default_bank": ...}
    <store>/<model>/<version>/model.onnx  one immutable directory per published version
    <store>/<model>/banks/<bank>.<sha256[:16]>.safetensors   the model's stat banks

``recalib.json`` is the commit point: a reader acts only on the versions and the
production number it lists, and it is only ever replaced whole (``os.replace``), after
everything it names is in place:

* a model's first publication is built complete (version directory, ``recalib.json``,
  ``config.pbtxt``) in ``<store>/.staging-<random>/`` and renamed to ``<store>/<model>``;
* a later version is copied into ``<store>/<model>/.staging-<random>/`` and renamed to
  ``<store>/<model>/<version>`` (never overwritten: versions are immutable); then
  ``recalib.json`` and ``config.pbtxt`` are replaced, in that order;
* removing a model renames its directory to ``<store>/.trash-<random>`` (readers see it
  go at once), then deletes it;
* with ``keep_versions`` (``RECALIB_STORE_KEEP_VERSIONS``), a publication keeps the
  production version and the ``keep_versions - 1`` most recently promoted others
  (``recalib.json``'s ``promoted``: versions in the order they last became production, so
  the previous production, the version replicas serve until they switch and the natural
  rollback target, goes last; without it, the highest numbers). The rest leave
  ``recalib.json`` at its commit point, and their directories are deleted once
  ``config.pbtxt`` names the new production too (renamed to ``<store>/.trash-<random>``
  first). A publication that fails after its commit point leaves them in place (the next
  one deletes them), so Triton's ``config.pbtxt`` never names a deleted version. The store
  is derived from the control's registry, which keeps every version: promoting a pruned
  version again copies it back in. Lowering the setting takes effect at each model's next
  publication.

*Stat banks* (:mod:`service.banks`) are published beside the versions: ``recalib.json``
lists each bank (``{"sha256", "versions"}``: its file's digest and the versions it is
valid for) and the model's ``default_bank`` (``null``, ``"auto"``, ``"none"`` or a bank
name). A bank's file is named by its name *and* digest, so a bank deleted and stored again
under its name never overwrites a file a committed ``recalib.json`` lists: new files are
copied in (``banks/.staging-<random>``, then ``os.replace``) before the commit point, and
files it no longer lists are deleted after it. An older ``recalib.json`` without these
keys reads as no banks and no default. Triton ignores the ``banks`` directory: its version
policy only looks at numerically named subdirectories (see docs/deployment.md).

``config.pbtxt`` has ``version_policy: specific`` on the production version, so a Triton
serving the same repository answers unversioned requests with the version recalib does.
Nothing but model directories stays in the store's root (Triton takes every directory
there for a model): the ``.staging-*`` / ``.trash-*`` directories exist only while a
publication or removal runs, and :meth:`ModelStore.sweep` (the control replica, at
start-up) removes what a crash left.

On object-store mounts without atomic rename (s3fs, gcsfuse), point the control replica
at a volume synced to the bucket instead; the commit point stays the ``recalib.json``
replace, which such a sync must copy last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from .errors import InvalidInput
from .names import NAME_PATTERN, check_name
from .runtime.bank_refs import RESERVED_BANK_WORDS, BankRef

if TYPE_CHECKING:  # imported where used: they load ONNX Runtime and tritonclient
    from .runtime.sessions import TensorSpec

__all__ = [
    "BANKS_DIR",
    "CONFIG_FILE",
    "METADATA_FILE",
    "ModelStore",
    "StoreMetrics",
    "StoreUnreadable",
    "StoredModel",
    "TritonOptions",
    "bank_key",
    "tensor_specs",
]

log = logging.getLogger(__name__)

METADATA_FILE = "recalib.json"
"""recalib's metadata of one model in the store (the commit point of a publication)."""

CONFIG_FILE = "config.pbtxt"
"""Triton's model configuration, beside the version directories."""

ONNX_FILE = "model.onnx"
"""The file of a version inside ``<store>/<model>/<version>/`` (Triton's default name)."""

BANKS_DIR = "banks"
"""The folder of a model's stat banks, ``<store>/<model>/banks/`` (ignored by Triton)."""

_FORMAT = 1  # the bank keys are optional: older readers ignore them, newer default them
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(NAME_PATTERN)
_STAGING = ".staging-"
_TRASH = ".trash-"
# NumPy dtype names (the registry's signatures) -> Open Inference Protocol datatypes
_NUMPY_TO_V2 = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "object": "BYTES",
}


class StoreUnreadable(Exception):
    """A model's ``recalib.json`` exists but cannot be read, or makes no sense.

    Attributes:
        io_error: reading failed (perhaps for a moment), rather than what was read.
    """

    def __init__(self, message: str, *, io_error: bool) -> None:
        super().__init__(message)
        self.io_error = io_error


@dataclass(frozen=True)
class TritonOptions:
    """What the control replica writes into each ``config.pbtxt`` (its serving settings).

    Attributes:
        max_batch_size, dynamic_batching, max_queue_delay_ms: as the service settings.
        gpu: one instance on the GPU (``True``), on the CPU (``False``), or on a GPU where
            there is one (``None``: Triton's ``KIND_AUTO``, as ``execution_provider=auto``).
    """

    max_batch_size: int = 32
    dynamic_batching: bool = True
    max_queue_delay_ms: float = 2.0
    gpu: bool | None = None


@dataclass(frozen=True)
class StoredModel:
    """One model as the store lists it (its committed ``recalib.json``).

    Attributes:
        name: the model's name.
        uid: the control replica's id of the model: a model deleted and registered again
            under the same name has another one (its version numbers start over).
        production: the version unversioned requests go to.
        versions: published version number -> its metadata (``sha256``, ``bytes``,
            ``created_at``, ``parent_version``).
        directory: ``<store>/<model>``.
        banks: the model's stat banks, by name, their files inside ``directory``.
        default_bank: ``None``, ``"auto"``, ``"none"`` or the name of one of ``banks``.
        promoted: published versions in the order they last became production (the
            production one last; empty in a ``recalib.json`` written before retention).
    """

    name: str
    uid: str
    production: int
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    directory: Path = Path()
    banks: tuple[BankRef, ...] = ()
    default_bank: str | None = None
    promoted: tuple[int, ...] = ()

    def onnx_path(self, version: int) -> Path:
        """Where version ``version``'s ONNX file is."""
        return self.directory / str(version) / ONNX_FILE


def bank_key(banks: Sequence[BankRef]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What identifies a bank set wherever its files are: ``(name, sha256, versions)``
    of each bank, by name (the registry's and the store's copies compare equal)."""
    return tuple(sorted((b.name, b.sha256, tuple(sorted(b.versions))) for b in banks))


def _bank_file(name: str, sha256: str) -> str:
    """A bank's file name in ``banks/``: its name and digest (never reused for other
    contents)."""
    return f"{name}.{sha256[:16]}.safetensors"


def _read_banks(raw: Mapping[str, Any], directory: Path) -> tuple[tuple[BankRef, ...], str | None]:
    """The banks and default bank ``recalib.json`` lists (none in an older one).

    Raises:
        ValueError, TypeError, AttributeError: they make no sense.
    """
    banks = []
    for name, entry in sorted(dict(raw.get("banks") or {}).items()):
        sha = str(entry["sha256"])
        if not _NAME.fullmatch(name) or name.lower() in RESERVED_BANK_WORDS:
            raise ValueError(f"expected a stat bank name (got {name!r})")
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"expected the sha256 of bank {name!r} (got {sha[:80]!r})")
        versions = frozenset(int(v) for v in entry["versions"])
        path = directory / BANKS_DIR / _bank_file(name, sha)
        banks.append(BankRef(name=name, path=path, versions=versions, sha256=sha))
    default = raw.get("default_bank")
    if default is not None and default not in RESERVED_BANK_WORDS | {b.name for b in banks}:
        raise ValueError(f"expected a default bank among the listed banks (got {default!r})")
    return tuple(banks), default


def _copy_synced(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def tensor_specs(specs: Sequence[Mapping[str, Any]]) -> list[TensorSpec]:
    """The registry's signature entries (``{name, dtype, shape}``: NumPy dtype names,
    ``None`` or a name for dynamic axes) as v2 :class:`TensorSpec` (``-1`` for those)."""
    from .runtime.sessions import TensorSpec

    return [
        TensorSpec(
            str(s["name"]),
            _NUMPY_TO_V2.get(str(s["dtype"]), f"UNSUPPORTED:{s['dtype']}"),
            tuple(d if isinstance(d, int) and d >= 0 else -1 for d in s["shape"]),
        )
        for s in specs
    ]


class StoreMetrics:
    """The store's counters, registered in ``registry`` (the one ``/metrics`` exposes).

    * ``recalib_model_store_publish_failures_total{model}``: publications (or removals)
      the control replica could not write; it retries them.
    * ``recalib_model_store_load_failures_total{model}``: versions an inference replica
      found in the store but could not load; the previous version keeps serving.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.publish_failures = Counter(
            "recalib_model_store_publish_failures_total",
            "Model store publications or removals that failed (retried)",
            ["model"],
            registry=registry,
        )
        self.load_failures = Counter(
            "recalib_model_store_load_failures_total",
            "Versions found in the model store that failed to load on this replica",
            ["model"],
            registry=registry,
        )

    def publish_failed(self, model: str) -> None:
        self.publish_failures.labels(model=model).inc()

    def load_failed(self, model: str) -> None:
        self.load_failures.labels(model=model).inc()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a temporary file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_onnx(source: Path, directory: Path) -> None:
    directory.mkdir(parents=True)
    target = directory / ONNX_FILE
    shutil.copyfile(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


class ModelStore:
    """A model repository directory: the control replica writes, inference replicas read.

    Args:
        root: the store's directory (created on first publication).
        triton: what ``config.pbtxt`` says about batching and placement.
        keep_versions: versions a model keeps in the store, the production one included
            (0: every version ever published; see the module).
    """

    def __init__(
        self, root: Path, *, triton: TritonOptions | None = None, keep_versions: int = 0
    ) -> None:
        if keep_versions < 0:
            raise ValueError(f"expected keep_versions >= 0 (got {keep_versions})")
        self.root = Path(root)
        self.triton = triton if triton is not None else TritonOptions()
        self.keep_versions = keep_versions

    def _model_dir(self, name: str) -> Path:
        check_name(name, "model name")  # never a path component like "..", never "."-led
        return self.root / name

    # -- reading -------------------------------------------------------------------------

    def read(self, name: str) -> StoredModel | None:
        """The store's entry of ``name``: ``None`` when it has none (no committed
        ``recalib.json``).

        Raises:
            InvalidInput: a malformed model name.
            StoreUnreadable: ``recalib.json`` exists but cannot be read or makes no sense
                (a reader keeps what it had; the writer replaces it).
        """
        directory = self._model_dir(name)
        try:
            raw = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnreadable(
                f"cannot read {name}/{METADATA_FILE}: {exc}", io_error=True
            ) from exc
        except ValueError as exc:
            raise StoreUnreadable(
                f"malformed {name}/{METADATA_FILE}: {exc}", io_error=False
            ) from exc
        try:
            versions = {int(k): dict(v) for k, v in raw["versions"].items()}
            banks, default = _read_banks(raw, directory)
            promoted = tuple(int(v) for v in raw.get("promoted", ()) if int(v) in versions)
            model = StoredModel(
                str(raw["name"]),
                str(raw["uid"]),
                int(raw["production"]),
                versions,
                directory,
                banks=banks,
                default_bank=default,
                promoted=promoted,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreUnreadable(
                f"malformed {name}/{METADATA_FILE}: {exc!r}", io_error=False
            ) from exc
        if model.name != name or model.production not in versions:
            raise StoreUnreadable(
                f"inconsistent {name}/{METADATA_FILE}: name {model.name!r}, production "
                f"{model.production} not among versions {sorted(versions)}",
                io_error=False,
            )
        return model

    def scan(self) -> tuple[dict[str, StoredModel], dict[str, str]]:
        """Every committed model in the store, and the models whose ``recalib.json``
        could not be read (name -> why).

        Raises:
            OSError: the store's directory cannot be listed (it is absent: no models).
        """
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return {}, {}
        found: dict[str, StoredModel] = {}
        unreadable: dict[str, str] = {}
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                model = self.read(entry.name)
            except StoreUnreadable as exc:
                unreadable[entry.name] = str(exc)
                continue
            except InvalidInput:  # not a model name, so not ours
                continue
            if model is not None:
                found[model.name] = model
        return found, unreadable

    def models(self) -> dict[str, StoredModel]:
        """Every committed (and readable) model in the store, by name."""
        return self.scan()[0]

    # -- writing (the control replica only) -----------------------------------------------

    def publish(
        self,
        name: str,
        version: int,
        onnx_path: Path,
        *,
        uid: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        metadata: Mapping[str, Any] | None = None,
        banks: Sequence[BankRef] = (),
        default_bank: str | None = None,
    ) -> StoredModel:
        """Make ``version`` the model's production version and ``banks`` its stat banks in
        the store, copying its ``model.onnx`` and the bank files it lacks in first; then
        delete the bank files no longer listed.

        A store entry of another model of that name (another ``uid``: the name was
        deleted and registered again) is removed first.

        Args:
            name: the model.
            version: the version to serve; ``onnx_path`` is its registry artifact.
            uid: the registry's id of the model.
            inputs, outputs: the signature (for ``config.pbtxt``).
            metadata: what ``recalib.json`` records about the version.
            banks: the model's whole bank set (``path``: the registry's file).
            default_bank: its default bank (``None``, ``"auto"``, ``"none"``, a bank name).

        Returns:
            The model's entry as readers now see it.
        """
        directory = self._model_dir(name)
        try:
            current = self.read(name)
        except StoreUnreadable as exc:
            if exc.io_error:
                raise  # perhaps for a moment: fail (and retry) rather than replace the model
            log.warning("model store: replacing %s (%s)", name, exc)
            current = None
        if current is None and directory.exists():
            # no commit point: a leftover (or a foreign directory) with that name
            self.remove(name)
        elif current is not None and current.uid != uid:
            log.info("model store: %s is a new model under an old name; replacing it", name)
            self.remove(name)
            current = None
        versions = dict(current.versions) if current is not None else {}
        versions[version] = dict(metadata or {})
        earlier = current.promoted if current is not None else ()
        dropped = _beyond(versions, version, self.keep_versions, earlier)
        for old in dropped:
            del versions[old]
        promoted = [v for v in earlier if v != version and v in versions] + [version]
        document = {
            "format": _FORMAT,
            "name": name,
            "uid": uid,
            "production": version,
            "versions": {str(v): versions[v] for v in sorted(versions)},
            "banks": {
                b.name: {"sha256": b.sha256, "versions": sorted(b.versions)}
                for b in sorted(banks, key=lambda b: b.name)
            },
            "default_bank": default_bank,
            "promoted": promoted,
        }
        metadata_text = json.dumps(document, indent=1, sort_keys=True)
        from .triton_config import config_text, model_config

        config = model_config(
            name,
            inputs,
            outputs,
            max_batch_size=self.triton.max_batch_size,
            dynamic_batching=self.triton.dynamic_batching,
            max_queue_delay_ms=self.triton.max_queue_delay_ms,
            gpu=bool(self.triton.gpu),
            versions=[version],
        )
        if self.triton.gpu is None:
            from tritonclient.grpc import model_config_pb2

            for group in config.instance_group:
                group.kind = model_config_pb2.ModelInstanceGroup.KIND_AUTO
        pbtxt = config_text(config)
        if current is None:
            self._create(directory, version, onnx_path, metadata_text, pbtxt, banks)
        else:
            self._add(directory, current, version, onnx_path)
            _add_banks(directory, current, banks)
            _write_atomic(directory / METADATA_FILE, metadata_text)  # the commit point
            _write_atomic(directory / CONFIG_FILE, pbtxt)
            _prune_banks(directory, {_bank_file(b.name, b.sha256) for b in banks})
            self._prune_versions(directory, set(versions))
        stored = tuple(
            BankRef(
                b.name, directory / BANKS_DIR / _bank_file(b.name, b.sha256), b.versions, b.sha256
            )
            for b in sorted(banks, key=lambda b: b.name)
        )
        return StoredModel(
            name, uid, version, versions, directory, stored, default_bank, tuple(promoted)
        )

    def _create(
        self,
        directory: Path,
        version: int,
        onnx_path: Path,
        metadata_text: str,
        pbtxt: str,
        banks: Sequence[BankRef],
    ) -> None:
        """A model's first publication: built complete aside, then renamed in."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{_STAGING}{uuid.uuid4().hex}"
        try:
            _copy_onnx(onnx_path, staging / str(version))
            if banks:
                (staging / BANKS_DIR).mkdir()
            for bank in banks:
                _copy_synced(bank.path, staging / BANKS_DIR / _bank_file(bank.name, bank.sha256))
            _write_atomic_new(staging / CONFIG_FILE, pbtxt)
            _write_atomic_new(staging / METADATA_FILE, metadata_text)
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(self.root)

    def _add(self, directory: Path, current: StoredModel, version: int, onnx_path: Path) -> None:
        """Copy ``version`` into an existing model directory (not committed yet)."""
        target = directory / str(version)
        if version in current.versions and (target / ONNX_FILE).is_file():
            return  # published before (a rollback): versions are immutable
        if target.exists():
            # left by a publication that crashed before its commit point: not trusted
            self._discard(target)
        staging = directory / f"{_STAGING}{uuid.uuid4().hex}"
        try:
            _copy_onnx(onnx_path, staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(directory)

    def _prune_versions(self, directory: Path, keep: set[int]) -> None:
        """Delete the version directories of ``directory`` not in ``keep`` (after the
        commit point no longer lists them)."""
        for entry in _listing(directory):
            if _VERSION_DIR.fullmatch(entry.name) and int(entry.name) not in keep:
                log.info("model store: removing version %s (past keep_versions)", entry)
                self._discard(entry)

    def _discard(self, path: Path) -> None:
        if path.is_symlink():  # rmtree refuses links: the link would stay in the root
            path.unlink()
            return
        trash = self.root / f"{_TRASH}{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, name: str) -> bool:
        """Take ``name`` out of the store (readers stop seeing it at once).

        Returns:
            Whether there was anything to remove.
        """
        directory = self._model_dir(name)
        if not directory.exists():
            return False
        self._discard(directory)
        _fsync_dir(self.root)
        return True

    def sweep(self) -> None:
        """Remove what an interrupted publication or removal left (the writer, at start-up:
        never while it publishes)."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith((_STAGING, _TRASH)):
                log.warning("model store: removing leftover %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not entry.name.startswith("."):
                for inner in [*entry.iterdir(), *_listing(entry / BANKS_DIR)]:
                    if inner.name.startswith((_STAGING, f".{METADATA_FILE}.", f".{CONFIG_FILE}.")):
                        log.warning("model store: removing leftover %s", inner)
                        if inner.is_dir():
                            shutil.rmtree(inner, ignore_errors=True)
                        else:
                            inner.unlink(missing_ok=True)
                self._sweep_banks(entry.name)

    def _sweep_banks(self, name: str) -> None:
        """Delete the bank files of ``name`` its ``recalib.json`` does not list (copied in
        by a publication that crashed before its commit point, or after it, before the
        old files were deleted). Version directories are left to the next publication:
        a crash between the commit point and ``config.pbtxt`` leaves Triton's config
        naming one that ``recalib.json`` no longer lists."""
        try:
            model = self.read(name)
        except (StoreUnreadable, InvalidInput):
            return  # not ours to judge: the next publication replaces it
        if model is not None:
            _prune_banks(model.directory, {b.path.name for b in model.banks})


_VERSION_DIR = re.compile(r"[1-9][0-9]*", re.ASCII)
"""A version directory's name, as Triton reads one (anything else is left alone)."""


def _beyond(
    versions: Mapping[int, Any], production: int, keep: int, promoted: Sequence[int]
) -> list[int]:
    """The versions a store keeping ``keep`` (0: all) drops: all but ``production`` and
    the ``keep - 1`` most recently promoted others (``promoted``: oldest first; versions
    it does not list rank below it, the higher number first)."""
    if keep == 0:
        return []
    rank = {v: i for i, v in enumerate(promoted)}
    others = sorted(
        (v for v in versions if v != production), key=lambda v: (rank.get(v, -1), v), reverse=True
    )
    return others[keep - 1 :]


def _listing(folder: Path) -> list[Path]:
    """The entries of ``folder`` (none if it does not exist)."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _add_banks(directory: Path, current: StoredModel, banks: Sequence[BankRef]) -> None:
    """Copy the bank files ``current`` does not list into ``directory/banks`` (not
    committed yet: readers only open the files ``recalib.json`` lists)."""
    folder = directory / BANKS_DIR
    listed = {b.path.name for b in current.banks}
    copied = False
    for bank in banks:
        target = folder / _bank_file(bank.name, bank.sha256)
        if target.name in listed and target.is_file():
            continue  # published before: same name and digest, same file
        folder.mkdir(exist_ok=True)
        staging = folder / f"{_STAGING}{uuid.uuid4().hex}"
        try:
            _copy_synced(bank.path, staging)
            os.replace(staging, target)  # over an unlisted leftover: nobody reads it
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        copied = True
    if copied:
        _fsync_dir(folder)


def _prune_banks(directory: Path, keep: set[str]) -> None:
    """Delete the bank files of ``directory/banks`` not in ``keep`` (after the commit
    point no longer lists them), and the folder once it is empty."""
    folder = directory / BANKS_DIR
    for entry in _listing(folder):
        if entry.name not in keep and not entry.name.startswith(_STAGING) and entry.is_file():
            log.info("model store: removing bank file %s (no longer listed)", entry)
            entry.unlink(missing_ok=True)
    if not keep:
        try:
            folder.rmdir()
        except OSError:
            pass  # absent, or a staging file of a crashed publication (the sweep's)


def _write_atomic_new(path: Path, text: str) -> None:
    """Write a file of a directory nobody reads yet (flushed to disk before the rename)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
