"""Reading a saved PEFT adapter: its config and its tensors, grouped per module.

The config is read as JSON (see ``bot.peft_rules`` for why PEFT itself is not imported
on this path) and normalised the way PEFT's loader would see it: upper-case enums,
old field names, task-type defaults for ``modules_to_save``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from bot import peft_rules
from bot.errors import AdapterConfigError, UnsupportedAdapterError
from bot.jsonfile import read_json_object
from bot.spec import is_valid_revision
from bot.tuners import adapter_key_roles, find_tuner, is_streamed, tuners

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_SAFETENSORS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Tuners whose adapters change activations or prompts instead of weights: nothing to fold in.
PROMPT_LEARNING_TYPES = frozenset(
    {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT", "CARTRIDGE"}
)
# Heads PEFT adds to modules_to_save for these task types (PeftModelForSequenceClassification etc.).
TASK_DEFAULT_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# Config fields the streaming merge reads itself, or that only shape training and the
# initialisation of tensors the saved adapter then overwrites: these common ones (PEFT's
# ``PeftConfig``) plus each tuner's ``config_fields`` (bot/tuners/<name>.py). Any other field set
# to a value (a LoRA variant such as KaSA or BD-LoRA, target_parameters, layer_replication,
# trainable_token_indices, a field newer than these lists, ...) sends the merge to PEFT,
# which applies it or refuses: exact either way. Each set is a subset of the fields of PEFT's
# own config class for that tuner (a field PEFT does not know, PEFT drops: IA3 has no
# layers_to_transform), checked against PEFT's configs in tests.
_PEFT_CONFIG_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "modules_to_save",
})


def streamed_fields(peft_type: str) -> frozenset[str]:
    """The config fields the streaming merge reads or may ignore for ``peft_type``; empty for a tuner it does not merge."""
    tuner = find_tuner(peft_type)
    return _PEFT_CONFIG_FIELDS | tuner.config_fields if tuner is not None else frozenset()


def _old_fields(peft_type: str) -> frozenset[str]:
    """Fields of PEFT versions too old for PEFT to know today, harmless when set."""
    tuner = find_tuner(peft_type)
    return tuner.old_fields if tuner is not None else frozenset()


class _StreamedFields(Mapping[str, frozenset[str]]):
    """``streamed_fields`` as a read-only mapping over the registered tuners (for tests and docs)."""

    def __getitem__(self, peft_type: str) -> frozenset[str]:
        if not is_streamed(peft_type):
            raise KeyError(peft_type)
        return streamed_fields(peft_type)

    def __iter__(self) -> Iterator[str]:
        return iter([t.peft_type for t in tuners()])

    def __len__(self) -> int:
        return len(tuners())


STREAMED_FIELDS: Mapping[str, frozenset[str]] = _StreamedFields()
# LoRA variants whose output cannot be expressed as merged weights at all.
_UNMERGEABLE_FIELDS = {
    "alora_invocation_tokens": "aLoRA adapters act only on tokens after their invocation sequence, so they cannot "
                               "be folded into the weights; load them with PEFT at inference time instead",
}


# How close an unknown field name must be to a known one to count as a typo of it (difflib's
# ratio): "target_module" and "lora_alhpa" score 0.96 and 0.90; unrelated names stay below 0.7.
_TYPO_CUTOFF = 0.85


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, normalised. ``raw`` keeps the file as read, for reports and PEFT."""

    peft_type: str
    task_type: str | None
    base_model: str | None
    base_revision: str | None
    fields: dict[str, Any] = field(repr=False)  # what the matching rules read (PEFT's field names)
    raw: dict[str, Any] = field(repr=False)
    unknown_fields: tuple[str, ...] = ()  # set fields the installed PEFT does not know for this tuner (it drops them)

    @property
    def is_native(self) -> bool:
        return is_streamed(self.peft_type) and self.peft_only_field is None

    @property
    def peft_only_field(self) -> str | None:
        """The first config field whose value the streaming merge does not model, if any."""
        streamed = streamed_fields(self.peft_type) | _old_fields(self.peft_type)
        tuner = find_tuner(self.peft_type)
        values = tuner.field_values if tuner is not None else {}
        for name, value in self.raw.items():
            if name in values:  # streamed with some values only (LoRA's init_lora_weights)
                if value not in values[name]:
                    return f"{name}={value!r}"
            elif name not in streamed and not _is_unset(value):
                return name
        return None

    def get(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name)
        return default if value is None else value


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterConfigError(f"no {CONFIG_NAME} in {folder}; point ADAPTER at a PEFT adapter folder or repo")
    raw = read_json_object(path, error=AdapterConfigError, what=CONFIG_NAME, fix="fix or re-save the adapter")
    return parse_adapter_config(raw)


