"""LoHa merge math (Hyeon-Woo et al. 2022, FedPara): Hadamard product of two low-rank products.

Follows PEFT's ``loha.layer.HadaWeight.forward``.
"""
from __future__ import annotations

import torch

from bot.tuners.base import LYCORIS_FIELDS, ModuleOp, NeedsPeft, OpRequest, RoleReader, Tuner, add_delta, layers_problem, \
    rank_and_alpha


def loha_delta(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scaling: float,
    *, shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) * scaling, reshaped to the weight's shape."""
    return (((w1_a @ w1_b) * (w2_a @ w2_b)) * scaling).reshape(shape)


# --- The LoHa tuner as merge-bot sees it (bot.tuners.base.Tuner) ---------------------------------

def _delta(shape: tuple[int, ...], op: ModuleOp, t: RoleReader, scratch: torch.Tensor | None = None) -> torch.Tensor:
    return loha_delta(t("w1_a"), t("w1_b"), t("w2_a"), t("w2_b"), op.scaling, shape=shape)


def _build_op(req: OpRequest) -> ModuleOp:
    if req.transpose:
        raise NeedsPeft(f"{req.peft_type} on a Conv1D module ({req.module})")
    r, alpha = rank_and_alpha(req.fields, req.module, r_name="r", alpha_name="alpha")
    req.need("w1_a", "w1_b", "w2_a", "w2_b")
    req.check_numel((req.shape("w1_a")[0], req.shape("w1_b")[-1]))
    return ModuleOp("LOHA", req.module, dict(req.roles), alpha / r, False)


TUNER = Tuner(
    peft_type="LOHA",
    key_roles={".hada_w1_a": "w1_a", ".hada_w1_b": "w1_b", ".hada_w2_a": "w2_a", ".hada_w2_b": "w2_b",
               ".hada_t1": "t1", ".hada_t2": "t2"},  # t1/t2: CP-decomposed conv kernels, left to PEFT
    roles=frozenset({"w1_a", "w1_b", "w2_a", "w2_b"}),
    config_fields=LYCORIS_FIELDS,
    build_op=_build_op,
    weight=add_delta(_delta),
    delta=_delta,  # a Hadamard product of whole products: rows are not independent (no row_slice)
    config_problem=layers_problem,
    peft_default_targets="TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
)
