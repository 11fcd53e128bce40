"""The tuners merge-bot folds in itself, as data plus small pure functions.

``ADAPTER_KEY_ROLES`` says which saved adapter tensor plays which part; ``TUNERS``
maps each supported ``peft_type`` to the function that applies one module's op to a
float32 or float64 weight (and, where the tuner touches it, the bias); the adapter's tensors
are upcast to the weight's dtype, exactly. Anything PEFT can merge
that is not listed here goes through ``bot.fallback`` instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from bot.tuners.ia3 import ia3_scale_bias, ia3_scale_weight
from bot.tuners.loha import loha_delta
from bot.tuners.lokr import lokr_delta, lokr_factor
from bot.tuners.lora import dora_merge, lora_delta

# Suffix of a saved adapter key (after the module name) -> role. Longest suffixes first
# so ".lora_B.bias" wins over a generic ".bias".
ADAPTER_KEY_ROLES: dict[str, str] = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_B_bias",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
    ".lora_magnitude_vector.weight": "magnitude",  # PEFT < 0.12 saved the magnitude as a module
    ".lora_magnitude_vector": "magnitude",
    ".ia3_l": "ia3_l",
    ".hada_w1_a": "w1_a",
    ".hada_w1_b": "w1_b",
    ".hada_w2_a": "w2_a",
    ".hada_w2_b": "w2_b",
    ".hada_t1": "t1",
    ".hada_t2": "t2",
    ".lokr_w1": "w1",
    ".lokr_w1_a": "w1_a",
    ".lokr_w1_b": "w1_b",
    ".lokr_w2": "w2",
    ".lokr_w2_a": "w2_a",
    ".lokr_w2_b": "w2_b",
    ".lokr_t2": "t2",
}

# Roles each fast-path tuner understands; a module carrying any other role (CP
# decompositions, conv kernels) is left to PEFT's own merge.
TUNER_ROLES: dict[str, frozenset[str]] = {
    "LORA": frozenset({"lora_A", "lora_B", "lora_B_bias", "magnitude"}),
    "IA3": frozenset({"ia3_l"}),
    "LOHA": frozenset({"w1_a", "w1_b", "w2_a", "w2_b"}),
    "LOKR": frozenset({"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"}),
}


@dataclass(frozen=True)
class ModuleOp:
    """What one adapter does to one module's weight (and maybe bias): fully resolved, no tensors."""

    tuner: str  # peft_type: LORA, IA3, LOHA, LOKR
    module: str  # module name in the model, e.g. model.layers.0.self_attn.q_proj
    tensors: Mapping[str, str] = field(default_factory=dict)  # role -> saved adapter key
    scaling: float = 1.0
    transpose: bool = False  # weight stored (in, out): Conv1D or embedding
    touches_bias: bool = False

    @property
    def kind(self) -> str:
        if self.tuner == "LORA":
            return "DORA" if "magnitude" in self.tensors else "LORA"
        return self.tuner


RoleReader = Callable[[str], torch.Tensor]


def _lora_delta(shape: tuple[int, ...], op: ModuleOp, t: RoleReader, scratch: torch.Tensor | None = None) -> torch.Tensor:
    return lora_delta(t("lora_A"), t("lora_B"), op.scaling, transpose=op.transpose, scratch=scratch)


def _loha_delta(shape: tuple[int, ...], op: ModuleOp, t: RoleReader, scratch: torch.Tensor | None = None) -> torch.Tensor:
    return loha_delta(t("w1_a"), t("w1_b"), t("w2_a"), t("w2_b"), op.scaling, shape=shape)


def _lokr_delta(shape: tuple[int, ...], op: ModuleOp, t: RoleReader, scratch: torch.Tensor | None = None) -> torch.Tensor:
    def opt(role: str) -> torch.Tensor | None:
        return t(role) if role in op.tensors else None

    w1 = lokr_factor(opt("w1"), opt("w1_a"), opt("w1_b"))
    w2 = lokr_factor(opt("w2"), opt("w2_a"), opt("w2_b"))
    return lokr_delta(w1, w2, op.scaling, shape=shape)


# Tuners whose merge adds a delta to the weight: W' = W + ΔW (DoRA, which renormalises, is not one).
DELTA_FUNCS = {"LORA": _lora_delta, "LOHA": _loha_delta, "LOKR": _lokr_delta}


def _additive_weight(weight: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return weight + DELTA_FUNCS[op.tuner](tuple(weight.shape), op, t)


def _lora_weight(weight: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    if "magnitude" in op.tensors:
        return dora_merge(weight, _lora_delta(tuple(weight.shape), op, t), t("magnitude"), transpose=op.transpose)
    return _additive_weight(weight, op, t)


def _ia3_weight(weight: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return ia3_scale_weight(weight, t("ia3_l"), transpose=op.transpose)


def _lora_bias(bias: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return bias + t("lora_B_bias") * op.scaling  # PEFT's lora_bias=True


def _ia3_bias(bias: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
    return ia3_scale_bias(bias, t("ia3_l"))


WEIGHT_FUNCS = {"LORA": _lora_weight, "IA3": _ia3_weight, "LOHA": _additive_weight, "LOKR": _additive_weight}
BIAS_FUNCS = {"LORA": _lora_bias, "IA3": _ia3_bias}


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
    funcs = BIAS_FUNCS if is_bias else WEIGHT_FUNCS
    return funcs[op.tuner](tensor, op, _role_reader(tensors, tensor.device, tensor.dtype))


def weight_delta(op: ModuleOp, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device,
                 scratch: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The ΔW (in ``dtype``: float32 or float64) of an op that merges as W' = W + ΔW, shaped ``shape``;
    None for any other op.

    ``scratch`` (``dtype``, ``shape``) may be used to hold the result, so a caller merging
    block after block reuses one buffer; then ``ΔW.add_(W)`` and one rounding give the same
    bits as ``W.to(dtype) + ΔW`` (in float32, PEFT's in-place ``weight.data += delta``).
    """
    if op.tuner not in DELTA_FUNCS or "magnitude" in op.tensors:
        return None
    return DELTA_FUNCS[op.tuner](shape, op, _role_reader(tensors, device, dtype), scratch)


def row_slice_tensors(op: ModuleOp, adapter: Mapping[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor] | None:
    """The adapter tensors that produce rows ``rows`` of this op's weight, or None if rows are not independent.

    Lets the streaming layer merge a big weight a block of rows at a time, in cache, with
    the same arithmetic per element as the whole-tensor functions above (pass the
    result to ``apply_op_tensors``).
    """
    t = {role: adapter[key] for role, key in op.tensors.items()}
    if op.tuner == "LORA" and "magnitude" not in t:
        if op.transpose:  # stored (in, out): row i of the weight is column i of A
            t["lora_A"] = t["lora_A"][:, rows]
        else:
            t["lora_B"] = t["lora_B"][rows]
        return t
    if op.tuner == "IA3" and not op.transpose:
        if t["ia3_l"].shape[1] == 1 and t["ia3_l"].shape[0] > 1:  # (out, 1): one factor per row
            t["ia3_l"] = t["ia3_l"][rows]
        return t  # (1, in), or a (1, 1) scalar: the same for every row
    return None

