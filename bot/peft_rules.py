"""PEFT's module-matching rules, mirrored so the merge path need not import ``peft``.

``import peft`` costs about 3.5 s on a 2-core machine (it pulls in every tuner and
transformers' auto classes), longer than a whole 1B merge. These few functions are the
rules PEFT applies when it loads an adapter; ``tests/test_peft_rules.py`` checks them
against PEFT's own ``check_target_module_exists``, ``get_pattern_key`` and
``_set_trainable`` on a corpus of real-world patterns, so a PEFT change shows up as a
failing test, not a silent drift.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import regex

from bot.errors import AdapterConfigError

# A pattern from a config must not hang a merge (or the self-service bot): PEFT's own matching
# backtracks without limit on a pattern like "(a+)+$". ``regex`` matches as ``re`` does for these
# patterns (tests/test_peft_rules.py checks it against PEFT) and can give up after a time.
_MATCH_SECONDS = 1.0


def _match(pattern: str, key: str, *, field: str, full: bool = False):
    """``re.match``/``re.fullmatch`` of a config-supplied pattern, as a one-line error when it is not
    a valid regular expression or takes too long."""
    try:
        return (regex.fullmatch if full else regex.match)(pattern, key, timeout=_MATCH_SECONDS)
    except TimeoutError as e:
        raise AdapterConfigError(f"adapter_config.json: the {field} pattern {pattern[:60]!r} takes too long to "
                                 f"match (catastrophic backtracking); simplify it") from e
    except regex.error as e:
        raise AdapterConfigError(f"adapter_config.json: the {field} pattern {pattern[:60]!r} is not a valid "
                                 f"regular expression ({e})") from e


def is_excluded(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT never wraps a module named in ``exclude_modules`` or ``modules_to_save``."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if _match(exclude, key, field="exclude_modules", full=True):
                return True
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return True
    modules_to_save = cfg.get("modules_to_save")
    if modules_to_save and any(_match(rf"(^|.*\.){m}($|\..*)", key, field="modules_to_save") for m in modules_to_save):
        return True
    return False


def config_problem(peft_type: str, cfg: Mapping[str, Any]) -> str | None:
    """What PEFT's config class (``LoraConfig.__post_init__`` etc.) would refuse when loading this config.

    Only the checks that can fire for a saved adapter merge-bot streams itself, each declared by
    its tuner (``bot/tuners/<name>.py``); every other tuner and option goes through PEFT, which
    runs its own.
    """
    from bot.tuners import find_tuner

    tuner = find_tuner(peft_type)
    return tuner.config_problem(cfg) if tuner is not None and tuner.config_problem is not None else None


ALL_LINEAR = "all-linear"


def is_all_linear(target_modules: Any) -> bool:
    """PEFT's shorthand for every linear layer (``INCLUDE_LINEAR_LAYERS_SHORTHAND``); saved configs
    usually hold the expanded list, hand-written ones the word."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def all_linear_modules(module_types: Mapping[str, str], output_embedding: str | None) -> list[str]:
    """What ``all-linear`` expands to (``_maybe_include_all_linear_layers``): every Linear or Conv1D
    module of the model except the output embedding."""
    output_module = output_embedding.rsplit(".", 1)[0] if output_embedding else None
    return sorted(m for m, kind in module_types.items() if kind in ("linear", "conv1d") and m != output_module)


def is_targeted(cfg: Mapping[str, Any], key: str) -> bool:
    """Would PEFT put an adapter layer on module ``key`` (``check_target_module_exists``)?"""
    if is_excluded(cfg, key):
        return False
    target_modules = cfg.get("target_modules")
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return _match(target_modules, key, field="target_modules", full=True) is not None
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
        match = regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = _match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, field="layers_pattern")
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes


def pattern_key(pattern_keys: Sequence[str], key: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` entry that applies to ``key`` (PEFT's ``get_pattern_key``)."""
    for pattern in pattern_keys:
        if _match(rf"(.*\.)?({pattern})$", key, field="rank_pattern/alpha_pattern"):
            return pattern
    return None


def is_module_to_save(modules_to_save: Sequence[str] | None, key: str) -> bool:
    """PEFT's ``_set_trainable`` wraps any module whose name ends with an entry (no dot needed)."""
    return bool(modules_to_save) and any(key.endswith(m) for m in modules_to_save)


def default_target_modules(peft_type: str, model_type: str) -> list[str] | None:
    """PEFT's per-architecture defaults, used when a config leaves target_modules empty.

    Only old or hand-written configs hit this (PEFT writes the resolved list when it
    saves), so the import of PEFT's table (the tuner's ``peft_default_targets``) is paid only then.
    """
    from bot.tuners import find_tuner

    tuner = find_tuner(peft_type)
    table = tuner.peft_default_targets if tuner is not None else None
    if table is None:
        return None
    from peft.utils import constants

    found = getattr(constants, table, {}).get(model_type)
    return list(found) if found else None
