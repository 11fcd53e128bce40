"""adapter_config.json files as found in the wild, merged against PEFT's own semantics.

Each entry below is a real adapter_config.json (or the dict a real script writes as one),
copied as data with its source. Only ``base_model_name_or_path`` is repointed at a tiny
seeded base; module names are kept unless the tiny model lacks them (``rename``).

For each config the adapter weights are made honestly: PEFT builds the config from the
dict (``PeftConfig.from_peft_type``), ``get_peft_model`` attaches it to the tiny base,
the trainable tensors are perturbed and saved, and then adapter_config.json is
overwritten with the in-the-wild dict, so its quirks are what merge-bot reads.

The spec is PEFT: either merge-bot's merged model gives the logits of
``PeftModel.from_pretrained(base, adapter)`` (unmerged), or merge-bot refuses with a
one-line error exactly when PEFT itself cannot load or merge the adapter.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from transformers import BertConfig, Gemma3TextConfig, GPTNeoXConfig, PhiConfig, Phi3Config, RobertaConfig, T5Config

import factory
from bot.cli import main
from factory import VOCAB, build_base, perturb_trainable, sample_inputs

# Extra tiny bases for architectures the in-the-wild configs were trained on.
factory.BASE_CONFIGS.setdefault("phi", lambda: PhiConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    architectures=["PhiForCausalLM"]))
factory.BASE_CONFIGS.setdefault("phi3", lambda: Phi3Config(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, architectures=["Phi3ForCausalLM"]))
factory.BASE_CONFIGS.setdefault("gpt_neox", lambda: GPTNeoXConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    architectures=["GPTNeoXForCausalLM"]))
factory.BASE_CONFIGS.setdefault("gemma3", lambda: Gemma3TextConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, architectures=["Gemma3ForCausalLM"]))
factory.BASE_CONFIGS.setdefault("t5_gated", lambda: T5Config(
    vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, feed_forward_proj="gated-gelu",
    decoder_start_token_id=0, tie_word_embeddings=False, architectures=["MT5ForConditionalGeneration"]))
factory.BASE_CONFIGS.setdefault("bert", lambda: BertConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, architectures=["BertForPreTraining"]))  # like bert-base-uncased: pooler included
factory.BASE_CONFIGS.setdefault("roberta", lambda: RobertaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, pad_token_id=1, architectures=["RobertaForMaskedLM"]))


@dataclass
class Wild:
    source: str  # where the config was found
    base: str  # tiny base (factory.BASE_CONFIGS key)
    config: dict  # the file, as found
    auto_class: str = "AutoModelForCausalLM"
    num_labels: int | None = None
    build: dict = field(default_factory=dict)  # fields changed only to let PEFT build weights
    rename: dict = field(default_factory=dict)  # target module names the tiny base spells differently
    reference: dict = field(default_factory=dict)  # fields changed only for PEFT's reference, where PEFT refuses
    #                                                 a config merge-bot merges (training-only fields)


def _lora(*defaults: dict, **fields) -> dict:
    merged = {"peft_type": "LORA"}
    for d in defaults:
        merged.update(d)
    return {**merged, **fields}


NEW_LORA_NULLS = {  # the all-null/empty fields PEFT >= 0.15 writes, as in the files below
    "alpha_pattern": {}, "corda_config": None, "eva_config": None, "exclude_modules": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_bias": False,
    "megatron_config": None, "megatron_core": "megatron.core", "rank_pattern": {}, "revision": None,
    "trainable_token_indices": None, "use_dora": False, "use_rslora": False, "qalora_group_size": 16,
    "target_parameters": None, "use_qalora": False, "auto_mapping": None, "fan_in_fan_out": False,
    "inference_mode": True, "init_lora_weights": True, "bias": "none",
}

WILD: dict[str, Wild] = {
    # --- PEFT 0.2/0.3 era (alpaca-lora) -----------------------------------------------------
    # KZ-Shi/LLaMA-E adapter_config.json
    "peft03_alpaca": Wild("github:KZ-Shi/LLaMA-E adapter_config.json", "llama", _lora(
        base_model_name_or_path="meta-llama/Llama-2-7b-hf", bias="none", enable_lora=None, fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, lora_alpha=16, lora_dropout=0.05, merge_weights=False,
        modules_to_save=None, r=8, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"], task_type="CAUSAL_LM")),
    # Emile-Jn/linguistic-steganalysis-with-llms adapter/adapter_config.json (query_key_value matches nothing in llama)
    "peft03_mixed_targets": Wild("github:Emile-Jn/linguistic-steganalysis-with-llms adapter/adapter_config.json", "llama",
        _lora(base_model_name_or_path="decapoda-research/llama-7b-hf", bias="none", enable_lora=None,
              fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, lora_alpha=16, lora_dropout=0.05,
              merge_weights=False, modules_to_save=None, r=8, target_modules=["q_proj", "v_proj", "query_key_value"],
              task_type="CAUSAL_LM")),
    # KJC-Dev/UpperDeckBot lora/adapter_config.json (PEFT 0.3, no enable_lora)
    "peft03_no_enable_lora": Wild("github:KJC-Dev/UpperDeckBot lora/adapter_config.json", "llama", _lora(
        base_model_name_or_path="/root/alpaca-lora/llama-7b-hf", bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, lora_alpha=16, lora_dropout=0.05, modules_to_save=None, r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")),
    # MountainAlpha/falcon-7b_lora_finetune lora/adapter_config.json (Baichuan W_pack: matches nothing in llama)
    "targets_match_nothing": Wild("github:MountainAlpha/falcon-7b_lora_finetune lora/adapter_config.json", "llama", _lora(
        auto_mapping=None, base_model_name_or_path="/data/models/Baichuan2-7B-Base/", bias="none", fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, layers_pattern=None, layers_to_transform=None, lora_alpha=32,
        lora_dropout=0.1, modules_to_save=None, r=8, revision=None, target_modules=["W_pack"], task_type="CAUSAL_LM"),
        build={"target_modules": ["q_proj"]}),
    # --- PEFT 0.5-0.10 ------------------------------------------------------------------------
    # GowthamNats/MicrosoftPhi1_5_finetuned- adapter_config.json (remote-code phi names Wqkv/out_proj + fc1/fc2)
    "phi15_remote_code_names": Wild("github:GowthamNats/MicrosoftPhi1_5_finetuned- adapter_config.json", "phi", _lora(
        auto_mapping=None, base_model_name_or_path="microsoft/phi-1_5", bias="none", fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, layers_pattern=None, layers_to_transform=None, lora_alpha=16,
        lora_dropout=0.05, modules_to_save=None, r=16, revision=None, target_modules=["fc1", "fc2", "Wqkv", "out_proj"],
        task_type="CAUSAL_LM")),
    # MountainAlpha-style PEFT 0.6: ZixuanLiu4869/LLaVA-Sco model/adapter_config.json
    "peft06_llava": Wild("github:ZixuanLiu4869/LLaVA-Sco model/adapter_config.json", "llama", _lora(
        auto_mapping=None, base_model_name_or_path="Xkev/Llama-3.2V-11B-cot", bias="none", fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, layers_pattern=None, layers_to_transform=None, lora_alpha=32,
        lora_dropout=0.05, modules_to_save=None, r=8, revision=None, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM")),
    # LTtt456c/InternLM_AdapterModel adapter_config.json (xtuner, PEFT 0.7)
    "peft07_internlm_xtuner": Wild("github:LTtt456c/InternLM_AdapterModel adapter_config.json", "llama", _lora(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path="/root/internlm-chat-7b", bias="none",
        fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, layers_pattern=None, layers_to_transform=None,
        loftq_config={}, lora_alpha=16, lora_dropout=0.1, megatron_config=None, megatron_core="megatron.core",
        modules_to_save=None, r=64, rank_pattern={}, revision=None,
        target_modules=["k_proj", "up_proj", "v_proj", "down_proj", "o_proj", "q_proj", "gate_proj"],
        task_type="CAUSAL_LM", use_dora=False, use_rslora=False)),
    # EDLlyc/kangya-glm4-lora adapter_config.json (LLaMA-Factory, GLM names -> GPT-NeoX has all four)
    "glm_names_llamafactory": Wild("github:EDLlyc/kangya-glm4-lora adapter_config.json", "gpt_neox", _lora(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path="/root/autodl-tmp/models/glm-4-9b-chat", bias="none",
        fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, layer_replication=None, layers_pattern=None,
        layers_to_transform=None, loftq_config={}, lora_alpha=16, lora_dropout=0.0, megatron_config=None,
        megatron_core="megatron.core", modules_to_save=None, r=8, rank_pattern={}, revision=None,
        target_modules=["dense", "dense_h_to_4h", "query_key_value", "dense_4h_to_h"], task_type="CAUSAL_LM",
        use_dora=False, use_rslora=False)),
    # rintaro-s/LAL-v2_NF4 model/adapter_config.json (rinna japanese-gpt-neox)
    "gpt_neox_qkv": Wild("github:rintaro-s/LAL-v2_NF4 model/adapter_config.json", "gpt_neox", _lora(
        {**NEW_LORA_NULLS, "target_parameters": None}, base_model_name_or_path="rinna/japanese-gpt-neox-3.6b",
        lora_alpha=32, lora_dropout=0.05, modules_to_save=None, r=8, target_modules=["query_key_value"],
        task_type="CAUSAL_LM")),
    # Azreal18/Phi2-finetuning model/adapter_config.json
    "phi2": Wild("github:Azreal18/Phi2-finetuning model/adapter_config.json", "phi", _lora(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path="microsoft/phi-2", bias="none", fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, layer_replication=None, layers_pattern=None,
        layers_to_transform=None, loftq_config={}, lora_alpha=16, lora_dropout=0.05, megatron_config=None,
        megatron_core="megatron.core", modules_to_save=None, r=8, rank_pattern={}, revision=None,
        target_modules=["fc1", "q_proj", "v_proj", "fc2"], task_type="CAUSAL_LM", use_dora=False, use_rslora=False)),
    # HeavyMetalAlchemist/phi3-lora-structured-output adapter/adapter_config.json (fused qkv_proj / gate_up_proj)
    "phi3_fused": Wild("github:HeavyMetalAlchemist/phi3-lora-structured-output adapter/adapter_config.json", "phi3", _lora(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path="microsoft/Phi-3-mini-4k-instruct", bias="none",
        fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, layer_replication=None, layers_pattern=None,
        layers_to_transform=None, loftq_config={}, lora_alpha=32, lora_dropout=0.05, megatron_config=None,
        megatron_core="megatron.core", modules_to_save=None, r=16, rank_pattern={}, revision=None,
        target_modules=["gate_up_proj", "down_proj", "qkv_proj", "o_proj"], task_type="CAUSAL_LM", use_dora=False,
        use_rslora=False)),
    # --- Unsloth ------------------------------------------------------------------------------
    # D3voz/joy-caption-alpha-two-gui-mod adapter_config.json (r=64, lora_dropout int 0)
    "unsloth_llama31_r64": Wild("github:D3voz/joy-caption-alpha-two-gui-mod adapter_config.json", "llama", _lora(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path="unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
        bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, layer_replication=None,
        layers_pattern=None, layers_to_transform=None, loftq_config={}, lora_alpha=16, lora_dropout=0,
        megatron_config=None, megatron_core="megatron.core", modules_to_save=None, r=64, rank_pattern={}, revision=None,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "o_proj", "k_proj", "up_proj"],
        task_type="CAUSAL_LM", use_dora=False, use_rslora=False)),
    # CogniX-LTD/Cogni-OpenModel adapter_config.json (every target listed twice)
    "unsloth_duplicate_targets": Wild("github:CogniX-LTD/Cogni-OpenModel adapter_config.json", "llama_untied", _lora(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path="unsloth/meta-llama-3.1-8b-bnb-4bit", bias="none",
        eva_config=None, exclude_modules=None, fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
        layer_replication=None, layers_pattern=None, layers_to_transform=None, loftq_config={}, lora_alpha=16,
        lora_bias=False, lora_dropout=0, megatron_config=None, megatron_core="megatron.core", modules_to_save=None,
        r=16, rank_pattern={}, revision=None,
        target_modules=["v_proj", "gate_proj", "up_proj", "o_proj", "q_proj", "down_proj", "k_proj", "gate_proj",
                        "o_proj", "k_proj", "down_proj", "q_proj", "v_proj", "up_proj"],
        task_type="CAUSAL_LM", use_dora=False, use_rslora=False)),
    # Akuseru0509/banking-intent-unsloth model/adapter_config.json (auto_mapping with unsloth_fixed)
    "unsloth_auto_mapping": Wild("github:Akuseru0509/banking-intent-unsloth model/adapter_config.json", "llama", _lora(
        NEW_LORA_NULLS, alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False,
        auto_mapping={"base_model_class": "LlamaForCausalLM",
                      "parent_library": "transformers.models.llama.modeling_llama", "unsloth_fixed": True},
        base_model_name_or_path="unsloth/llama-3.2-3b-unsloth-bnb-4bit", lora_alpha=32, lora_dropout=0.05,
        modules_to_save=None, peft_version="0.18.1", r=16,
        target_modules=["v_proj", "q_proj", "o_proj", "gate_proj", "down_proj", "k_proj", "up_proj"],
        task_type="CAUSAL_LM")),
    # DigitalIntelligenceCenter-of-ICMM/Baize-Traditional-Chinese-Medicine-Large-Language-Model (qwen3 unsloth)
    "unsloth_qwen": Wild("github:DigitalIntelligenceCenter-of-ICMM/Baize-Traditional-Chinese-Medicine-Large-Language-Model"
                         " adapter_config.json", "qwen2", _lora(
        NEW_LORA_NULLS, base_model_name_or_path="unsloth/qwen3-8b-unsloth-bnb-4bit", lora_alpha=16, lora_dropout=0,
        modules_to_save=None, r=16,
        target_modules=["k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "q_proj", "gate_proj"],
        task_type="CAUSAL_LM")),
    # HRF001/gemma-text-to-sql adapter/adapter_config.json (Gemma 3, tied and scaled embeddings)
    "gemma3_trl": Wild("github:HRF001/gemma-text-to-sql adapter/adapter_config.json", "gemma3", _lora(
        NEW_LORA_NULLS, alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False,
        lora_ga_config=None, use_bdlora=None, base_model_name_or_path="google/gemma-3-1b-it", lora_alpha=16,
        lora_dropout=0.05, modules_to_save=None, peft_version="0.19.1", r=8,
        target_modules=["gate_proj", "q_proj", "o_proj", "up_proj", "k_proj", "down_proj", "v_proj"],
        task_type="CAUSAL_LM")),
    # Mar-IA-no/deamoncraft-gemma4-andy adapter/adapter_config.json (exclude_modules as a regex string)
    "exclude_modules_regex": Wild("github:Mar-IA-no/deamoncraft-gemma4-andy adapter/adapter_config.json", "llama", _lora(
        {**NEW_LORA_NULLS, "exclude_modules": ".*(audio_tower|vision_tower|embed_vision|embed_audio).*"},
        alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False, lora_ga_config=None,
        use_bdlora=None, base_model_name_or_path="google/gemma-4-E4B-it", lora_alpha=32, lora_dropout=0.05,
        modules_to_save=None, peft_version="0.19.1", r=16,
        target_modules=["o_proj", "q_proj", "up_proj", "v_proj", "k_proj", "gate_proj", "down_proj"],
        task_type="CAUSAL_LM")),
    # ChisomOkwor/homework4-vlm adapter_config.json (SmolVLM: bare "proj" target)
    "vlm_bare_proj_target": Wild("github:ChisomOkwor/homework4-vlm adapter_config.json", "llama", _lora(
        NEW_LORA_NULLS, base_model_name_or_path="HuggingFaceTB/SmolVLM-256M-Instruct", lora_alpha=64,
        lora_dropout=0.1, modules_to_save=None, r=16,
        target_modules=["gate_proj", "up_proj", "fc1", "out_proj", "q_proj", "v_proj", "proj", "fc2", "k_proj",
                        "down_proj", "o_proj"], task_type="CAUSAL_LM")),
    # Hastws/NVIDIA-Nemotron-Model-Reasoning-Challenge adapter/adapter_config.json (mamba in_proj/out_proj too)
    "nemotron_hybrid_targets": Wild("github:Hastws/NVIDIA-Nemotron-Model-Reasoning-Challenge adapter/adapter_config.json",
        "mistral", _lora(NEW_LORA_NULLS, base_model_name_or_path="/kaggle/input/nemotron-3-nano-30b-a3b-bf16",
        lora_alpha=32, lora_dropout=0.05, modules_to_save=None, peft_version="0.18.1", r=32,
        target_modules=["v_proj", "down_proj", "out_proj", "in_proj", "k_proj", "o_proj", "up_proj", "q_proj"],
        task_type="CAUSAL_LM")),
    # lucasaugustodev/heretic-project adapter/adapter_config.json (r=1, alpha=1)
    "heretic_rank1": Wild("github:lucasaugustodev/heretic-project adapter/adapter_config.json", "mistral", _lora(
        NEW_LORA_NULLS, base_model_name_or_path="mistralai/Mistral-7B-Instruct-v0.3", lora_alpha=1, lora_dropout=0,
        modules_to_save=None, peft_version="0.18.1", r=1, target_modules=["o_proj", "down_proj"],
        task_type="CAUSAL_LM")),
    # MAJORminorStudio/e028-evidence-classifier-release adapter/adapter_config.json (PEFT 0.21 fields, revision set)
    "peft021_revision": Wild("github:MAJORminorStudio/e028-evidence-classifier-release adapter/adapter_config.json",
        "qwen2", _lora(NEW_LORA_NULLS, alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False,
        kasa_config=None, lora_ga_config=None, monteclora_config=None, use_bdlora=None, velora_config=None,
        base_model_name_or_path="Qwen/Qwen3-8B-Base", lora_alpha=32, lora_dropout=0.05, modules_to_save=None,
        peft_version="0.21.0", r=16,
        target_modules=["down_proj", "gate_proj", "q_proj", "v_proj", "k_proj", "up_proj", "o_proj"],
        task_type="CAUSAL_LM")),
    # Unisound-LLM/u2_decision_4b adapter/adapter_config.json (Qwen3.5 linear-attention names absent in qwen2)
    "qwen35_extra_targets": Wild("github:Unisound-LLM/u2_decision_4b adapter/adapter_config.json", "qwen2", _lora(
        NEW_LORA_NULLS, kasa_config=None, monteclora_config=None, velora_config=None, use_bdlora=None,
        base_model_name_or_path="Qwen/Qwen3.5-4B", lora_alpha=32, lora_dropout=0.05, modules_to_save=None,
        peft_version="0.21.0", r=16,
        target_modules=["in_proj_b", "v_proj", "down_proj", "in_proj_qkv", "o_proj", "gate_proj", "out_proj",
                        "in_proj_z", "in_proj_a", "q_proj", "up_proj", "k_proj"], task_type="CAUSAL_LM")),
    # AnHuanAo/qwythos-9b-math-sft adapter_config.json (task_type SEQ_2_SEQ_LM on a causal LM)
    "seq2seq_task_on_causal_lm": Wild("github:AnHuanAo/qwythos-9b-math-sft adapter_config.json", "qwen2", _lora(
        NEW_LORA_NULLS, base_model_name_or_path="/root/autodl-tmp/models/qwythos-9b", lora_alpha=32,
        lora_dropout=0.0, modules_to_save=None, peft_version="0.18.1", r=16,
        target_modules=["q_proj", "v_proj", "down_proj", "linear_fc2", "up_proj", "in_proj_b", "out_proj", "qkv",
                        "k_proj", "in_proj_qkv", "linear_fc1", "in_proj_a", "o_proj", "in_proj_z", "attn.proj",
                        "gate_proj"], task_type="SEQ_2_SEQ_LM")),
    # Alex720415/MicroVlm lora/adapter_config.json (trained on the bare LlamaModel, task_type null, empty base name)
    "bare_llamamodel_task_null": Wild("github:Alex720415/MicroVlm lora/adapter_config.json", "llama_untied", _lora(
        NEW_LORA_NULLS, auto_mapping={"base_model_class": "LlamaModel",
                                        "parent_library": "transformers.models.llama.modeling_llama"},
        base_model_name_or_path="", lora_alpha=32, lora_dropout=0.05, modules_to_save=None, peft_version="0.20.0",
        r=16, target_modules=["q_proj", "gate_proj", "v_proj", "o_proj", "up_proj", "down_proj", "k_proj"],
        task_type=None), auto_class="AutoModel"),
    # --- GPT-2 / T5 / encoders ---------------------------------------------------------------
    # Ahsan-Asim/FineTune_GPT2_Math_Riddles model/adapter_config.json (fan_in_fan_out, task null, auto_mapping)
    "gpt2_task_null": Wild("github:Ahsan-Asim/FineTune_GPT2_Math_Riddles model/adapter_config.json", "gpt2", _lora(
        alpha_pattern={}, auto_mapping={"base_model_class": "GPT2LMHeadModel",
                                        "parent_library": "transformers.models.gpt2.modeling_gpt2"},
        base_model_name_or_path="gpt2", bias="none", eva_config=None, exclude_modules=None, fan_in_fan_out=True,
        inference_mode=True, init_lora_weights=True, layer_replication=None, layers_pattern=None,
        layers_to_transform=None, loftq_config={}, lora_alpha=64, lora_bias=False, lora_dropout=0.05,
        megatron_config=None, megatron_core="megatron.core", modules_to_save=None, r=16, rank_pattern={},
        revision=None, target_modules=["c_proj", "c_attn"], task_type=None, use_dora=False, use_rslora=False)),
    # 3L0L0/FLAN-T5-Motivation-Model adapter_config.json (PEFT 0.18.1)
    "t5_seq2seq_peft018": Wild("github:3L0L0/FLAN-T5-Motivation-Model adapter_config.json", "t5", _lora(
        NEW_LORA_NULLS, alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False,
        base_model_name_or_path="google/flan-t5-base", lora_alpha=32, lora_dropout=0.08, modules_to_save=None,
        peft_version="0.18.1", r=16, target_modules=["o", "k", "q", "v"], task_type="SEQ_2_SEQ_LM"),
        auto_class="AutoModelForSeq2SeqLM"),
    # abdouelouatiki/flan-t5-large-qlora-chatbot model/adapter_config.json
    "t5_seq2seq_qv": Wild("github:abdouelouatiki/flan-t5-large-qlora-chatbot model/adapter_config.json", "t5", _lora(
        NEW_LORA_NULLS, base_model_name_or_path="google/flan-t5-large", lora_alpha=64, lora_dropout=0.0,
        modules_to_save=None, r=16, target_modules=["v", "q"], task_type="SEQ_2_SEQ_LM"),
        auto_class="AutoModelForSeq2SeqLM"),
    # Hareshjethani/BERT-GPT2-Multitask-Finetuning adapter_config.json (SEQ_CLS, modules_to_save classifier/score)
    "bert_seq_cls": Wild("github:Hareshjethani/BERT-GPT2-Multitask-Finetuning adapter_config.json", "bert", _lora(
        NEW_LORA_NULLS, base_model_name_or_path="bert-base-uncased", lora_alpha=32, lora_dropout=0.0,
        modules_to_save=["classifier", "score"], r=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
        auto_class="AutoModelForSequenceClassification", num_labels=2),
    # Neoville026/chatbotkesehatanmentalbertpeftlora model/adapter_config.json (r=64 alpha=128 on a 32-wide model)
    "bert_seq_cls_r64": Wild("github:Neoville026/chatbotkesehatanmentalbertpeftlora model/adapter_config.json", "bert",
        _lora(NEW_LORA_NULLS, base_model_name_or_path="cahya/bert-base-indonesian-522M", lora_alpha=128,
              lora_dropout=0.05, modules_to_save=["classifier", "score"], r=64, target_modules=["value", "query"],
              task_type="SEQ_CLS"), auto_class="AutoModelForSequenceClassification", num_labels=5),
    # Kartik87580/Text_Classification model/adapter_config.json (RoBERTa head, modules_to_save listed twice)
    "roberta_seq_cls_dup_mts": Wild("github:Kartik87580/Text_Classification model/adapter_config.json", "roberta", _lora(
        NEW_LORA_NULLS, alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False,
        base_model_name_or_path="FacebookAI/roberta-base", lora_alpha=32, lora_dropout=0.1,
        modules_to_save=["classifier", "score", "classifier", "score"], peft_version="0.18.0", r=16,
        target_modules=["value", "query"], task_type="SEQ_CLS"),
        auto_class="AutoModelForSequenceClassification", num_labels=3),
    # --- PEFT's own method-comparison adapters (huggingface/peft method_comparison/MetaMathQA/experiments/...) --
    # lora/llama-3.2-3B-rank16-all-linear-lr3e-4/adapter_config.json
    "all_linear": Wild("github:huggingface/peft method_comparison/MetaMathQA/experiments/lora/"
                       "llama-3.2-3B-rank16-all-linear-lr3e-4/adapter_config.json", "llama", _lora(
        NEW_LORA_NULLS, alora_invocation_tokens=None, arrow_config=None, astra_config=None, ensure_weight_tying=False,
        kasa_config=None, lora_ga_config=None, monteclora_config=None, use_bdlora=None, velora_config=None,
        base_model_name_or_path=None, lora_alpha=32, lora_dropout=0.0, modules_to_save=None, r=16,
        target_modules="all-linear", task_type="CAUSAL_LM") | {"inference_mode": False}),
    # lora/llama-3.2-3B-rank32-dora/adapter_config.json (target_modules null -> PEFT's llama defaults)
    "dora_default_targets": Wild("github:huggingface/peft .../lora/llama-3.2-3B-rank32-dora/adapter_config.json",
        "llama", _lora(NEW_LORA_NULLS, base_model_name_or_path=None, lora_alpha=64, lora_dropout=0.0,
                       modules_to_save=None, r=32, target_modules=None, task_type="CAUSAL_LM") | {
            "use_dora": True, "inference_mode": False}),
    # lora/llama-3.2-3B-rank64-rslora/adapter_config.json
    "rslora_default_targets": Wild("github:huggingface/peft .../lora/llama-3.2-3B-rank64-rslora/adapter_config.json",
        "llama", _lora(NEW_LORA_NULLS, base_model_name_or_path=None, lora_alpha=64, lora_dropout=0.0,
                       modules_to_save=None, r=64, target_modules=None, task_type="CAUSAL_LM") | {
            "use_rslora": True, "inference_mode": False}),
    # lora/llama-3.2-3B-rank10-target-mlp/adapter_config.json
    "lora_mlp_r10": Wild("github:huggingface/peft .../lora/llama-3.2-3B-rank10-target-mlp/adapter_config.json", "llama",
        _lora(NEW_LORA_NULLS, base_model_name_or_path=None, lora_alpha=20, lora_dropout=0.0, modules_to_save=None,
              r=10, target_modules=["gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")),
    # ia3/llama-3.2-3B-default/adapter_config.json (targets and feedforward null -> defaults)
    "ia3_defaults": Wild("github:huggingface/peft .../ia3/llama-3.2-3B-default/adapter_config.json", "llama", {
        "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
        "feedforward_modules": None, "inference_mode": False, "init_ia3_weights": True, "modules_to_save": None,
        "peft_type": "IA3", "revision": None, "target_modules": None, "task_type": None}),
    # ia3/llama-3.2-3B-all-attn-5k-lr0.005/adapter_config.json
    "ia3_all": Wild("github:huggingface/peft .../ia3/llama-3.2-3B-all-attn-5k-lr0.005/adapter_config.json", "llama", {
        "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
        "feedforward_modules": ["down_proj", "gate_proj", "up_proj"], "inference_mode": False, "init_ia3_weights": True,
        "modules_to_save": None, "peft_type": "IA3", "revision": None,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "gate_proj", "up_proj"],
        "task_type": None}),
    # huggingface/peft examples/conditional_generation/bigscience/mt0-large_IA3_SEQ_2_SEQ_LM/adapter_config.json
    "ia3_mt0_empty_feedforward": Wild("github:huggingface/peft examples/conditional_generation/bigscience/"
                                      "mt0-large_IA3_SEQ_2_SEQ_LM/adapter_config.json", "t5_gated", {
        "auto_mapping": None, "base_model_name_or_path": "bigscience/mt0-large", "fan_in_fan_out": False,
        "feedforward_modules": [], "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
        "peft_type": "IA3", "revision": None, "target_modules": ["k", "v", "wi_1"], "task_type": "SEQ_2_SEQ_LM"},
        auto_class="AutoModelForSeq2SeqLM"),
    # loha/llama-3.2-3B-rank32/adapter_config.json
    "loha_r32": Wild("github:huggingface/peft .../loha/llama-3.2-3B-rank32/adapter_config.json", "llama", {
        "alpha": 64, "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None,
        "inference_mode": False, "init_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "module_dropout": 0.0, "modules_to_save": None, "peft_type": "LOHA", "r": 32, "rank_dropout": 0.0,
        "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"], "task_type": None,
        "use_effective_conv2d": False}),
    # lokr/llama-3.2-3B-rank32-factor4-lr0.003/adapter_config.json
    "lokr_factor4": Wild("github:huggingface/peft .../lokr/llama-3.2-3B-rank32-factor4-lr0.003/adapter_config.json",
        "llama", {
        "alpha": 64, "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "decompose_both": False,
        "decompose_factor": 4, "exclude_modules": None, "inference_mode": False, "init_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "module_dropout": 0.0, "modules_to_save": None,
        "peft_type": "LOKR", "r": 32, "rank_dropout": 0.0, "rank_dropout_scale": False, "rank_pattern": {},
        "revision": None, "target_modules": ["q_proj", "v_proj"], "task_type": None, "use_effective_conv2d": False}),
    # adalora/llama-3.2-3B-rank32/adapter_config.json (merged by PEFT itself)
    "adalora": Wild("github:huggingface/peft .../adalora/llama-3.2-3B-rank32/adapter_config.json", "llama", {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "beta1": 0.85, "beta2": 0.85,
        "bias": "none", "corda_config": None, "deltaT": 1, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": False, "inference_mode": False, "init_lora_weights": True, "init_r": 64,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "orth_reg_weight": 0.5, "peft_type": "ADALORA",
        "r": 8, "rank_pattern": None, "revision": None, "target_modules": None, "target_r": 32, "task_type": None,
        "tfinal": 500, "tinit": 200, "total_step": 5000, "use_dora": False, "use_rslora": False}),
    # huggingface/peft diag_adapter/adapter_config.json (a peft_type no released PEFT knows)
    "unknown_peft_type": Wild("github:huggingface/peft diag_adapter/adapter_config.json", "llama", {
        "auto_mapping": {"base_model_class": "LlamaForSequenceClassification",
                         "parent_library": "transformers.models.llama.modeling_llama"},
        "base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "bias": "none", "diag_alpha": 1.0,
        "diag_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True, "init_diag_weights": True,
        "modules_to_save": None, "peft_type": "DIAG", "revision": None, "target_modules": ["q_proj", "v_proj"],
        "task_type": None}, build={"peft_type": "LORA"}),
    # --- configs written by conversion / benchmark scripts ----------------------------------
    # mlx-lm -> PEFT converter (code index file 71598751667): layers_to_transform with layers_pattern "layers"
    "mlx_converted_layers": Wild("code-index file 71598751667 (mlx-lm -> PEFT converter)", "llama", _lora(
        auto_mapping=None, base_model_name_or_path="x", revision=None, task_type="CAUSAL_LM", r=4, lora_alpha=8,
        lora_dropout=0.0, bias="none", fan_in_fan_out=False, target_modules=["o_proj", "q_proj", "v_proj"],
        layers_to_transform=[1], layers_pattern="layers", modules_to_save=None, inference_mode=True)),
    # dummy-LoRA benchmark writer (code index file 7830239673): layers_pattern without layers_to_transform
    "layers_pattern_without_indices": Wild("code-index file 7830239673 (dummy LoRA benchmark writer)", "llama", _lora(
        base_model_name_or_path="x", bias="none", fan_in_fan_out=False, inference_mode=True,
        layers_pattern="model.layers.", lora_alpha=16, lora_dropout=0.0, modules_to_save=[], r=8,
        target_modules=["o_proj", "down_proj"], task_type="CAUSAL_LM", use_dora=False),
        build={"layers_pattern": None}),
    # SparseGPT/wanda LoRA export script (code index file 7315337050): "score" targeted on a causal LM
    "wanda_score_target": Wild("code-index file 7315337050 (wanda LoRA export)", "llama", _lora(
        base_model_name_or_path="", bias="none", enable_lora=None, fan_in_fan_out=False, inference_mode=True,
        lora_alpha=16, lora_dropout=0.05, merge_weights=False, modules_to_save=None, r=8,
        target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "score"],
        task_type="CAUSAL_LM")),
}


# AdaLoRA as PEFT saves it once training has run through update_and_allocate: rank_pattern maps each
# module to its kept-rank mask (RankAllocator.mask_to_budget in huggingface/peft
# src/peft/tuners/adalora/model.py), and the saved tensors are cut to the kept ranks. Built from the
# method-comparison config above; the tiny base has 2 layers, init_r=64 masks keep 0..64 ranks.
_ADALORA = WILD["adalora"].config
_MASKS = {f"model.layers.{i}.self_attn.{m}.lora_E": [j % (i + 2) == 0 for j in range(64)]
          for i in range(2) for m in ("q_proj", "v_proj")}
WILD["adalora_pruned_masks"] = Wild(WILD["adalora"].source + " (rank_pattern as update_and_allocate leaves it)",
                                    "llama", {**_ADALORA, "target_modules": ["q_proj", "v_proj"],
                                              "rank_pattern": _MASKS})
# The same config with "total_step": null, the default PEFT <= 0.13 saved (AdaLoraConfig.total_step=None,
# not validated then); PEFT 0.21 refuses it at construction although merging never reads the schedule.
WILD["adalora_total_step_null"] = Wild(WILD["adalora"].source + " (total_step null, as PEFT <= 0.13 saved it)",
                                       "llama", {**_ADALORA, "target_modules": ["q_proj", "v_proj"],
                                                 "rank_pattern": _MASKS, "total_step": None},
                                       build={"total_step": 5000}, reference={"total_step": 5000})

# The MicroVlm config with its targets written as PEFT's shorthand (found in review): the bare-model
# names must still match what "all-linear" expands to on the ForCausalLM base.
WILD["bare_llamamodel_all_linear"] = Wild(
    WILD["bare_llamamodel_task_null"].source + " (target_modules rewritten as all-linear)", "llama_untied",
    {**WILD["bare_llamamodel_task_null"].config, "target_modules": "all-linear"}, auto_class="AutoModel")


def _build_adapter(cache, name: str, case: Wild, base):
    from peft import PeftConfig, get_peft_model

    folder = cache / f"wild-{name}"
    if (folder / "adapter_config.json").exists():
        return folder
    build = {k: v for k, v in copy.deepcopy(case.config).items() if k != "base_model_name_or_path"}
    build.update(case.build)
    build["inference_mode"] = False
    if isinstance(build.get("target_modules"), list):
        build["target_modules"] = [case.rename.get(t, t) for t in build["target_modules"]]
    peft_config = PeftConfig.from_peft_type(**build)
    kwargs = {"num_labels": case.num_labels} if case.num_labels else {}
    torch.manual_seed(0)
    model = getattr(transformers, case.auto_class).from_pretrained(base, dtype=torch.float32, **kwargs)
    peft_model = get_peft_model(model, peft_config)
    perturb_trainable(peft_model)
    peft_model.save_pretrained(folder)
    raw = copy.deepcopy(case.config)
    raw["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(raw, indent=2))
    return folder


def _inputs(case: Wild) -> dict:
    return sample_inputs(seq2seq=case.auto_class == "AutoModelForSeq2SeqLM", vocab=VOCAB)


def _output(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def _peft_reference(base, adapter, case: Wild):
    """PEFT's unmerged outputs and how far PEFT's own merge lands from them (float32 rounding),
    or the exception PEFT raises loading or merging the adapter."""
    from peft import PeftModel

    kwargs = {"num_labels": case.num_labels} if case.num_labels else {}
    cls = getattr(transformers, case.auto_class)
    if case.reference:
        import shutil

        copy_dir = adapter.parent / f"{adapter.name}-reference"
        shutil.copytree(adapter, copy_dir, dirs_exist_ok=True)
        raw = json.loads((adapter / "adapter_config.json").read_text())
        (copy_dir / "adapter_config.json").write_text(json.dumps({**raw, **case.reference}))
        adapter = copy_dir
    try:
        model = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32, **kwargs), adapter).eval()
        expected = _output(model.get_base_model(), _inputs(case))
        own_merge = _output(model.merge_and_unload(), _inputs(case))  # PEFT must also be able to merge it
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return None, 0.0, e
    return expected, (own_merge - expected).abs().max().item(), None


@pytest.mark.parametrize("name", sorted(WILD))
def test_wild_config_matches_peft(name, cache_dir, tmp_path, capfd):
    case = WILD[name]
    base = build_base(cache_dir, case.base)
    adapter = _build_adapter(cache_dir, name, case, base)
    out = tmp_path / "merged"
    capfd.readouterr()
    rc = main(["merge", str(adapter), "--out", str(out), "--quiet"])
    err = capfd.readouterr().err
    expected, rounding, peft_error = _peft_reference(base, adapter, case)

    if peft_error is not None:
        assert rc != 0, f"PEFT refuses this adapter ({peft_error!r}) but merge-bot merged it"
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, err
        return
    assert rc == 0, f"PEFT loads and merges this adapter but merge-bot refused: {err.strip()}"
    kwargs = {"num_labels": case.num_labels} if case.num_labels else {}
    merged = getattr(transformers, case.auto_class).from_pretrained(out, dtype=torch.float32, **kwargs).eval()
    actual = _output(merged, _inputs(case))
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    # float32 tolerance; PEFT's own merge_and_unload may round further than that on deep models (T5)
    tolerance = max(1e-5 + 1e-5 * expected.abs().max().item(), 2 * rounding)
    assert diff <= tolerance, f"max |logit diff| = {diff:.3g} (PEFT's own merge: {rounding:.3g})"
