"""Turning user calibration data into model calls.

Accepted data: a tensor or NumPy array (the whole dataset, cut into ``batch_size`` chunks
along axis 0), or any iterable of batches (a ``DataLoader``, a list, a generator) whose
items are tensors/arrays (the input), tuples/lists (first element is the input, like
``update_bn``), or dicts (passed as keyword arguments). ``forward(model, batch)`` handles
anything else. ``max_samples`` caps the number of items along the batch axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DataError

__all__ = ["Batch", "ForwardFn", "iterate_batches"]

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class Batch:
    """One prepared batch: its index, item count and the call that runs the model on it."""

    index: int
    items: int
    payload: Any

    def run(self, model: nn.Module, forward: ForwardFn | None) -> Any:
        if forward is not None:
            return forward(model, self.payload)
        if isinstance(self.payload, Mapping):
            return model(**self.payload)
        return model(self.payload)


def _as_tensor(x: Any, device: torch.device | None) -> Any:
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise DataError(f"expected a numeric array (got dtype {x.dtype})")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor) and device is not None:
        x = x.to(device, non_blocking=True)
    return x


def _leading(x: Any) -> int | None:
    if isinstance(x, Tensor | np.ndarray) and x.ndim > 0:
        return int(x.shape[0])
    return None


def _count_items(payload: Any) -> int:
    first = payload
    if isinstance(payload, Mapping):
        first = next(iter(payload.values()), None)
    elif isinstance(payload, tuple | list):
        first = payload[0] if payload else None
    n = _leading(first)
    return 1 if n is None else n


def _truncate(payload: Any, n: int) -> Any:
    if isinstance(payload, Mapping):
        return {k: _truncate(v, n) for k, v in payload.items()}
    if isinstance(payload, tuple | list):
        return type(payload)(_truncate(v, n) for v in payload)
    if isinstance(payload, Tensor | np.ndarray) and payload.ndim > 0:
        return payload[:n]
    return payload


def _prepare(raw: Any, device: torch.device | None, custom_forward: bool) -> Any:
    if custom_forward:
        return raw
    if isinstance(raw, Mapping):
        return {k: _as_tensor(v, device) for k, v in raw.items()}
    if isinstance(raw, tuple | list):
        if not raw:
            raise DataError("expected a non-empty tuple/list batch (got an empty one)")
        return _as_tensor(raw[0], device)
    return _as_tensor(raw, device)


def _check_input(payload: Any, index: int) -> None:
    if isinstance(payload, Tensor):
        if payload.dim() == 0:
            raise DataError(f"expected a batched input tensor at batch {index} (got a scalar)")
        if not (payload.is_floating_point() or payload.is_complex()):
            raise DataError(
                f"expected a floating-point input at batch {index} (got {payload.dtype})"
            )
        if payload.shape[0] == 0:
            raise DataError(f"expected a non-empty batch at batch {index} (got 0 items)")


def _raw_batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, Tensor | np.ndarray):
        if data.ndim == 0:
            raise DataError("expected calibration data with a batch axis (got a scalar)")
        return (data[i : i + batch_size] for i in range(0, int(data.shape[0]), batch_size))
    if isinstance(data, Mapping):
        raise DataError(
            "expected an iterable of batches (got a single dict: wrap it in a list, [batch])"
        )
    if not isinstance(data, Iterable):
        raise DataError(f"expected a tensor, array or iterable of batches (got {type(data)})")
    return data


def iterate_batches(
    data: Any,
    *,
    batch_size: int = 64,
    max_samples: int | None = None,
    device: torch.device | None = None,
    forward: ForwardFn | None = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects from ``data``, stopping after ``max_samples`` items.

    Raises:
        DataError: the data is empty, not iterable, or a batch is not a usable input.
    """
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1 (got {batch_size})")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"expected max_samples >= 1 or None (got {max_samples})")
    seen = 0
    index = -1
    for index, raw in enumerate(_raw_batches(data, batch_size)):
        items = _count_items(raw)
        if max_samples is not None and seen + items > max_samples:
            items = max_samples - seen
            raw = _truncate(raw, items)
        payload = _prepare(raw, device, forward is not None)
        if forward is None:
            _check_input(payload, index)
        yield Batch(index, items, payload)
        seen += items
        if max_samples is not None and seen >= max_samples:
            return
    if index < 0:
        raise DataError("expected calibration data with at least one batch (got none)")
