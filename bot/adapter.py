"""Reading a saved PEFT adapter: its config and its tensors, grouped per module.

The config is read as JSON (see ``bot.peft_rules`` for why PEFT itself is not imported
on this path) and normalised the way PEFT's loader would see it: upper-case enums,
old field names, task-type defaults for ``modules_to_save``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.jsonfile import read_json_object
from bot.errors import AdapterConfigError, UnsupportedAdapterError
from bot.tuners import ADAPTER_KEY_ROLES

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_SAFETENSORS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Tuners whose adapters change activations or prompts instead of weights: nothing to fold in.
PROMPT_LEARNING_TYPES = frozenset(
    {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT", "CARTRIDGE"}
)
# Tuners merge-bot merges itself, streaming; every other mergeable one goes through PEFT.
NATIVE_TYPES = frozenset({"LORA", "IA3", "LOHA", "LOKR"})
# Heads PEFT adds to modules_to_save for these task types (PeftModelForSequenceClassification etc.).
TASK_DEFAULT_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# LoRA options whose merge merge-bot leaves to PEFT.
_LORA_FEATURES_FOR_PEFT = ("target_parameters", "trainable_token_indices", "layer_replication", "use_qalora")


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, normalised. ``raw`` keeps the file as read, for reports and PEFT."""

    peft_type: str
    task_type: str | None
    base_model: str | None
    base_revision: str | None
    fields: dict[str, Any] = field(repr=False)  # what the matching rules read (PEFT's field names)
    raw: dict[str, Any] = field(repr=False)

    @property
    def is_native(self) -> bool:
        return self.peft_type in NATIVE_TYPES and not any(self.fields.get(f) for f in _LORA_FEATURES_FOR_PEFT)

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
            raise AdapterConfigError(f"{CONFIG_NAME}: {name} must be an object mapping module patterns to numbers")
        fields[name] = value
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
    )


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors from safetensors, or a legacy .bin through ``torch.load(weights_only=True)``."""
    folder = Path(folder)
    st, binary = folder / WEIGHTS_SAFETENSORS, folder / WEIGHTS_BIN
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st)
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
        return state
    raise AdapterConfigError(
        f"adapter weights missing: neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN} is in {folder}"
    )


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
    suffixes = sorted(ADAPTER_KEY_ROLES, key=len, reverse=True)
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in sorted(keys):
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix in suffixes:
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                modules.setdefault(module, {})[ADAPTER_KEY_ROLES[suffix]] = key
                break
        else:
            parts = [p for p in name.split(".") if p not in ("base_layer", "modules_to_save", "original_module")]
            replacements[".".join(parts)] = key
    return AdapterTensors(modules=modules, replacements=replacements)
