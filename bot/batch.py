"""``python -m bot batch FILE.yaml``: many publish jobs, validated up front, run in order.

The file is ``jobs: [...]`` (or a bare list) of mappings with the keys of ``PublishJob``.
Every entry is checked before the first job starts, so a typo in job 7 fails in a second,
not after six merges. A failing job is reported and the batch goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bot.errors import MergeBotError, OutputError, UsageError, redact
from bot.jobs import EventFn, PublishJob, job_from_mapping, run_publish_job
from bot.progress import ProgressSink
from bot.transport import hub_client

log = logging.getLogger(__name__)


MAX_BATCH_BYTES = 256 * 1024
MAX_BATCH_JOBS = 500


@dataclass(frozen=True)
class JobOutcome:
    job: PublishJob
    ok: bool
    status: str  # created / pr-opened / unchanged / ..., or "failed (exit N)"
    detail: str  # URL, or the one-line error


def load_batch(path: Path) -> list[PublishJob]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"batch file {path} does not exist")
    if path.stat().st_size > MAX_BATCH_BYTES:
        raise UsageError(f"batch file {path} is larger than {MAX_BATCH_BYTES // 1024} KiB; split it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"batch file {path} is not valid YAML{where}; fix its syntax") from e
    if data is None:
        return []
    entries = data.get("jobs") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"jobs"}:
        extra = ", ".join(sorted(str(k)[:40] for k in set(data) - {"jobs"}))
        raise UsageError(f"batch file {path}: unknown top-level key(s) {extra}; expected only jobs:")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise UsageError(f"batch file {path}: jobs must be a list of mappings (adapter, repo, pr, private, base, dtype)")
    if len(entries) > MAX_BATCH_JOBS:
        raise UsageError(f"batch file {path} lists {len(entries)} jobs; at most {MAX_BATCH_JOBS} per file")
    return [job_from_mapping(entry, f"{path.name} job {i + 1}") for i, entry in enumerate(entries)]


def run_batch_jobs(jobs: list[PublishJob], *, token: str | None, endpoint: str | None = None,
                   work_dir: Path | None = None, on_event: EventFn = lambda _: None,
                   progress: ProgressSink | None = None) -> list[JobOutcome]:
    outcomes = []
    for i, job in enumerate(jobs, 1):
        on_event(f"[{i}/{len(jobs)}] {job.adapter} -> {job.repo}{' (pull request)' if job.pr else ''}")
        try:
            result = run_publish_job(job, api=hub_client(token=token, endpoint=endpoint), work_dir=work_dir,
                                     on_event=on_event, progress=progress)
        except MergeBotError as e:
            on_event(f"[{i}/{len(jobs)}] failed: {e}")
            outcomes.append(JobOutcome(job, False, f"failed (exit {e.exit_code})", str(e)))
        except OSError as e:  # disk full, permissions: this job fails, the batch goes on
            message = redact(f"{e.strerror or e} ({e.filename})" if e.filename else f"{e.strerror or e}", token)
            on_event(f"[{i}/{len(jobs)}] failed: {message}")
            outcomes.append(JobOutcome(job, False, f"failed (exit {OutputError.exit_code})", message))
        except Exception as e:  # a bug must not cost the other jobs; it is reported, with its type
            log.debug("job %d failed unexpectedly", i, exc_info=True)
            message = redact(f"internal error {e.__class__.__name__}: {' '.join(str(e).split())[:200]}", token)
            on_event(f"[{i}/{len(jobs)}] failed: {message}")
            outcomes.append(JobOutcome(job, False, "failed (internal error)", message))
        else:
            outcomes.append(JobOutcome(job, True, result.publish.action, result.publish.url))
    return outcomes


def run_batch_as_jobs(jobs: list[PublishJob], *, token: str | None, settings, endpoint: str | None = None,
                      on_event: EventFn = lambda _: None, sleep=None) -> list[JobOutcome]:
    """``batch --executor jobs``: each entry pinned by pre-flight, run as one Hugging Face Job (at most
    ``settings.max_concurrent`` at once), its result read from the target repo: the same summary."""
    import time
    from dataclasses import replace

    from bot.errors import RemoteJobError
    from bot.executors import JobsExecutor, choose_flavor, outcome_text
    from bot.hub import check_can_publish, survey_target
    from bot.preflight import preflight

    if not token:
        raise UsageError("batch --executor jobs needs a token (--token or HF_TOKEN): the Jobs run with it")
    api = hub_client(token=token, endpoint=endpoint)
    account = api.whoami()["name"]
    executor = JobsExecutor(api, settings, token=token, namespace=settings.namespace or account, endpoint=endpoint)
    outcomes: dict[int, JobOutcome] = {}
    running: dict[int, tuple[str, PublishJob, tuple[str, ...]]] = {}
    pending = list(enumerate(jobs, 1))

    def fail(i: int, job: PublishJob, e: MergeBotError) -> None:
        message = redact(str(e), token)
        on_event(f"[{i}/{len(jobs)}] failed: {message}")
        outcomes[i] = JobOutcome(job, False, f"failed (exit {e.exit_code})", message)

    while pending or running:
        while pending and len(running) < settings.max_concurrent:
            i, job = pending.pop(0)
            try:
                spec = job.merge_spec(Path("unused"), token)
                if spec.adapter.local or (spec.base is not None and spec.base.local):
                    raise UsageError("a local folder cannot be merged in a Job; push it to the Hub first")
                author = check_can_publish(api, job.target).name
                checked = preflight(spec, api=api, check_disk=False)
                pinned = replace(job, adapter=f"{checked.adapter_pin.name}@{checked.adapter_pin.revision}",
                                 base=f"{checked.base_pin.name}@{checked.base_pin.revision}")
                fps = checked.fingerprints(spec)
                existing, _ = survey_target(api, job.target, fps, author=author, verified=job.verify)
                if existing is not None:
                    outcomes[i] = JobOutcome(job, True, existing.action, existing.url)
                    continue
                flavor = settings.flavor or choose_flavor(output_bytes=checked.output_bytes,
                                                          download_bytes=checked.download_bytes, verify=job.verify)
                job_id = executor.launch(pinned, flavor=flavor, labels={"merge-bot-batch": str(i)})
            except MergeBotError as e:
                fail(i, job, e)
                continue
            on_event(f"[{i}/{len(jobs)}] {job.adapter} -> {job.repo}: Job {job_id} ({flavor})")
            running[i] = (job_id, job, fps)
        (sleep or time.sleep)(settings.poll_s)
        for i, (job_id, job, fps) in list(running.items()):
            state = executor.state(job_id)
            if not state.ended:
                continue
            del running[i]
            lines = executor.logs(job_id)
            try:
                landed, _ = survey_target(api, job.target, fps, author=account, verified=job.verify)
            except MergeBotError:
                landed = None
            if landed is not None:
                from bot.executors import action_line

                line = action_line(lines, landed.url) or ""
                action = next((a for a, words in (("created", "published "), ("pr-opened", "opened pull request"))
                               if line.startswith(words)), landed.action)
                outcomes[i] = JobOutcome(job, True, action, landed.url)
                on_event(f"[{i}/{len(jobs)}] done: {landed.url}")
            else:
                fail(i, job, RemoteJobError(outcome_text(state, timeout_s=settings.timeout_s, lines=lines)))
    return [outcomes[i] for i in sorted(outcomes)]
