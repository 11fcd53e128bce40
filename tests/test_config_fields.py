"""Which adapter configs the streaming merge may take, checked against PEFT's own config classes.

The streaming path models plain LoRA (+ rsLoRA, DoRA, patterns, bias), IA3, LoHa and LoKr.
Anything else a config turns on must go to PEFT's merge (or be refused), never be merged as
if it were plain LoRA.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

from bot import errors
from bot.adapter import STREAMED_FIELDS, parse_adapter_config
from bot.cli import main
from factory import assert_matches_peft, build_adapter, build_base

CONFIG_CLASSES = {"LORA": LoraConfig, "IA3": IA3Config, "LOHA": LoHaConfig, "LOKR": LoKrConfig}


def saved_config(cls, **fields) -> dict:
    """The dict PEFT writes to adapter_config.json for this config."""
    config = cls(target_modules=["q_proj"], **fields)
    return json.loads(json.dumps(config.to_dict(), default=list))


@pytest.mark.parametrize("peft_type", sorted(CONFIG_CLASSES))
def test_default_configs_as_peft_saves_them_stream(peft_type):
    acfg = parse_adapter_config(saved_config(CONFIG_CLASSES[peft_type]))
    assert acfg.peft_type == peft_type
    assert acfg.is_native, acfg.peft_only_field


@pytest.mark.parametrize("peft_type", sorted(CONFIG_CLASSES))
def test_streamed_fields_are_fields_of_peft_config_class(peft_type):
    """A field PEFT's class lacks is dropped by PEFT on load; the streaming merge must not act on it either."""
    known = {f.name for f in dataclasses.fields(CONFIG_CLASSES[peft_type])}
    assert STREAMED_FIELDS[peft_type] <= known, sorted(STREAMED_FIELDS[peft_type] - known)


def test_ia3_with_a_lora_only_field_goes_to_peft():
    raw = saved_config(IA3Config)
    raw["layers_to_transform"] = [0]  # IA3Config has no such field: PEFT drops it and adapts every layer
    assert parse_adapter_config(raw).peft_only_field == "layers_to_transform"


def lora_variant_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")]


def test_no_lora_variant_counts_as_streamed_except_dora():
    """PEFT tags its LoRA variants; each one changes the merge, so none may be in the streamed list."""
    variants = set(lora_variant_fields())
    assert "use_dora" in variants and len(variants) > 1
    assert variants & STREAMED_FIELDS["LORA"] == {"use_dora"}


@pytest.mark.parametrize("field", [f for f in lora_variant_fields() if f not in ("use_dora", "alora_invocation_tokens")]
                         + ["target_parameters", "trainable_token_indices", "layer_replication", "use_qalora",
                            "ensure_weight_tying", "megatron_config", "a_field_from_a_future_peft"])
def test_any_other_option_goes_to_peft(field):
    raw = saved_config(LoraConfig)
    raw[field] = {"some": "setting"}
    acfg = parse_adapter_config(raw)
    assert not acfg.is_native
    assert acfg.peft_only_field == field


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "mica"])
def test_inits_that_rewrite_the_base_go_to_peft(init):
    raw = saved_config(LoraConfig)
    raw["init_lora_weights"] = init
    assert not parse_adapter_config(raw).is_native


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva"])
def test_inits_of_a_and_b_only_stream(init):
    raw = saved_config(LoraConfig)
    raw["init_lora_weights"] = init
    assert parse_adapter_config(raw).is_native


def test_mica_is_the_init_variant_peft_declares():
    declared = dataclasses.fields(LoraConfig)
    init_field = next(f for f in declared if f.name == "init_lora_weights")
    for variant in init_field.metadata.get("lora_variants", []):
        raw = saved_config(LoraConfig)
        raw["init_lora_weights"] = variant
        assert not parse_adapter_config(raw).is_native, variant


def test_config_from_an_early_peft_streams():
    """PEFT 0.2/0.3 wrote enable_lora and merge_weights; unset, they change nothing."""
    raw = {"base_model_name_or_path": "x", "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
           "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05, "merge_weights": False,
           "modules_to_save": None, "peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
           "task_type": "CAUSAL_LM"}
    assert parse_adapter_config(raw).is_native


