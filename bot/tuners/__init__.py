"""The tuners merge-bot folds in itself: one module each, collected in ``registry``.

Each tuner module declares a ``Tuner`` (``base.py``): which saved adapter tensor plays which
part, the config fields it reads, how a module's op is built, and the pure functions that
apply that op to a float32 or float64 weight (and, where the tuner touches it, the bias). The
functions here dispatch on ``op.tuner``; the adapter's tensors are upcast to the weight's
dtype, exactly. Anything PEFT can merge that is not registered goes through ``bot.fallback``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from bot.tuners.base import ModuleOp, NeedsPeft, OpRequest, RoleReader, Tuner
from bot.tuners.registry import adapter_key_roles, find_tuner, get_tuner, is_streamed, register, tuners, unregister

__all__ = [
    "ModuleOp", "NeedsPeft", "OpRequest", "RoleReader", "Tuner", "adapter_key_roles", "apply_op", "apply_op_tensors",
    "find_tuner", "get_tuner", "is_streamed", "register", "row_slice_tensors", "tuners", "unregister", "weight_delta",
]


def apply_op(
    tensor: torch.Tensor, op: ModuleOp, adapter: Mapping[str, torch.Tensor], *, is_bias: bool = False
) -> torch.Tensor:
    """Apply one module op to a float32 or float64 weight or bias, reading its tensors from the saved adapter."""
    return apply_op_tensors(tensor, op, {role: adapter[key] for role, key in op.tensors.items()}, is_bias=is_bias)


def _role_reader(tensors: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> RoleReader:
    def t(role: str) -> torch.Tensor:
        return tensors[role].to(device=device, dtype=dtype)  # a no-op when already there

    return t


def apply_op_tensors(
    tensor: torch.Tensor, op: ModuleOp, tensors: Mapping[str, torch.Tensor], *, is_bias: bool = False
) -> torch.Tensor:
    """Apply one module op given its tensors by role; they are upcast to the tensor's dtype on its device."""
    tuner = get_tuner(op.tuner)
    func = tuner.bias if is_bias else tuner.weight
    if func is None:
        raise KeyError(f"{op.tuner} has no bias function, yet {op.module}'s op touches the bias")
    return func(tensor, op, _role_reader(tensors, tensor.device, tensor.dtype))


def weight_delta(op: ModuleOp, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device,
                 scratch: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The ΔW (in ``dtype``: float32 or float64) of an op that merges as W' = W + ΔW, shaped ``shape``;
    None for any other op.

    ``scratch`` (``dtype``, ``shape``) may be used to hold the result, so a caller merging
    block after block reuses one buffer; then ``ΔW.add_(W)`` and one rounding give the same
    bits as ``W.to(dtype) + ΔW`` (in float32, PEFT's in-place ``weight.data += delta``).
    """
    delta = get_tuner(op.tuner).delta
    if delta is None:
        return None
    return delta(shape, op, _role_reader(tensors, device, dtype), scratch)


def row_slice_tensors(op: ModuleOp, adapter: Mapping[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor] | None:
    """The adapter tensors that produce rows ``rows`` of this op's weight, or None if rows are not independent.

    Lets the streaming layer merge a big weight a block of rows at a time, in cache, with
    the same arithmetic per element as the whole-tensor functions above (pass the
    result to ``apply_op_tensors``).
    """
    row_slice = get_tuner(op.tuner).row_slice
    if row_slice is None:
        return None
    return row_slice(op, {role: adapter[key] for role, key in op.tensors.items()}, rows)
