"""bot.peft_rules must agree with PEFT's own matching on real-world patterns."""
import itertools

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from bot import peft_rules

KEYS = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.mlp.down_proj",
    "model.layers.1.mlp.experts.0.up_proj", "transformer.h.3.attn.c_attn", "lm_head", "model.embed_tokens",
    "encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.v", "score",
    "model.vision_tower.layers.0.q_proj", "q_proj",
]
CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q", "v"]),
    dict(target_modules=r".*\.layers\.\d+\.self_attn\.(q|k)_proj"),
    dict(target_modules=r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"),
    dict(target_modules=["q_proj", "down_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[3, 0], layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj"], exclude_modules=["vision_tower.layers.0.q_proj"]),
    dict(target_modules=["q_proj"], exclude_modules=r".*vision_tower.*"),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
    dict(target_modules=["embed_tokens", "lm_head", "score"]),
]


@pytest.mark.parametrize("fields,key", list(itertools.product(CONFIGS, KEYS)))
def test_is_targeted_agrees_with_peft(fields, key):
    expected = check_target_module_exists(LoraConfig(**fields), key)
    expected = bool(expected) and type(expected).__name__ != "_ExcludedModule"
    assert peft_rules.is_targeted(fields, key) == expected


PATTERNS = [["q_proj"], ["layers.0.self_attn.q_proj", "q_proj"], ["^model.layers.1.self_attn.q_proj"],
            [r"model\.layers\.\d+\.mlp\.down_proj"], ["proj"], ["self_attn.q_proj", "mlp.down_proj"]]


@pytest.mark.parametrize("patterns,key", list(itertools.product(PATTERNS, KEYS)))
def test_pattern_key_agrees_with_peft(patterns, key):
    expected = get_pattern_key(patterns, key)
    ours = peft_rules.pattern_key(patterns, key)
    assert (ours if ours is not None else key) == expected


CONFIG_CASES = [
    ("LORA", dict(target_modules=["q_proj"])),
    ("LORA", dict(target_modules=["q_proj"], layers_pattern="layers")),
    ("LORA", dict(target_modules=["q_proj"], layers_pattern="layers", layers_to_transform=[0])),
    ("LORA", dict(target_modules=r".*q_proj", layers_to_transform=[0])),
    ("LORA", dict(target_modules=r".*q_proj", layers_pattern="layers")),
    ("LORA", dict(target_modules=r".*q_proj")),
    ("LORA", dict(target_modules=["q_proj"], lora_bias=True)),
    ("LORA", dict(target_modules=["q_proj"], lora_bias=True, use_dora=True)),
    ("LORA", dict(target_modules=["q_proj"], lora_bias=True, init_lora_weights="gaussian")),
    ("LOHA", dict(target_modules=["q_proj"], layers_pattern="layers")),
    ("LOKR", dict(target_modules=["q_proj"], layers_pattern="layers", layers_to_transform=1)),
    ("IA3", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("IA3", dict(target_modules=["k_proj"], feedforward_modules=["down_proj"])),
    ("IA3", dict(target_modules=r".*k_proj", feedforward_modules=["down_proj"])),
]


@pytest.mark.parametrize("peft_type,fields", CONFIG_CASES)
def test_config_problem_agrees_with_peft_config_classes(peft_type, fields):
    from peft import IA3Config, LoHaConfig, LoKrConfig

    cls = {"LORA": LoraConfig, "LOHA": LoHaConfig, "LOKR": LoKrConfig, "IA3": IA3Config}[peft_type]
    try:
        cls(**fields)
        peft_refuses = False
    except ValueError:
        peft_refuses = True
    assert (peft_rules.config_problem(peft_type, fields) is not None) == peft_refuses


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "t5"])
def test_all_linear_expands_like_peft(model_name):
    """PEFT's own expansion of target_modules="all-linear" on a real (tiny) model, against ours on its layout."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from bot.architecture import describe_model
    from factory import BASE_CONFIGS, model_class

    config = BASE_CONFIGS[model_name]()
    model = model_class(model_name)(config)
    expanded = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules
    layout = describe_model(config)
    ours = peft_rules.all_linear_modules(layout.module_types, layout.output_embedding)
    assert peft_rules.is_all_linear("ALL-LINEAR") and not peft_rules.is_all_linear(["all-linear"])
    assert sorted(expanded) == ours
