"""Tuners merged through PEFT's own merge, and the single-rounding guarantee in bf16."""
from __future__ import annotations

import json

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
