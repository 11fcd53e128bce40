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
