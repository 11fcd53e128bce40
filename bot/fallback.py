"""PEFT's own merge_and_unload, in memory, for tuners merge-bot does not stream itself.

Exact by construction (it is PEFT's code) but holds the whole model in memory.
"""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from bot.adapter import all_finite, read_adapter_weights
from bot.errors import AdapterConfigError, IncompatibleBaseError, UnsupportedAdapterError
from bot.plan import DTYPE_CODES, MergePlan

log = logging.getLogger(__name__)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """PEFT's and transformers' own warnings, log lines and progress bars, kept off the terminal.

    merge-bot says what matters in its own words (unknown fields, unused or missing adapter
    tensors, the fallback itself); the rest (deprecation notices, notes about training
    settings) goes to the debug log.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    peft_logger = logging.getLogger("peft")
    peft_level = peft_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    peft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            log.debug("library warning (%s): %s", warning.category.__name__, warning.message)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        peft_logger.setLevel(peft_level)


def load_peft_model(plan: MergePlan, *, dtype: torch.dtype | str = "auto"):
    """Base + adapter through PEFT, unmerged: the reference merge-bot's output must reproduce.

    Every tensor saved in the adapter must land in the model (``check_every_tensor_loaded``):
    PEFT skips saved keys it has no module for, so a reference built on a misspelt target would
    agree with a merge that dropped part of the adapter.
    """
    import transformers

    from bot.architecture import describe_model, load_config
    from bot.peft_config import build_peft_config

    config = build_peft_config(plan.adapter_config)
    layout = describe_model(load_config(plan.base.path), task_type=plan.adapter_config.task_type)
    model_cls = getattr(transformers, layout.architecture)
    with quiet_libraries():
        labels = (plan.config_updates or {}).get("id2label")  # a head of the size the adapter saved
        extra = {"num_labels": len(labels)} if labels else {}
        model = model_cls.from_pretrained(plan.base.path, dtype=dtype, trust_remote_code=False, use_safetensors=None,
                                          **extra)
        resize_like_adapter(model, read_adapter_weights(plan.adapter.path))
        try:
            peft_model, loaded = _attach_adapter(model, config, plan.adapter.path)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise IncompatibleBaseError(f"PEFT could not attach the adapter to the base: {str(e).splitlines()[0]}") from e
    check_every_tensor_loaded(loaded)
    return peft_model, layout


def resize_like_adapter(model, saved: Mapping[str, torch.Tensor]) -> None:
    """A vocabulary the adapter saved (``saved``: its tensors by key) at another size: the base is resized
    first, as its trainer did (``resize_token_embeddings`` before ``get_peft_model``), so PEFT's saved
    embeddings fit."""
    emb = model.get_input_embeddings()
    if emb is None:
        return
    embeddings = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight", "lm_head.weight",
                  "embed_in.weight", "embed_out.weight")
    rows = {int(t.shape[0]) for k, t in saved.items()
            if k.replace(".base_layer.", ".").endswith(embeddings) and t.dim() == 2}
    rows.discard(emb.weight.shape[0])
    if len(rows) == 1:
        model.resize_token_embeddings(rows.pop(), mean_resizing=False)


def _attach_adapter(model, config, adapter_path: Path, *, low_cpu_mem_usage: bool = False):
    """``PeftModel.from_pretrained`` in its two steps (wrap, then ``load_adapter``), keeping the load
    result that from_pretrained drops: which saved keys PEFT had no place for."""
    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    config.inference_mode = True
    key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}  # as from_pretrained does
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    peft_model = cls(model, config, "default", low_cpu_mem_usage=low_cpu_mem_usage)
    loaded = peft_model.load_adapter(str(adapter_path), "default", is_trainable=False, key_mapping=key_mapping,
                                     low_cpu_mem_usage=low_cpu_mem_usage)
    return peft_model, loaded


def _saved_name(key: str) -> str:
    """A key of the loaded model's state as the adapter file spells it (without PEFT's adapter name)."""
    return key.replace(".default.", ".").removesuffix(".default").removeprefix("base_model.model.")


def check_every_tensor_loaded(loaded) -> None:
    """Refuse when PEFT left saved adapter tensors unused; note tensors PEFT expected but did not find."""
    from bot.plan import unused_tensors_error

    # PEFT saves a wrapped embedding's internals too (``x.modules_to_save.weight``, ``x.original_module.weight``,
    # beside ``x.weight``, which is what it loads): redundant copies, not part of the adapter left unused.
    unexpected = sorted(_saved_name(k) for k in loaded.unexpected_keys
                        if not re.search(r"\.(modules_to_save|original_module)\.[^.]+$", k))
    if unexpected:
        has_mts = any(".modules_to_save." in k or ".base_layer." in k for k in unexpected)
        raise unused_tensors_error({"modules_to_save" if has_mts else "target_modules": unexpected})
    adapter_missing = sorted(k for k in loaded.missing_keys if ".default" in k)
    if adapter_missing:
        log.warning("the adapter's weights lack %d tensor(s) that its config asks for (e.g. %s); PEFT keeps their "
                    "initial values, and so does the merge", len(adapter_missing), _saved_name(adapter_missing[0]))


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
    inner_out.weight = torch.nn.Parameter(inner_out.weight.detach().clone())  # type: ignore[operator]
    base.config.tie_word_embeddings = False
    if hasattr(base.config, "get_text_config"):
        base.config.get_text_config().tie_word_embeddings = False
    return True


def peft_merge(plan: MergePlan, out: Path) -> tuple[list[str], dict[str, int], int]:
    """PEFT's merge_and_unload saved into ``out``: (files, module counts, tensors written)."""
    dtype = DTYPE_CODES.get(plan.spec.dtype)
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype, "auto")
    read_adapter_weights(plan.adapter.path)  # the same checks as the streaming path: readable, finite tensors
    model, _ = load_peft_model(plan, dtype=torch_dtype)
    untied = _untie_if_adapted(model)
    n_layers = sum(1 for m in model.modules() if hasattr(m, "merge") and hasattr(m, "get_base_layer"))
    with quiet_libraries():
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
    return files, {plan.adapter_config.peft_type: n_layers, "merged_modules": n_layers}, count_tensors(out)


def count_tensors(folder: Path) -> int:
    """Tensors in the safetensors files of ``folder``, read from their headers."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            total += len(list(f.keys()))
    return total
