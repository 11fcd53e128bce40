"""The merged repo's model card (README.md), built from the merge report and the input cards.

Metadata goes through huggingface_hub's ``ModelCardData`` so the Hub reads it: the base
as ``base_model`` (relation ``finetune``: the merged weights are the base fine-tuned by
the adapter), the base's license (the merged weights are mostly the base's; the body names
both licenses), language / datasets from the adapter's card, else the base's, and a
``merge_bot`` block with the provenance fingerprint. Local inputs are named "a local folder"
with their content digest, never by path.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.report import MergeReport, ReportSource, Verification

CARD_NAME = "README.md"

# Architecture class-name suffix -> Auto class, first match wins.
_SUFFIX_AUTO_CLASS = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
)
# Auto class -> the Hub's pipeline tag for it (AutoModel: only when the adapter says it extracts features).
_PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModel": "feature-extraction",
}
_INHERITED = ("license", "license_name", "license_link", "language", "datasets")
_LICENSE_KEYS = ("license", "license_name", "license_link")


def auto_class_and_pipeline(architecture: str | None, task_type: str | None = None) -> tuple[str, str | None]:
    """(Auto class, pipeline tag): the PEFT task type the adapter was trained for decides (the same table
    PEFT's task models use, ``bot.architecture.TASK_AUTO_CLASS``), else the architecture's class name."""
    from bot.architecture import TASK_AUTO_CLASS

    if task_type in TASK_AUTO_CLASS:
        auto_class = TASK_AUTO_CLASS[task_type]
        return auto_class, _PIPELINE_TAGS[auto_class]
    for suffix, auto_class in _SUFFIX_AUTO_CLASS:
        # *ForConditionalGeneration is also vision-language and speech models: only trust it with a task type.
        if architecture and architecture.endswith(suffix) and suffix != "ForConditionalGeneration":
            return auto_class, _PIPELINE_TAGS[auto_class]
    return "AutoModel", None


def read_card_data(folder: Path | None) -> dict[str, Any]:
    """The YAML metadata of ``folder/README.md``; empty when there is none or it does not parse."""
    path = Path(folder) / CARD_NAME if folder else None
    if path is None or not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a broken upstream card must not stop a merge; we just inherit nothing
        return {}


def _clean(key: str, value: Any) -> Any:
    """Keep only what the Hub's metadata schema accepts: a short string, or (language, datasets) a list of them."""
    def ok(v: Any) -> bool:
        return isinstance(v, str) and 0 < len(v) <= 200 and "\n" not in v

    if ok(value):
        return value.strip().lower() if key == "license" else value  # Hub license ids are lower-case
    if key in ("language", "datasets") and isinstance(value, list):
        kept = [v for v in value if ok(v)][:50]
        return kept or None
    return None


def inherited_metadata(adapter_card: dict[str, Any], base_card: dict[str, Any]) -> dict[str, Any]:
    """language, datasets: the adapter's if its card says, else the base's; the license fields are
    the base's only (the merged weights are mostly the base's). Malformed values are dropped."""
    out = {}
    for key in _INHERITED:
        value = _clean(key, base_card.get(key)) if key in _LICENSE_KEYS else (
            _clean(key, adapter_card.get(key)) or _clean(key, base_card.get(key)))
        if value:
            out[key] = value
    return out


def license_of(card: dict[str, Any]) -> str | None:
    """A card's license as people read it: ``license_name`` for ``other``, else the license id."""
    licence = _clean("license", card.get("license"))
    if licence == "other":
        return _clean("license_name", card.get("license_name")) or "other"
    return licence


def license_text(base: str | None, adapter: str | None) -> str:
    """The card's License section: both inputs' licenses, and plainly what to do when they differ or one is missing."""
    if base and adapter and base == adapter:
        return f"Released under `{base}`, the license of both the base model and the adapter."
    if base and adapter:
        return (f"The base model's card declares `{base}` and the adapter's card declares `{adapter}`: they "
                f"differ. The merged weights are mostly the base's, so this card's metadata carries the base's "
                f"license, `{base}`; the adapter's terms may apply as well. Check both before use.")
    if base:
        return (f"The base model's card declares `{base}`, which this card's metadata carries (the merged weights "
                f"are mostly the base's). The adapter's card declares no license, so its terms are unknown.")
    if adapter:
        return (f"The adapter's card declares `{adapter}`, but the base model's card declares no license. The "
                f"merged weights are mostly the base's, so this card's metadata declares none: check the base "
                f"model's terms before use.")
    return ("Neither the base model's card nor the adapter's declares a license, so this card's metadata declares "
            "none: check the base model's terms before use.")


def _link(source: ReportSource, hub_url: str) -> str:
    if source.repo_id and source.revision:
        repo, sha = source.repo_id, source.revision
        return f"[{repo}]({hub_url}/{repo}/tree/{sha}) at `{sha[:12]}`"
    return f"a local folder (content digest `{source.revision or '?'}`)"


def base_model_of(base: ReportSource, hub_url: str) -> tuple[str | None, str]:
    """(the card's ``base_model``, the body's Base model line) for the report's base entry; links go to ``hub_url``."""
    if base.repo_id:
        return base.repo_id, _link(base, hub_url)
    named = base.config_names
    if named:
        return named, (f"{_link(base, hub_url)}, whose config.json names [{named}]({hub_url}/{named}) as its origin; "
                       f"that is this card's `base_model` (merge-bot did not compare the folder with that repo)")
    return None, f"{_link(base, hub_url)} that names no Hub repo, so this card has no `base_model`"


def _method_line(report: MergeReport) -> str:
    scales = report.scaling
    scale_text = ", ".join(f"{k} ({n} tensors)" for k, n in scales.items()) if scales else "per PEFT's merge"
    how = ("streamed tensor by tensor, float32 arithmetic rounded once" if report.streamed
           else "PEFT's merge_and_unload")
    return f"{report.peft_type} folded into the base weights ({how}); scale: {scale_text}"


def build_card(report: MergeReport, adapter_folder: Path | None, base_folder: Path | None, *, hub_url: str,
               has_tokenizer: bool = True) -> str:
    """README.md text for a merged model folder; its links go to ``hub_url``, the Hub the job reads and
    publishes through (the job's client's endpoint), not the process-wide default."""
    from huggingface_hub import ModelCardData

    adapter, base = report.adapter, report.base
    auto_class, pipeline = auto_class_and_pipeline(report.architecture, report.task_type)
    peft_type = report.peft_type.lower()
    base_model, base_line = base_model_of(base, hub_url)
    adapter_card, base_card = read_card_data(adapter_folder), read_card_data(base_folder)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline,
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        tags=sorted({"merge", "peft-merge", "merge-bot", peft_type}),
        merge_bot={"fingerprint": report.fingerprint, "adapter": adapter.repo_id,
                   "adapter_revision": adapter.revision, "base_revision": base.revision},
        **inherited_metadata(adapter_card, base_card),
    )
    title = f"{adapter.repo_id.split('/')[-1]} (merged)" if adapter.repo_id else "Merged model"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title}", "",
        "This is a standalone model: a PEFT adapter merged into its base model by merge-bot. "
        "It loads with `transformers` alone; PEFT is not needed.", "",
        "## What was merged", "",
        f"- **Adapter:** {_link(adapter, hub_url)}",
        f"- **Base model:** {base_line}",
    ]
    if report.base_note:
        lines.append(f"- **Base note:** {report.base_note}")
    if report.requested_by:
        author = (adapter.repo_id or "").split("/")[0]
        credit = f"; the adapter is the work of [@{author}]({hub_url}/{author})" if author else ""
        lines.append(f"- **Requested by:** [@{report.requested_by}]({hub_url}/{report.requested_by}) "
                     f"through merge-bot's self-service{credit}")
    counts = report.adapted_counts
    lines += [
        f"- **Method:** {_method_line(report)}",
        f"- **Modules:** {', '.join(f'{n} {k}' for k, n in counts.items()) or 'see merge_report.json'}",
        f"- **Output dtype:** {report.output_dtype or 'as the base'}",
        f"- **Provenance fingerprint:** `{report.fingerprint}` (full record in `merge_report.json`)",
    ]
    lines += verification_lines(report.verification)
    lines += ["", "## Usage", "", "```python",
              f"from transformers import {auto_class}" + (", AutoTokenizer" if has_tokenizer else ""), "",
              'repo = "REPO_ID"']
    if has_tokenizer:
        lines.append("tokenizer = AutoTokenizer.from_pretrained(repo)")
    else:
        lines.append("# no tokenizer files were found on the adapter or base; load the base model's tokenizer")
    lines += [f"model = {auto_class}.from_pretrained(repo)", "```", "", "## License", "",
              license_text(license_of(base_card), license_of(adapter_card))]
    return "\n".join(lines) + "\n"


