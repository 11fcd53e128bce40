"""What the Space's buttons do: thin wrappers over bot.preflight and bot.jobs.

Every Hub read and write uses the signed-in user's own OAuth token. When the app runs
outside a Space (local development), there is no real OAuth, so the token comes from
``HF_TOKEN`` (or the stored login) instead; a Space never falls back to a shared token.
Errors reach the page as one-line ``gr.Error`` messages.
"""
from __future__ import annotations

import logging
import os
import re
import time
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from bot.errors import MergeBotError, redact
from bot.report import Verification
from bot.spec import DTYPES
from bot.transport import hub_client
from space import zerogpu

MOCK_TOKEN_PREFIX = "mock-oauth-token"  # what gradio's local login mock hands out
log = logging.getLogger(__name__)
EMPTY_PREFLIGHT = "Enter an adapter id (`owner/name`, optionally `@revision`, or its huggingface.co address)."


def on_space() -> bool:
    """Serving other people: a Space, a configured self-service bot, or any non-loopback address.

    Then only a signed-in user's own OAuth token counts; HF_TOKEN (the Space's or bot's secret)
    is never used for a visitor's action.
    """
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    return bool(os.environ.get("SPACE_ID") or os.environ.get("SYSTEM") == "spaces"
                or os.environ.get("MERGEBOT_WEBHOOK_SECRET") or host not in ("127.0.0.1", "localhost", "::1"))


def user_token(oauth_token: gr.OAuthToken | None) -> str | None:
    """The caller's token: OAuth on a Space; HF_TOKEN / stored login when developing locally."""
    if oauth_token is not None and oauth_token.token and not oauth_token.token.startswith(MOCK_TOKEN_PREFIX):
        return oauth_token.token
    if on_space():
        return None
    from huggingface_hub import get_token

    return get_token()


def read_token(oauth_token: gr.OAuthToken | None) -> str | bool | None:
    """Token for reads: the user's, or on a Space explicitly none (False), never the Space's own secret."""
    return user_token(oauth_token) or (False if on_space() else None)


def user_name(profile: gr.OAuthProfile | None, api) -> str | None:
    """The signed-in user's name: from the OAuth profile, else asked of the Hub with ``api`` (the
    handler's one client) when it holds a token."""
    if profile is not None and getattr(profile, "username", None):
        return profile.username
    if api is None or not api.token:
        return None
    try:
        return api.whoami()["name"]
    except Exception:  # an invalid token shows up later as a clear error on the action itself
        return None


def adapter_name(adapter: str) -> str:
    """The repo name part of what was typed (an id, ``@revision`` or a pasted URL), for the default target."""
    from bot.spec import parse_source_ref

    try:
        repo_id = parse_source_ref(adapter, what="adapter", allow_local=False).name
    except MergeBotError:
        repo_id = (adapter or "").split("@")[0]
    return repo_id.rstrip("/").split("/")[-1]


def default_target(user: str | None, adapter: str) -> str:
    name = adapter_name(adapter) if adapter and adapter.strip() else ""
    return f"{user}/{name}-merged" if user and name else ""


# The core's messages name command-line flags; the form has fields. (pattern, the form's words)
FORM_WORDS = (
    (r"pass --base with the base model's Hub id or folder", "enter the base model's Hub id in Base model override"),
    (r"\(override with --base\)", "(override it in Base model override)"),
    (r"pass it with --base\b", "enter it in Base model override"),
    (r"pass --base\b", "fill in Base model override"),
    (r"(?:use|with) --base\b", "in Base model override"),
    (r"--base\b", "Base model override"),
    (r"pass --pr\b", "tick \"Open a pull request on an existing repo\""),
    (r"with --pr\b", "with \"Open a pull request on an existing repo\""),
    (r"--dtype\b", "Output dtype"),
    (r"pass (?:a valid )?--token, set HF_TOKEN,? (?:or )?run `hf auth login`(?: with a token that has write access)?",
     "sign in again, granting write access"),
    (r"--token\b", "signing in"),
    (r"use --device cpu", "retry (the merge runs on the CPU)"),
    (r"set --work-dir elsewhere", "try again later"),
    (r"choose another --out", "try again later"),
)


def form_words(message: str) -> str:
    """A core message in the words of the form (its field labels instead of command-line flags)."""
    for pattern, words in FORM_WORDS:
        message = re.sub(pattern, words, message)
    return message


def _one_line(error: BaseException | str, token: str | None) -> str:
    return form_words(redact(" ".join(str(error).split()), token))


def _size(n: int) -> str:
    from bot.pipeline import human_bytes

    return human_bytes(n)


