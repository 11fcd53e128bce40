"""LoKr merge math (Yeh et al. 2023, LyCORIS): Kronecker product of two factors.

Follows PEFT's ``lokr.layer.LoKrLayer.get_delta_weight`` / ``make_kron``. Each factor is
either stored whole (``w1``) or as a low-rank product (``w1_a @ w1_b``).
"""
from __future__ import annotations

import torch

from bot.tuners.base import LYCORIS_FIELDS, ModuleOp, NeedsPeft, OpRequest, RoleReader, Tuner, add_delta, layers_problem, \
    rank_and_alpha


def lokr_factor(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    if full is not None:
        return full
    if a is None or b is None:
        raise ValueError("LoKr factor needs either the full matrix or both low-rank parts")
    return a @ b


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float, *, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = (w1 ⊗ w2) * scaling, reshaped to the weight's shape."""
    return (torch.kron(w1, w2.contiguous()) * scaling).reshape(shape)


# --- The LoKr tuner as merge-bot sees it (bot.tuners.base.Tuner) ---------------------------------

def _delta(shape: tuple[int, ...], op: ModuleOp, t: RoleReader, scratch: torch.Tensor | None = None) -> torch.Tensor:
    def opt(role: str) -> torch.Tensor | None:
        return t(role) if role in op.tensors else None

    w1 = lokr_factor(opt("w1"), opt("w1_a"), opt("w1_b"))
    w2 = lokr_factor(opt("w2"), opt("w2_a"), opt("w2_b"))
    return lokr_delta(w1, w2, op.scaling, shape=shape)


def _build_op(req: OpRequest) -> ModuleOp:
    if req.transpose:
        raise NeedsPeft(f"{req.peft_type} on a Conv1D module ({req.module})")
    r, alpha = rank_and_alpha(req.fields, req.module, r_name="r", alpha_name="alpha")

    def factor(n: str) -> tuple[int, ...]:  # the shape of w{n}, stored whole or as w{n}_a @ w{n}_b
        if f"w{n}" in req.roles:
            return req.shape(f"w{n}")
        return req.shape(f"w{n}_a")[0], req.shape(f"w{n}_b")[-1]

    w1, w2 = factor("1"), factor("2")
    req.check_numel((w1[0] * w2[0], w1[1] * w2[1]))
    return ModuleOp("LOKR", req.module, dict(req.roles), alpha / r, False)


TUNER = Tuner(
    peft_type="LOKR",
    key_roles={".lokr_w1": "w1", ".lokr_w1_a": "w1_a", ".lokr_w1_b": "w1_b", ".lokr_w2": "w2", ".lokr_w2_a": "w2_a",
               ".lokr_w2_b": "w2_b", ".lokr_t2": "t2"},  # t2: a CP-decomposed conv kernel, left to PEFT
    roles=frozenset({"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"}),
    config_fields=LYCORIS_FIELDS | {"decompose_both", "decompose_factor", "rank_dropout_scale"},
    build_op=_build_op,
    weight=add_delta(_delta),
    delta=_delta,  # a Kronecker product: rows are not independent (no row_slice)
    config_problem=layers_problem,
    peft_default_targets="TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
)
