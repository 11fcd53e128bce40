"""The tuners merge-bot merges itself, by ``peft_type`` (mergekit's ``merge_methods/registry.py``).

A built-in tuner is one module declaring a ``TUNER`` (see ``bot.tuners.base.Tuner``) plus one
entry in ``BUILTIN`` below. Anything PEFT can merge that is not registered goes through
``bot.fallback`` (PEFT's own ``merge_and_unload``) instead.
"""
from __future__ import annotations

from bot.tuners import ia3, loha, lokr, lora
from bot.tuners.base import Tuner

BUILTIN: tuple[Tuner, ...] = (lora.TUNER, ia3.TUNER, loha.TUNER, lokr.TUNER)

_TUNERS: dict[str, Tuner] = {}


def register(tuner: Tuner) -> Tuner:
    """Add (or replace) a tuner. Its saved key suffixes may not mean another role for another tuner,
    since adapter keys are split into module parts before the tuner is known to apply."""
    for other in _TUNERS.values():
        if other.peft_type == tuner.peft_type:
            continue
        for suffix, role in tuner.key_roles.items():
            if other.key_roles.get(suffix, role) != role:
                raise ValueError(f"{tuner.peft_type}'s key suffix {suffix} is {other.peft_type}'s "
                                 f"{other.key_roles[suffix]}")
    _TUNERS[tuner.peft_type] = tuner
    return tuner


def unregister(peft_type: str) -> None:
    _TUNERS.pop(peft_type, None)


def get_tuner(peft_type: str) -> Tuner:
    """The registered tuner for ``peft_type``; KeyError when there is none (check ``is_streamed`` first)."""
    return _TUNERS[peft_type]


def find_tuner(peft_type: str) -> Tuner | None:
    return _TUNERS.get(peft_type)


def is_streamed(peft_type: str) -> bool:
    """Whether merge-bot merges this tuner itself (else PEFT's merge does, or nothing can)."""
    return peft_type in _TUNERS


def tuners() -> tuple[Tuner, ...]:
    return tuple(_TUNERS.values())


def adapter_key_roles() -> dict[str, str]:
    """Saved key suffix (after the module name) -> role, over every registered tuner."""
    return {suffix: role for tuner in _TUNERS.values() for suffix, role in tuner.key_roles.items()}


for _tuner in BUILTIN:
    register(_tuner)