def target_view(repo: str, private: bool, pr_mode: bool) -> str:
    """What Merge and publish will create, shown before anything is published."""
    repo = (repo or "").strip()
    if not repo:
        return "Target: sign in and enter an adapter, or type a target repo."
    if pr_mode:
        return f"Will open **a pull request** on the existing repo `{repo}`."
    return f"Will create the **{'private' if private else 'public'}** repo `{repo}` (or leave it as it is when it " \
           f"already holds this exact merge)."


def follows_adapter(repo: str, follows: bool | None) -> bool:
    """Whether the target is the adapter's default: on the page until the user types a target of
    their own (``follows``, tracked in the browser); otherwise only when left empty."""
    return bool(follows) or not (repo or "").strip()


def preflight_view(adapter: str, base: str, dtype: str, repo: str, follows: bool | None,
                   profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None) -> tuple[str, str]:
    """(markdown describing what a merge would do or why it will be refused, target repo).

    The target follows the adapter (``you/<adapter name>-merged``) until the user edits the field
    themselves; from then on it is theirs (``follows_adapter``)."""
    from bot.preflight import preflight
    from bot.spec import MergeSpec, parse_source_ref

    adapter = (adapter or "").strip()
    if not adapter:
        return EMPTY_PREFLIGHT, repo
    token = read_token(oauth_token)
    api = hub_client(token=token)
    suggestion = (default_target(user_name(profile, api), adapter) or repo) \
        if follows_adapter(repo, follows) else repo
    try:
        spec = MergeSpec(adapter=parse_source_ref(adapter, what="adapter", allow_local=False),
                         base=parse_source_ref(base.strip(), what="base", allow_local=False)
                         if base and base.strip() else None,
                         out=Path(tempfile.gettempdir()) / "merge-bot-preflight", dtype=dtype or "auto", token=token)
        checked = preflight(spec, api=api)
    except MergeBotError as e:
        return f"**Will be refused:** {_one_line(e, token or None)}", suggestion
    except Exception:
        log.exception("pre-flight of %s failed unexpectedly", adapter)
        return "**Could not check this adapter** (internal error; see the Space's logs).", suggestion
    access = []
    for name in checked.private:
        access.append(f"`{name}` is private; your account can read it")
    for name in checked.gated:
        access.append(f"`{name}` is gated; your account has access")
    for name in checked.visibility_unknown:
        access.append(f"the Hub did not say whether `{name}` is public")
    lines = [
        "**Ready to merge.**", "",
        f"- Tuner: **{checked.peft_type}**" + (f" ({checked.task_type})" if checked.task_type else ""),
        f"- Adapter: `{checked.adapter_pin.name}` at `{checked.adapter_pin.revision[:12]}`",
        f"- Base: `{checked.base_pin.name}` at `{checked.base_pin.revision[:12]}`",
        f"- Download: ~{_size(checked.download_bytes)}; merged weights: ~{_size(checked.output_bytes)}"
        + ("" if checked.sizes_known else " (at least: the Hub did not report every file size)"),
        f"- Access: {'; '.join(access) if access else 'public repos'}",
    ]
    if checked.base_note:
        lines.append(f"- Note: {checked.base_note}")
    return "\n".join(lines), suggestion


class ProgressReport:
    """The job's events and phases (``bot.progress``) as gradio progress: the bar follows the merge, the
    text gives each phase's bytes, speed and ETA.

    huggingface_hub's own bars are not tracked (``track_tqdm=False``): their totals are unknown
    while a download starts ("0/0 B") and they say nothing about the merge."""

    EVERY = 0.25  # seconds between page updates from phases: they come per chunk, from three threads

    def __init__(self, progress, clock=time.monotonic):
        from bot.progress import PhaseSummary

        self.progress = progress
        self.steps: list[str] = []
        self.summary = ""  # the pre-flight line, shown again after the publish
        self.share = 0.0  # of the merge phase: the bar
        self.phases = PhaseSummary(lambda text: self.progress(self.share, desc=text), every=self.EVERY, clock=clock)

    def event(self, message: str) -> None:
        self.steps.append(message)
        if message.startswith("pre-flight: "):
            self.summary = message[len("pre-flight: "):]
            self.progress(None, desc="pre-flight done; " + message.split("; ")[-1][:100])
        elif message.startswith("uploaded ") and self.phases.lines:
            return  # the upload phase says it, with the others
        elif message.endswith(zerogpu.FALLBACK_NOTE):
            self.progress(None, desc=message)
        elif not message.startswith(("warning:", "note:")):
            self.progress(None, desc=message.split(";")[0][:100])

    def phase(self, name: str, done: int, total: int) -> None:
        from bot.progress import MERGE

        if name == MERGE and total > 0:
            self.share = done / total
        self.phases.phase(name, done, total)


