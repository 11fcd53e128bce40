"""LoRA and DoRA merge math. Tensors in, tensor out; callers pass float32 or float64 (all one dtype).

Formulas follow PEFT's ``lora.Linear.get_delta_weight`` / ``lora.Embedding.get_delta_weight``
and ``DoraLinearVariant.merge_safe`` (peft/tuners/lora/layer.py, variants.py), in the
same operation order so a float32 merge is bit-identical to PEFT's CPU merge.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from bot.architecture import infer_linear_kind
from bot.errors import AdapterConfigError
from bot.tuners.base import ModuleOp, NeedsPeft, OpRequest, RoleReader, Tuner, layers_problem, rank_and_alpha


def lora_scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *, transpose: bool = False,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = (B @ A) * scaling, in the base weight's layout.

    lora_A: (r, in), lora_B: (out, r). ``transpose`` is for weights stored (in, out):
    GPT-2's Conv1D (``fan_in_fan_out``) and embeddings, whose A is (r, num_embeddings)
    and B is (embedding_dim, r). ``scratch``, an (out, in) tensor of their dtype, may hold the
    result instead of a new allocation (same values either way).
    """
    if scratch is not None and not transpose:
        delta = torch.mm(lora_B, lora_A, out=scratch)
    else:
        delta = lora_B @ lora_A  # (out, in), a fresh tensor, so scaling in place is safe
        if transpose:
            delta = delta.T
    return delta.mul_(scaling)


def dora_merge(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, transpose: bool = False
) -> torch.Tensor:
    """W' = m / ||W + ΔW||_row * (W + ΔW)  (Liu et al. 2024, DoRA, eq. 5).

    ``weight`` and ``delta`` are in the stored layout; the norm is taken per output
    feature, so a transposed (Conv1D) layout is flipped for the norm and back.
    """
    oriented = (weight.T + delta.T) if transpose else (weight + delta)  # (out, in)
    weight_norm = torch.linalg.norm(oriented, dim=1)  # (out,)
    factor = (magnitude / weight_norm).view(-1, 1)  # (out, 1)
    if transpose:
        factor = factor.T  # (1, out) to scale the columns of an (in, out) weight
    return factor * (weight + delta)


# --- The LoRA tuner as merge-bot sees it (bot.tuners.base.Tuner) ---------------------------------

def _delta(shape: tuple[int, ...], op: ModuleOp, t: RoleReader, scratch: torch.Tensor | None = None) -> torch.Tensor | None:
    if "magnitude" in op.tensors:  # DoRA renormalises: not W + ΔW
        return None
    return lora_delta(t("lora_A"), t("lora_B"), op.scaling, transpose=op.transpose, scratch=scratch)


