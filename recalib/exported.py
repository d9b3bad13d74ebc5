"""Recalibrating a :class:`torch.export.ExportedProgram` in place.

An exported program has no BatchNorm *modules*: its graph calls ``aten.batch_norm`` (or
``_native_batch_norm_legit_no_training``) on buffers held in ``program.state_dict``.
:func:`module_with_norm_layers` unlifts the program (``program.module()``, whose buffers
share storage with the program's state dict) and replaces each eval-mode batch-norm call
by a call to an :class:`ExportedBatchNorm` module that holds *the same* buffer tensors.
The recalibration core then treats the program like any model, and writing the new
statistics into those buffers updates the original program in place.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import NoBatchNormError, RecalibError
from .layers import NormLayer

__all__ = ["ExportedBatchNorm", "module_with_norm_layers", "resolve_model"]

_BN_OPS = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten._native_batch_norm_legit_no_training.default: -1,
}


class ExportedBatchNorm(_BatchNorm):
    """A BatchNorm view over an exported program's buffers (any input of 2D or more).

    Args:
        running_mean: the program's running-mean buffer (shared, not copied).
        running_var: the program's running-variance buffer (shared, not copied).
        weight: affine scale or ``None``.
        bias: affine shift or ``None``.
        eps: the ``eps`` of the exported call.
        momentum: the ``momentum`` of the exported call.
    """

    def __init__(
        self,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        momentum: float,
    ) -> None:
        super().__init__(int(running_mean.numel()), eps, momentum, affine=False)
        self.affine = weight is not None
        self.running_mean = running_mean
        self.running_var = running_var
        w = None if weight is None else nn.Parameter(weight, requires_grad=False)
        b = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def _attr(gm: fx.GraphModule, node: Any) -> tuple[str | None, Tensor | None]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        target = str(node.target)
        obj: Any = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return target, obj
    return None, None


def _layer_name(buffer_fqn: str) -> str:
    return buffer_fqn.rsplit(".", 1)[0] if "." in buffer_fqn else buffer_fqn


def module_with_norm_layers(program: torch.export.ExportedProgram) -> nn.Module:
    """Unlift ``program`` into a module whose BN calls go through shared-buffer modules.

    The new modules are registered under the name of the layer the buffers came from
    (``"layer1.0.bn1"`` with dots replaced by ``_`` where needed), so reports and stat
    banks use the original torch names.

    Raises:
        NoBatchNormError: the program has no eval-mode batch-norm call on buffers.
    """
    gm = program.module()
    if not isinstance(gm, fx.GraphModule):
        raise NoBatchNormError(f"expected an unliftable program (got {type(gm).__name__})")
    holder = nn.Module()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _BN_OPS:
            continue
        args = list(node.args)
        x, weight, bias, rm_node, rv_node = args[:5]
        training = args[5] if _BN_OPS[node.target] == 5 else False
        momentum, eps = (args[6], args[7]) if _BN_OPS[node.target] == 5 else (args[5], args[6])
        rm_name, rm = _attr(gm, rm_node)
        _, rv = _attr(gm, rv_node)
        if training or rm is None or rv is None or rm_name is None:
            continue
        _, w = _attr(gm, weight)
        _, b = _attr(gm, bias)
        name = _layer_name(rm_name)
        layer = ExportedBatchNorm(rm, rv, w, b, float(eps), float(momentum))
        slot = name.replace(".", "__")
        holder.add_module(slot, layer)
        gm.add_submodule(f"recalib_bn.{slot}", layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(f"recalib_bn.{slot}", (x,))
        if node.target is torch.ops.aten.batch_norm.default:
            node.replace_all_uses_with(call)
        else:
            for user in list(node.users):
                if user.target is not operator.getitem or user.args[1] != 0:
                    raise NoBatchNormError(
                        f"unsupported use of batch-norm output {node.name}: expected only [0]"
                    )
                user.replace_all_uses_with(call)
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        count += 1
    if count == 0:
        raise NoBatchNormError(
            "expected an ExportedProgram with eval-mode batch_norm calls on buffers "
            "(got none; export the model with model.eval() and BN layers tracking statistics)"
        )
    gm.graph.lint()
    gm.recompile()
    return _Named(gm, holder)


class _Named(nn.Module):
    """Wraps the rewritten graph module; ``layers`` carries the BN modules by torch name."""

    def __init__(self, gm: fx.GraphModule, holder: nn.Module) -> None:
        super().__init__()
        self.program = gm
        self._holder = holder

    def named_norm_layers(self) -> list[tuple[str, ExportedBatchNorm]]:
        return [
            (slot.replace("__", "."), mod)  # type: ignore[misc]
            for slot, mod in self._holder.named_children()
        ]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)


def resolve_model(model: Any) -> tuple[nn.Module, list[NormLayer] | None]:
    """The module to run and, for an ``ExportedProgram``, its norm layers.

    Returns ``(module, layers)``: an ``nn.Module`` is returned as is with ``None`` (find
    its layers with :func:`~recalib.layers.find_norm_layers`); an exported program is
    unlifted by :func:`module_with_norm_layers` (its buffers shared with the program).

    Raises:
        RecalibError: neither an ``nn.Module`` nor an ``ExportedProgram``.
    """
    if isinstance(model, torch.export.ExportedProgram):
        wrapped = module_with_norm_layers(model)
        named = wrapped.named_norm_layers()  # type: ignore[operator]
        return wrapped, [NormLayer(n, m) for n, m in named]
    if not isinstance(model, nn.Module):
        raise RecalibError(
            f"expected an nn.Module or torch.export.ExportedProgram (got {type(model).__name__})"
        )
    return model, None
