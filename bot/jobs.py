"""One publish job end to end: pre-flight → (skip if already published) → merge → publish.

``PublishJob`` is the validated request, whichever door it came through (CLI ``run``,
a batch file, the Space form, a Hub discussion). ``run_publish_job`` is the one
implementation all of them call.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from bot.errors import MergeBotError, UsageError
from bot.hub import (PublishResult, PublishTarget, check_can_publish, hub_write_errors, parse_repo_id,
                     publish_folder, survey_target)
from bot.spec import DTYPES, MergeSpec, parse_size, parse_source_ref

EventFn = Callable[[str], None]
MERGE_LOCK = threading.Lock()


@dataclass(frozen=True)
class PublishJob:
    adapter: str
    repo: str
    pr: bool = False
    private: bool = False
    base: str | None = None
    dtype: str = "auto"
    verify: bool = False
    device: str = "auto"
    max_shard_size: str = "5GB"
    requested_by: str | None = None
    allow_local: bool = True  # False for web and bot requests: only Hub repos, never this machine's folders

    def __post_init__(self) -> None:
        _ = self.target  # validates the repo id, and --pr with --private, in PublishTarget
        if self.dtype not in DTYPES:
            raise UsageError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)

    @property
    def target(self) -> PublishTarget:
        return PublishTarget(parse_repo_id(self.repo), pr=self.pr, private=self.private)

    def merge_spec(self, out: Path, token: str | None) -> MergeSpec:
        return MergeSpec(
            adapter=parse_source_ref(self.adapter, what="adapter", allow_local=self.allow_local),
            base=parse_source_ref(self.base, what="base", allow_local=self.allow_local) if self.base else None,
            out=out, dtype=self.dtype, device=self.device, verify=self.verify, overwrite=True,
            max_shard_bytes=parse_size(self.max_shard_size), token=token, requested_by=self.requested_by,
        )


_JOB_FIELDS = {f.name: f for f in fields(PublishJob)}
_BOOL_FIELDS = {"pr", "private", "verify"}
_BATCH_FIELDS = set(_JOB_FIELDS) - {"requested_by", "allow_local"}  # set by the Space and the bot only


def _short(value: Any) -> str:
    """A value for an error message: never the expansion of a YAML alias bomb."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__name__}"


