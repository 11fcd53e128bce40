"""The files that travel with the weights: tokenizer, chat template, processor and generation configs.

The merged folder gets the base's side files overlaid with the adapter's (the adapter wins):

- An adapter that ships a vocabulary of its own (``tokenizer.json``, ``tokenizer.model``,
  ``vocab.json``, ...) replaces the base's tokenizer files as a set: two vocabularies are
  never mixed.
- Otherwise its tokenizer files (often only ``tokenizer_config.json`` with a chat template)
  are laid over the base's: a JSON file present in both is merged key by key, the adapter's
  keys winning; any other file is the adapter's.
- A chat template the adapter defines (in ``tokenizer_config.json`` or ``chat_template.*``)
  supersedes the base's, wherever the base keeps it.
- ``generation_config.json`` and the processor configs follow the same per-file rule.

After writing, ``check_tokenizer`` loads the result with ``AutoTokenizer`` (never remote
code) and checks it against the merged config; see its docstring for what is refused.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import AdapterConfigError
from bot.jsonfile import read_json_object
from bot.sources import is_side_file, is_tokenizer_file

# A tokenizer's vocabulary: an adapter with any of these brings a whole tokenizer of its own.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model", "*.tiktoken")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


@dataclass(frozen=True)
class SideFile:
    """One output side file: copied from ``sources[-1]``, or (several sources) their JSON objects merged in order."""

    name: str
    sources: tuple[Path, ...]
    drop_keys: tuple[str, ...] = ()  # keys of the base's JSON superseded by an adapter file (a chat template)


@dataclass(frozen=True)
class SideFilesPlan:
    files: tuple[SideFile, ...]
    adapter_tokenizer: tuple[str, ...]  # tokenizer files the adapter contributed (empty: the base's tokenizer as is)
    adapter_generation_config: bool


def _side_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(Path(folder).iterdir()) if p.is_file() and is_side_file(p.name)}


def _read(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, error=AdapterConfigError, what=what, fix="fix or remove that file")


def defines_chat_template(files: dict[str, Path]) -> bool:
    if any(_matches(name, CHAT_TEMPLATE_FILES) for name in files):
        return True
    config = files.get("tokenizer_config.json")
    return config is not None and _read(config, "the adapter's tokenizer_config.json").get("chat_template") is not None


def plan_side_files(adapter: Path, base: Path) -> SideFilesPlan:
    """Which side files the merged folder gets, and from where (no file is written)."""
    base_files, adapter_files = _side_files(base), _side_files(adapter)
    adapter_tokenizer = tuple(n for n in adapter_files if is_tokenizer_file(n))
    if any(_matches(n, VOCAB_FILES) for n in adapter_tokenizer):  # a whole tokenizer: the base's goes
        base_files = {n: p for n, p in base_files.items() if not is_tokenizer_file(n)}
    drop: tuple[str, ...] = ()
    if defines_chat_template(adapter_files):
        base_files = {n: p for n, p in base_files.items() if not _matches(n, CHAT_TEMPLATE_FILES)}
        drop = ("chat_template",)
    files = []
    for name in sorted(set(base_files) | set(adapter_files)):
        ours, theirs = base_files.get(name), adapter_files.get(name)
        if ours and theirs and name.endswith(".json"):
            files.append(SideFile(name, (ours, theirs), drop if name == "tokenizer_config.json" else ()))
        else:
            files.append(SideFile(name, (theirs or ours,)))
    return SideFilesPlan(tuple(files), adapter_tokenizer, GENERATION_CONFIG in adapter_files)


# Keys where transformers 4 recorded the folder a tokenizer or config was loaded from: a local
# path there would be published with the merge.
_ORIGIN_KEYS = ("name_or_path", "_name_or_path")


def is_local_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~", ".")) or "\\" in value or value[1:3] == ":/")


def write_side_files(plan: SideFilesPlan, out: Path) -> list[str]:
    """Write the planned files: copies, or merged JSON; small JSON files lose origin keys that hold local paths."""
    import shutil

    for item in plan.files:
        single_json = len(item.sources) == 1 and item.name.endswith(".json") and item.name != "tokenizer.json"
        if len(item.sources) == 1 and not single_json:
            shutil.copyfile(item.sources[0], out / item.name)
            continue
        merged: dict[str, Any] = {}
        for index, source in enumerate(item.sources):
            data = _read(source, f"{'base' if index == 0 and len(item.sources) > 1 else 'input'} {item.name}")
            if index == 0:
                data = {k: v for k, v in data.items() if k not in item.drop_keys}
            merged.update(data)
        local = [k for k in _ORIGIN_KEYS if is_local_path(merged.get(k))]
        if single_json and not local:
            shutil.copyfile(item.sources[0], out / item.name)  # byte for byte when there is nothing to change
            continue
        for key in local:
            del merged[key]
        (out / item.name).write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [item.name for item in plan.files]


def load_tokenizer(folder: Path):
    """(tokenizer, None), or (None, "why") when ``AutoTokenizer`` cannot load ``folder`` without remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True), None
    except Exception as e:  # any failure is the answer: this tokenizer does not load
        text = " ".join(str(e).replace(str(folder), "the folder").split())[:200]  # the staged folder means nothing
        return None, f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def embedding_rows(config: dict[str, Any]) -> int | None:
    """The merged config's vocabulary size (top level, else its text model's)."""
    for part in (config, config.get("text_config"), config.get("decoder")):
        if isinstance(part, dict) and isinstance(part.get("vocab_size"), int) and part["vocab_size"] > 0:
            return part["vocab_size"]
    return None


