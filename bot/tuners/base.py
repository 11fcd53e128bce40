"""What a tuner is to merge-bot: one ``Tuner`` record of data and small functions.

Each tuner module (``lora.py``, ``ia3.py``, ``loha.py``, ``lokr.py``) declares one ``TUNER``;
``bot.tuners.registry`` collects them. Everything the rest of merge-bot asks about a tuner
(which saved keys it owns, which config fields it reads, how a module's op is built and
shape-checked, its weight/bias/delta math, whether rows merge independently) is read from
that record, so a new tuner is one file plus one line in the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from bot import peft_rules
from bot.errors import AdapterConfigError, IncompatibleBaseError


class NeedsPeft(Exception):
    """The adapter uses something only PEFT's own merge handles (conv kernels, CP factors, ...)."""


@dataclass(frozen=True)
class ModuleOp:
    """What one adapter does to one module's weight (and maybe bias): fully resolved, no tensors."""

    tuner: str  # peft_type: LORA, IA3, LOHA, LOKR, or a registered tuner's
    module: str  # module name in the model, e.g. model.layers.0.self_attn.q_proj
    tensors: Mapping[str, str] = field(default_factory=dict)  # role -> saved adapter key
    scaling: float = 1.0
    transpose: bool = False  # weight stored (in, out): Conv1D or embedding
    touches_bias: bool = False

    @property
    def kind(self) -> str:
        """The name this op is counted under in the report (``DORA`` for a LoRA op with a magnitude)."""
        from bot.tuners.registry import get_tuner

        kind_of = get_tuner(self.tuner).kind_of
        return kind_of(self) if kind_of is not None else self.tuner


@dataclass(frozen=True)
class OpRequest:
    """What a tuner's ``build_op`` is given: one adapted module, its saved tensors' shapes and the base weight's."""

    peft_type: str
    module: str
    kind: str  # how the base stores the module: linear, conv1d, embedding
    roles: Mapping[str, str]  # role -> saved adapter key
    shapes: Mapping[str, tuple[int, ...]]  # role -> that tensor's shape
    weight_shape: tuple[int, ...]  # the base weight's (or its replacement's) stored shape
    fields: Mapping[str, Any]  # adapter_config.json as PEFT reads it

    @property
    def transpose(self) -> bool:
        """The weight is stored (in, out): GPT-2's Conv1D, or an embedding."""
        return self.kind in ("conv1d", "embedding")

    def shape(self, role: str) -> tuple[int, ...]:
        return self.shapes[role]

    def need(self, *roles: str) -> None:
        """Refuse a module whose saved tensors lack one of ``roles``."""
        for name in roles:
            if name not in self.roles:
                raise AdapterConfigError(f"adapter weights for {self.module} are incomplete: {name} is missing")

    def mismatch(self, expected: tuple[int, ...]) -> IncompatibleBaseError:
        return IncompatibleBaseError(
            f"adapter does not fit the base: {self.module} is {list(self.weight_shape)} in the base but the adapter "
            f"makes {list(expected)}; check that --base is the model the adapter was trained on"
        )

    def check_numel(self, produced: tuple[int, ...]) -> None:
        """For deltas that are reshaped to the weight's shape (LoHa, LoKr): only the element count must agree."""
        if produced[0] * produced[1] != self.weight_shape[0] * self.weight_shape[1]:
            raise self.mismatch(produced)


def rank_and_alpha(fields: Mapping[str, Any], module: str, *, r_name: str, alpha_name: str) -> tuple[int, float]:
    """A module's rank and alpha: the config's, overridden by ``rank_pattern`` / ``alpha_pattern`` (PEFT's
    ``get_pattern_key``); PEFT's default of 8 for either when unset."""
    r = fields.get(r_name) if fields.get(r_name) is not None else 8
    alpha = fields.get(alpha_name) if fields.get(alpha_name) is not None else 8
    rank_pattern, alpha_pattern = fields.get("rank_pattern") or {}, fields.get("alpha_pattern") or {}
    key = peft_rules.pattern_key(list(rank_pattern), module)
    if key is not None:
        r = rank_pattern[key]
    key = peft_rules.pattern_key(list(alpha_pattern), module)
    if key is not None:
        alpha = alpha_pattern[key]
    return int(r), float(alpha)


