"""Packages that import their submodules on first use (what ``recalib`` and
``recalib.onnx`` are): the torch-free parts - ``recalib.drift``, ``recalib.errors``,
``recalib.onnx.taps`` - load without torch, which is what the serving process imports."""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["LazyPackage"]


class LazyPackage(types.ModuleType):
    """A package whose public names (its ``_LAZY`` map: name -> submodule) are imported on
    first access. Install with ``sys.modules[__name__].__class__ = LazyPackage``.

    A public name that is also a submodule (``recalib.recalibrate``, ``recalib.adapt``)
    stays the function: the import system sets the package attribute to the submodule
    when that is first imported, which must not hide it (the submodule stays in
    ``sys.modules``).
    """

    def __getattr__(self, name: str) -> Any:
        module = self.__dict__.get("_LAZY", {}).get(name)
        if module is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, self.__name__), name)
        self.__dict__[name] = value
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("__all__", ())))

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{self.__name__}.{name}"
            and name in self.__dict__.get("_LAZY", {})
        ):
            return
        super().__setattr__(name, value)
