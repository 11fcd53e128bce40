"""Merged model == PEFT's unmerged base+adapter, for every adapter kind merge-bot supports."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import pytest
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, TaskType
from safetensors import safe_open

from bot.cli import main
from factory import VOCAB, assert_matches_peft, build_adapter, build_base


@dataclass
class Case:
    base: str
    config: Callable[[], object]
    auto_class: str = "AutoModelForCausalLM"
    resize_vocab: int | None = None
    num_labels: int | None = None
    edit_config: Callable[[dict], None] | None = None
    expect_untied: bool = False
    expect_counts: dict = field(default_factory=dict)


def _null_targets(cfg: dict) -> None:
    cfg["target_modules"] = None  # old/hand-written configs: PEFT falls back to its per-model defaults


CASES = {
    "lora": Case("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                 expect_counts={"LORA": 6}),
    "rslora": Case("llama", lambda: LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    "rank_alpha_pattern": Case("llama", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "gate_proj": 6}, alpha_pattern={"k_proj": 2, "^model.layers.1.self_attn.q_proj": 16})),
    "layers_to_transform": Case("llama", lambda: LoraConfig(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
                                expect_counts={"LORA": 2}),
    "target_regex": Case("llama", lambda: LoraConfig(r=4, target_modules=r".*\.1\.mlp\.(gate|up)_proj")),
    "default_targets": Case("mistral", lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), edit_config=_null_targets),
    "dora": Case("llama", lambda: LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
                 expect_counts={"DORA": 6}),
    "embedding_tied": Case("llama", lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), expect_untied=True),
    "modules_to_save_tied": Case("llama", lambda: LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                 expect_untied=True),
    "resized_vocab": Case("llama_untied", lambda: LoraConfig(r=4, target_modules=["q_proj"],
                                                            modules_to_save=["embed_tokens", "lm_head"]), resize_vocab=VOCAB + 8),
    "resized_vocab_tied_lora_embedding": Case("llama", lambda: LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
                                              resize_vocab=VOCAB + 8, expect_untied=True),
    "bias_all": Case("qwen2", lambda: LoraConfig(r=4, target_modules=["q_proj", "k_proj"], bias="all")),
    "bias_lora_only": Case("qwen2", lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only")),
    "lora_bias": Case("qwen2", lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True)),
    "gpt2_fan_in_fan_out": Case("gpt2", lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                                expect_counts={"LORA": 8}),
    "gpt2_dora": Case("gpt2", lambda: LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    "t5_seq2seq": Case("t5", lambda: LoraConfig(r=4, target_modules=["q", "v", "wo"], task_type=TaskType.SEQ_2_SEQ_LM),
                       auto_class="AutoModelForSeq2SeqLM"),
    "seq_cls_head": Case("llama_untied", lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.SEQ_CLS),
                         auto_class="AutoModelForSequenceClassification", num_labels=3),
    "ia3": Case("llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                expect_counts={"IA3": 6}),
    "ia3_bias": Case("qwen2", lambda: IA3Config(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])),
    "ia3_gpt2": Case("gpt2", lambda: IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                                fan_in_fan_out=True)),
    "loha": Case("llama", lambda: LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj", "gate_proj"],
                                             rank_pattern={"gate_proj": 2})),
    "lokr": Case("llama", lambda: LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj", "gate_proj"])),
    "lokr_decomposed": Case("llama", lambda: LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"], decompose_both=True,
                                                        decompose_factor=4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_model_matches_peft_unmerged(name, cache_dir, tmp_path):
    case = CASES[name]
    base = build_base(cache_dir, case.base)
    adapter = build_adapter(cache_dir, name, base, case.base, case.config(), auto_class=case.auto_class,
                            resize_vocab=case.resize_vocab, edit_config=case.edit_config, num_labels=case.num_labels)
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet"]) == 0

    assert_matches_peft(out, base, adapter, auto_class=case.auto_class, resize_vocab=case.resize_vocab,
                        num_labels=case.num_labels)

    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "streaming"
    for kind, count in case.expect_counts.items():
        assert report["module_counts"][kind] == count
    if case.expect_untied:
        assert config["tie_word_embeddings"] is False
    if case.resize_vocab:
        assert config["vocab_size"] == case.resize_vocab
    if case.num_labels:
        assert len(config["id2label"]) == case.num_labels
        assert config["architectures"] == ["LlamaForSequenceClassification"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any(part in key for key in keys for part in ("lora_", "ia3_", "hada_", "lokr_", "base_layer", "modules_to_save"))