def layers_problem(cfg: Mapping[str, Any]) -> str | None:
    """PEFT's check, shared by LoRA, LoHa and LoKr configs, that ``layers_pattern`` comes with ``layers_to_transform``."""
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        return "layers_pattern is set but layers_to_transform is not"
    return None


# Fields of PEFT's LyCORIS config base class (LoHa, LoKr) the streaming merge reads or may ignore.
LYCORIS_FIELDS = frozenset({
    "r", "alpha", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "rank_dropout",
    "module_dropout", "use_effective_conv2d", "init_weights",
})

RoleReader = Callable[[str], torch.Tensor]  # role -> that adapter tensor, in the arithmetic's dtype and device


class WeightFn(Protocol):
    def __call__(self, weight: torch.Tensor, op: ModuleOp, t: RoleReader, /) -> torch.Tensor: ...


class DeltaFn(Protocol):
    def __call__(self, shape: tuple[int, ...], op: ModuleOp, t: RoleReader,
                 scratch: torch.Tensor | None = None, /) -> torch.Tensor | None: ...


class RowSliceFn(Protocol):
    def __call__(self, op: ModuleOp, tensors: dict[str, torch.Tensor], rows: slice, /) -> dict[str, torch.Tensor] | None: ...


def add_delta(delta: DeltaFn) -> WeightFn:
    """The weight function of a tuner that merges as W' = W + ΔW."""
    def weight(w: torch.Tensor, op: ModuleOp, t: RoleReader) -> torch.Tensor:
        d = delta(tuple(w.shape), op, t)
        assert d is not None, f"{op.tuner}'s delta is not additive for {op.module}"
        return w + d

    return weight


@dataclass(frozen=True)
class Tuner:
    """Everything merge-bot knows about one tuner it merges itself (streaming, without PEFT)."""

    peft_type: str  # adapter_config.json's peft_type, upper case
    key_roles: Mapping[str, str]  # saved key suffix after the module name -> role (every suffix PEFT saves for it)
    roles: frozenset[str]  # the roles merged here; a module with any other role goes to PEFT's merge
    config_fields: frozenset[str]  # config fields read here or harmless, beyond PEFT's common ones; others -> PEFT
    build_op: Callable[[OpRequest], ModuleOp]  # resolve and shape-check one module; raise NeedsPeft or an error
    weight: WeightFn  # W (float32/float64) -> W'
    delta: DeltaFn | None = None  # ΔW when W' = W + ΔW (None from it: this op is not additive)
    bias: WeightFn | None = None  # b -> b' for ops with touches_bias
    # The tensors (by role) that produce rows ``rows`` of the weight, or None when rows are not
    # independent: then the weight is merged whole rather than a block of rows at a time.
    row_slice: RowSliceFn | None = None
    module_kinds: frozenset[str] = frozenset({"linear", "conv1d"})  # how the base stores modules it can merge
    kind_of: Callable[[ModuleOp], str] | None = None  # the op's name in the report's counts (default: peft_type)
    # Storage of a module told by the adapter's shapes ("linear", "conv1d", "conv"), when only the checkpoint is read;
    # None: the model family decides.
    storage_kind: Callable[[str, Mapping[str, tuple[int, ...]], tuple[int, ...]], str | None] | None = None
    field_values: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # fields streamed only with these values
    old_fields: frozenset[str] = frozenset()  # fields of old PEFT versions, harmless when set
    bias_roles: Mapping[str, str] = field(default_factory=dict)  # role that trains a bias -> the config field asking
    embedding_suffixes: tuple[str, ...] = ()  # saved key suffixes only embeddings have (the layout is then needed)
    config_problem: Callable[[Mapping[str, Any]], str | None] | None = None  # what PEFT's config class refuses
    peft_default_targets: str | None = None  # PEFT's table of per-model default target_modules (peft.utils.constants)
