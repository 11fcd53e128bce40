"""(IA)^3 merge math (Liu et al. 2022): a learned vector rescales the weight.

Follows PEFT's ``ia3.Linear.merge``: the vector is (out, 1) for attention-style
modules (rescaling outputs, so the bias too) and (1, in) for feed-forward modules
(rescaling inputs, so not the bias).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bot.tuners.base import ModuleOp, OpRequest, RoleReader, Tuner


def ia3_scale_weight(weight: torch.Tensor, ia3_l: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    return weight * (ia3_l.T if transpose else ia3_l)


def ia3_scale_bias(bias: torch.Tensor, ia3_l: torch.Tensor) -> torch.Tensor:
    return bias * ia3_l.reshape(bias.shape)


# --- The IA3 tuner as merge-bot sees it (bot.tuners.base.Tuner) ----------------------------------

def _weight(weight: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return ia3_scale_weight(weight, t("ia3_l"), transpose=op.transpose)


def _bias(bias: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return ia3_scale_bias(bias, t("ia3_l"))


def _row_slice(op: ModuleOp, tensors: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor] | None:
    """Each row is scaled by its own factor (out, 1), or every row alike (1, in); a transposed weight is not split."""
    if op.transpose:
        return None
    if tensors["ia3_l"].shape[1] == 1 and tensors["ia3_l"].shape[0] > 1:  # (out, 1): one factor per row
        tensors["ia3_l"] = tensors["ia3_l"][rows]
    return tensors  # (1, in), or a (1, 1) scalar: the same for every row


def _build_op(req: OpRequest) -> ModuleOp:
    """Feed-forward (1, in) or attention-style (out, 1) is told by the vector's shape, as PEFT stores it."""
    req.need("ia3_l")
    vec, weight_shape = req.shape("ia3_l"), req.weight_shape
    oriented = (weight_shape[1], weight_shape[0]) if req.transpose else weight_shape
    feedforward = vec == (1, oriented[1]) and vec != (oriented[0], 1)
    if vec not in ((1, oriented[1]), (oriented[0], 1)):
        raise req.mismatch(vec)
    return ModuleOp("IA3", req.module, dict(req.roles), 1.0, req.transpose, touches_bias=not feedforward)


def _config_problem(cfg: Mapping[str, Any]) -> str | None:
    """What ``IA3Config.__post_init__`` refuses in a saved config."""
    feedforward, targets = cfg.get("feedforward_modules"), cfg.get("target_modules")
    if isinstance(feedforward, list) and isinstance(targets, list) and not set(feedforward) <= set(targets):
        return "feedforward_modules must be a subset of target_modules"
    return None


TUNER = Tuner(
    peft_type="IA3",
    key_roles={".ia3_l": "ia3_l"},
    roles=frozenset({"ia3_l"}),
    config_fields=frozenset({"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"}),
    build_op=_build_op,
    weight=_weight,
    bias=_bias,
    row_slice=_row_slice,
    config_problem=_config_problem,
    peft_default_targets="TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
)
