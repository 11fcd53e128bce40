"""Who runs a publish job: this process (local, the default) or one Hugging Face Job per merge.

A Job runs the same idempotent unit of work as every other door: ``python -m bot run
ADAPTER@sha --base BASE@sha --repo R [--pr] [--verify]`` at the SHAs pre-flight pinned, in a
pinned image that has merge-bot installed (the Space's own, ``hf.co/spaces/<owner>/<space>``),
with the token passed as a Job *secret* (never an argument, never a log line). Whoever
launches it stays the source of truth: the bot's queue stores the Job id, polls its stage and,
when it ends, reads the result from the target repo (the fingerprint in ``merge_report.json``,
or the pull request carrying it), so a Job that published and then died still counts as done,
and a retried request never merges twice.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bot.errors import RemoteJobError, UsageError, redact

log = logging.getLogger(__name__)

# Hugging Face Jobs CPU flavors, from https://huggingface.co/docs/hub/jobs-pricing (read 2026):
# name -> (vCPU, RAM GB, ephemeral disk GB, USD per hour; billed per minute).
FLAVORS: dict[str, tuple[int, int, int, float]] = {
    "cpu-basic": (2, 16, 50, 0.01),
    "cpu-upgrade": (8, 32, 50, 0.03),
    "cpu-xl": (16, 124, 1000, 1.00),
}
DISK_MARGIN = 0.8  # never plan to fill more than 80% of a Job's disk (image, caches, logs)
MORE_CPU_FROM = 30e9  # outputs above this many bytes get cpu-upgrade: 4x the CPU for 3x the price
TERMINAL = ("COMPLETED", "ERROR", "CANCELED", "DELETED")  # huggingface_hub's TERMINAL_JOB_STAGES



def positive_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise UsageError(f"{name} must be a positive whole number, not {raw[:20]!r}")
    return int(raw)


@dataclass(frozen=True)
class JobsSettings:
    """How merges run as Hugging Face Jobs (``MERGEBOT_JOBS_*``)."""

    image: str  # a pinned image with merge-bot installed, e.g. hf.co/spaces/owner/merge-bot
    flavor: str | None = None  # None: chosen per merge from its size (``choose_flavor``)
    max_concurrent: int = 4
    timeout_s: int = 6 * 3600
    namespace: str | None = None  # whose Jobs (and credits); default: the token's account
    verify: bool = True  # run with --verify (a whole-folder merge, so it needs base + output on disk)
    poll_s: float = 15.0  # how often running Jobs are inspected

    @classmethod
    def from_env(cls, env: dict[str, str]) -> JobsSettings:
        image = env.get("MERGEBOT_JOBS_IMAGE", "").strip()
        if not image and env.get("SPACE_ID"):
            image = f"hf.co/spaces/{env['SPACE_ID']}"  # the Space's own image: merge-bot is installed there
        if not image:
            raise UsageError("MERGEBOT_EXECUTOR=jobs needs MERGEBOT_JOBS_IMAGE (an image with merge-bot installed, "
                             "e.g. hf.co/spaces/owner/merge-bot)")
        flavor = env.get("MERGEBOT_JOBS_FLAVOR", "").strip() or None
        verify = env.get("MERGEBOT_JOBS_VERIFY", "1").strip().lower()
        if verify not in ("0", "1", "true", "false", "yes", "no"):
            raise UsageError(f"MERGEBOT_JOBS_VERIFY must be 1 or 0, not {verify[:20]!r}")
        return cls(image=image, flavor=flavor,
                   max_concurrent=positive_int(env, "MERGEBOT_JOBS_MAX_CONCURRENT", 4),
                   timeout_s=parse_duration(env.get("MERGEBOT_JOBS_TIMEOUT", "").strip() or "6h"),
                   namespace=env.get("MERGEBOT_JOBS_NAMESPACE", "").strip() or None,
                   verify=verify in ("1", "true", "yes"),
                   poll_s=float(env.get("MERGEBOT_JOBS_POLL_S", "").strip() or 15.0))


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h`` or ``1d`` (the units ``run_job`` accepts)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = int(float(number) * units[unit])
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise UsageError(f"MERGEBOT_JOBS_TIMEOUT must be a duration like 90m or 6h, not {text[:20]!r}")
    return seconds


def disk_needed(*, output_bytes: int, download_bytes: int, verify: bool) -> int:
    """Scratch disk a Job needs: the whole base and output when verifying, else the streaming bound."""
    from bot.pipeline import scratch_bytes
    from bot.spec import auto_shard_bytes

    if verify:
        return download_bytes + output_bytes
    # the streamed pipeline's own bound: a few pieces and shards (with auto shards), never more than the model
    return min(output_bytes + 2**30, scratch_bytes(auto_shard_bytes(output_bytes), 0, output_bytes))


def choose_flavor(*, output_bytes: int, download_bytes: int, verify: bool) -> str:
    """The cheapest CPU flavor whose disk holds the merge, with more CPU for large outputs.

    Streamed (no --verify), disk stays at a few GiB whatever the size, so cpu-basic does any model
    the bot accepts; above ``MORE_CPU_FROM`` cpu-upgrade's 8 vCPU cut the merge's CPU time for 3x
    the price per hour. Verified merges hold base and output on disk: up to 40 GB together on
    cpu-basic/cpu-upgrade (50 GB disk), beyond that cpu-xl (1000 GB).
    """
    need = disk_needed(output_bytes=output_bytes, download_bytes=download_bytes, verify=verify)
    for name in ("cpu-basic", "cpu-upgrade", "cpu-xl"):
        if name == "cpu-basic" and output_bytes > MORE_CPU_FROM:
            continue
        if need <= FLAVORS[name][2] * 1e9 * DISK_MARGIN:
            return name
    raise RemoteJobError(f"the merge needs about {need / 1e9:.0f} GB of disk, more than any CPU Job has; run it "
                         f"without --verify (streamed, bounded disk) or on your own machine")


def job_command(publish: Any) -> list[str]:
    """The Job's command line for a ``PublishJob`` whose adapter and base carry pinned SHAs. No token."""
    command = ["python", "-m", "bot", "run", publish.adapter, "--repo", publish.repo]
    if publish.base:
        command += ["--base", publish.base]
    if publish.pr:
        command.append("--pr")
    if publish.private:
        command.append("--private")
    if publish.dtype != "auto":
        command += ["--dtype", publish.dtype]
    if publish.max_shard_size != "auto":
        command += ["--max-shard-size", publish.max_shard_size]
    command.append("--verify" if publish.verify else "--no-verify")  # run verifies unless told not to
    if publish.requested_by:
        command += ["--requested-by", publish.requested_by]
    return command


