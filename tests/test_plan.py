"""The plan on its own: resolve_plan builds a MergePlan from tiny local models, and nothing is written.

Each test asserts what the plan decides (which tensors are touched, by which op and scale,
which are copied, their dtypes, how tied weights and config updates come out) without
merging. The merge itself is checked against PEFT in test_equivalence.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from peft import IA3Config, LoraConfig

from bot.plan import MergePlan, output_dtype, resolve_plan
from bot.spec import MergeSpec, parse_source_ref
from factory import VOCAB, build_adapter, build_base

LAYERS = range(2)


def plan_for(cache_dir, tmp_path, tag: str, base_name: str, config, *, dtype: str = "auto", **kwargs) -> MergePlan:
    base = build_base(cache_dir, base_name)
    adapter = build_adapter(cache_dir, f"plan-{tag}", base, base_name, config, **kwargs)
    out = tmp_path / "out"
    plan = resolve_plan(MergeSpec(adapter=parse_source_ref(str(adapter)), out=out, dtype=dtype))
    assert not out.exists()  # planning writes nothing
    return plan


def touched(plan: MergePlan) -> dict:
    return {j.name: j for j in plan.jobs if j.ops or j.replacement}


def test_lora_plan_names_each_touched_weight_its_op_and_scale_and_copies_the_rest(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "lora", "llama", LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    assert plan.fallback_reason is None and plan.module_counts == {"LORA": 4}
    jobs = touched(plan)
    assert sorted(jobs) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in LAYERS for p in "qv")
    for name, job in jobs.items():
        ((op, is_bias),) = job.ops
        assert (op.tuner, op.kind, is_bias, op.transpose, op.touches_bias) == ("LORA", "LORA", False, False, False)
        assert op.module == name.removesuffix(".weight")
        assert op.scaling == (8 / 2 if ".v_proj" in name else 8 / 4)  # rank_pattern gives v_proj r=2
        assert set(op.tensors) == {"lora_A", "lora_B"} and job.replacement is None
        assert job.source is not None and job.source.name.endswith(name) and job.dtype == "F32"
    copied = [j for j in plan.jobs if j.name not in jobs]
    assert copied and all(j.is_passthrough for j in copied)
    # tied embeddings the adapter does not touch: written once, still tied
    names = [j.name for j in plan.jobs]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert plan.config_updates == {"architectures": ["LlamaForCausalLM"], "dtype": "float32"}
    assert plan.warnings == ()


def test_rslora_scale_and_a_requested_dtype_reach_every_float_job(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "rslora", "llama", LoraConfig(r=4, lora_alpha=3, use_rslora=True,
                                                                        target_modules=["o_proj"]), dtype="bfloat16")
    assert {op.scaling for j in touched(plan).values() for op, _ in j.ops} == {3 / math.sqrt(4)}
    assert {j.dtype for j in plan.jobs} == {"BF16"}
    assert not any(j.is_passthrough for j in plan.jobs)  # a dtype change is not a byte copy
    assert plan.config_updates["dtype"] == "bfloat16"


def test_a_lora_on_one_side_of_tied_embeddings_unties_them(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "embedding-tied", "llama",
                    LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    by_name = {j.name: j for j in plan.jobs}
    emb, head = by_name["model.embed_tokens.weight"], by_name["lm_head.weight"]
    ((op, _),) = emb.ops
    assert op.transpose and op.kind == "LORA"  # an embedding's A is (r, vocab): the delta is transposed
    # PEFT saves the embedding's base layer too; it loads into the shared parameter, so both sides start
    # from it, and only the embedding side gets the LoRA
    assert emb.replacement == head.replacement == "base_model.model.model.embed_tokens.base_layer.weight"
    assert head.ops == ()
    assert plan.config_updates["tie_word_embeddings"] is False
    assert any("tied embeddings" in w for w in plan.warnings)
    assert plan.module_counts == {"LORA": 3, "replaced_tensors": 1}


def test_modules_to_save_replaces_one_tied_side_and_a_resized_vocab_updates_the_config(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "resized", "llama_untied", LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), resize_vocab=VOCAB + 8)
    jobs = touched(plan)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert jobs[name].replacement is not None and jobs[name].ops == ()
        assert jobs[name].shape == (VOCAB + 8, 32) and jobs[name].dtype == "F32"
    assert plan.module_counts == {"LORA": 2, "modules_to_save": 2}
    assert plan.config_updates["vocab_size"] == VOCAB + 8
    assert "tie_word_embeddings" not in plan.config_updates  # the base was not tied


def test_ia3_ops_touch_the_bias_only_for_attention_style_vectors(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "ia3-bias", "qwen2", IA3Config(target_modules=["k_proj", "up_proj"],
                                                                        feedforward_modules=["up_proj"]))
    jobs = touched(plan)
    assert sorted(jobs) == sorted([f"model.layers.{i}.self_attn.k_proj.{p}" for i in LAYERS for p in ("weight", "bias")]
                                  + [f"model.layers.{i}.mlp.up_proj.weight" for i in LAYERS])
    for name, job in jobs.items():
        ((op, is_bias),) = job.ops
        assert op.tuner == "IA3" and is_bias == name.endswith(".bias")
        assert op.touches_bias == (".k_proj" in name)  # (out, 1) rescales outputs; feed-forward (1, in) inputs
    assert plan.module_counts == {"IA3": 4}


def test_what_only_peft_merges_is_planned_as_a_fallback(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "dora-embedding", "llama_untied",
                    LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens"]))
    assert plan.fallback_reason == "LORA on a embedding module (model.embed_tokens)"
    assert plan.jobs == ()


@pytest.mark.parametrize("start,source,replacement,target,model,expected", [
    ("BF16", "BF16", None, None, "BF16", "BF16"),  # auto keeps the stored dtype
    ("F32", "F32", None, "BF16", "BF16", "BF16"),  # --dtype converts floats
    ("I64", "I64", None, "BF16", "BF16", "I64"),  # ... but never integers
    ("F32", "BF16", "k", None, "BF16", "BF16"),  # a saved replacement takes the base tensor's dtype
    ("F32", None, "k", None, "F16", "F16"),  # ... or, with no base tensor, the model's
])
def test_output_dtype_rules(start, source, replacement, target, model, expected):
    info = None if source is None else type("Info", (), {"dtype": source})()
    assert output_dtype(start, info, replacement, target_float=target, model_float=model) == expected


def test_merge_plan_carries_no_tensors(cache_dir, tmp_path):
    plan = plan_for(cache_dir, tmp_path, "lora-small", "llama", LoraConfig(r=2, target_modules=["q_proj"]))
    assert not any(isinstance(v, torch.Tensor) for j in plan.jobs for v in vars(j).values())
