"""Verification against PEFT: the per-module proof always (``bot.proof``), end to end when it fits.

- **Proof** (bounded memory, any size, per tensor as it is written): see ``bot.proof``.
- **End to end** (when the merged folder is on disk whole and both models fit the memory budget):
  PEFT's unmerged base+adapter and the merged folder, both float32, compared on a fixed input
  (max |delta logits|); for causal LMs also greedy generation from a chat-formatted prompt,
  which must give the same tokens and stop at EOS in the same place; and the two models'
  forward latency on the same input and hardware (warm runs, median), the reason merging exists.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from bot.errors import AdapterConfigError, IncompatibleBaseError, VerificationError
from bot.plan import MergePlan
from bot.report import EndToEnd, GenerationCheck, Latency, ProofSummary, Skipped, Verification

log = logging.getLogger(__name__)

FIXED_SEQUENCE_LENGTH = 16
GENERATED_TOKENS = 32
LATENCY = {"batch": 1, "sequence_length": 64, "warmup": 2, "runs": 7}
_BUDGET_FRACTION = 0.4  # of available memory, for both float32 models together (MERGEBOT_VERIFY_MEMORY_GB overrides)


def fixed_inputs(vocab_size: int, *, seq2seq: bool, length: int = FIXED_SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    """The same deterministic token ids every time, spread over the vocabulary."""
    ids = (torch.arange(length, dtype=torch.long) * 7919 + 11) % max(vocab_size, 1)
    inputs = {"input_ids": ids.view(1, -1), "attention_mask": torch.ones(1, length, dtype=torch.long)}
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


def end_to_end_budget() -> int:
    """Bytes both float32 models may take: ``MERGEBOT_VERIFY_MEMORY_GB``, else a share of available memory."""
    configured = os.environ.get("MERGEBOT_VERIFY_MEMORY_GB")
    if configured:
        try:
            return int(float(configured) * 1e9)
        except ValueError:
            log.warning("MERGEBOT_VERIFY_MEMORY_GB=%r is not a number; using the default budget", configured)
    import psutil

    return int(psutil.virtual_memory().available * _BUDGET_FRACTION)


def end_to_end_bytes(plan: MergePlan) -> int:
    """Both models in float32: the merged folder's parameters twice, at 4 bytes each."""
    from bot.shards import DTYPE_FROM_CODE

    if plan.jobs:
        elements = sum(j.output.nbytes // DTYPE_FROM_CODE[j.dtype].itemsize for j in plan.jobs)
    else:
        elements = plan.output_bytes // 2
    return 2 * 4 * elements


def verify_output(plan: MergePlan, folder: Path | None, proof: ProofSummary | None,
                  unavailable: str | None) -> Verification:
    """The verification record: the proof's summary (run by the merge as it wrote, before any shard
    left; ``unavailable`` says why there is none) and, when ``folder`` holds the whole merge and it
    fits the budget, the end-to-end comparison."""
    compared, skipped = None, None
    needed = end_to_end_bytes(plan)
    if folder is None:
        skipped = "the merged model is streamed to the Hub shard by shard, never whole on disk"
    elif needed > end_to_end_budget():
        skipped = f"both models need ~{needed / 2**30:.1f} GiB in float32, over the budget (MERGEBOT_VERIFY_MEMORY_GB)"
    else:
        try:
            compared = end_to_end(plan, folder)
        except (AdapterConfigError, IncompatibleBaseError) as e:
            if proof is None:
                raise
            # PEFT's whole-model loader cannot take this adapter the way its trainer attached it (a bare-model
            # adapter, a task the base has no class for); the per-module proof above did.
            skipped = f"PEFT's whole-model reference could not be built ({e})"
    if proof is None and compared is None:
        raise VerificationError(f"this merge cannot be verified here: {unavailable}, and "
                                f"{skipped}; raise MERGEBOT_VERIFY_MEMORY_GB or pass --no-verify")
    return Verification(proof=proof, end_to_end=compared, passed=True, proof_skipped=unavailable or None,
                        end_to_end_skipped=skipped)


def end_to_end(plan: MergePlan, merged_dir: Path) -> EndToEnd:
    import transformers

    from bot.fallback import load_peft_model, quiet_libraries

    reference, layout = load_peft_model(plan, dtype=torch.float32)
    reference.eval()
    with quiet_libraries():
        merged = getattr(transformers, layout.auto_class).from_pretrained(
            merged_dir, dtype=torch.float32, trust_remote_code=False)
        merged.eval()
        vocab = reference.get_base_model().get_input_embeddings().weight.shape[0]
        seq2seq = bool(merged.config.is_encoder_decoder)
        inputs = fixed_inputs(vocab, seq2seq=seq2seq)
        expected, actual = model_outputs(reference, inputs), model_outputs(merged, inputs)
        delta = (expected - actual).abs().max().item()
        scale = expected.abs().max().item()
        generation = None
        if layout.auto_class == "AutoModelForCausalLM":
            generation = _unless_broken(lambda: compare_generation(reference, merged, merged_dir, vocab, delta),
                                        "greedy generation")
        latency = _unless_broken(lambda: measure_latency(reference, merged, vocab, seq2seq=seq2seq), "latency")
    return EndToEnd(max_abs_logit_delta=delta, max_abs_logit=scale, relative=delta / scale if scale else delta,
                    input_tokens=FIXED_SEQUENCE_LENGTH, reference="peft.PeftModel (unmerged), float32",
                    latency=latency, generation=generation)


T = TypeVar("T")


def _unless_broken(measure: Callable[[], T], what: str) -> T | Skipped:
    """A measurement that could not run (a model whose generate() needs more than ids) is recorded as
    skipped, with the reason, rather than stopping a merge that the proof and logits already checked."""
    try:
        return measure()
    except VerificationError:
        raise
    except Exception as e:  # noqa: BLE001 - reported in the record
        log.info("%s skipped: %s", what, e)
        return Skipped(f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}" if str(e) else e.__class__.__name__)


def chat_prompt(merged_dir: Path, vocab: int) -> tuple[torch.Tensor, str]:
    """Token ids of a short chat-formatted prompt (the merged tokenizer's chat template when it has one)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - no tokenizer: fixed ids stand in
        return fixed_inputs(vocab, seq2seq=False)["input_ids"], "fixed token ids (no tokenizer)"
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    if getattr(tokenizer, "chat_template", None):
        encoded: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return ids, "the merged tokenizer's chat template"
    return tokenizer(messages[0]["content"], return_tensors="pt")["input_ids"], "plain text (no chat template)"


def compare_generation(reference, merged, merged_dir: Path, vocab: int, logit_delta: float) -> GenerationCheck:
    """Greedy generation from both models: the same tokens, stopping at EOS at the same place. A first
    difference where the reference's top two logits are closer than twice the measured logit delta is a
    near-tie (reported); a difference beyond that fails."""
    ids, prompt = chat_prompt(merged_dir, vocab)
    ids = ids[:, -256:] % vocab
    if not ids.numel():
        ids, prompt = fixed_inputs(vocab, seq2seq=False)["input_ids"], "fixed token ids (the prompt encoded to nothing)"
    eos = merged.generation_config.eos_token_id if merged.generation_config is not None else None
    settings = dict(max_new_tokens=GENERATED_TOKENS, do_sample=False, num_beams=1, eos_token_id=eos,
                    pad_token_id=eos[0] if isinstance(eos, list) else eos, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        want = reference.generate(input_ids=ids, **settings)[0, ids.shape[1]:].tolist()
        got = merged.generate(input_ids=ids, **settings)[0, ids.shape[1]:].tolist()
    if want == got:
        return GenerationCheck(prompt=prompt, new_tokens=len(want), identical=True)
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    with torch.inference_mode():
        context = torch.cat([ids, torch.tensor([want[:first]], dtype=ids.dtype)], dim=1)
        top2 = reference(input_ids=context).logits[0, -1].float().topk(2).values
    margin = float(top2[0] - top2[1])
    if margin > 2 * logit_delta:
        raise VerificationError(f"greedy generation differs from PEFT's at new token {first} (reference margin "
                                f"{margin:.3g}, logit delta {logit_delta:.3g}); nothing was published")
    return GenerationCheck(prompt=prompt, new_tokens=len(want), identical=False, first_difference=first,
                           reference_margin=margin)


def measure_latency(reference, merged, vocab: int, *, seq2seq: bool) -> Latency:
    """Median forward time of each model on the same input, warm, on this process's device."""
    inputs = fixed_inputs(vocab, seq2seq=seq2seq, length=LATENCY["sequence_length"])
    inputs = {k: v.repeat(LATENCY["batch"], 1) for k, v in inputs.items()}

    def median_ms(model) -> float:
        times = []
        with torch.inference_mode():
            for i in range(LATENCY["warmup"] + LATENCY["runs"]):
                start = time.perf_counter()
                model(**inputs)
                if i >= LATENCY["warmup"]:
                    times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    adapter_ms, merged_ms = median_ms(reference), median_ms(merged)
    return Latency(merged_ms=merged_ms, adapter_ms=adapter_ms, speedup=adapter_ms / merged_ms if merged_ms else None,
                   **LATENCY, dtype="float32", hardware=f"{platform.processor() or platform.machine()} CPU, "
                                                        f"{torch.get_num_threads()} threads")


def describe(verification: Verification | None) -> str:
    """One line, in words, for the terminal, the commit and the Space."""
    if not verification:
        return "not verified"
    proof, e2e = verification.proof, verification.end_to_end
    if proof is None:
        return f"passed end to end only (no per-module proof: {verification.proof_skipped})" + (
            f"; max |delta logits| {e2e.max_abs_logit_delta:.3g}" if e2e else "")
    words = (f"passed: {proof.modules_proved} modules proved against PEFT {proof.peft_version}'s "
             f"unmerged layers ({proof.probes_per_module} probes each), max error "
             f"{proof.max_error_ulp:.2f} ulp (threshold {proof.threshold_ulp:g}); "
             f"{proof.saved_copies} saved copies and {proof.unchanged_tensors} other tensors exact")
    if e2e:
        words += f"; end to end max |delta logits| {e2e.max_abs_logit_delta:.3g}"
        generation = e2e.generation
        if isinstance(generation, GenerationCheck):
            words += f", greedy generation {'identical' if generation.identical else 'diverged at a near-tie'}"
        latency = e2e.latency
        if isinstance(latency, Latency) and latency.speedup:
            words += (f"; merged {latency.merged_ms:.1f} ms vs adapter attached {latency.adapter_ms:.1f} ms "
                      f"({latency.speedup:.2f}x)")
    return words
