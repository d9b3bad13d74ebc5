"""Putting a model in eval mode for a while, restoring every module's own flag afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, via_attribute: bool = True) -> Iterator[None]:
    """Eval mode inside the block; each module's ``training`` flag is restored exactly.

    Args:
        model: the module tree.
        via_attribute: set ``training = False`` on every module directly rather than calling
            ``model.eval()``: ``ExportedProgram.module()`` refuses ``.train()``/``.eval()``.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        if via_attribute:
            for m, _ in flags:
                m.training = False
        else:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag
