"""LoRA and DoRA merge math. Tensors in, tensor out; callers pass float32 or float64 (all one dtype).

Formulas follow PEFT's ``lora.Linear.get_delta_weight`` / ``lora.Embedding.get_delta_weight``
and ``DoraLinearVariant.merge_safe`` (peft/tuners/lora/layer.py, variants.py), in the
same operation order so a float32 merge is bit-identical to PEFT's CPU merge.
"""
from __future__ import annotations

import math

import torch


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
