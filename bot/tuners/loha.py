"""LoHa merge math (Hyeon-Woo et al. 2022, FedPara): Hadamard product of two low-rank products.

Follows PEFT's ``loha.layer.HadaWeight.forward``.
"""
from __future__ import annotations

import torch


def loha_delta(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scaling: float,
    *, shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) * scaling, reshaped to the weight's shape."""
    return (((w1_a @ w1_b) * (w2_a @ w2_b)) * scaling).reshape(shape)