def _weight(weight: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    delta = lora_delta(t("lora_A"), t("lora_B"), op.scaling, transpose=op.transpose)
    if "magnitude" in op.tensors:
        return dora_merge(weight, delta, t("magnitude"), transpose=op.transpose)
    return weight + delta


def _bias(bias: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return bias + t("lora_B_bias") * op.scaling  # PEFT's lora_bias=True


def _row_slice(op: ModuleOp, tensors: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor] | None:
    """Row i of W + (B @ A) * s needs row i of B only (column i of A when stored (in, out)); DoRA's norm needs all."""
    if "magnitude" in tensors:
        return None
    if op.transpose:  # stored (in, out): row i of the weight is column i of A
        tensors["lora_A"] = tensors["lora_A"][:, rows]
    else:
        tensors["lora_B"] = tensors["lora_B"][rows]
    return tensors


def _build_op(req: OpRequest) -> ModuleOp:
    if req.kind == "embedding" and "magnitude" in req.roles:  # DoRA on an embedding: PEFT's own merge
        raise NeedsPeft(f"{req.peft_type} on a {req.kind} module ({req.module})")
    req.need("lora_A", "lora_B")
    r, alpha = rank_and_alpha(req.fields, req.module, r_name="r", alpha_name="lora_alpha")
    a, b = req.shape("lora_A"), req.shape("lora_B")
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise AdapterConfigError(f"adapter weights for {req.module} have inconsistent shapes A{list(a)} B{list(b)}")
    if a[0] != r:
        raise AdapterConfigError(f"adapter weights for {req.module} have rank {a[0]} but the config says r={r}")
    transpose, weight_shape = req.transpose, req.weight_shape
    produced = (a[1], b[0]) if transpose else (b[0], a[1])
    if produced != weight_shape:
        raise req.mismatch(produced)
    scaling = lora_scaling(alpha, r, use_rslora=bool(req.fields.get("use_rslora")))
    if "magnitude" in req.roles and req.shape("magnitude") != (weight_shape[1] if transpose else weight_shape[0],):
        raise req.mismatch(req.shape("magnitude"))
    return ModuleOp("LORA", req.module, dict(req.roles), scaling, transpose, touches_bias="lora_B_bias" in req.roles)


def _storage_kind(model_type: str, shapes: Mapping[str, tuple[int, ...]], weight_shape: tuple[int, ...]) -> str | None:
    """Linear or Conv1D, told by which orientation B @ A fits; "conv" for a conv kernel's 4-D factors."""
    if "lora_A" not in shapes or "lora_B" not in shapes:
        return None
    a, b = shapes["lora_A"], shapes["lora_B"]
    if len(a) != 2 or len(b) != 2:
        return "conv"
    return infer_linear_kind(model_type, weight_shape, (b[0], a[1]))


def _config_problem(cfg: Mapping[str, Any]) -> str | None:
    """What ``LoraConfig.__post_init__`` refuses in a saved config."""
    targets, layers, pattern = cfg.get("target_modules"), cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        return "layers_to_transform and layers_pattern cannot be used when target_modules is a regex string"
    problem = layers_problem(cfg)
    if problem:
        return problem
    if cfg.get("lora_bias"):
        if cfg.get("init_lora_weights", True) not in (True, False):
            return "lora_bias needs init_lora_weights true or false"
        if cfg.get("use_dora"):
            return "lora_bias is not supported together with DoRA (use_dora)"
    return None


# init_lora_weights values that only initialise A and B. PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA also rewrite the base weights when PEFT loads the adapter (and MiCA is a variant):
# PEFT's merge reproduces that, a plain W + BA would not.
PLAIN_LORA_INITS = (True, False, None, "gaussian", "orthogonal", "eva")

TUNER = Tuner(
    peft_type="LORA",
    key_roles={
        ".lora_A.weight": "lora_A",
        ".lora_B.weight": "lora_B",
        ".lora_B.bias": "lora_B_bias",
        ".lora_embedding_A": "lora_A",
        ".lora_embedding_B": "lora_B",
        ".lora_magnitude_vector.weight": "magnitude",  # PEFT < 0.12 saved the magnitude as a module
        ".lora_magnitude_vector": "magnitude",
    },
    roles=frozenset({"lora_A", "lora_B", "lora_B_bias", "magnitude"}),
    config_fields=frozenset({
        "r", "lora_alpha", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
        "lora_dropout", "bias", "use_rslora", "use_dora", "lora_bias", "init_lora_weights", "loftq_config",
        "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size", "runtime_config",
    }),
    build_op=_build_op,
    weight=_weight,
    delta=_delta,
    bias=_bias,
    row_slice=_row_slice,
    module_kinds=frozenset({"linear", "conv1d", "embedding"}),
    kind_of=lambda op: "DORA" if "magnitude" in op.tensors else "LORA",
    storage_kind=_storage_kind,
    field_values={"init_lora_weights": PLAIN_LORA_INITS},  # exact, as PEFT compares ("EVA" is an error there)
    old_fields=frozenset({"merge_weights"}),  # PEFT <= 0.3: merge on eval; saved tensors are unmerged
    bias_roles={"lora_B_bias": "lora_bias"},
    embedding_suffixes=(".lora_embedding_A", ".lora_embedding_B"),
    config_problem=_config_problem,
    peft_default_targets="TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
)
