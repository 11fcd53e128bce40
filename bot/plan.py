"""resolve_plan(spec) -> MergePlan: everything decided and checked, no base weights loaded.

The plan names, for every output tensor, where its value comes from (a base tensor or
a whole tensor saved in the adapter), which adapter ops apply to it, and its output
dtype and shape. All adapter/base mismatches are found here, before anything is written.
The adapter's tensors are read once, here, and the plan carries those its jobs use to the merge.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from bot import peft_rules
from bot.adapter import (PEFT_PREFIX, AdapterConfig, AdapterTensors, read_adapter_config, read_adapter_weights,
                         split_adapter_keys)
from bot.architecture import (CONV1D_MODEL_TYPES, ModelLayout, checkpoint_layout, describe_model, load_config)
from bot.checkpoint import BinTensorInfo, index_checkpoint, index_remote_checkpoint, local_weight_bytes
from bot.errors import AdapterConfigError, IncompatibleBaseError, UnsupportedAdapterError, UsageError
from bot.jsonfile import read_json_object
from bot.shards import CODE_FROM_DTYPE, OutputTensor, TensorInfo
from bot.sources import ResolvedSource, is_tokenizer_file, resolve_source
from bot.spec import MergeSpec, SourceRef, auto_shard_bytes, parse_source_ref
from bot.transport import hub_client
from bot.tuners import ModuleOp, NeedsPeft, OpRequest, get_tuner, is_streamed, tuners

if TYPE_CHECKING:
    from huggingface_hub import HfApi

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
    # The adapter tensors the jobs use, by saved key: read once for the plan and merged from, never again.
    adapter_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    hub_url: str = ""  # the Hub the sources were read from (the job's client's endpoint): the card links there

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
        return local_weight_bytes(self.base.path)


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
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(acfg.peft_type)  # type: ignore[call-overload]  # keyed by a str enum
    if tuner is None or not hasattr(tuner, "merge_and_unload"):
        raise UnsupportedAdapterError(f"PEFT cannot merge {acfg.peft_type} adapters into the base weights")
    build_peft_config(acfg)  # what PEFT's config class refuses, with PEFT's reason, before any download


def resolve_plan(spec: MergeSpec, *, stream_base: bool = False, api: HfApi | None = None) -> MergePlan:
    """Resolve the sources and decide every output tensor. ``stream_base``: a Hub base's safetensors
    weights are not downloaded; the plan reads their headers remotely and its tensors are fetched
    piece by piece while merging (``bot.pipeline``). PEFT's own merge needs them whole: downloaded then.
    ``api``: the job's Hub client (by default one for ``spec.token``)."""
    api = api or hub_client(token=spec.token)
    adapter = resolve_source(spec.adapter, what="adapter", api=api)
    acfg = read_adapter_config(adapter.path)
    if not acfg.is_native:
        check_peft_can_merge(acfg)
    base_ref = base_ref_for(spec, acfg)
    base = resolve_source(base_ref, what="base", api=api, stream_weights=stream_base and acfg.is_native)
    config_path = base.path / "config.json"
    if not config_path.is_file():
        raise IncompatibleBaseError(f"base {base.label} has no config.json; is it a transformers model?")
    base_config = read_json_object(config_path, error=IncompatibleBaseError, what="base config.json",
                                   fix=f"re-download {base.label}")
    check_not_quantized(base_config, base)
    tokenizer_folder = adapter.path if any(is_tokenizer_file(p.name) for p in adapter.path.iterdir()) else base.path
    common: dict[str, Any] = dict(spec=spec, adapter=adapter, base=base, adapter_config=acfg, base_config=base_config,
                  tokenizer_folder=tokenizer_folder, hub_url=api.endpoint.rstrip("/"))
    if not acfg.is_native:
        what = f"{acfg.peft_type} with {acfg.peft_only_field}" if is_streamed(acfg.peft_type) else acfg.peft_type
        return MergePlan(**common, fallback_reason=f"{what} is merged by PEFT itself",
                         warnings=unknown_field_notes(acfg))
    weights = read_adapter_weights(adapter.path)
    parts = split_adapter_keys(list(weights))
    checkpoint = index_remote_checkpoint(base.remote) if base.remote else index_checkpoint(base.path)[0]
    layout = checkpoint_layout(base_config, list(checkpoint))
    if needs_model_layout(acfg, parts, list(weights), layout, base_config):
        layout = describe_model(load_config(base.path), task_type=acfg.task_type)
    try:
        plan = _plan_streaming(common, acfg, weights, parts, checkpoint, layout)
    except NeedsPeft as e:
        if base.remote:  # PEFT loads the whole base from a folder
            common["base"] = resolve_source(base_ref, what="base", api=api)
        return MergePlan(**common, fallback_reason=str(e))
    used = used_adapter_keys(plan.jobs)
    return replace(plan, adapter_tensors={key: tensor for key, tensor in weights.items() if key in used})


