"""PEFT's own merge_and_unload, in memory, for tuners merge-bot does not stream itself.

Exact by construction (it is PEFT's code) but holds the whole model in memory.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bot.adapter import all_finite, read_adapter_weights
from bot.errors import AdapterConfigError, IncompatibleBaseError, UnsupportedAdapterError
from bot.plan import DTYPE_CODES, MergePlan

log = logging.getLogger(__name__)


def load_peft_model(plan: MergePlan, *, dtype: torch.dtype | str = "auto"):
    """Base + adapter through PEFT, unmerged: the reference merge-bot's output must reproduce."""
    import transformers
    from peft import PeftConfig, PeftModel

    from bot.architecture import describe_model, load_config

    try:
        PeftConfig.from_pretrained(str(plan.adapter.path))
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedAdapterError(
            f"peft_type {plan.adapter_config.peft_type} is not known to the installed PEFT; upgrade peft or check the adapter"
        ) from e
    layout = describe_model(load_config(plan.base.path), task_type=plan.adapter_config.task_type)
    model_cls = getattr(transformers, layout.architecture)
    model = model_cls.from_pretrained(plan.base.path, dtype=dtype, trust_remote_code=False, use_safetensors=None)
    try:
        return PeftModel.from_pretrained(model, str(plan.adapter.path)), layout
    except (RuntimeError, ValueError) as e:
        raise IncompatibleBaseError(f"PEFT could not attach the adapter to the base: {str(e).splitlines()[0]}") from e


def _untie_if_adapted(model) -> bool:
    """Give the output embedding its own tensor when the adapter wraps either side of a tied pair.

    PEFT's merge writes into the shared tensor, which would change the other side too and
    no longer match the unmerged model; untying keeps the outputs identical.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = model.get_base_model()
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if inp is None or out is None:
        return False
    wrappers = (BaseTunerLayer, ModulesToSaveWrapper)
    inner_in = inp.get_base_layer() if isinstance(inp, BaseTunerLayer) else inp
    inner_out = out.get_base_layer() if isinstance(out, BaseTunerLayer) else out
    tied = getattr(inner_in, "weight", None) is not None and inner_in.weight is getattr(inner_out, "weight", None)
    if not tied or not (isinstance(inp, wrappers) or isinstance(out, wrappers)):
        return False
    inner_out.weight = torch.nn.Parameter(inner_out.weight.detach().clone())
    base.config.tie_word_embeddings = False
    if hasattr(base.config, "get_text_config"):
        base.config.get_text_config().tie_word_embeddings = False
    return True


def peft_merge(plan: MergePlan, out: Path) -> tuple[list[str], dict[str, int]]:
    dtype = DTYPE_CODES.get(plan.spec.dtype)
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype, "auto")
    read_adapter_weights(plan.adapter.path)  # the same checks as the streaming path: readable, finite tensors
    model, _ = load_peft_model(plan, dtype=torch_dtype)
    untied = _untie_if_adapted(model)
    n_layers = sum(1 for m in model.modules() if hasattr(m, "merge") and hasattr(m, "get_base_layer"))
    try:
        merged = model.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError, RuntimeError) as e:
        raise UnsupportedAdapterError(
            f"PEFT cannot merge {plan.adapter_config.peft_type} adapters ({str(e).splitlines()[0]})"
        ) from e
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise AdapterConfigError(f"PEFT's merge gave NaN or infinite values in {name}; the adapter's weights "
                                     f"(or the base's, or a --dtype too narrow for them) are the cause")
    if untied:
        merged.config.tie_word_embeddings = False
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=plan.shard_bytes)
    files = sorted(p.name for p in out.iterdir())
    return files, {plan.adapter_config.peft_type: n_layers, "merged_modules": n_layers}