def _agrees(token_id: int, value: Any) -> bool:
    return value is None or value == token_id or (isinstance(value, list) and token_id in value)


def check_tokenizer(out: Path, base: Path, plan: SideFilesPlan) -> list[str]:
    """Check the merged tokenizer in ``out``; return warnings, fix what is deterministic, refuse the rest.

    - It must load with ``AutoTokenizer`` (no remote code) and fit the embedding rows
      (``len(tokenizer) <= vocab_size``); when the adapter's files break either, the merge
      is refused (exit 5). When the base's own tokenizer fails the same way, it is a warning.
    - EOS and PAD: when the adapter's tokenizer moved them and the adapter ships no
      generation config, ``generation_config.json`` follows the tokenizer (the id replaces an
      int; it is added to a list). Any other disagreement between the tokenizer,
      ``generation_config.json`` and ``config.json`` is reported as a warning.
    """
    if not any(is_tokenizer_file(p.name) for p in out.iterdir()):
        return []
    tokenizer, why = load_tokenizer(out)
    base_tokenizer = load_tokenizer(base)[0] if plan.adapter_tokenizer else tokenizer
    from_adapter = ", ".join(plan.adapter_tokenizer)
    if tokenizer is None:
        if plan.adapter_tokenizer and base_tokenizer is not None:
            raise AdapterConfigError(f"the merged tokenizer (the base's overlaid with the adapter's {from_adapter}) "
                                     f"does not load with AutoTokenizer ({why}); fix or remove the adapter's "
                                     f"tokenizer files")
        return [f"the tokenizer does not load with AutoTokenizer without remote code ({why}); copied as is"]
    warnings = []
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    rows = embedding_rows(config)
    if rows is not None and len(tokenizer) > rows:
        message = (f"the tokenizer has {len(tokenizer)} tokens but the model has {rows} embedding rows; "
                   f"token ids from {rows} on would fail")
        if plan.adapter_tokenizer and base_tokenizer is not None and len(base_tokenizer) <= rows:
            raise AdapterConfigError(f"{message} (the adapter's {from_adapter} added them but its weights do not "
                                     f"resize the embeddings); pass the adapter's resized embeddings or fix its "
                                     f"tokenizer files")
        warnings.append(message)
    return warnings + align_special_tokens(out, tokenizer, base_tokenizer, plan, config)


def align_special_tokens(out: Path, tokenizer, base_tokenizer, plan: SideFilesPlan,
                         config: dict[str, Any]) -> list[str]:
    generation_path = out / GENERATION_CONFIG
    generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
    warnings, changed = [], False
    for key in ("eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, key, None)
        if not isinstance(token_id, int):
            continue
        moved = base_tokenizer is not None and getattr(base_tokenizer, key, None) != token_id
        value = generation.get(key)
        if not _agrees(token_id, value):
            if moved and not plan.adapter_generation_config:
                generation[key] = value + [token_id] if isinstance(value, list) else token_id
                changed = True
                warnings.append(f"{GENERATION_CONFIG} {key} set to {generation[key]} (was {value}) to follow the "
                                f"adapter's tokenizer")
            else:
                warnings.append(f"{key} differs: the tokenizer says {token_id}, {GENERATION_CONFIG} says {value}")
        if not _agrees(token_id, config.get(key)):
            warnings.append(f"{key} differs: the tokenizer says {token_id}, config.json says {config[key]}"
                            + (f" ({GENERATION_CONFIG} decides for generate)" if generation else ""))
    if changed:
        generation_path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return warnings
