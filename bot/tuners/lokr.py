"""LoKr merge math (Yeh et al. 2023, LyCORIS): Kronecker product of two factors.

Follows PEFT's ``lokr.layer.LoKrLayer.get_delta_weight`` / ``make_kron``. Each factor is
either stored whole (``w1``) or as a low-rank product (``w1_a @ w1_b``).
"""
from __future__ import annotations

import torch


def lokr_factor(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    if full is not None:
        return full
    if a is None or b is None:
        raise ValueError("LoKr factor needs either the full matrix or both low-rank parts")
    return a @ b


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float, *, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = (w1 ⊗ w2) * scaling, reshaped to the weight's shape."""
    return (torch.kron(w1, w2.contiguous()) * scaling).reshape(shape)
