"""(IA)^3 merge math (Liu et al. 2022): a learned vector rescales the weight.

Follows PEFT's ``ia3.Linear.merge``: the vector is (out, 1) for attention-style
modules (rescaling outputs, so the bias too) and (1, in) for feed-forward modules
(rescaling inputs, so not the bias).
"""
from __future__ import annotations

import torch


def ia3_scale_weight(weight: torch.Tensor, ia3_l: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    return weight * (ia3_l.T if transpose else ia3_l)


def ia3_scale_bias(bias: torch.Tensor, ia3_l: torch.Tensor) -> torch.Tensor:
    return bias * ia3_l.reshape(bias.shape)
