"""Reading calibration data from files: ``.npz``, ``.npy`` and ``.safetensors``.

Nothing is unpickled: ``.npz``/``.npy`` are opened with ``allow_pickle=False`` (``.npy``
memory-mapped, so large files are not read whole). A file may hold several arrays; the
model input is the one named by ``key``, else the only array, else the first of the
conventional names ``x``, ``input``, ``inputs``, ``data``, ``images``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["SUFFIXES", "load_arrays", "load_input_array", "pick_input"]

SUFFIXES = (".npz", ".npy", ".safetensors")
_CONVENTIONAL = ("x", "input", "inputs", "data", "images")
_NPY_MAGIC = b"\x93NUMPY"


def _check_format(p: Path, suffix: str) -> None:
    """Refuse a file that is not what its suffix says, before NumPy guesses (NumPy reports
    any unknown bytes as "pickled (object) data" and an empty file as EOFError)."""
    if suffix == ".npz" and not zipfile.is_zipfile(p):
        size = p.stat().st_size
        raise DataError(
            f"expected a .npz file (a zip archive of .npy arrays, np.savez) (got {p.name!r}, "
            f"{'an empty file' if size == 0 else f'{size} bytes that are not a zip archive'})"
        )
    if suffix == ".npy":
        with p.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            what = "an empty file" if not head else "no .npy header"
            raise DataError(
                f"expected a .npy file (np.save, starting with the NumPy magic bytes) "
                f"(got {p.name!r}, {what})"
            )


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays in ``path``, by name (``.npy`` files hold one array named ``"x"``)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise DataError(f"expected a data file (got {str(p)!r}, which does not exist)")
    if suffix not in SUFFIXES:
        raise DataError(f"expected a data file ending in {', '.join(SUFFIXES)} (got {p.name!r})")
    _check_format(p, suffix)
    try:
        if suffix == ".npy":
            return {"x": np.load(p, mmap_mode="r", allow_pickle=False)}
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            other = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
            if other:
                raise DataError(
                    f"expected a .npz file of .npy arrays (np.savez) (got {p.name!r} with "
                    f"members that are not .npy arrays: {other})"
                )
            return arrays
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(p)))
    except DataError:
        raise
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"could not read {p.name} as {suffix} data: {exc}") from exc
    except Exception as exc:  # safetensors.SafetensorError (a plain Exception)
        if type(exc).__name__ != "SafetensorError":
            raise
        raise DataError(f"could not read {p.name} as .safetensors data: {exc}") from exc
    raise AssertionError(suffix)  # unreachable: the suffix was checked above


def pick_input(arrays: dict[str, np.ndarray], key: str | None = None) -> np.ndarray:
    """The model input among ``arrays`` (see the module docstring)."""
    if not arrays:
        raise DataError("expected at least one array in the data file (got none)")
    if key is not None:
        if key not in arrays:
            raise DataError(f"expected an array named {key!r} (got {sorted(arrays)})")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for name in _CONVENTIONAL:
        if name in arrays:
            return arrays[name]
    raise DataError(
        f"expected one array or one named {', '.join(_CONVENTIONAL)}; pass a key (got "
        f"{sorted(arrays)})"
    )


def load_input_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """The model-input array of a data file, checked to be floating point and batched."""
    x = pick_input(load_arrays(path), key)
    if x.ndim < 2:
        raise DataError(f"expected an array of shape (N, C, ...) (got shape {x.shape})")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"expected floating-point data (got dtype {x.dtype})")
    if x.shape[0] == 0:
        raise DataError("expected at least one sample (got 0)")
    return x
