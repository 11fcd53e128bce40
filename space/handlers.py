"""What the Space's buttons do: thin wrappers over bot.preflight and bot.jobs.

Every Hub read and write uses the signed-in user's own OAuth token. When the app runs
outside a Space (local development), there is no real OAuth, so the token comes from
``HF_TOKEN`` (or the stored login) instead; a Space never falls back to a shared token.
Errors reach the page as one-line ``gr.Error`` messages.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from bot.errors import MergeBotError, redact
from bot.spec import DTYPES

MOCK_TOKEN_PREFIX = "mock-oauth-token"  # what gradio's local login mock hands out
log = logging.getLogger(__name__)


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


def user_name(profile: gr.OAuthProfile | None, token: str | None) -> str | None:
    if profile is not None and getattr(profile, "username", None):
        return profile.username
    if not token:
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).whoami()["name"]
    except Exception:  # an invalid token shows up later as a clear error on the action itself
        return None


def default_target(user: str | None, adapter: str) -> str:
    name = adapter.split("@")[0].rstrip("/").split("/")[-1] if adapter else ""
    return f"{user}/{name}-merged" if user and name else ""


def _one_line(error: BaseException, token: str | None) -> str:
    return redact(" ".join(str(error).split()), token)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def preflight_view(adapter: str, base: str, dtype: str, repo: str, profile: gr.OAuthProfile | None,
                   oauth_token: gr.OAuthToken | None) -> tuple[str, str]:
    """(markdown describing what a merge would do or why it will be refused, target repo suggestion)."""
    from bot.preflight import preflight
    from bot.spec import MergeSpec, parse_source_ref

    adapter = (adapter or "").strip()
    if not adapter:
        return "Enter an adapter id (`owner/name`, optionally `@revision`).", repo
    token = read_token(oauth_token)
    suggestion = repo or default_target(user_name(profile, token or None), adapter)
    try:
        spec = MergeSpec(adapter=parse_source_ref(adapter, what="adapter", allow_local=False),
                         base=parse_source_ref(base.strip(), what="base", allow_local=False)
                         if base and base.strip() else None,
                         out=Path(tempfile.gettempdir()) / "merge-bot-preflight", dtype=dtype or "auto", token=token)
        checked = preflight(spec)
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
        f"- Download: ~{_gib(checked.download_bytes)}; merged weights: ~{_gib(checked.output_bytes)}"
        + ("" if checked.sizes_known else " (at least: the Hub did not report every file size)"),
        f"- Access: {'; '.join(access) if access else 'public repos'}",
    ]
    if checked.base_note:
        lines.append(f"- Note: {checked.base_note}")
    return "\n".join(lines), suggestion


def gpu_seconds(plan, verify: bool) -> int:
    """ZeroGPU time to ask for: a minute plus ~20 s per GB of output, more with verification."""
    gb = plan.output_bytes / 1e9
    return int(min(600, 60 + 20 * gb + (30 + 10 * gb if verify else 0)))


def _gpu(fn):
    """``spaces.GPU`` when running on ZeroGPU, else the function itself (importing spaces is optional)."""
    try:
        import spaces  # type: ignore
    except ImportError:
        return fn
    return spaces.GPU(duration=gpu_seconds)(fn)


@_gpu
def merge_on_gpu(plan, verify: bool):
    from bot.jobs import run_merge_plan

    return run_merge_plan(plan, verify)


def _merge_runner(progress: gr.Progress):
    """Per-tensor progress when merging in this process; ZeroGPU runs the merge in a worker."""
    try:
        import spaces  # noqa: F401  # type: ignore
    except ImportError:
        from bot.jobs import run_merge_plan

        def merge_here(plan, verify: bool):
            return run_merge_plan(plan, verify, lambda done, total, what: progress(
                (done, total), desc="merging tensors", unit="tensors"))

        return merge_here
    return merge_on_gpu


def merge_and_publish(adapter: str, base: str, repo: str, private: bool, pr_mode: bool, dtype: str, verify: bool,
                      profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None,
                      progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple[str, str]:
    """Run the whole job for the signed-in user; returns (result markdown, generated card)."""
    from bot.jobs import PublishJob, run_publish_job

    token = user_token(oauth_token)
    if not token:
        raise gr.Error("Sign in with Hugging Face first: the merge is published under your account.", duration=None)
    adapter, repo = (adapter or "").strip(), (repo or "").strip()
    repo = repo or default_target(user_name(profile, token), adapter)
    if dtype not in DTYPES:
        raise gr.Error(f"dtype must be one of {', '.join(DTYPES)}", duration=None)
    steps: list[str] = []

    def event(message: str) -> None:
        steps.append(message)
        progress(None, desc=message.split(";")[0][:80])

    try:
        job = PublishJob(adapter=adapter, repo=repo, pr=bool(pr_mode), private=bool(private) and not pr_mode,
                         base=(base or "").strip() or None, dtype=dtype, verify=bool(verify), allow_local=False)
        progress(0, desc="pre-flight")
        with tempfile.TemporaryDirectory(prefix="merge-bot-space-") as work:
            result = run_publish_job(job, token=token, work_dir=Path(work), on_event=event,
                                     merge_runner=_merge_runner(progress))
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
    return result_markdown(result), result.card or ""


def result_markdown(result: Any) -> str:
    publish = result.publish
    lines = [f"### {publish.describe().split(':')[0]}", "", f"[{publish.url}]({publish.url})"]
    report = result.report or {}
    if report.get("verification"):
        from bot.verify import describe

        lines += ["", f"Verification {describe(report['verification'])}."]
    if report.get("base_note"):
        lines += ["", f"Note: {report['base_note']}"]
    if report:
        counts = {k: n for k, n in report.get("module_counts", {}).items() if k != "merged_modules"}
        lines += ["", f"Merged {', '.join(f'{n} {k}' for k, n in counts.items()) or 'the adapter'} in "
                      f"{report.get('timing_seconds', 0):.1f} s; output dtype {report.get('output_dtype')}."]
    return "\n".join(lines)