def with_repo_id(card: str, repo_id: str) -> str:
    """Fill the usage snippet's placeholder once the target repo is known."""
    return card.replace('repo = "REPO_ID"', f'repo = "{repo_id}"')


def verification_lines(verification: Verification | None) -> list[str]:
    """The card's Verification section: how the merge was proved, the worst error against its threshold,
    and, when the end-to-end check ran, the logits, generation and latency it measured."""
    from bot.report import GenerationCheck, Latency

    if not verification:
        return ["", "## Verification", "", "Not verified (the merge ran with `--no-verify`)."]
    proof = verification.proof
    if proof is None:
        lines = ["", "## Verification", "", f"- No per-module proof: {verification.proof_skipped}."]
    else:
        lines = ["", "## Verification", "",
                 f"- **Per-module proof** against PEFT {proof.peft_version}'s own layers with the adapter attached "
                 f"(unmerged): {proof.modules_proved} adapted modules, {proof.probes_per_module} one-hot "
                 f"and {proof.probes_per_module} random probes each. Largest error "
                 f"{proof.max_error_ulp:.2f} ulp of the output dtype (threshold {proof.threshold_ulp:g} "
                 f"ulp; {proof.max_share_beyond_half_ulp:.2%} of probed elements beyond half an ulp, threshold "
                 f"{proof.threshold_share:.0%}). {proof.saved_copies} `modules_to_save` tensors and "
                 f"{proof.unchanged_tensors} untouched tensors compared exactly. **Passed.**"]
    e2e = verification.end_to_end
    if e2e:
        lines.append(f"- **End to end** (float32, {e2e.input_tokens} fixed tokens): max |delta logits| "
                     f"{e2e.max_abs_logit_delta:.3g} (largest logit {e2e.max_abs_logit:.3g}).")
        generation = e2e.generation
        if isinstance(generation, GenerationCheck):
            same = "the same tokens" if generation.identical else \
                f"a different token at a near-tie (position {generation.first_difference})"
            lines.append(f"- **Greedy generation** of {generation.new_tokens} tokens from {generation.prompt}: "
                         f"{same} as PEFT with the adapter attached.")
        latency = e2e.latency
        if isinstance(latency, Latency) and latency.speedup:
            lines.append(f"- **Latency** (batch {latency.batch}, {latency.sequence_length} tokens, "
                         f"{latency.dtype}, median of {latency.runs} warm runs on {latency.hardware}): "
                         f"merged {latency.merged_ms:.1f} ms, adapter attached {latency.adapter_ms:.1f} ms "
                         f"({latency.speedup:.2f}x).")
    elif verification.end_to_end_skipped:
        lines.append(f"- End-to-end comparison not run: {verification.end_to_end_skipped}.")
    return lines
