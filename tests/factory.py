"""Tiny seeded models and adapters, built on the fly with transformers and PEFT."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, T5Config

warnings.filterwarnings("ignore")

VOCAB = 96

BASE_CONFIGS: dict[str, Callable[[], object]] = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 architectures=["LlamaForCausalLM"]),
    "llama_untied": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        pad_token_id=0, architectures=["LlamaForCausalLM"]),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                 architectures=["Qwen2ForCausalLM"]),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, architectures=["MistralForCausalLM"]),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"]),
    "t5": lambda: T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8,
                           decoder_start_token_id=0, architectures=["T5ForConditionalGeneration"]),
}


def model_class(name: str):
    config = BASE_CONFIGS[name]()
    return getattr(transformers, config.architectures[0])


def build_base(cache: Path, name: str, *, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
    """Save a seeded random base model once per (name, dtype, shard) under ``cache``."""
    folder = cache / f"base-{name}-{str(dtype).split('.')[-1]}-{shard or 'one'}"
    if not (folder / "config.json").exists():
        torch.manual_seed(1234)
        config = BASE_CONFIGS[name]()
        model = model_class(name)(config).to(dtype)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, **kwargs)
    return folder


def perturb_trainable(model, seed: int = 0) -> None:
    """Give every trainable adapter tensor non-trivial values (PEFT initialises B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * 0.2
                center = 1.0 if ("ia3_l" in name or "magnitude" in name) else 0.0
                param.copy_((center + noise).to(param.dtype) if center else (param.float() + noise).to(param.dtype))


def build_adapter(cache: Path, tag: str, base: Path, base_name: str, peft_config, *,
                  auto_class: str | None = None, resize_vocab: int | None = None,
                  edit_config: Callable[[dict], None] | None = None, num_labels: int | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Train-free adapter: attach ``peft_config`` to the base, perturb it, save it."""
    from peft import get_peft_model

    folder = cache / f"adapter-{tag}"
    if (folder / "adapter_config.json").exists():
        return folder
    cls = getattr(transformers, auto_class) if auto_class else model_class(base_name)
    kwargs = {"num_labels": num_labels} if num_labels else {}
    model = cls.from_pretrained(base, dtype=dtype, **kwargs)
    if resize_vocab:
        torch.manual_seed(99)
        model.resize_token_embeddings(resize_vocab)
    peft_model = get_peft_model(model, peft_config)
    perturb_trainable(peft_model)
    peft_model.save_pretrained(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    if edit_config:
        edit_config(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return folder


def reference_outputs(base: Path, adapter: Path, *, auto_class: str, inputs: dict, resize_vocab: int | None = None,
                      num_labels: int | None = None) -> torch.Tensor:
    """PEFT's own unmerged forward: the spec the merged model must reproduce."""
    from peft import PeftModel

    kwargs = {"num_labels": num_labels} if num_labels else {}
    model = getattr(transformers, auto_class).from_pretrained(base, dtype=torch.float32, **kwargs)
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        return model(**inputs).logits.float()


def peft_merged_state(base: Path, adapter: Path, base_name: str, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload with the base loaded in ``dtype``. In float64 (the base's
    float32/bf16 values and the adapter's upcast exactly) it is the reference for correct rounding."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model_class(base_name).from_pretrained(base, dtype=dtype), adapter)
    return model.merge_and_unload().state_dict()


def merged_outputs(folder: Path, *, auto_class: str, inputs: dict) -> torch.Tensor:
    model = getattr(transformers, auto_class).from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(**inputs).logits.float()


def assert_matches_peft(merged: Path, base: Path, adapter: Path, *, auto_class: str = "AutoModelForCausalLM",
                        tol: float = 1e-5, resize_vocab: int | None = None, num_labels: int | None = None) -> None:
    """The merged folder's logits equal PEFT's unmerged forward of base + adapter (float32)."""
    inputs = sample_inputs(seq2seq=auto_class == "AutoModelForSeq2SeqLM")
    expected = reference_outputs(base, adapter, auto_class=auto_class, inputs=inputs, resize_vocab=resize_vocab,
                                 num_labels=num_labels)
    actual = merged_outputs(merged, auto_class=auto_class, inputs=inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def sample_inputs(*, seq2seq: bool = False, vocab: int = VOCAB) -> dict:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (2, 7), generator=gen)
    return inputs


def unverified_report(**changes):
    """A plausible ``MergeReport`` of a --no-verify merge of local folders, for code that renders one."""
    from bot.report import MergeReport, ReportOptions, ReportSource, Versions

    local = ReportSource(ref="a local folder", repo_id=None, revision="local-0123456789abcdef")
    report = MergeReport(
        merge_bot_version="0.0.0", fingerprint="0" * 32, adapter=local, base=local, base_note=None,
        requested_by=None, architecture="LlamaForCausalLM", peft_type="LORA", task_type="CAUSAL_LM",
        options=ReportOptions(dtype="auto", max_shard_bytes="auto", device="cpu"), scaling={"2.0": 4},
        method="streaming", output_dtype="float32", module_counts={"LORA": 4}, tensors_written=20,
        tensors_merged=4, warnings=(), timing_seconds=0.1, peak_rss_bytes=1, verification=None,
        versions=Versions(python="3", torch="2", transformers=None, peft=None, safetensors=None,
                          huggingface_hub=None))
    return replace(report, **changes)