def test_unmerged_pissa_adapter_matches_peft(cache_dir, tmp_path, capsys):
    """An unconverted PiSSA adapter: PEFT re-derives the residual base on load; the merge must too."""
    base = build_base(cache_dir, "llama_untied")
    adapter = build_adapter(cache_dir, "pissa", base, "llama_untied",
                            LoraConfig(r=4, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "o_proj"]))
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet"]) == 0
    assert "init_lora_weights='pissa'" in capsys.readouterr().err
    assert_matches_peft(out, base, adapter, tol=1e-4)
    # the streaming formula W + BA would differ: PiSSA moved the principal part out of W
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "peft-merge_and_unload"


def test_alora_adapter_is_refused_before_any_work(cache_dir, tmp_path, capsys):
    base = build_base(cache_dir, "llama_untied")
    adapter = tmp_path / "alora"
    adapter.mkdir()
    raw = saved_config(LoraConfig, alora_invocation_tokens=[5, 6])
    raw["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet"]) == errors.UnsupportedAdapterError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aLoRA" in err[0] and "cannot be folded" in err[0]
    assert not out.exists()


def test_default_oft_config_with_r_0_is_read():
    """OFT saves r=0 when oft_block_size sets the block size; rank rules differ per tuner."""
    from peft import OFTConfig

    raw = saved_config(OFTConfig)
    assert raw["r"] == 0
    assert parse_adapter_config(raw).peft_type == "OFT"


def test_adalora_rank_pattern_masks_are_read_other_tuners_still_need_ranks():
    from peft import AdaLoraConfig

    raw = saved_config(AdaLoraConfig, total_step=10)
    raw["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True]}
    assert parse_adapter_config(raw).peft_type == "ADALORA"
    lora = saved_config(LoraConfig)
    lora["rank_pattern"] = {"q_proj": [True, False]}
    with pytest.raises(errors.AdapterConfigError, match="positive whole number"):
        parse_adapter_config(lora)


def _typo_target_module(cfg: dict) -> None:
    cfg["target_module"] = cfg.pop("target_modules")


def _typo_lora_alpha(cfg: dict) -> None:
    cfg["lora_alhpa"] = cfg.pop("lora_alpha")


def _typo_module_name(cfg: dict) -> None:
    cfg["target_modules"] = ["q_prj", "v_proj"]


def _typo_module_name_via_peft(cfg: dict) -> None:  # the same typo on the PEFT fallback path
    cfg["target_modules"] = ["q_prj", "v_proj"]
    cfg["a_field_from_a_future_peft"] = {"on": True}


@pytest.mark.parametrize("edit, needles", [
    (_typo_target_module, ["'target_module'", "did you mean 'target_modules'?"]),
    (_typo_lora_alpha, ["'lora_alhpa'", "did you mean 'lora_alpha'?"]),
    (_typo_module_name, ["4 adapter tensor(s) would not be used", "q_proj.lora_A.weight", "target_modules"]),
    (_typo_module_name_via_peft, ["4 adapter tensor(s) would not be used", "q_proj.lora_A.weight", "target_modules"]),
], ids=["target_module", "lora_alhpa", "q_prj", "q_prj-peft-fallback"])
def test_config_typos_are_refused_and_nothing_is_written(cache_dir, tmp_path, capsys, edit, needles):
    """PEFT ignores an unknown field (default targets, default alpha) and skips tensors no module takes:
    a merge would drop part of the adapter, and a PEFT reference would agree with it."""
    base = build_base(cache_dir, "llama")
    good = build_adapter(cache_dir, "typo-source", base, "llama", LoraConfig(r=4, lora_alpha=16,
                                                                          target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    shutil.copytree(good, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    edit(cfg)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out), "--verify", "--quiet"]) == errors.AdapterConfigError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("Error: ")]
    assert len(message) == 1 and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in message[0], message[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_field_from_a_newer_peft_is_handed_to_peft_with_one_warning(cache_dir, tmp_path, capsys):
    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, "future-field", base, "llama", LoraConfig(r=4, target_modules=["q_proj"]),
                            edit_config=lambda c: c.update(use_frobnication={"on": True}))
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("use_frobnication are unknown to the installed PEFT") == 1, err
    assert_matches_peft(out, base, adapter)
