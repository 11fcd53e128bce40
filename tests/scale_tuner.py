"""A toy tuner, defined the way a newcomer adds one: this file is all of it.

SCALE multiplies each row of a targeted weight by a saved per-row factor:
W'[i, :] = s[i] * W[i, :], with ``s`` saved as ``<module>.scale_s`` (shape (out,)).
``tests/test_tuner_plugin.py`` registers it and merges through the CLI.
"""
from __future__ import annotations

import torch

from bot.tuners import ModuleOp, OpRequest, RoleReader, Tuner


def _weight(weight: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return weight * t("s").view(-1, 1)  # (out, in) * (out, 1)


def _row_slice(op: ModuleOp, tensors: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {"s": tensors["s"][rows]}  # row i needs s[i] only


def _build_op(req: OpRequest) -> ModuleOp:
    req.need("s")
    if req.shape("s") != (req.weight_shape[0],):
        raise req.mismatch(req.shape("s"))
    return ModuleOp("SCALE", req.module, dict(req.roles))


TUNER = Tuner(
    peft_type="SCALE",
    key_roles={".scale_s": "s"},
    roles=frozenset({"s"}),
    config_fields=frozenset(),
    build_op=_build_op,
    weight=_weight,
    row_slice=_row_slice,
    module_kinds=frozenset({"linear"}),
)