def job_from_mapping(entry: Any, where: str) -> PublishJob:
    """Validate one job from YAML/JSON; errors name the entry (``where``) and the bad key."""
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: each job must be a mapping with at least adapter and repo")
    unknown = sorted((str(k) for k in set(entry) - _BATCH_FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(k[:40] for k in unknown)}; "
                         f"allowed: {', '.join(sorted(_BATCH_FIELDS))}")
    for key in ("adapter", "repo"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise UsageError(f"{where}: {key} is required and must be a string")
    for key, value in entry.items():
        if key in _BOOL_FIELDS and not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, not {_short(value)}")
        if key not in _BOOL_FIELDS and value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: {key} must be a string, not {_short(value)}")
    try:
        job = PublishJob(**{k: v for k, v in entry.items() if v is not None})
        job.merge_spec(Path("."), None)  # checks adapter/base syntax (and local folders) now, not mid-batch
    except MergeBotError as e:
        raise UsageError(f"{where}: {e}") from e
    return job


def commit_text(report: dict[str, Any]) -> tuple[str, str]:
    """(title, description) of the commit or pull request, from a merge report."""
    def at(source: dict[str, Any]) -> str:
        if source.get("repo_id"):
            return f"{source['repo_id']}@{(source.get('revision') or '')[:12]}"
        return f"local {Path(source.get('path') or '?').name}"

    adapter, base = report.get("adapter", {}), report.get("base", {})
    title = f"Merge {report.get('peft_type', 'adapter')} adapter {at(adapter)} into {at(base)}"
    options = report.get("options", {})
    lines = [
        "Merged by merge-bot.", "",
        f"- adapter: {adapter.get('repo_id') or at(adapter)} at `{adapter.get('revision')}`",
        f"- base: {base.get('repo_id') or at(base)} at `{base.get('revision')}`",
        f"- method: {report.get('method')} ({report.get('peft_type')}), output dtype {report.get('output_dtype')}",
        f"- options: {json.dumps(options, sort_keys=True)}",
        f"- merge-bot {report.get('merge_bot_version')}",
    ]
    if report.get("base_note"):
        lines.append(f"- note: {report['base_note']}")
    if report.get("verification"):
        lines.append(f"- verification: max |delta logits| {report['verification']['max_abs_logit_delta']:.3g}")
    return title, "\n".join(lines)


def read_report(folder: Path) -> dict[str, Any]:
    from bot.hub import read_folder_report

    return read_folder_report(folder)


def publish_merged_folder(folder: Path, target: PublishTarget, *, token: str | None,
                          endpoint: str | None = None, aliases: tuple[str, ...] = ()) -> PublishResult:
    report = read_report(folder)
    title, description = commit_text(report)
    return publish_folder(folder, target, title=title, description=description, fingerprint=report["fingerprint"],
                          token=token, endpoint=endpoint, verified=bool(report.get("verification")), aliases=aliases)


@dataclass
class JobResult:
    """What a job did: the publish outcome, and the merge report and card when a merge ran."""

    publish: PublishResult
    report: dict[str, Any] | None = None
    card: str | None = None

    def describe(self) -> str:
        return self.publish.describe()


MergeRunner = Callable[..., Any]  # (plan, verify: bool) -> MergeResult


def run_merge_plan(plan, verify: bool, on_progress=None):
    """The default merge step: stream the plan, optionally verifying against PEFT."""
    from bot.merge import execute_plan

    verify_fn = None
    if verify:
        from bot.verify import verify_merge

        verify_fn = verify_merge
    return execute_plan(plan, on_progress=on_progress, verify=verify_fn)


def run_publish_job(job: PublishJob, *, token: str | None, endpoint: str | None = None,
                    work_dir: Path | None = None, on_event: EventFn = lambda _: None,
                    on_progress=None, merge_runner: MergeRunner | None = None,
                    policy: Callable[[Any], None] | None = None) -> JobResult:
    """Pre-flight, skip if the target already has this merge, else merge into a temp folder and publish.

    ``merge_runner(plan, verify)`` replaces the merge step (the Space runs it on a GPU worker);
    ``policy(preflight)`` may raise to refuse a job after pre-flight (the self-service bot's rules).
    """
    from huggingface_hub import HfApi

    from bot.card import CARD_NAME, with_repo_id
    from bot.plan import resolve_plan
    from bot.preflight import preflight

    target = job.target
    api = HfApi(endpoint=endpoint, token=token)
    account = check_can_publish(api, target)  # a bad token or foreign namespace is known before any download
    work = Path(tempfile.mkdtemp(prefix="merge-bot-", dir=work_dir))
    try:
        spec = job.merge_spec(work / "merged", token)
        checked = preflight(spec, endpoint=endpoint)
        if policy is not None:
            policy(checked)
        on_event(f"pre-flight: {checked.summary()}")
        if checked.base_note:
            on_event(f"note: {checked.base_note}")
        fps = checked.fingerprints(spec)
        with hub_write_errors(f"checking {target.repo_id}", target.repo_id):
            existing, _ = survey_target(api, target, fps, author=account.name, verified=job.verify)  # refusals now
            if existing is not None:
                return JobResult(existing)
        on_event("downloading the adapter and base")
        plan = resolve_plan(checked.pinned_spec(spec))
        for notice in plan.notices:
            on_event(f"warning: {notice}")
        on_event("merging")
        with MERGE_LOCK:  # one merge at a time per process (the Space's form and its bot share the disk)
            if merge_runner is None:
                result = run_merge_plan(plan, job.verify, on_progress)
            else:
                result = merge_runner(plan, job.verify)
        on_event(f"merged {result.tensors_merged} tensors in {result.seconds:.1f}s; publishing to {target.repo_id}")
        published = publish_merged_folder(result.out_dir, target, token=token, endpoint=endpoint, aliases=fps[1:])
        card = with_repo_id((result.out_dir / CARD_NAME).read_text(encoding="utf-8"), target.repo_id)
        return JobResult(published, result.report, card)
    finally:
        shutil.rmtree(work, ignore_errors=True)