def parse_adapter_config(raw: dict[str, Any]) -> AdapterConfig:
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type.strip():
        raise AdapterConfigError(f"{CONFIG_NAME} has no peft_type; is this a PEFT adapter?")
    peft_type = peft_type.strip().upper()
    if peft_type in PROMPT_LEARNING_TYPES:
        raise UnsupportedAdapterError(
            f"{peft_type} adapters change the prompt, not the weights, so they cannot be merged; "
            "load them with PEFT at inference time instead"
        )
    for name, why in _UNMERGEABLE_FIELDS.items():
        if not _is_unset(raw.get(name)):
            raise UnsupportedAdapterError(why)
    task_type = raw.get("task_type")
    task_type = task_type.strip().upper() if isinstance(task_type, str) and task_type.strip() else None
    fields = dict(raw)
    for name in ("target_modules", "modules_to_save", "exclude_modules", "feedforward_modules"):
        value = fields.get(name)
        if value is not None and not isinstance(value, (str, list)):
            if isinstance(value, (tuple, set)):
                fields[name] = sorted(value)
            else:
                raise AdapterConfigError(f"{CONFIG_NAME}: {name} must be a list or a regex string")
    for name in ("rank_pattern", "alpha_pattern"):
        value = fields.get(name) or {}
        if not isinstance(value, dict):
            raise AdapterConfigError(f"{CONFIG_NAME}: {name} must be an object mapping module names or patterns "
                                     f"to values")
        fields[name] = value
    _check_field_types(fields, peft_type)
    unknown = unknown_fields(peft_type, raw)
    problem = peft_rules.config_problem(peft_type, fields)
    if problem:
        raise AdapterConfigError(f"{CONFIG_NAME}: {problem}, so PEFT cannot load it either; fix or re-save the adapter")
    defaults = TASK_DEFAULT_MODULES_TO_SAVE.get(task_type or "")
    if defaults:
        fields["modules_to_save"] = sorted(set(fields.get("modules_to_save") or []) | set(defaults))
    return AdapterConfig(
        peft_type=peft_type,
        task_type=task_type,
        base_model=raw.get("base_model_name_or_path") or None,
        base_revision=raw.get("revision") or None,
        fields=fields,
        raw=raw,
        unknown_fields=unknown,
    )


