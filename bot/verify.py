"""verify_merge: the merged folder against PEFT's unmerged base+adapter, on a fixed input.

Both sides run in float32 on the CPU (or the merge device) so the number reflects the
merge and the output rounding, not the inference precision.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bot.plan import MergePlan

log = logging.getLogger(__name__)

FIXED_SEQUENCE_LENGTH = 16


def fixed_inputs(vocab_size: int, *, seq2seq: bool) -> dict[str, torch.Tensor]:
    """The same deterministic token ids every time, spread over the vocabulary."""
    ids = (torch.arange(FIXED_SEQUENCE_LENGTH, dtype=torch.long) * 7919 + 11) % max(vocab_size, 1)
    inputs = {"input_ids": ids.view(1, -1), "attention_mask": torch.ones(1, FIXED_SEQUENCE_LENGTH, dtype=torch.long)}
    if seq2seq:
        inputs["decoder_input_ids"] = ids.flip(0).view(1, -1)
    return inputs


def model_outputs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    value = getattr(out, "logits", None)
    if value is None:
        value = out.last_hidden_state
    return value.float()


def verify_merge(plan: MergePlan, merged_dir: Path) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our CLI owns the terminal

    from bot.fallback import load_peft_model, quiet_libraries

    reference, layout = load_peft_model(plan, dtype=torch.float32)
    reference.eval()
    with quiet_libraries():
        merged = getattr(transformers, layout.auto_class).from_pretrained(
            merged_dir, dtype=torch.float32, trust_remote_code=False)
        merged.eval()
        vocab = reference.get_base_model().get_input_embeddings().weight.shape[0]
        inputs = fixed_inputs(vocab, seq2seq=merged.config.is_encoder_decoder)
        expected, actual = model_outputs(reference, inputs), model_outputs(merged, inputs)
    delta = (expected - actual).abs().max().item()
    scale = expected.abs().max().item()
    return {
        "max_abs_logit_delta": delta,
        "max_abs_logit": scale,
        "relative": delta / scale if scale else delta,
        "input_tokens": FIXED_SEQUENCE_LENGTH,
        "reference": "peft.PeftModel (unmerged), float32",
    }