def used_adapter_keys(jobs: tuple[TensorJob, ...]) -> set[str]:
    """The saved adapter keys the jobs read: whole-tensor replacements and every op's tensors."""
    return {job.replacement for job in jobs if job.replacement} | {
        key for job in jobs for op, _ in job.ops for key in op.tensors.values()}


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
    embedding_suffixes = tuple(s for tuner in tuners() for s in tuner.embedding_suffixes)  # LoRA on nn.Embedding
    if not base_config.get("architectures") or any(k.endswith(embedding_suffixes) for k in keys):
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


def module_op(acfg: AdapterConfig, module: str, kind: str, roles: Mapping[str, str],
              weights: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> ModuleOp:
    """Build and shape-check one module's op with its tuner's ``build_op``; raise on a mismatch with the base,
    ``NeedsPeft`` for what only PEFT merges (a role or a kind of module the tuner does not stream)."""
    tuner = get_tuner(acfg.peft_type)
    unknown = set(roles) - tuner.roles
    if unknown:
        raise NeedsPeft(f"{acfg.peft_type} module {module} uses {sorted(unknown)[0]}")
    if kind not in tuner.module_kinds:
        raise NeedsPeft(f"{acfg.peft_type} on a {kind} module ({module})")
    shapes = {role: tuple(weights[key].shape) for role, key in roles.items()}
    return tuner.build_op(OpRequest(acfg.peft_type, module, kind, roles, shapes, weight_shape, acfg.fields))


def storage_kind(peft_type: str, model_type: str, roles: Mapping[str, str], weights: Mapping[str, torch.Tensor],
                 weight_shape: tuple[int, ...]) -> str:
    """Linear or Conv1D storage, told by which orientation the adapter's shapes fit (the tuner's ``storage_kind``).

    When the shapes fit neither (or the tuner's do not say), the model family decides and
    ``module_op`` then names any mismatch.
    """
    family_default = "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"
    from_shapes = get_tuner(peft_type).storage_kind
    if from_shapes is None:
        return family_default
    shapes = {role: tuple(weights[key].shape) for role, key in roles.items()}
    return from_shapes(model_type, shapes, weight_shape) or family_default


# The steps of a streaming plan, in the order their answers depend on each other (resolve_plan
# runs them through _plan_streaming): targets -> base tensors -> ops -> replacements -> check
# that every saved tensor is used -> output dtypes -> jobs with ties -> config updates.

def effective_fields(acfg: AdapterConfig, layout: ModelLayout) -> dict[str, Any]:
    """Targets: the config's fields with ``target_modules`` as PEFT resolves it on this model.

    An unset ``target_modules`` takes PEFT's per-architecture default; ``all-linear`` expands to
    every linear module (also under the bare model's names, for an adapter trained on it).
    """
    fields = dict(acfg.fields)
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
    return fields


BaseInfo = TensorInfo | BinTensorInfo


@dataclass(frozen=True)
class BaseTensors:
    """The base checkpoint by the model's parameter names."""

    by_param: dict[str, BaseInfo]  # every parameter name, tied aliases included -> the stored tensor
    order: list[str]  # canonical names in checkpoint order: the output's order
    dropped: list[str]  # stored keys the architecture does not use


def base_tensors(checkpoint: Mapping[str, BaseInfo], layout: ModelLayout) -> BaseTensors:
    """Base tensors: each stored tensor under its canonical name and every name tied to it."""
    by_param: dict[str, BaseInfo] = {}
    order: list[str] = []
    dropped = []
    for key, info in checkpoint.items():
        name = layout.canonical_name(key)
        if name is None:
            dropped.append(key)
            continue
        for member in layout.tied_group_of(name):
            by_param.setdefault(member, info)
        order.append(name)
    return BaseTensors(by_param, order, dropped)


@dataclass
class _Usage:
    """What the ops and replacements steps found: per-kind counts, and saved keys no module takes."""

    counts: Counter[str] = field(default_factory=Counter)
    unused: dict[str, list[str]] = field(default_factory=dict)  # config field that would have to name them -> keys

    def skip(self, field_name: str, keys: Iterable[str]) -> None:
        self.unused.setdefault(field_name, []).extend(keys)


def module_ops(acfg: AdapterConfig, fields: Mapping[str, Any], parts: AdapterTensors,
               weights: Mapping[str, torch.Tensor], layout: ModelLayout, base: BaseTensors, usage: _Usage, *,
               base_label: str) -> dict[str, list[tuple[ModuleOp, bool]]]:
    """Ops: for each adapted module PEFT targets, its op on the weight (and on the bias, where the op touches it).

    Returns parameter name -> [(op, applies to the bias)]. Untargeted modules' keys go to
    ``usage.unused``; a module the base lacks is an error naming it.
    """
    tuner = get_tuner(acfg.peft_type)
    ops_by_param: dict[str, list[tuple[ModuleOp, bool]]] = {}
    missing_modules: list[str] = []
    for module, roles in sorted(parts.modules.items()):
        weight_name = layout.canonical_name(f"{module}.weight")
        kind = layout.module_types.get(weight_name.rsplit(".", 1)[0] if weight_name else module)  # the model's name
        if (kind is None and not layout.from_checkpoint) or (layout.from_checkpoint and weight_name is None):
            missing_modules.append(module)
            continue
        if not peft_rules.is_targeted(fields, module):
            usage.skip(untargeted_field(dict(fields), module), roles.values())
            continue
        weight_info = base.by_param.get(weight_name) if weight_name else None
        replaced = parts.replacements.get(f"{module}.weight")
        weight_shape = tuple(weights[replaced].shape) if replaced else (tuple(weight_info.shape) if weight_info else None)
        if weight_shape is None or len(weight_shape) != 2:
            raise NeedsPeft(f"{module} has no 2-D weight in the base")
        if layout.from_checkpoint:
            kind = storage_kind(acfg.peft_type, layout.model_type, roles, weights, weight_shape)
        assert kind is not None  # a model layout names it; a checkpoint-only one was just told
        op = module_op(acfg, module, kind, roles, weights, weight_shape)
        ops_by_param.setdefault(weight_name, []).append((op, False))
        bias_name = layout.canonical_name(f"{module}.bias")
        trained_bias = [tuner.bias_roles[r] for r in roles if r in tuner.bias_roles]
        if op.touches_bias and bias_name in base.by_param:
            ops_by_param.setdefault(bias_name, []).append((op, True))
        elif trained_bias:
            raise IncompatibleBaseError(f"adapter trains a bias for {module} ({trained_bias[0]}) but the base layer "
                                        f"has none")
        usage.counts[op.kind] += 1
    if missing_modules:
        raise IncompatibleBaseError(
            f"adapter targets {len(missing_modules)} module(s) missing from base {base_label}, "
            f"e.g. {missing_modules[0]}; check that --base is the model the adapter was trained on"
        )
    return ops_by_param


@dataclass(frozen=True)
class Replacements:
    """Whole tensors saved in the adapter that replace the base's (parameter name -> saved key)."""

    local: dict[str, str]  # a modules_to_save copy: only this name, not its tied aliases
    shared: dict[str, str]  # loaded into the shared parameter: every tied alias


def replacements(fields: Mapping[str, Any], parts: AdapterTensors, weights: Mapping[str, torch.Tensor],
                 layout: ModelLayout, base: BaseTensors, usage: _Usage) -> Replacements:
    """Replacements: where each whole saved tensor goes, shape-checked as PEFT's ``load_state_dict`` would."""
    modules_to_save = fields.get("modules_to_save") or []
    local: dict[str, str] = {}
    shared: dict[str, str] = {}
    for param, key in parts.replacements.items():
        name = layout.canonical_name(param)
        if name is None:  # PEFT would skip it as an unexpected key: the adapter was saved from another model
            usage.skip("modules_to_save", [key])
            continue
        module = name.rsplit(".", 1)[0]
        _check_replacement_shape(name, tuple(weights[key].shape), base.by_param.get(name))
        if peft_rules.is_module_to_save(modules_to_save, module):
            local[name] = key
            usage.counts["modules_to_save"] += 1
        else:  # loaded into the shared parameter, so every tied alias sees it
            for member in layout.tied_group_of(name):
                shared[member] = key
            usage.counts["replaced_tensors"] += 1
    return Replacements(local, shared)


def check_usage(usage: _Usage, *, base_label: str) -> None:
    """Every saved tensor is used (PEFT would drop the others with a warning), and something is changed."""
    if usage.unused:
        raise unused_tensors_error(usage.unused)
    if not usage.counts:
        raise IncompatibleBaseError(
            f"adapter changes nothing in base {base_label}: none of its saved tensors match a targeted module"
        )


def model_float_code(dtype: str, checkpoint: Mapping[str, BaseInfo]) -> str:
    """The output's float dtype: ``--dtype``, or under ``auto`` the base's most common float dtype."""
    target_float = DTYPE_CODES.get(dtype)
    float_codes = Counter(t.dtype for t in checkpoint.values() if t.dtype in _FLOAT_CODES)
    return target_float or (float_codes.most_common(1)[0][0] if float_codes else "F32")


def output_dtype(start_code: str, source: BaseInfo | None, replacement: str | None, *,
                 target_float: str | None, model_float: str) -> str:
    """Dtypes: one output tensor's dtype code. ``--dtype`` converts every float tensor; under ``auto`` a tensor
    keeps its stored dtype, and a saved replacement takes the base tensor's float dtype (or the model's)."""
    is_float = start_code in _FLOAT_CODES
    if target_float and is_float:
        return target_float
    if replacement and is_float:
        return source.dtype if source is not None and source.dtype in _FLOAT_CODES else model_float
    return start_code


def tensor_jobs(layout: ModelLayout, base: BaseTensors, ops_by_param: Mapping[str, list[tuple[ModuleOp, bool]]],
                repl: Replacements, weights: Mapping[str, torch.Tensor], *, target_float: str | None,
                model_float: str) -> tuple[list[TensorJob], bool]:
    """Ties: one job per output tensor. Returns (jobs, whether a tied group had to be written untied).

    A tied group (``lm_head.weight`` <-> ``embed_tokens.weight``) is written once while every
    member gets the same value; when the adapter changes one member only (a LoRA on
    ``lm_head``, a ``modules_to_save`` copy) each member is written on its own.
    """
    def value_of(name: str) -> tuple[BaseInfo | None, str | None, tuple[tuple[ModuleOp, bool], ...]]:
        return base.by_param.get(name), repl.local.get(name) or repl.shared.get(name), tuple(ops_by_param.get(name, ()))

    jobs: list[TensorJob] = []
    written: set[str] = set()
    untied = False
    for name in base.order + sorted(set(repl.local) | set(repl.shared)):
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
            if replacement is not None:
                start_code, shape = CODE_FROM_DTYPE[weights[replacement].dtype], tuple(weights[replacement].shape)
            elif source is not None:
                start_code, shape = source.dtype, tuple(source.shape)
            else:
                raise IncompatibleBaseError(f"base checkpoint has no {member} and the adapter does not provide it")
            code = output_dtype(start_code, source, replacement, target_float=target_float, model_float=model_float)
            jobs.append(TensorJob(member, source, replacement, ops, code, shape))
    return jobs, untied


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def config_updates(acfg: AdapterConfig, base_config: Mapping[str, Any], layout: ModelLayout, jobs: list[TensorJob],
                   *, model_float: str, untied: bool) -> dict[str, Any]:
    """Config updates: what ``config.json`` must say of the merged model.

    The architecture (a task head's class), its dtype, ``tie_word_embeddings: false`` when a
    tied group was untied, ``vocab_size`` when the adapter resized the embeddings, and fresh
    label maps when a classification head's label count differs from the base config's.
    """
    updates: dict[str, Any] = {"architectures": [layout.architecture]} if layout.architecture else {}
    updates["dtype"] = _DTYPE_NAMES[model_float]
    if untied:
        updates["tie_word_embeddings"] = False
    by_name = {j.name: j for j in jobs}
    emb = by_name.get(layout.input_embedding or "")
    if emb is not None and "vocab_size" in base_config and emb.shape[0] != base_config["vocab_size"]:
        updates["vocab_size"] = emb.shape[0]
    if acfg.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [j for n, j in by_name.items() if n.split(".")[0] in ("score", "classifier") and n.endswith(".weight")]
        head = heads[-1] if heads else None  # the last layer of the head gives the label count
        if head is not None:
            n_labels = head.shape[0]
            old = base_config.get("id2label") or {}
            if len(old) != n_labels:
                updates["id2label"] = {str(i): f"LABEL_{i}" for i in range(n_labels)}
                updates["label2id"] = {f"LABEL_{i}": i for i in range(n_labels)}
    return updates


def _plan_streaming(common: dict, acfg: AdapterConfig, weights: dict[str, torch.Tensor], parts: AdapterTensors,
                    checkpoint: Mapping[str, BaseInfo], layout: ModelLayout) -> MergePlan:
    """Every output tensor's fate for a tuner merge-bot streams: the steps above, top to bottom.

    Raises ``NeedsPeft`` when something in the adapter is for PEFT's own merge, and a
    ``MergeBotError`` for any mismatch with the base; nothing is read but shapes and dtypes.
    """
    spec: MergeSpec = common["spec"]
    base_label = common["base"].label
    warnings: list[str] = []
    fields = effective_fields(acfg, layout)
    base = base_tensors(checkpoint, layout)
    if base.dropped:
        warnings.append(f"dropped {len(base.dropped)} base tensors that {layout.architecture} does not use "
                        f"(e.g. {base.dropped[0]})")
    usage = _Usage()
    ops_by_param = module_ops(acfg, fields, parts, weights, layout, base, usage, base_label=base_label)
    repl = replacements(fields, parts, weights, layout, base, usage)
    check_usage(usage, base_label=base_label)
    model_float = model_float_code(spec.dtype, checkpoint)
    jobs, untied = tensor_jobs(layout, base, ops_by_param, repl, weights, target_float=DTYPE_CODES.get(spec.dtype),
                               model_float=model_float)
    if untied:
        warnings.append("the adapter changes one side of tied embeddings; input and output embeddings are written "
                        "separately (tie_word_embeddings=false)")
    updates = config_updates(acfg, common["base_config"], layout, jobs, model_float=model_float, untied=untied)
    return MergePlan(**common, layout=layout, jobs=tuple(jobs), config_updates=updates,
                     module_counts=dict(sorted(usage.counts.items())), warnings=tuple(warnings))