@dataclass(frozen=True)
class RemoteState:
    stage: str  # SCHEDULING | RUNNING | COMPLETED | ERROR | CANCELED | DELETED
    message: str | None
    url: str

    @property
    def ended(self) -> bool:
        return self.stage in TERMINAL

    @property
    def timed_out(self) -> bool:
        return self.stage == "ERROR" and "timeout" in (self.message or "").lower().replace("timed out", "timeout")


class JobsExecutor:
    """Start, find, inspect, read and cancel merge Jobs for one account (``api`` carries its token)."""

    def __init__(self, api, settings: JobsSettings, *, token: str, namespace: str, endpoint: str | None = None):
        self.api, self.settings, self.namespace = api, settings, namespace
        self._token = token
        self._endpoint = endpoint

    def launch(self, publish: Any, *, flavor: str, labels: dict[str, str]) -> str:
        """Start one Job for ``publish``; its id. 402 (no credits) and refusals are one-line errors."""
        from huggingface_hub.errors import HfHubHTTPError

        env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        if self._endpoint:
            env["HF_ENDPOINT"] = self._endpoint
        try:
            info = self.api.run_job(image=self.settings.image, command=job_command(publish), env=env,
                                    secrets={"HF_TOKEN": self._token}, flavor=flavor,
                                    timeout=self.settings.timeout_s, labels=labels, namespace=self.namespace)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status == 402:
                raise RemoteJobError(f"the {self.namespace} account has no credits left to run a Job (HTTP 402); "
                                     f"add credits, then ask again") from e
            if status in (401, 403):
                raise RemoteJobError(f"the Hub refused to start a Job in {self.namespace} (HTTP {status}); the "
                                     f"token needs the right to run Jobs there") from e
            raise
        log.info("started Job %s (%s) for %s", info.id, flavor, publish.repo)
        return info.id

    def find(self, labels: dict[str, str]) -> str | None:
        """A Job already started with these labels (a launch whose id a crash lost), newest first."""
        found = list(self.api.list_jobs(labels=labels, namespace=self.namespace))
        found.sort(key=lambda j: j.created_at.timestamp() if j.created_at else 0.0, reverse=True)
        return found[0].id if found else None

    def state(self, job_id: str) -> RemoteState:
        info = self.api.inspect_job(job_id=job_id, namespace=self.namespace)
        return RemoteState(str(getattr(info.status.stage, "value", info.status.stage)), info.status.message, info.url)

    def logs(self, job_id: str, keep: int = 40) -> list[str]:
        """The Job's last log lines, tokens redacted (empty when the Hub has none)."""
        try:
            lines = list(self.api.fetch_job_logs(job_id=job_id, namespace=self.namespace))
        except Exception as e:  # logs are a courtesy: the result comes from the target repo
            log.warning("logs of Job %s unavailable (%s)", job_id, e.__class__.__name__)
            return []
        return [redact(line, self._token) for line in lines[-keep:]]

    def cancel(self, job_id: str) -> None:
        self.api.cancel_job(job_id=job_id, namespace=self.namespace)


def error_line(lines: Iterable[str]) -> str | None:
    """The CLI's one-line ``Error: ...`` from a Job's log (what a local run would have raised)."""
    found = None
    for line in lines:
        if line.startswith("Error: "):
            found = line[len("Error: "):].strip()
    return found


def action_line(lines: Iterable[str], url: str) -> str | None:
    """The CLI's last line, ``PublishResult.describe()``, when it names ``url``."""
    found = None
    for line in lines:
        if url in line:
            found = line.strip()
    return found


def outcome_text(state: RemoteState, *, timeout_s: int, lines: list[str]) -> str:
    """One line for a Job that ended without the merge on the target."""
    if state.timed_out:
        limit = f"{timeout_s // 60}-minute" if timeout_s >= 120 else f"{timeout_s}-second"
        return (f"the merge Job ran past its {limit} limit and was stopped; nothing was published. "
                f"Ask again to retry")
    if state.stage in ("CANCELED", "DELETED"):
        return "the merge Job was cancelled; nothing was published. Ask again to retry"
    return error_line(lines) or (f"the merge Job ended with {state.stage}"
                                 f"{f' ({state.message})' if state.message else ''}; nothing was published")
