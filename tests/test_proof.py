"""The per-module proof (bot.proof) catches each class of merge error: a correct merge passes, then one
fault is injected into the merged output and the proof must fail naming the module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType
from safetensors.torch import load_file, save_file

from bot.cli import main
from bot.errors import VerificationError
from bot.plan import resolve_plan
from bot.proof import prove_folder, rounding_error
from bot.spec import MergeSpec, parse_source_ref
from factory import VOCAB, build_adapter, build_base


def merged_folder(cache_dir, tmp_path, tag, base_name, config, **adapter_kwargs):
    base = build_base(cache_dir, base_name, dtype=adapter_kwargs.pop("dtype", torch.float32))
    adapter = build_adapter(cache_dir, f"proof-{tag}", base, base_name, config, **adapter_kwargs)
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet", "--no-verify"]) == 0
    plan = resolve_plan(MergeSpec(adapter=parse_source_ref(str(adapter)), out=tmp_path / "unused"))
    return plan, out, base


def edit_weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def expect_failure(plan, folder, *names: str) -> str:
    with pytest.raises(VerificationError) as caught:
        prove_folder(plan, folder)
    message = str(caught.value)
    assert any(name in message for name in names), message
    return message


def test_a_correct_merge_is_proved(cache_dir, tmp_path):
    plan, out, _ = merged_folder(cache_dir, tmp_path, "ok", "llama_untied",
                                 LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    summary = prove_folder(plan, out)
    assert summary.passed and summary.modules_proved == 6
    assert summary.max_error_ulp <= 0.5 + 1e-3  # float32 output: the float64 merge rounded once


def test_a_module_mapped_to_the_wrong_weight_fails(cache_dir, tmp_path):
    plan, out, base = merged_folder(cache_dir, tmp_path, "wrong-weight", "llama_untied",
                                    LoraConfig(r=4, target_modules=["q_proj"]))
    base_sd = load_file(base / "model.safetensors")
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"

    def swap(t):  # q's delta lands on o_proj, q keeps the base
        t[o] = t[o] + (t[q] - base_sd[q])
        t[q] = base_sd[q].clone()
    edit_weights(out, swap)
    expect_failure(plan, out, "layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj")


def test_a_wrong_scale_fails(cache_dir, tmp_path):
    """alpha/r where the adapter says rsLoRA (alpha/sqrt(r)): the delta off by sqrt(r)."""
    plan, out, base = merged_folder(cache_dir, tmp_path, "rslora", "llama_untied",
                                    LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=["v_proj"]))
    base_sd = load_file(base / "model.safetensors")
    v = "model.layers.1.self_attn.v_proj.weight"
    edit_weights(out, lambda t: t.__setitem__(v, base_sd[v] + (t[v] - base_sd[v]) / 4))  # alpha/r = alpha/sqrt(r)/4
    expect_failure(plan, out, "layers.1.self_attn.v_proj")


def test_a_missing_transpose_fails(cache_dir, tmp_path):
    """GPT-2's Conv1D stores (in, out): a delta added without the fan_in_fan_out transpose."""
    plan, out, base = merged_folder(cache_dir, tmp_path, "conv1d", "gpt2",
                                    LoraConfig(r=4, target_modules=["attn.c_proj"], fan_in_fan_out=True))
    base_sd = load_file(base / "model.safetensors")
    name = "transformer.h.0.attn.c_proj.weight"
    assert base_sd[name].shape[0] == base_sd[name].shape[1]  # square: the wrong layout still fits
    edit_weights(out, lambda t: t.__setitem__(name, base_sd[name] + (t[name] - base_sd[name]).T.contiguous()))
    expect_failure(plan, out, "h.0.attn.c_proj")


def test_a_tied_embedding_left_tied_fails(cache_dir, tmp_path):
    """The adapter changes the input embedding of a tied model: the merge must write lm_head on its own."""
    plan, out, _ = merged_folder(cache_dir, tmp_path, "tied", "llama",
                                 LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    prove_folder(plan, out)
    edit_weights(out, lambda t: t.pop("lm_head.weight"))
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    expect_failure(plan, out, "lm_head", "embed_tokens")


def test_a_modules_to_save_copy_not_applied_fails(cache_dir, tmp_path):
    plan, out, base = merged_folder(cache_dir, tmp_path, "seq-cls", "llama_untied",
                                    LoraConfig(r=4, target_modules=["q_proj"], task_type=TaskType.SEQ_CLS),
                                    auto_class="AutoModelForSequenceClassification", num_labels=3)
    prove_folder(plan, out)
    edit_weights(out, lambda t: t.__setitem__("score.weight", torch.zeros_like(t["score.weight"])))
    expect_failure(plan, out, "score")


def test_a_resized_vocabulary_not_applied_fails(cache_dir, tmp_path):
    plan, out, _ = merged_folder(cache_dir, tmp_path, "resized", "llama_untied",
                                 LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
                                 resize_vocab=VOCAB + 8)
    prove_folder(plan, out)
    edit_weights(out, lambda t: t.update({k: t[k][:VOCAB].contiguous() for k in ("model.embed_tokens.weight",
                                                                                  "lm_head.weight")}))
    expect_failure(plan, out, "embed_tokens", "lm_head")


def test_bad_rounding_fails(cache_dir, tmp_path):
    """bf16 output: values one ulp off on about half the elements (truncation-like) are not PEFT's merge."""
    plan, out, _ = merged_folder(cache_dir, tmp_path, "bf16", "llama",
                                 LoraConfig(r=4, target_modules=["up_proj"]), dtype=torch.bfloat16)
    summary = prove_folder(plan, out)
    assert summary.max_error_ulp <= 1.0
    name = "model.layers.0.mlp.up_proj.weight"

    def nudge(t):
        value = t[name]
        step = torch.nextafter(value, torch.full_like(value, float("inf"))) - value
        mask = torch.rand(value.shape, generator=torch.Generator().manual_seed(0)) < 0.5
        t[name] = torch.where(mask, value + step, value)
    edit_weights(out, nudge)
    expect_failure(plan, out, "layers.0.mlp.up_proj")


def test_rounding_error_counts_ulps():
    exact = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)
    one_ulp = torch.tensor([1.0 + 2**-7, 1.0, 3.0], dtype=torch.bfloat16)
    worst, share = rounding_error(one_ulp, exact, torch.bfloat16)
    assert worst == pytest.approx(1.0) and share == pytest.approx(1 / 3)