def peft_config_fields(peft_type: str) -> frozenset[str] | None:
    """The fields of the installed PEFT's config class for ``peft_type``; None when PEFT has no such tuner."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)  # type: ignore[call-overload]  # keyed by a str enum
    return frozenset(f.name for f in dataclasses.fields(cls)) if cls is not None else None


def _all_peft_config_fields() -> frozenset[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return frozenset(f.name for cls in PEFT_TYPE_TO_CONFIG_MAPPING.values() for f in dataclasses.fields(cls))


def unknown_fields(peft_type: str, raw: dict[str, Any]) -> tuple[str, ...]:
    """Set fields neither merge-bot nor the installed PEFT knows for this tuner, after refusing likely typos.

    PEFT drops a field its config class lacks and uses the default instead, so a misspelt
    ``target_modules`` or ``lora_alpha`` would merge a different adapter without a word. A name
    close to a known one is refused with the suggestion; any other (a field of a newer PEFT) is
    returned, for a warning. PEFT is imported only when some set field is not one the
    streaming merge reads, which already means PEFT's own merge.
    """
    mine = streamed_fields(peft_type) | _old_fields(peft_type) | _PEFT_CONFIG_FIELDS
    candidates = [n for n, v in raw.items() if n not in mine and not _is_unset(v)]
    if not candidates:
        return ()
    peft_fields = peft_config_fields(peft_type)
    if peft_fields is None:  # an unknown peft_type is refused on its own, with that reason
        return ()
    known = mine | peft_fields
    elsewhere = _all_peft_config_fields()  # another tuner's field (IA3 with layers_to_transform): not a typo
    unknown = []
    for name in sorted(candidates):
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=_TYPO_CUTOFF)
        if close and name not in elsewhere:
            raise AdapterConfigError(
                f"{CONFIG_NAME} has an unknown field {name!r}; did you mean {close[0]!r}? PEFT would ignore it and "
                f"use the default, merging a different adapter; rename the field"
            )
        unknown.append(name)
    return tuple(unknown)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_mask(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, bool) for v in value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# How a rank is spelled differs between tuners (PEFT's config classes): most need r > 0, OFT
# saves r=0 when oft_block_size sets the size, and AdaLoRA's rank_pattern, once update_and_allocate
# has pruned, maps each module to its kept-rank mask ([true, false, ...]), which PEFT loads as is.
_RANK_RULES: dict[str, tuple[Any, str]] = {"OFT": (_is_count, "a whole number, 0 or more")}
_RANK_PATTERN_RULES: dict[str, tuple[Any, str]] = {
    "ADALORA": (_is_mask, "a list of true/false (AdaLoRA's kept-rank mask)"),
    "OSF": (lambda v: _is_number(v) and v > 0, "a positive number"),
}
_POSITIVE_RANK = (_is_rank, "a positive whole number")


def _check_field_types(fields: dict[str, Any], peft_type: str) -> None:
    """The numeric and name fields the merge reads must have the types PEFT gives them for this tuner."""
    def bad(name: str, value: Any, want: str) -> AdapterConfigError:
        return AdapterConfigError(f"{CONFIG_NAME}: {name} must be {want}, not {json.dumps(value)[:40]}; "
                                  f"fix or re-save the adapter")

    rank_ok, rank_want = _RANK_RULES.get(peft_type, _POSITIVE_RANK)
    if fields.get("r") is not None and not rank_ok(fields["r"]):
        raise bad("r", fields["r"], rank_want)
    for name in ("lora_alpha", "alpha"):
        if fields.get(name) is not None and not _is_number(fields[name]):
            raise bad(name, fields[name], "a finite number")
    pattern_ok, pattern_want = _RANK_PATTERN_RULES.get(peft_type, _POSITIVE_RANK)
    for key, value in fields["rank_pattern"].items():
        if not pattern_ok(value):
            raise bad(f"rank_pattern[{key!r}]", value, pattern_want)
    for key, value in fields["alpha_pattern"].items():
        if not _is_number(value):
            raise bad(f"alpha_pattern[{key!r}]", value, "a finite number")
    layers = fields.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in layers)):
        raise bad("layers_to_transform", layers, "a layer number or a list of layer numbers")
    for name in ("base_model_name_or_path", "revision"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise bad(name, fields[name], "a string")
    revision = fields.get("revision")
    if revision and not is_valid_revision(revision):
        raise bad("revision", revision, "a branch, tag or commit of the base model")


def _is_unset(value: Any) -> bool:
    """None, False and empty strings or containers: how saved configs spell "not used"."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors from safetensors, or a legacy .bin through ``torch.load(weights_only=True)``."""
    folder = Path(folder)
    st, binary = folder / WEIGHTS_SAFETENSORS, folder / WEIGHTS_BIN
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _checked_tensors(load_file(st), WEIGHTS_SAFETENSORS)
        except (SafetensorError, OSError) as e:
            raise AdapterConfigError(f"{WEIGHTS_SAFETENSORS} is corrupt ({e}); re-download or re-save the adapter") from e
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusals and corrupt zips come as many types
            raise AdapterConfigError(
                f"{WEIGHTS_BIN} cannot be read safely ({e.__class__.__name__}); re-save the adapter as safetensors"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterConfigError(f"{WEIGHTS_BIN} does not hold a tensor state dict; re-save the adapter")
        return _checked_tensors(state, WEIGHTS_BIN)
    raise AdapterConfigError(
        f"adapter weights missing: neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN} is in {folder}"
    )


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN or infinity in ``tensor``: float32 sums of chunks (a NaN or inf makes its sum non-finite).

    Half-precision chunks are widened into one reused buffer: reductions that convert on the
    fly, or a float32 copy of a whole embedding, cost ten times more.
    """
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.float32 or flat.dtype == torch.float64:
        return all(bool(torch.isfinite(flat[i:i + chunk].sum())) for i in range(0, flat.numel(), chunk))
    buffer = torch.empty(min(chunk, flat.numel()), dtype=torch.float32)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        if not torch.isfinite(buffer[:part.numel()].copy_(part).sum()):
            return False
    return True


def _checked_tensors(state: dict[str, torch.Tensor], file_name: str) -> dict[str, torch.Tensor]:
    """Every tensor must have a dtype a checkpoint can hold and only finite values (a NaN would be merged in)."""
    from bot.shards import CODE_FROM_DTYPE

    for key, tensor in state.items():
        if tensor.dtype not in CODE_FROM_DTYPE:
            raise AdapterConfigError(f"{file_name}: tensor {key} has dtype {tensor.dtype}, which no model checkpoint "
                                     f"holds; re-save the adapter")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise AdapterConfigError(f"{file_name}: tensor {key} holds NaN or infinite values; the adapter is "
                                     f"broken (re-train or re-save it)")
    return state


@dataclass(frozen=True)
class AdapterTensors:
    """Saved adapter keys sorted into per-module parts and whole-tensor replacements."""

    modules: dict[str, dict[str, str]]  # module name -> role -> saved key
    replacements: dict[str, str]  # parameter name (e.g. lm_head.weight) -> saved key


def split_adapter_keys(keys: list[str]) -> AdapterTensors:
    """Sort saved keys the way PEFT's ``set_peft_model_state_dict`` reads them.

    ``base_model.model.<module>.lora_A.weight`` is a part of an adapter layer; any other
    key is a whole tensor that PEFT loads over the model's own: a ``modules_to_save``
    copy, a resized embedding (``<module>.base_layer.weight``), or a trained bias.
    """
    key_roles = adapter_key_roles()
    suffixes = sorted(key_roles, key=len, reverse=True)  # longest first: ".lora_B.bias" before a generic ".bias"
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in sorted(keys):
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix in suffixes:
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                modules.setdefault(module, {})[key_roles[suffix]] = key
                break
        else:
            parts = [p for p in name.split(".") if p not in ("base_layer", "modules_to_save", "original_module")]
            replacements[".".join(parts)] = key
    return AdapterTensors(modules=modules, replacements=replacements)
