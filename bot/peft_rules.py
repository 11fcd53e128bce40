"""PEFT's module-matching rules, mirrored so the merge path need not import ``peft``.

``import peft`` costs about 3.5 s on a 2-core machine (it pulls in every tuner and
transformers' auto classes), longer than a whole 1B merge. These few functions are the
rules PEFT applies when it loads an adapter; ``tests/test_peft_rules.py`` checks them
against PEFT's own ``check_target_module_exists``, ``get_pattern_key`` and
``_set_trainable`` on a corpus of real-world patterns, so a PEFT change shows up as a
failing test, not a silent drift.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence


def is_excluded(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT never wraps a module named in ``exclude_modules`` or ``modules_to_save``."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return True
    modules_to_save = cfg.get("modules_to_save")
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return True
    return False


def is_targeted(cfg: Mapping[str, Any], key: str) -> bool:
    """Would PEFT put an adapter layer on module ``key`` (``check_target_module_exists``)?"""
    if is_excluded(cfg, key):
        return False
    target_modules = cfg.get("target_modules")
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False
    layer_indexes = cfg.get("layers_to_transform")
    if layer_indexes is None or (isinstance(layer_indexes, list) and not layer_indexes):
        return True
    layers_pattern = cfg.get("layers_pattern")
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes


def pattern_key(pattern_keys: Sequence[str], key: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` entry that applies to ``key`` (PEFT's ``get_pattern_key``)."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def is_module_to_save(modules_to_save: Sequence[str] | None, key: str) -> bool:
    """PEFT's ``_set_trainable`` wraps any module whose name ends with an entry (no dot needed)."""
    return bool(modules_to_save) and any(key.endswith(m) for m in modules_to_save)


def default_target_modules(peft_type: str, model_type: str) -> list[str] | None:
    """PEFT's per-architecture defaults, used when a config leaves target_modules empty.

    Only old or hand-written configs hit this (PEFT writes the resolved list when it
    saves), so the import of PEFT's table is paid only then.
    """
    from peft.utils import constants

    table = {
        "LORA": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
        "IA3": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
        "LOHA": "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
        "LOKR": "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
    }.get(peft_type)
    mapping = getattr(constants, table, {}) if table else {}
    found = mapping.get(model_type)
    return list(found) if found else None


def default_feedforward_modules(model_type: str) -> list[str] | None:
    from peft.utils import constants

    found = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    return list(found) if found else None
