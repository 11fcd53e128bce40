"""What the base architecture looks like, learned from a weightless (meta-device) instance.

Building the model on the ``meta`` device costs no memory and tells us, with
transformers' own code, which class and Auto class to use, each module's type (Linear,
GPT-2's Conv1D, Embedding), which parameters are tied, and the prefix rules that map
checkpoint names onto parameter names. Never with ``trust_remote_code``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from bot.errors import IncompatibleBaseError

log = logging.getLogger(__name__)

# PEFT task_type -> the transformers Auto class PEFT's task model wraps.
TASK_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Auto class -> name of transformers' model_type -> class-name table, in lookup order.
_AUTO_TABLES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


# Model types whose linear layers are transformers' Conv1D, storing weights (in, out).
# Only consulted for square weights, where shapes alone cannot tell the layout.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "omniasr"})


@dataclass(frozen=True)
class ModelLayout:
    """The target architecture, without weights.

    Built from a meta-device model when the adapter touches embeddings, heads or tied
    weights (``describe_model``); for the common case of adapters on plain linear layers
    the checkpoint alone is enough (``checkpoint_layout``), which spares the merge the
    seconds it takes to import transformers' modeling code.
    """

    model_type: str
    architecture: str  # class name, e.g. LlamaForCausalLM
    auto_class: str  # e.g. AutoModelForCausalLM
    base_model_prefix: str
    module_types: dict[str, str]  # module name -> "linear" | "conv1d" | "embedding" | "conv" | "other"
    param_names: tuple[str, ...]  # every state-dict name, tied duplicates included
    tied_groups: tuple[tuple[str, ...], ...]  # names sharing one tensor, in state-dict order
    input_embedding: str | None  # parameter name of the input embedding weight
    output_embedding: str | None
    from_checkpoint: bool = False  # True: names are checkpoint keys, module types unknown

    @cached_property
    def _names(self) -> frozenset[str]:
        return frozenset(self.param_names)

    def tied_group_of(self, name: str) -> tuple[str, ...]:
        for group in self.tied_groups:
            if name in group:
                return group
        return (name,)

    def canonical_name(self, checkpoint_key: str) -> str | None:
        """Map a checkpoint key onto a parameter name, the way transformers adds or strips the base prefix."""
        names = self._names
        if checkpoint_key in names:
            return checkpoint_key
        if self.from_checkpoint:  # a model-side name against a bare-base checkpoint: drop the prefix
            rest = checkpoint_key.partition(".")[2]
            return rest if rest in names else None
        prefix = self.base_model_prefix
        if prefix:
            if f"{prefix}.{checkpoint_key}" in names:
                return f"{prefix}.{checkpoint_key}"
            if checkpoint_key.startswith(prefix + ".") and checkpoint_key[len(prefix) + 1:] in names:
                return checkpoint_key[len(prefix) + 1:]
        return None


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except ValueError as e:
        raise IncompatibleBaseError(
            f"base config in {folder} names an architecture transformers does not know "
            "(it may need remote code, which merge-bot never runs)"
        ) from e
    except OSError as e:
        raise IncompatibleBaseError(f"base folder {folder} has no readable config.json") from e


def _auto_class_for(model_type: str, class_name: str) -> str:
    from transformers.models.auto import modeling_auto

    for auto_name, table_name in _AUTO_TABLES:
        table = getattr(modeling_auto, table_name, {})
        value = table.get(model_type)
        if value == class_name or (isinstance(value, (tuple, list)) and class_name in value):
            return auto_name
    return "AutoModel"


def _model_class(config, task_type: str | None):
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = config.model_type
    if task_type in TASK_AUTO_CLASS:
        auto_name = TASK_AUTO_CLASS[task_type]
        table_name = dict(_AUTO_TABLES)[auto_name]
        class_name = getattr(modeling_auto, table_name, {}).get(model_type)
        if isinstance(class_name, (list, tuple)):
            class_name = class_name[0]
        if not class_name:
            raise IncompatibleBaseError(
                f"the adapter is for task {task_type} but transformers has no {auto_name} for {model_type} models"
            )
    else:
        archs = getattr(config, "architectures", None) or []
        class_name = archs[0] if archs else None
        if class_name is None:
            class_name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or \
                modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, str(class_name), None) if class_name else None
    if cls is None:
        raise IncompatibleBaseError(
            f"architecture {class_name} is not part of transformers (it may need remote code, "
            "which merge-bot never runs)"
        )
    return cls


def _module_kind(module: torch.nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    return "other"


def describe_model(config, *, task_type: str | None = None) -> ModelLayout:
    """Instantiate the target class on the meta device and read its layout."""
    cls = _model_class(config, task_type)
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # a config the class rejects; say which and stop
        raise IncompatibleBaseError(f"cannot build {cls.__name__} from the base config: {e}") from e
    state = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    tied = tuple(tuple(names) for names in by_tensor.values() if len(names) > 1)

    def weight_name(module) -> str | None:
        if module is None or getattr(module, "weight", None) is None:
            return None
        for name, tensor in state.items():
            if tensor is module.weight:
                return name
        return None

    try:
        out_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out_emb = None
    try:
        in_emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        in_emb = None
    out_name = None
    if out_emb is not None:
        out_name = next((f"{n}.weight" for n, m in model.named_modules() if m is out_emb), None)
    return ModelLayout(
        model_type=config.model_type,
        architecture=cls.__name__,
        auto_class=_auto_class_for(config.model_type, cls.__name__),
        base_model_prefix=getattr(cls, "base_model_prefix", "") or "",
        module_types={name: _module_kind(m) for name, m in model.named_modules(remove_duplicate=False) if name},
        param_names=tuple(state),
        tied_groups=tied,
        input_embedding=weight_name(in_emb),
        output_embedding=out_name,
    )


def checkpoint_layout(base_config: dict, checkpoint_keys: list[str]) -> ModelLayout:
    """A layout from config.json and the checkpoint's names alone (no transformers import)."""
    archs = base_config.get("architectures") or []
    return ModelLayout(
        model_type=str(base_config.get("model_type", "")),
        architecture=archs[0] if archs else "",
        auto_class="",
        base_model_prefix="",
        module_types={},
        param_names=tuple(checkpoint_keys),
        tied_groups=(),
        input_embedding=None,
        output_embedding=None,
        from_checkpoint=True,
    )


def infer_linear_kind(model_type: str, weight_shape: tuple[int, ...], produced_out_in: tuple[int, int]) -> str | None:
    """"linear" if the weight is stored (out, in), "conv1d" if (in, out); None if neither fits."""
    out_dim, in_dim = produced_out_in
    fits_linear = weight_shape == (out_dim, in_dim)
    fits_conv1d = weight_shape == (in_dim, out_dim)
    if fits_linear and fits_conv1d:
        return "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"
    if fits_linear:
        return "linear"
    if fits_conv1d:
        return "conv1d"
    return None
