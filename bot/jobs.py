"""One publish job end to end: pre-flight → (skip if already published) → merge → publish.

``PublishJob`` is the validated request, whichever door it came through (CLI ``run``,
a batch file, the Space form, a Hub discussion). ``run_publish_job`` is the one
implementation all of them call.
"""
from __future__ import annotations

import json
import shutil
import threading
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bot.errors import MergeBotError, UsageError
from bot.hub import (PublishResult, PublishTarget, check_can_publish, open_publication, parse_repo_id, publish_folder,
                     survey_target)
from bot.report import MergeReport, ReportSource
from bot.spec import DTYPES, MergeSpec, parse_shard_size, parse_source_ref
from bot.transport import hub_write_errors

if TYPE_CHECKING:
    from huggingface_hub import HfApi

if TYPE_CHECKING:
    from bot.merge import Compute
    from bot.progress import ProgressSink

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
    verify: bool = True  # the per-module proof (and end to end when it fits); --no-verify / verify: false
    device: str = "auto"
    max_shard_size: str = "auto"
    requested_by: str | None = None
    allow_local: bool = True  # False for web and bot requests: only Hub repos, never this machine's folders

    def __post_init__(self) -> None:
        _ = self.target  # validates the repo id, and --pr with --private, in PublishTarget
        if self.dtype not in DTYPES:
            raise UsageError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        parse_shard_size(self.max_shard_size)

    @property
    def target(self) -> PublishTarget:
        return PublishTarget(parse_repo_id(self.repo), pr=self.pr, private=self.private)

    def merge_spec(self, out: Path, token: str | None) -> MergeSpec:
        return MergeSpec(
            adapter=parse_source_ref(self.adapter, what="adapter", allow_local=self.allow_local),
            base=parse_source_ref(self.base, what="base", allow_local=self.allow_local) if self.base else None,
            out=out, dtype=self.dtype, device=self.device, verify=self.verify, overwrite=True,
            max_shard_bytes=parse_shard_size(self.max_shard_size), token=token, requested_by=self.requested_by,
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


def commit_text(report: MergeReport) -> tuple[str, str]:
    """(title, description) of the commit or pull request, from a merge report."""
    from bot.report import to_json

    def at(source: ReportSource) -> str:
        if source.repo_id:
            return f"{source.repo_id}@{(source.revision or '')[:12]}"
        return "a local folder"  # never its path: the text is published

    adapter, base = report.adapter, report.base
    title = f"Merge {report.peft_type} adapter {at(adapter)} into {at(base)}"
    lines = [
        "Merged by merge-bot.", "",
        f"- adapter: {adapter.repo_id or 'a local folder'} at `{adapter.revision}`",
        f"- base: {base.repo_id or 'a local folder'} at `{base.revision}`",
        f"- method: {report.method} ({report.peft_type}), output dtype {report.output_dtype}",
        f"- options: {json.dumps(to_json(report.options), sort_keys=True)}",
        f"- merge-bot {report.merge_bot_version}",
    ]
    if report.base_note:
        lines.append(f"- note: {report.base_note}")
    if report.verification:
        from bot.verify import describe

        lines.append(f"- verification: {describe(report.verification)}")
    return title, "\n".join(lines)


def publish_merged_folder(folder: Path, target: PublishTarget, *, api: HfApi,
                          aliases: tuple[str, ...] = ()) -> PublishResult:
    """Publish a folder ``merge`` wrote, through the job's client ``api``."""
    from bot.report import read_report

    report = read_report(folder)
    title, description = commit_text(report)
    return publish_folder(folder, target, api=api, title=title, description=description,
                          fingerprint=report.fingerprint, verified=bool(report.verification), aliases=aliases)


@dataclass
class JobResult:
    """What a job did: the publish outcome, and the merge report and card when a merge ran."""

    publish: PublishResult
    report: MergeReport | None = None
    card: str | None = None

    def describe(self) -> str:
        return self.publish.describe()


def run_merge_plan(plan, verify: bool, on_progress=None, compute=None):
    """The default merge step: stream the plan into its output folder, proving it against PEFT when asked."""
    from bot.merge import execute_plan

    return execute_plan(plan, on_progress=on_progress, verify=verify, compute=compute)


def tensor_callback(plan, progress: ProgressSink | None):
    """The merge's per-tensor callback reporting output bytes as ``progress``'s merge phase; None without one."""
    if progress is None:
        return None
    from bot.progress import MERGE, merge_progress

    progress.phase(MERGE, 0, plan.output_bytes)
    return merge_progress(progress, ((j.name, j.output.nbytes) for j in plan.jobs))


def run_publish_job(job: PublishJob, *, api: HfApi, work_dir: Path | None = None, on_event: EventFn = lambda _: None,
                    policy: Callable[[Any], None] | None = None, progress: ProgressSink | None = None,
                    compute: Compute | None = None) -> JobResult:
    """Pre-flight, skip if the target already has this merge, else merge and publish in one commit.

    The merge streams Hub to Hub (``stream_publish``): scratch disk stays at a few shards whatever the
    model's size, and each shard is proved against PEFT before it is uploaded. A verified job small
    enough to hold whole (``_end_to_end_fits``) builds the merged folder in ``work_dir`` first, so the
    end-to-end check runs too. ``policy(preflight)`` may raise to refuse a job after pre-flight (the
    self-service bot's rules). ``api``: the job's one Hub client (``bot.transport.hub_client``); every
    read and write of the job goes through it. ``progress`` hears each phase's bytes (``bot.progress``);
    ``compute`` runs the merge's arithmetic a batch at a time (the Space's ZeroGPU calls,
    ``bot.merge.stream_merge``).
    """
    from bot.pipeline import claim_scratch, release_scratch
    from bot.plan import resolve_plan
    from bot.preflight import preflight

    target = job.target
    account = check_can_publish(api, target)  # a bad token or foreign namespace is known before any download
    work, work_lock = claim_scratch(work_dir)  # and removes what a killed run left there
    try:
        # The client's token for the merge's own reads: a str here (check_can_publish refuses a job without one).
        spec = job.merge_spec(work / "merged", api.token if isinstance(api.token, str) else None)
        checked = preflight(spec, api=api, streamed=True)
        if policy is not None:
            policy(checked)
        on_event(f"pre-flight: {checked.summary()}")
        if checked.base_note:
            on_event(f"note: {checked.base_note}")
        fps = checked.fingerprints(spec)
        # small enough to hold whole when verified: the end-to-end check and latency run too
        streamed = not (job.verify and _end_to_end_fits(checked.output_bytes, work))
        with hub_write_errors(f"checking {target.repo_id}", target.repo_id):
            existing, _ = survey_target(api, target, fps, author=account.name, verified=job.verify)  # refusals now
            if existing is not None:
                return JobResult(existing)
        on_event("reading the adapter and the base's headers" if streamed else "downloading the adapter and base")
        plan = resolve_plan(checked.pinned_spec(spec), stream_base=streamed, api=api)
        for notice in plan.notices:
            on_event(f"warning: {notice}")
        with MERGE_LOCK:  # one merge at a time per process (the Space's form and its bot share the disk)
            if streamed:
                return stream_publish(plan, api, target, fps, author=account.name, work=work, on_event=on_event,
                                      progress=progress, compute=compute)
            on_event("merging")
            result = run_merge_plan(plan, job.verify, tensor_callback(plan, progress), compute)
        on_event(f"merged {result.tensors_merged} tensors in {result.seconds:.1f}s; publishing to {target.repo_id}")
        published = publish_merged_folder(result.out_dir, target, api=api, aliases=fps[1:])
        if progress is not None:  # one commit uploads the whole folder: done when it is
            from bot.progress import UPLOAD

            progress.phase(UPLOAD, plan.output_bytes, plan.output_bytes)
        return JobResult(published, result.report, _card_of(result.out_dir, target.repo_id))
    finally:
        release_scratch(work, work_lock)


def _end_to_end_fits(output_bytes: int, work: Path) -> bool:
    """Whether a verified job can build the merged folder whole (disk) and load both models (memory):
    then the end-to-end comparison runs too; else the per-module proof alone, streamed."""
    from bot.verify import end_to_end_budget

    return 4 * output_bytes <= end_to_end_budget() and output_bytes * 2 < shutil.disk_usage(work).free


def _card_of(folder: Path, repo_id: str) -> str:
    from bot.card import CARD_NAME, with_repo_id

    return with_repo_id((folder / CARD_NAME).read_text(encoding="utf-8"), repo_id)


def stream_publish(plan, api, target: PublishTarget, fps: tuple[str, ...], *, author: str, work: Path,
                   on_event: EventFn = lambda _: None, progress: ProgressSink | None = None,
                   compute: Compute | None = None) -> JobResult:
    """Merge ``plan`` Hub to Hub: base pieces fetched ahead, each output shard pre-uploaded as it closes
    and deleted, then one commit (see ``bot.pipeline``). Scratch lives in ``work``. ``progress`` hears
    the download, merge and upload phases; ``compute``: see ``run_publish_job``."""
    from bot.merge import merge_into
    from bot.pipeline import (PieceFetcher, check_scratch_space, merge_threads_beside_transfers, plan_pieces,
                              scratch_bytes)
    from bot.progress import DOWNLOAD, UPLOAD, NoProgress, PhaseCounter

    largest = max((j.output.nbytes for j in plan.jobs), default=0)
    check_scratch_space(work, scratch_bytes(plan.shard_bytes, largest, plan.output_bytes) if plan.jobs
                        else plan.output_bytes)
    sink = progress or NoProgress()
    # What is fetched: pieces of the base (a tensor read twice comes once); what is sent: the output.
    down = PhaseCounter(sink, DOWNLOAD, sum(p.nbytes for p in plan_pieces(list(plan.jobs))) if plan.base.remote else 0)
    up = PhaseCounter(sink, UPLOAD, plan.output_bytes)

    def uploaded(n: int) -> None:
        up.add(n)
        on_event(f"uploaded {up.describe()}")

    with hub_write_errors(f"preparing {target.repo_id}", target.repo_id):
        opened = open_publication(api, target, fps, author=author, verified=plan.spec.verify, on_uploaded=uploaded)
    if isinstance(opened, PublishResult):
        return JobResult(opened)
    with opened, ExitStack() as stack:  # the upload threads and the transfer mode end with this block
        sink.phase(UPLOAD, 0, up.total)
        on_tensor = tensor_callback(plan, progress)
        fetcher = None
        if plan.base.remote:
            sink.phase(DOWNLOAD, 0, down.total)
            fetcher = PieceFetcher(plan.base.remote, list(plan.jobs), work / "pieces", on_bytes=down.add)
            stack.callback(fetcher.close)
        folder = work / "out"
        folder.mkdir()
        on_event(f"merging {len(plan.jobs)} tensors; each shard is uploaded as soon as it is written")
        with merge_threads_beside_transfers():
            result = merge_into(plan, folder, base_pieces=fetcher, on_shard=opened.upload,
                                on_progress=on_tensor, verify=plan.spec.verify, compute=compute)
        if fetcher is not None:
            on_event(f"downloaded {down.describe()}")
            down.finish()
        for warning in result.warnings:
            on_event(f"warning: {warning}")
        title, description = commit_text(result.report)
        on_event(f"merged {result.tensors_merged} tensors in {result.seconds:.1f}s; committing to "
                 f"{target.repo_id}")
        published = opened.commit(folder, title=title, description=description)
        up.finish()
    return JobResult(published, result.report, _card_of(folder, target.repo_id))
