"""resolve_plan(spec) -> MergePlan: everything decided and checked, no weights loaded.

The plan names, for every output tensor, where its value comes from (a base tensor or
a whole tensor saved in the adapter), which adapter ops apply to it, and its output
dtype and shape. All adapter/base mismatches are found here, before anything is written.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot import peft_rules
from bot.adapter import (NATIVE_TYPES, PEFT_PREFIX, AdapterConfig, AdapterTensors, read_adapter_config, read_adapter_weights,
                         split_adapter_keys)
from bot.architecture import (CONV1D_MODEL_TYPES, ModelLayout, checkpoint_layout, describe_model, infer_linear_kind,
                               load_config)
from bot.checkpoint import BinTensorInfo, index_checkpoint, index_remote_checkpoint
from bot.errors import AdapterConfigError, IncompatibleBaseError, UnsupportedAdapterError, UsageError
from bot.jsonfile import read_json_object
from bot.shards import CODE_FROM_DTYPE, OutputTensor, TensorInfo
from bot.sources import ResolvedSource, is_tokenizer_file, resolve_source
from bot.spec import MergeSpec, SourceRef, auto_shard_bytes, parse_source_ref
from bot.tuners import TUNER_ROLES, ModuleOp

log = logging.getLogger(__name__)

_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Common suffixes of quantized re-uploads -> what the 16-bit original is usually called.
_QUANT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-8bit", "-4bit", "-8bit", "-GPTQ", "-AWQ", "-gptq", "-awq",
                   "-int4", "-int8", "-nf4")


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor."""

    name: str
    source: TensorInfo | BinTensorInfo | None  # base tensor, if the value starts from the base
    replacement: str | None  # saved adapter key whose tensor replaces the base value
    ops: tuple[tuple[ModuleOp, bool], ...]  # (op, applies to the bias) in order
    dtype: str  # output safetensors dtype code
    shape: tuple[int, ...]

    @property
    def is_passthrough(self) -> bool:
        return self.replacement is None and not self.ops and self.source is not None and self.source.dtype == self.dtype

    @property
    def output(self) -> OutputTensor:
        return OutputTensor(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class MergePlan:
    spec: MergeSpec
    adapter: ResolvedSource
    base: ResolvedSource
    adapter_config: AdapterConfig = field(repr=False)
    base_config: dict[str, Any] = field(repr=False)
    fallback_reason: str | None = None  # set when PEFT itself must do the merge
    layout: ModelLayout | None = field(default=None, repr=False)
    jobs: tuple[TensorJob, ...] = field(default=(), repr=False)
    config_updates: dict[str, Any] = field(default_factory=dict)
    module_counts: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    tokenizer_folder: Path | None = None

    @property
    def shard_bytes(self) -> int:
        """The largest output shard: ``--max-shard-size``, or auto from the output's size."""
        return self.spec.max_shard_bytes or auto_shard_bytes(self.output_bytes)

    @property
    def notices(self) -> tuple[str, ...]:
        """What the user hears before the merge starts, each fact once (the CLI and the publish jobs print these)."""
        fallback = (f"{self.fallback_reason}; using PEFT's in-memory merge (memory = whole model)",) \
            if self.fallback_reason else ()
        return self.warnings + fallback

    @property
    def output_bytes(self) -> int:
        if self.jobs:
            return sum(j.output.nbytes for j in self.jobs)
        return sum(p.stat().st_size for p in self.base.path.glob("*.safetensors")) or \
            sum(p.stat().st_size for p in self.base.path.glob("*.bin"))


def suggest_unquantized(name: str) -> str | None:
    for suffix in _QUANT_SUFFIXES:
        if name.lower().endswith(suffix.lower()):
            return name[: -len(suffix)]
    return None


def base_ref_for(spec: MergeSpec, acfg: AdapterConfig) -> SourceRef:
    if spec.base is not None:
        return spec.base
    if not acfg.base_model:
        raise UsageError("adapter_config.json names no base model (base_model_name_or_path); pass --base")
    ref = parse_source_ref(acfg.base_model, what="base model named in adapter_config.json (override with --base)",
                           allow_local=spec.adapter.local)
    if acfg.base_revision and not ref.local and not ref.revision:
        ref = SourceRef(name=ref.name, revision=acfg.base_revision)
    return ref


def check_not_quantized(base_config: dict[str, Any], base: ResolvedSource) -> None:
    if not base_config.get("quantization_config"):
        return
    method = (base_config["quantization_config"] or {}).get("quant_method", "quantized")
    name = base.repo_id or base.path.name
    guess = suggest_unquantized(name)
    hint = f" (likely {guess})" if guess else ""
    raise IncompatibleBaseError(
        f"base {name} is {method}-quantized; merging into dequantized weights degrades the model. "
        f"Pass the original 16-bit base with --base{hint}"
    )


def check_peft_can_merge(acfg: AdapterConfig) -> None:
    """Refuse, before any download of the base, a peft_type the installed PEFT cannot merge."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from bot.peft_config import build_peft_config

    if acfg.peft_type not in PeftType.__members__:
        raise UnsupportedAdapterError(
            f"peft_type {acfg.peft_type} is not known to the installed PEFT; upgrade peft or check adapter_config.json"
        )
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(acfg.peft_type)
    if tuner is None or not hasattr(tuner, "merge_and_unload"):
        raise UnsupportedAdapterError(f"PEFT cannot merge {acfg.peft_type} adapters into the base weights")
    build_peft_config(acfg)  # what PEFT's config class refuses, with PEFT's reason, before any download


def resolve_plan(spec: MergeSpec, *, stream_base: bool = False) -> MergePlan:
    """Resolve the sources and decide every output tensor. ``stream_base``: a Hub base's safetensors
    weights are not downloaded; the plan reads their headers remotely and its tensors are fetched
    piece by piece while merging (``bot.pipeline``). PEFT's own merge needs them whole: downloaded then."""
    adapter = resolve_source(spec.adapter, what="adapter", token=spec.token)
    acfg = read_adapter_config(adapter.path)
    if not acfg.is_native:
        check_peft_can_merge(acfg)
    base_ref = base_ref_for(spec, acfg)
    base = resolve_source(base_ref, what="base", token=spec.token, stream_weights=stream_base and acfg.is_native)
    config_path = base.path / "config.json"
    if not config_path.is_file():
        raise IncompatibleBaseError(f"base {base.label} has no config.json; is it a transformers model?")
    base_config = read_json_object(config_path, error=IncompatibleBaseError, what="base config.json",
                                   fix=f"re-download {base.label}")
    check_not_quantized(base_config, base)
    tokenizer_folder = adapter.path if any(is_tokenizer_file(p.name) for p in adapter.path.iterdir()) else base.path
    common = dict(spec=spec, adapter=adapter, base=base, adapter_config=acfg, base_config=base_config,
                  tokenizer_folder=tokenizer_folder)
    if not acfg.is_native:
        what = f"{acfg.peft_type} with {acfg.peft_only_field}" if acfg.peft_type in NATIVE_TYPES else acfg.peft_type
        return MergePlan(**common, fallback_reason=f"{what} is merged by PEFT itself",
                         warnings=unknown_field_notes(acfg))
    weights = read_adapter_weights(adapter.path)
    parts = split_adapter_keys(list(weights))
    checkpoint = index_remote_checkpoint(base.remote) if base.remote else index_checkpoint(base.path)[0]
    layout = checkpoint_layout(base_config, list(checkpoint))
    if needs_model_layout(acfg, parts, list(weights), layout, base_config):
        layout = describe_model(load_config(base.path), task_type=acfg.task_type)
    try:
        return _plan_streaming(common, acfg, weights, parts, checkpoint, layout)
    except _NeedsPeft as e:
        if base.remote:  # PEFT loads the whole base from a folder
            common["base"] = resolve_source(base_ref, what="base", token=spec.token)
        return MergePlan(**common, fallback_reason=str(e))


def unknown_field_notes(acfg: AdapterConfig) -> tuple[str, ...]:
    if not acfg.unknown_fields:
        return ()
    import peft

    names = ", ".join(acfg.unknown_fields)
    return (f"adapter_config.json field(s) {names} are unknown to the installed PEFT {peft.__version__} for "
            f"{acfg.peft_type}, which ignores them; upgrade peft if the adapter was saved by a newer one",)


# Last name parts of modules that may be tied to, or be, an embedding or a task head.
_HEAD_OR_EMBEDDING = ("lm_head", "embed_out", "output", "score", "classifier", "qa_outputs", "shared", "wte",
                      "embed_tokens", "word_embeddings", "embed_in", "embeddings")


def needs_model_layout(acfg: AdapterConfig, parts: AdapterTensors, keys: list[str],
                       checkpoint: ModelLayout, base_config: dict) -> bool:
    """Whether the checkpoint alone cannot answer the plan's questions (ties, heads, prefixes).

    Adapters on plain linear layers whose weights sit in the checkpoint under their own
    names need nothing else; anything touching embeddings, heads or whole tensors, or a
    task head the base does not have, asks transformers for the real layout.
    """
    if parts.replacements or acfg.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        return True
    if peft_rules.is_all_linear(acfg.fields.get("target_modules")):  # needs every module's type
        return True
    if not base_config.get("architectures") or any(".lora_embedding_" in k for k in keys):
        return True
    for module in parts.modules:
        if module.rsplit(".", 1)[-1] in _HEAD_OR_EMBEDDING:
            return True
        if checkpoint.canonical_name(f"{module}.weight") is None:
            return True
    return False


def _check_replacement_shape(name: str, saved: tuple[int, ...], base: TensorInfo | BinTensorInfo | None) -> None:
    """A saved tensor loads over the base's only with the same shape, as in PEFT's ``load_state_dict``;
    embeddings and task heads may differ in their first dimension (a resized vocabulary, a label count)."""
    if base is None or saved == tuple(base.shape):
        return
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if module in _HEAD_OR_EMBEDDING and len(saved) == len(base.shape) and saved[1:] == tuple(base.shape)[1:]:
        return
    raise IncompatibleBaseError(f"adapter's saved {name} is {list(saved)} but the base's is {list(base.shape)}; "
                                f"check that --base is the model the adapter was trained on")


def untargeted_field(fields: dict[str, Any], module: str) -> str:
    """The config field that keeps PEFT from putting an adapter layer on ``module``."""
    if fields.get("exclude_modules") and peft_rules.is_excluded({"exclude_modules": fields["exclude_modules"]}, module):
        return "exclude_modules"
    if peft_rules.is_excluded({"modules_to_save": fields.get("modules_to_save")}, module):
        return "modules_to_save"
    if fields.get("layers_to_transform") is not None and peft_rules.is_targeted(
            {**fields, "layers_to_transform": None, "layers_pattern": None}, module):
        return "layers_to_transform"
    return "target_modules"


def unused_tensors_error(unused: dict[str, list[str]]) -> AdapterConfigError:
    """Saved adapter tensors the merge would not read: PEFT drops them silently, merge-bot refuses (exit 5)."""
    keys = sorted(k.removeprefix(PEFT_PREFIX) for ks in unused.values() for k in ks)
    shown = ", ".join(keys[:2]) + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")
    fields = " / ".join(sorted(unused))
    return AdapterConfigError(
        f"{len(keys)} adapter tensor(s) would not be used by the merge ({shown}): {fields} in adapter_config.json "
        f"does not cover them, so part of the adapter would be dropped; fix {fields} (a misspelt module name?) "
        f"or check that --base is the model the adapter was trained on"
    )


class _NeedsPeft(Exception):
    """The adapter uses something only PEFT's own merge handles (conv kernels, CP factors, ...)."""


def _rank_and_alpha(fields: dict[str, Any], module: str, *, r_name: str, alpha_name: str) -> tuple[int, float]:
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


def _module_op(acfg: AdapterConfig, module: str, kind: str, roles: dict[str, str],
               weights: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> ModuleOp:
    """Build and shape-check one module's op; raise on a mismatch with the base."""
    peft_type, fields = acfg.peft_type, acfg.fields
    unknown = set(roles) - TUNER_ROLES[peft_type]
    if unknown:
        raise _NeedsPeft(f"{peft_type} module {module} uses {sorted(unknown)[0]}")
    if kind not in ("linear", "conv1d") and not (peft_type == "LORA" and kind == "embedding" and "magnitude" not in roles):
        raise _NeedsPeft(f"{peft_type} on a {kind} module ({module})")
    transpose = kind in ("conv1d", "embedding")
    shape = lambda role: tuple(weights[roles[role]].shape)  # noqa: E731

    def need(*names: str) -> None:
        for name in names:
            if name not in roles:
                raise AdapterConfigError(f"adapter weights for {module} are incomplete: {name} is missing")

    def mismatch(expected: tuple[int, ...]) -> IncompatibleBaseError:
        return IncompatibleBaseError(
            f"adapter does not fit the base: {module} is {list(weight_shape)} in the base but the adapter "
            f"makes {list(expected)}; check that --base is the model the adapter was trained on"
        )

    if peft_type == "LORA":
        need("lora_A", "lora_B")
        r, alpha = _rank_and_alpha(fields, module, r_name="r", alpha_name="lora_alpha")
        a, b = shape("lora_A"), shape("lora_B")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterConfigError(f"adapter weights for {module} have inconsistent shapes A{list(a)} B{list(b)}")
        if a[0] != r:
            raise AdapterConfigError(f"adapter weights for {module} have rank {a[0]} but the config says r={r}")
        produced = (a[1], b[0]) if transpose else (b[0], a[1])
        if produced != weight_shape:
            raise mismatch(produced)
        from bot.tuners.lora import lora_scaling

        scaling = lora_scaling(alpha, r, use_rslora=bool(fields.get("use_rslora")))
        if "magnitude" in roles and shape("magnitude") != (weight_shape[1] if transpose else weight_shape[0],):
            raise mismatch(shape("magnitude"))
        return ModuleOp("LORA", module, dict(roles), scaling, transpose, touches_bias="lora_B_bias" in roles)
    if peft_type == "IA3":
        need("ia3_l")
        vec = shape("ia3_l")
        oriented = (weight_shape[1], weight_shape[0]) if transpose else weight_shape
        feedforward = vec == (1, oriented[1]) and vec != (oriented[0], 1)
        if vec not in ((1, oriented[1]), (oriented[0], 1)):
            raise mismatch(vec)
        return ModuleOp("IA3", module, dict(roles), 1.0, transpose, touches_bias=not feedforward)
    if transpose:
        raise _NeedsPeft(f"{peft_type} on a Conv1D module ({module})")
    r, alpha = _rank_and_alpha(fields, module, r_name="r", alpha_name="alpha")
    numel = weight_shape[0] * weight_shape[1]
    if peft_type == "LOHA":
        need("w1_a", "w1_b", "w2_a", "w2_b")
        produced = (shape("w1_a")[0], shape("w1_b")[-1])
    else:
        w1 = shape("w1") if "w1" in roles else (shape("w1_a")[0], shape("w1_b")[-1])
        w2 = shape("w2") if "w2" in roles else (shape("w2_a")[0], shape("w2_b")[-1])
        produced = (w1[0] * w2[0], w1[1] * w2[1])
    if produced[0] * produced[1] != numel:
        raise mismatch(produced)
    return ModuleOp(peft_type, module, dict(roles), alpha / r, False)


def _kind_from_shapes(peft_type: str, model_type: str, roles: dict[str, str], weights: dict[str, torch.Tensor],
                      weight_shape: tuple[int, ...]) -> str:
    """Linear or Conv1D storage, told by which orientation the adapter's shapes fit.

    When the shapes fit neither (or the tuner's do not say), the model family decides and
    ``_module_op`` then names any mismatch.
    """
    family_default = "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"
    if peft_type == "LORA" and "lora_A" in roles and "lora_B" in roles:
        a, b = weights[roles["lora_A"]].shape, weights[roles["lora_B"]].shape
        if len(a) != 2 or len(b) != 2:
            return "conv"
        return infer_linear_kind(model_type, weight_shape, (b[0], a[1])) or family_default
    return family_default


def _plan_streaming(common: dict, acfg: AdapterConfig, weights: dict[str, torch.Tensor], parts: AdapterTensors,
                    checkpoint: dict, layout: ModelLayout) -> MergePlan:
    spec: MergeSpec = common["spec"]
    fields = dict(acfg.fields)
    warnings: list[str] = []
    if fields.get("target_modules") is None:
        fields["target_modules"] = peft_rules.default_target_modules(acfg.peft_type, layout.model_type)
        if fields["target_modules"] is None and not fields.get("modules_to_save"):
            raise AdapterConfigError(
                f"adapter_config.json has no target_modules and PEFT has no default for {layout.model_type} models"
            )
    if peft_rules.is_all_linear(fields["target_modules"]):
        names = peft_rules.all_linear_modules(layout.module_types, layout.output_embedding)
        prefix = f"{layout.base_model_prefix}." if layout.base_model_prefix else None
        # an adapter trained on the bare model names its modules without the prefix
        fields["target_modules"] = names + [n[len(prefix):] for n in names if prefix and n.startswith(prefix)]
    if acfg.peft_type == "IA3" and fields.get("feedforward_modules") is None:
        fields["feedforward_modules"] = peft_rules.default_feedforward_modules(layout.model_type) or []

    base_by_param: dict[str, TensorInfo | BinTensorInfo] = {}
    order: list[str] = []
    unused_base = []
    for key, info in checkpoint.items():
        name = layout.canonical_name(key)
        if name is None:
            unused_base.append(key)
            continue
        for member in layout.tied_group_of(name):
            base_by_param.setdefault(member, info)
        order.append(name)
    if unused_base:
        warnings.append(f"dropped {len(unused_base)} base tensors that {layout.architecture} does not use "
                        f"(e.g. {unused_base[0]})")

    ops_by_param: dict[str, list[tuple[ModuleOp, bool]]] = {}
    counts: Counter[str] = Counter()
    missing_modules: list[str] = []
    unused: dict[str, list[str]] = {}  # config field that would have to name them -> saved keys nobody reads
    for module, roles in sorted(parts.modules.items()):
        weight_name = layout.canonical_name(f"{module}.weight")
        kind = layout.module_types.get(weight_name.rsplit(".", 1)[0] if weight_name else module)  # the model's name
        if (kind is None and not layout.from_checkpoint) or (layout.from_checkpoint and weight_name is None):
            missing_modules.append(module)
            continue
        if not peft_rules.is_targeted(fields, module):
            unused.setdefault(untargeted_field(fields, module), []).extend(roles.values())
            continue
        weight_info = base_by_param.get(weight_name) if weight_name else None
        replaced = parts.replacements.get(f"{module}.weight")
        weight_shape = tuple(weights[replaced].shape) if replaced else (tuple(weight_info.shape) if weight_info else None)
        if weight_shape is None or len(weight_shape) != 2:
            raise _NeedsPeft(f"{module} has no 2-D weight in the base")
        if layout.from_checkpoint:
            kind = _kind_from_shapes(acfg.peft_type, layout.model_type, roles, weights, weight_shape)
        op = _module_op(acfg, module, kind, roles, weights, weight_shape)
        ops_by_param.setdefault(weight_name, []).append((op, False))
        bias_name = layout.canonical_name(f"{module}.bias")
        if op.touches_bias and bias_name in base_by_param:
            ops_by_param.setdefault(bias_name, []).append((op, True))
        elif "lora_B_bias" in roles:
            raise IncompatibleBaseError(f"adapter trains a bias for {module} (lora_bias) but the base layer has none")
        counts[op.kind] += 1
    if missing_modules:
        raise IncompatibleBaseError(
            f"adapter targets {len(missing_modules)} module(s) missing from base {common['base'].label}, "
            f"e.g. {missing_modules[0]}; check that --base is the model the adapter was trained on"
        )

    modules_to_save = fields.get("modules_to_save") or []
    local_repl: dict[str, str] = {}
    group_repl: dict[str, str] = {}
    for param, key in parts.replacements.items():
        name = layout.canonical_name(param)
        if name is None:  # PEFT would skip it as an unexpected key: the adapter was saved from another model
            unused.setdefault("modules_to_save", []).append(key)
            continue
        module = name.rsplit(".", 1)[0]
        _check_replacement_shape(name, tuple(weights[key].shape), base_by_param.get(name))
        if peft_rules.is_module_to_save(modules_to_save, module):
            local_repl[name] = key
            counts["modules_to_save"] += 1
        else:  # loaded into the shared parameter, so every tied alias sees it
            for member in layout.tied_group_of(name):
                group_repl[member] = key
            counts["replaced_tensors"] += 1
    if unused:
        raise unused_tensors_error(unused)
    if not counts:
        raise IncompatibleBaseError(
            f"adapter changes nothing in base {common['base'].label}: none of its saved tensors match a targeted module"
        )

    target_float = DTYPE_CODES.get(spec.dtype)
    float_codes = Counter(t.dtype for t in checkpoint.values() if t.dtype in _FLOAT_CODES)
    model_float = target_float or (float_codes.most_common(1)[0][0] if float_codes else "F32")

    def value_of(name: str):
        return (base_by_param.get(name), local_repl.get(name) or group_repl.get(name),
                tuple(ops_by_param.get(name, ())))

    jobs: list[TensorJob] = []
    written: set[str] = set()
    untied = False
    candidates = order + sorted(set(local_repl) | set(group_repl))
    for name in candidates:
        if name in written:
            continue
        group = layout.tied_group_of(name)
        values = {member: value_of(member) for member in group}
        if len({(id(v[0]), v[1], tuple((id(op), b) for op, b in v[2])) for v in values.values()}) == 1:
            emit = [name]
        else:
            emit = list(group)
            untied = True
        for member in emit:
            written.update(group if len(emit) == 1 else (member,))
            source, replacement, ops = values[member]
            if source is None and replacement is None:
                raise IncompatibleBaseError(f"base checkpoint has no {member} and the adapter does not provide it")
            start_code = source.dtype if replacement is None else CODE_FROM_DTYPE[weights[replacement].dtype]
            shape = tuple(weights[replacement].shape) if replacement else tuple(source.shape)
            is_float = start_code in _FLOAT_CODES
            if target_float and is_float:
                code = target_float
            elif replacement and is_float:
                code = source.dtype if source is not None and source.dtype in _FLOAT_CODES else model_float
            else:
                code = start_code
            jobs.append(TensorJob(member, source, replacement, ops, code, shape))

    updates: dict[str, Any] = {"architectures": [layout.architecture]} if layout.architecture else {}
    updates["dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[model_float]
    if untied:
        updates["tie_word_embeddings"] = False
        warnings.append("the adapter changes one side of tied embeddings; input and output embeddings are written "
                        "separately (tie_word_embeddings=false)")
    by_name = {j.name: j for j in jobs}
    emb = by_name.get(layout.input_embedding or "")
    if emb is not None and "vocab_size" in common["base_config"] and emb.shape[0] != common["base_config"]["vocab_size"]:
        updates["vocab_size"] = emb.shape[0]
    if acfg.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [j for n, j in by_name.items() if n.split(".")[0] in ("score", "classifier") and n.endswith(".weight")]
        head = heads[-1] if heads else None  # the last layer of the head gives the label count
        if head is not None:
            n_labels = head.shape[0]
            old = common["base_config"].get("id2label") or {}
            if len(old) != n_labels:
                updates["id2label"] = {str(i): f"LABEL_{i}" for i in range(n_labels)}
                updates["label2id"] = {f"LABEL_{i}": i for i in range(n_labels)}
    return MergePlan(**common, layout=layout, jobs=tuple(jobs), config_updates=updates,
                     module_counts=dict(sorted(counts.items())), warnings=tuple(warnings))
