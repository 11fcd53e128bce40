"""Tuners merged through PEFT's own merge, and the single-rounding guarantee in bf16."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import HRAConfig, LoraConfig, OFTConfig, PeftModel, VeraConfig
from safetensors.torch import load_file

from bot.cli import main
from factory import assert_matches_peft, build_adapter, build_base, model_class

FALLBACK_CASES = {
    "vera": lambda: VeraConfig(r=4, target_modules=["q_proj", "o_proj"]),
    "oft": lambda: OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj", "v_proj"]),
    "hra": lambda: HRAConfig(r=4, target_modules=["q_proj"]),
}


@pytest.mark.parametrize("name", sorted(FALLBACK_CASES))
def test_other_mergeable_tuners_go_through_peft(name, cache_dir, tmp_path, capsys):
    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, f"fallback-{name}", base, "llama", FALLBACK_CASES[name]())
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet"]) == 0
    assert "in-memory merge" in capsys.readouterr().err
    assert_matches_peft(out, base, adapter)
    assert json.loads((out / "merge_report.json").read_text())["method"] == "peft-merge_and_unload"


def test_bf16_merge_rounds_once_like_fp32_merge(cache_dir, tmp_path):
    """bf16 output == (W_fp32 + ΔW_fp32) rounded once, and == PEFT's own CPU merge bit for bit."""
    base = build_base(cache_dir, "llama", dtype=torch.bfloat16)
    adapter = build_adapter(cache_dir, "bf16-lora", base, "llama",
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
                            dtype=torch.bfloat16)
    out_bf16, out_fp32 = tmp_path / "bf16", tmp_path / "fp32"
    assert main(["merge", str(adapter), "--out", str(out_bf16), "--quiet"]) == 0
    assert main(["merge", str(adapter), "--out", str(out_fp32), "--dtype", "float32", "--quiet"]) == 0
    merged = load_file(out_bf16 / "model.safetensors")
    merged32 = load_file(out_fp32 / "model.safetensors")
    assert json.loads((out_bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    changed = 0
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, merged32[name].to(torch.bfloat16)), name
    base_sd = load_file(base / "model.safetensors")
    changed = sum(not torch.equal(merged[k], base_sd[k]) for k in base_sd)
    assert changed == 6

    peft = PeftModel.from_pretrained(model_class("llama").from_pretrained(base, dtype=torch.bfloat16), adapter)
    reference = peft.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name]), name


def _train_adalora_until_pruned(base, folder):
    """A tiny AdaLoRA trained as users do: steps of SGD with update_and_allocate until ranks are pruned."""
    from peft import AdaLoraConfig, get_peft_model

    from factory import sample_inputs

    torch.manual_seed(0)
    model = model_class("llama").from_pretrained(base, dtype=torch.float32)
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = sample_inputs()["input_ids"]
    for step in range(config.total_step):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.save_pretrained(folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    return raw


def test_adalora_trained_through_update_and_allocate_merges(cache_dir, tmp_path, capsys):
    base = build_base(cache_dir, "llama")
    adapter = tmp_path / "adalora"
    raw = _train_adalora_until_pruned(base, adapter)
    masks = raw["rank_pattern"]
    assert masks and all(isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in masks.values())
    assert any(sum(v) < len(v) for v in masks.values()), "training pruned no rank"
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert_matches_peft(out, base, adapter)

    # the same adapter as PEFT <= 0.13 saved it, "total_step": null: PEFT 0.21 refuses to build that config,
    # but the merge never reads the schedule, so merge-bot merges it to the same model
    null_adapter = tmp_path / "adalora-null"
    shutil.copytree(adapter, null_adapter)
    (null_adapter / "adapter_config.json").write_text(json.dumps({**raw, "total_step": None}))
    with pytest.raises(ValueError, match="total_step"):
        PeftModel.from_pretrained(model_class("llama").from_pretrained(base), null_adapter)
    out_null = tmp_path / "merged-null"
    assert main(["merge", str(null_adapter), "--out", str(out_null), "--quiet"]) == 0, capsys.readouterr().err
    assert_matches_peft(out_null, base, adapter)


def test_a_config_peft_refuses_is_refused_with_peft_reason(cache_dir, tmp_path, capsys):
    """Not "peft_type ... is not known": the real reason, PEFT's own words."""
    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, "fallback-hra", base, "llama", FALLBACK_CASES["hra"]())
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    raw = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**raw, "layers_pattern": "layers"}))
    out = tmp_path / "out"
    assert main(["merge", str(bad), "--out", str(out), "--quiet"]) == 5
    err = capsys.readouterr().err
    assert "refuses this HRA config" in err and "layers_to_transform" in err and "not known" not in err
    assert not out.exists()