def merge_and_publish(adapter: str, base: str, repo: str, private: bool, pr_mode: bool, dtype: str, verify: bool,
                      follows: bool | None, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None,
                      progress: gr.Progress = gr.Progress(track_tqdm=False)) -> tuple[str, str, str, str]:
    """Run the whole job for the signed-in user.

    Returns (result markdown, pre-flight panel, rendered card, card source). The target is the
    user's own when they edited the field, else it follows the adapter."""
    from bot.jobs import PublishJob, run_publish_job

    token = user_token(oauth_token)
    if not token:
        raise gr.Error("Sign in with Hugging Face first: the merge is published under your account.", duration=None)
    adapter, repo = (adapter or "").strip(), (repo or "").strip()
    api = hub_client(token=token)  # the job's one client: every read and write below goes through it
    if follows_adapter(repo, follows):
        repo = default_target(user_name(profile, api), adapter) or repo
    if dtype not in DTYPES:
        raise gr.Error(f"Output dtype must be one of {', '.join(DTYPES)}", duration=None)
    report = ProgressReport(progress)
    # ZeroGPU: the job streams Hub to Hub here too; only the arithmetic goes to the GPU, batch by batch.
    compute = zerogpu.ZeroGpuCompute(report.event) if zerogpu.on_zerogpu() else None
    try:
        job = PublishJob(adapter=adapter, repo=repo, pr=bool(pr_mode), private=bool(private) and not pr_mode,
                         base=(base or "").strip() or None, dtype=dtype, verify=bool(verify), allow_local=False)
        progress(None, desc="pre-flight: pinning the adapter and base, checking access")
        # Scratch in the system's temp folder, locked while the job runs: a later job removes what a
        # killed Space process left there (bot.pipeline.claim_scratch).
        result = run_publish_job(job, api=api, work_dir=None, on_event=report.event, progress=report,
                                 compute=compute)
    except MergeBotError as e:
        raise gr.Error(_one_line(e, token), duration=None) from None
    except OSError as e:
        raise gr.Error(_one_line(f"{e.strerror or e}", token), duration=None) from None
    except gr.Error:
        raise
    except Exception:  # a bug: the details go to the log, the page gets one line
        log.exception("merge of %s failed unexpectedly", adapter)
        raise gr.Error("The merge failed with an internal error; nothing was published. The details are in the "
                       "Space's logs.", duration=None) from None
    card = result.card or ""
    markdown = result_markdown(result)
    if compute is not None and compute.fallback:
        markdown += f"\n\nNote: {compute.fallback}; the rest of the merge ran on the CPU."
    return markdown, done_preflight(result, report.summary), render_card(card), card


def done_preflight(result: Any, summary: str) -> str:
    """The pre-flight panel after a publish: what was merged, not a prompt to enter an adapter."""
    publish = result.publish
    lines = [f"**Done:** {publish.describe().split(':')[0]}."]
    if summary:
        lines += ["", f"- Pre-flight: {summary}"]
    return "\n".join(lines)


def verification_verdict(v: Verification) -> str:
    """The verification in words, with its verdict against the stated thresholds."""
    from bot.verify import describe

    proof = v.proof
    verdict = "**Verification passed**" if v.passed else "**Verification failed**"
    threshold = (f" (threshold {proof.threshold_ulp:g} ulp per element, at most "
                 f"{proof.threshold_share:.0%} beyond half an ulp)") if proof else ""
    return f"{verdict}{threshold}: {describe(v).removeprefix('passed: ')}."


def render_card(card: str) -> str:
    """The card as the Hub shows it: the YAML header becomes a metadata block, the rest is Markdown."""
    match = re.match(r"^---\n(.*?)\n---\n?", card, re.DOTALL)
    if not match:
        return card
    return f"{card[match.end():].lstrip()}\n\n<details><summary>Card metadata</summary>\n\n```yaml\n" \
           f"{match.group(1)}\n```\n</details>\n"


def result_markdown(result: Any) -> str:
    publish = result.publish
    lines = [f"### {publish.describe().split(':')[0]}", "", f"[{publish.url}]({publish.url})"]
    report = result.report
    if report is None:
        return "\n".join(lines)
    if report.verification:
        lines += ["", verification_verdict(report.verification)]
    if report.base_note:
        lines += ["", f"Note: {form_words(report.base_note)}"]
    counts = report.adapted_counts
    lines += ["", f"Merged {', '.join(f'{n} {k}' for k, n in counts.items()) or 'the adapter'} in "
                  f"{report.timing_seconds:.1f} s; output dtype {report.output_dtype}."]
    return "\n".join(lines)
