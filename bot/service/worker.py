"""The self-service bot: what it does with a webhook, and the threads that do the slow parts.

``receive`` runs inside the webhook request and touches only the local queue (no Hub
calls), so the Hub gets its answer at once. Three duties run in the background:
*triage* (who asked, pre-flight with the bot's token, pick the target; reply accepted or
refused), *work* (one merge at a time, through the same ``run_publish_job`` as the CLI),
and *replies* (post the outbox to the discussions, exactly once).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from bot.errors import MergeBotError, redact
from bot.service.commands import SYNTAX, CommandError, find_command, parse_command
from bot.service.config import ServiceConfig
from bot.service.queue import Job, JobQueue, Where

log = logging.getLogger(__name__)

REPLY_MARKER = "merge-bot-reply:"  # hidden in every reply: the bot never answers itself, never posts twice
MAX_ATTEMPTS = 3  # a job interrupted this many times (crash, restart) is failed instead of retried forever
PROGRESS_EVERY = 10.0  # seconds between updates of a running job's phases in the queue table


@dataclass(frozen=True)
class Received:
    status: str  # queued | duplicate | rejected | ignored
    detail: str
    job_id: int | None = None


def reply_marker(key: str) -> str:
    return f"<!-- {REPLY_MARKER} {key} -->"


def quote(text: str, limit: int = 300) -> str:
    """Someone else's text inside a reply: shortened, as inline code (no links, mentions or markup)."""
    text = " ".join(str(text).split()).replace("`", "'")
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


class Service:
    def __init__(self, config: ServiceConfig, queue: JobQueue | None = None):
        from bot.transport import hub_client

        self.config = config
        self.queue = queue or JobQueue(config.db_path)
        self.api = hub_client(token=config.token, endpoint=config.endpoint)  # every job of the service uses it
        me = self.api.whoami()
        self.bot_name: str = me["name"]
        self.bot_id: str = me.get("id", "")
        self.namespace = config.namespace or self.bot_name
        self.remote = None  # the Jobs executor, when merges run as Hugging Face Jobs
        if config.executor == "jobs":
            from bot.executors import JobsExecutor

            assert config.jobs is not None
            self.remote = JobsExecutor(self.api, config.jobs, token=config.token, endpoint=config.endpoint,
                                       namespace=config.jobs.namespace or self.bot_name)
        self._polled_at: dict[int, float] = {}
        self._triage_failures: dict[int, int] = {}
        self._triage_retry_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- inside the webhook request: local only ---------------------------------------------
    def receive(self, payload: Any) -> Received:
        """Handle a validated ``huggingface_hub`` ``WebhookPayload``."""
        scope, action = payload.event.scope, payload.event.action
        if scope == "repo.content" and action == "update":
            return self._refresh(payload)
        if scope not in ("discussion", "discussion.comment") or action != "create":
            return Received("ignored", f"event {scope}/{action} is not a new discussion or comment")
        repo = payload.repo
        if repo.name.lower() != self.config.requests_repo.lower() or repo.type != self.config.requests_repo_type:
            return Received("ignored", "event from another repo")
        comment, discussion = payload.comment, payload.discussion
        if discussion is None or (comment is None and scope != "discussion") or (comment and comment.hidden):
            return Received("ignored", "no visible comment")
        # A new discussion may arrive without its first comment: then its title and author speak.
        text = comment.content if comment else None
        author_id = comment.author.id if comment else discussion.author.id
        comment_id = comment.id if comment else None
        event_id = comment.id if comment else f"discussion:{discussion.id}"
        if (self.bot_id and author_id == self.bot_id) or REPLY_MARKER in (text or ""):
            return Received("ignored", "the bot's own comment")
        line = find_command(text)
        if line is None and scope == "discussion":  # the title counts only when the discussion is opened
            line = find_command(discussion.title)
        if line is None:
            return Received("ignored", "no /merge command")
        where = Where(repo.type, repo.name, discussion.num)
        with self.queue.handling(event_id) as new:  # check, enqueue and reply: one transaction
            if not new:
                return Received("ignored", "already handled (webhook redelivery)")
            return self._admit(line, where, author_id=author_id, comment_id=comment_id, event_id=event_id)

    def _admit(self, line: str, where: Where, *, author_id: str, comment_id: str | None, event_id: str) -> Received:
        """Parse, apply the caps, enqueue or answer; runs inside ``receive``'s transaction."""
        try:
            request = parse_command(line)
        except CommandError as e:
            self._reply(f"syntax:{event_id}", where, f"I could not read that request: {quote(str(e))}.\n\n"
                        f"Write it like this:\n\n```\n{SYNTAX}\n```", event_id=event_id)
            return Received("rejected", str(e))
        existing = self.queue.live_job(request.key)
        if existing is None:
            if self.queue.active_count(author_id) >= self.config.max_queued_per_user:
                self._reply(f"limit:{event_id}", where,
                            f"You already have {self.config.max_queued_per_user} requests waiting, which is the limit "
                            f"per person. Ask again when one of them is done.", event_id=event_id)
                return Received("rejected", "per-user limit")
            if self.queue.active_count() >= self.config.max_queue:
                self._reply(f"full:{event_id}", where,
                            f"The queue is full ({self.config.max_queue} requests). Please ask again later.",
                            event_id=event_id)
                return Received("rejected", "queue full")
        job, created = self.queue.enqueue(request, requester_id=author_id, comment_id=comment_id,
                                          where=where, event_id=event_id)
        self._wake.set()
        if created:
            return Received("queued", f"job {job.id}", job.id)
        if job.state == "done":
            self._reply(f"done-again:{event_id}", where, f"This exact request was already done: {job.result_url}")
        else:
            self._reply(f"dup:{event_id}", where,
                        f"This exact request is already in the queue (job #{job.id}); I will answer here too when "
                        f"it is done.")
        return Received("duplicate", f"job {job.id}", job.id)

    def _refresh(self, payload: Any) -> Received:
        """An adapter we merged before got a new commit on main: merge again, as a PR on our repo."""
        if payload.repo.type != "model":
            return Received("ignored", "not a model repo")
        head = next((ref.newSha for ref in payload.updatedRefs or [] if ref.ref == "refs/heads/main" and ref.newSha),
                    None)
        if not head:  # a PR ref, a tag, or a payload without updatedRefs: not a new version of the adapter
            return Received("ignored", "no new commit on main")
        queued = []
        for old in self.queue.done_jobs_for_adapter(payload.repo.name):
            if self.queue.active_count() >= self.config.max_queue:
                break
            stem = old.key.split("|refresh:")[0]  # the same request refreshed twice at one head is one job
            job, created = self.queue.enqueue(old.request, requester_id=old.requester_id, comment_id=None,
                                              where=self.queue.subscriber_of(old.id), key=f"{stem}|refresh:{head}",
                                              requester=old.requester)
            if created:
                queued.append(job.id)
        if not queued:
            return Received("ignored", "no earlier merge of this adapter to refresh")
        self._wake.set()
        return Received("queued", f"refresh job(s) {', '.join(map(str, queued))}", queued[0])

    def _reply(self, key: str, where: Where, body: str, event_id: str | None = None) -> None:
        self.queue.add_reply(key, where, body, event_id=event_id)
        self._wake.set()

    # ---- triage ----------------------------------------------------------------------------
    def policy(self, checked) -> None:
        """What the self-service bot will not publish, whoever asks; applied at triage and again in the worker."""
        if checked.visibility_unknown:
            raise RefusedError(f"the Hub did not say whether {', '.join(checked.visibility_unknown)} is gated or "
                               f"private; the self-service bot only republishes models it knows are public")
        if not checked.sizes_known:
            raise RefusedError("the Hub did not report the model's file sizes, so this bot cannot check its size "
                               "limit; run merge-bot yourself")
        restricted = checked.private + checked.gated
        if restricted:
            raise RefusedError(f"{', '.join(restricted)} is gated or private; the self-service bot only republishes "
                               f"public models. Use the merge-bot Space with your own account")
        if checked.output_bytes > self.config.max_output_gb * 1e9:
            raise RefusedError(f"the merged model would be about {checked.output_bytes / 1e9:.0f} GB, over this "
                               f"bot's {self.config.max_output_gb:.0f} GB limit; run merge-bot yourself")

    def triage_once(self) -> int:
        """Pre-flight every new job; accept (with queue position) or refuse it. Returns jobs decided."""
        from bot.hub import repo_state
        from bot.preflight import preflight
        from bot.spec import MergeSpec, parse_source_ref

        decided = 0
        for job in self.queue.unchecked():
            if self._triage_failures.get(job.id, 0) and time.monotonic() < self._triage_retry_at.get(job.id, 0):
                continue
            try:
                if "|refresh:" in job.key and self._adapter_unchanged(job):
                    previous = self.queue.latest_done(job.key.split("|refresh:")[0])
                    self.queue.finish(job.id, state="done", url=previous.result_url if previous else None,
                                      reply=None, reply_kind="unchanged")
                    decided += 1
                    continue
                requester = job.requester or self._requester_name(job)
                request = job.request
                spec = MergeSpec(adapter=parse_source_ref(request.adapter, allow_local=False),
                                 base=parse_source_ref(request.base, what="base", allow_local=False)
                                 if request.base else None,
                                 out=self.config.db_path.parent / "unused", dtype=request.dtype, token=self.config.token)
                checked = preflight(spec, api=self.api, check_disk=False)
                self.policy(checked)
                target = self._target(request, requester, checked.adapter_pin.name)
                state = repo_state(self.api, target)
            except (MergeBotError, RefusedError) as e:
                if isinstance(e, MergeBotError) and self._is_transient(e) and self._retry_later(job.id):
                    continue
                decided += 1
                self.queue.finish(job.id, state="failed", error=str(e), reply_kind="refused",
                                  reply=f"I cannot do this merge: {quote(redact(str(e), self.config.token))}")
                continue
            except Exception as e:  # the Hub is down, the discussion vanished, or a bug
                log.warning("triage of job %d failed (%s)", job.id, e.__class__.__name__)
                if not self._retry_later(job.id):
                    decided += 1
                    self.queue.finish(job.id, state="failed", error=f"could not check ({e.__class__.__name__})",
                                      reply_kind="refused", reply="I could not check this request (the Hub did not "
                                                                  "answer). Please ask again later.")
                continue
            decided += 1
            exists = bool(state and not state.is_empty)
            what = f"a pull request on {target}" if request.pr_repo or exists else f"a new repo {target}"
            if "|refresh:" in job.key:
                what += " (the adapter has a new commit since the last merge)"
            self.queue.accept(job.id, requester=requester, target=target, adapter_sha=checked.adapter_pin.revision,
                              target_private=bool(state and state.private is not False),  # unknown: hide
                              reply=f"Accepted: I will merge `{checked.adapter_pin.name}` "
                                    f"(`{checked.adapter_pin.revision[:12]}`) into `{checked.base_pin.name}` and "
                                    f"publish it as {what}. Queue position: {{position}}. I will reply here with the "
                                    f"link.")
        return decided

    def _adapter_unchanged(self, job: Job) -> bool:
        """Whether a refresh's new commit left every file a merge reads from the adapter as it was (a README
        edit, say). Any doubt (history rewritten, repo gone) says "changed" and lets pre-flight decide."""
        from bot.sources import files_to_download

        previous = self.queue.latest_done(job.key.split("|refresh:")[0])
        head = job.key.rsplit("|refresh:", 1)[1]
        if previous is None or not previous.adapter_sha:
            return False
        repo = job.adapter.split("@")[0]

        def blobs(revision: str) -> dict[str, str]:
            info = self.api.model_info(repo, revision=revision, files_metadata=True)
            ids = {s.rfilename: (s.lfs.sha256 if s.lfs else s.blob_id) for s in info.siblings or []}
            used = files_to_download(list(ids), "adapter", lambda name: {})
            return {name: ids[name] for name in used if name != "README.md"}

        try:
            before, after = blobs(previous.adapter_sha), blobs(head)
            known = bool(before) and None not in before.values() and None not in after.values()
            return known and before == after  # a server that gives no blob ids cannot show "unchanged"
        except Exception:
            return False

    def _retry_later(self, job_id: int) -> bool:
        """Back off a job whose check failed for a passing reason; False once it has failed too often."""
        failures = self._triage_failures.get(job_id, 0) + 1
        self._triage_failures[job_id] = failures
        self._triage_retry_at[job_id] = time.monotonic() + min(300.0, 2.0 ** failures)
        return failures < 6

    def _reply_failed(self, job, error: BaseException) -> None:
        """End ``job`` as failed with its one-line error (token redacted) as the reply."""
        message = redact(str(error), self.config.token)
        self.queue.finish(job.id, state="failed", error=message, reply_kind="failed",
                          reply=f"The merge failed: {quote(message)}")

    @staticmethod
    def _is_transient(error: BaseException) -> bool:
        from bot.transport import hub_failure, is_transient

        cause = hub_failure(error)
        return cause is not None and is_transient(cause)

    def _requester_name(self, job: Job) -> str:
        """Webhooks carry only the author's id; the discussion's events carry the name."""
        where = self.queue.subscriber_of(job.id)
        details = self.api.get_discussion_details(where.repo_id, where.discussion, repo_type=where.repo_type)
        if job.comment_id is None:  # asked for in the title of a new discussion
            return details.author
        for event in details.events:
            if event.id == job.comment_id:
                return event.author
        raise RefusedError("I could not find your comment any more (deleted?); please ask again")

    def _target(self, request, requester: str, adapter_repo: str) -> str:
        if request.pr_repo:
            owner = request.pr_repo.split("/")[0]
            if owner.lower() != requester.lower():
                raise RefusedError(f"a pull request on {request.pr_repo} must be asked for by its owner, {owner}; "
                                   f"ask them to request it, or request a new repo instead")
            return request.pr_repo
        owner, name = adapter_repo.split("/") if "/" in adapter_repo else ("", adapter_repo)
        suffix = "" if request.dtype == "auto" else f"-{request.dtype}"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{owner}-{name}" if owner else name).strip("-.")
        stem = re.sub(r"-{2,}", "-", stem)[: 80 - len(suffix)].rstrip("-.")
        target = f"{self.namespace}/{stem}-merged{suffix}"
        if self._holds_other_adapter(target, adapter_repo):  # a-b/c and a/b-c flatten alike: keep them apart
            digest = hashlib.sha256(adapter_repo.lower().encode()).hexdigest()[:6]
            target = f"{self.namespace}/{stem}-{digest}-merged{suffix}"
        return target

    def _holds_other_adapter(self, target: str, adapter_repo: str) -> bool:
        from bot.hub import repo_state
        from bot.report import REPORT_NAME, ReportStamp

        state = repo_state(self.api, target)
        if state is None or REPORT_NAME not in state.files:
            return False
        report = json.loads(Path(self.api.hf_hub_download(target, REPORT_NAME, revision=state.sha)).read_text())
        return (ReportStamp.from_json(report).adapter_repo_id or "").lower() != adapter_repo.lower()

    # ---- work ------------------------------------------------------------------------------
    def work_once(self) -> bool:
        """Run the next accepted job, if any. Publishing is idempotent, so a re-run after a crash is safe."""
        from bot.hub import repo_state
        from bot.jobs import PublishJob, run_publish_job

        if self.remote is not None:
            return self._work_remote_once()
        job = self.queue.claim_next()
        if job is None:
            return False
        if job.attempts > MAX_ATTEMPTS:
            self.queue.finish(job.id, state="failed", error="interrupted too often", reply_kind="failed",
                              reply=f"The merge was interrupted {MAX_ATTEMPTS} times; giving up. Please ask again.")
            return True
        request = job.request
        try:
            pr = bool(request.pr_repo)
            if not pr:  # our own earlier merge of another revision: propose the new one as a PR on it
                state = repo_state(self.api, job.target)
                pr = state is not None and not state.is_empty
            publish = PublishJob(adapter=job.pinned_adapter, repo=job.target, pr=pr, base=request.base,
                                 dtype=request.dtype, requested_by=job.requester, allow_local=False)
            result = run_publish_job(publish, api=self.api,
                                     on_event=lambda m: log.info("job %d: %s", job.id, m), policy=self.policy,
                                     progress=self.progress_of(job.id))
        except (MergeBotError, RefusedError) as e:
            if isinstance(e, MergeBotError) and self._is_transient(e) and job.attempts < MAX_ATTEMPTS:
                log.warning("job %d hit a transient Hub error; back in the queue", job.id)
                self.queue.requeue(job.id)
                self._stop.wait(5.0)
                return True
            self._reply_failed(job, e)
            return True
        except Exception as e:
            log.exception("job %d crashed", job.id)
            self.queue.finish(job.id, state="failed", error=f"internal error ({e.__class__.__name__})",
                              reply_kind="failed", reply="The merge failed with an internal error; the maintainers "
                                                         "have the details. Sorry!")
            return True
        url = result.publish.url
        self.queue.finish(job.id, state="done", url=url, reply_kind="done",
                          reply=f"Done: {url}\n\n({result.publish.describe().split(':')[0]}.)")
        return True

    def progress_of(self, job_id: int):
        """The job's phases for the queue table, refreshed every ``PROGRESS_EVERY`` seconds (in memory; no
        Hub comment: the discussion hears once, when the job is done)."""
        from bot.progress import PhaseSummary

        return PhaseSummary(lambda text: self.queue.set_progress(job_id, text), every=PROGRESS_EVERY)

    # ---- work as Hugging Face Jobs -------------------------------------------------------------
    def _work_remote_once(self) -> bool:
        """Poll the running Jobs (finishing those that ended), then start queued ones up to the cap.

        An entry is 'running' from its claim until its Job's outcome is written; the Job's id is stored
        with it. Labels (queue identity, entry, attempt) let a restart find a Job whose id a crash lost
        between starting it and storing it, so no entry ever gets a second Job for one attempt.
        """
        settings = self.config.jobs
        busy = False
        for job in self.queue.running():
            if job.remote is None:
                busy = self._launch(job) or busy
            elif time.monotonic() >= self._polled_at.get(job.id, 0.0):
                self._polled_at[job.id] = time.monotonic() + settings.poll_s
                busy = self._poll(job) or busy
        if len(self.queue.running()) < settings.max_concurrent:
            job = self.queue.claim_next()
            if job is not None:
                if job.attempts > MAX_ATTEMPTS:
                    self.queue.finish(job.id, state="failed", error="interrupted too often", reply_kind="failed",
                                      reply=f"The merge was interrupted {MAX_ATTEMPTS} times; giving up. Please ask "
                                            f"again.")
                else:
                    self._launch(job)
                busy = True
        return busy

    def _remote_plan(self, job: Job):
        """Pre-flight at the checked adapter commit; (PublishJob pinned to both SHAs, fingerprints, flavor),
        or the ``PublishResult`` when the target already holds this merge."""
        from bot.executors import choose_flavor
        from bot.hub import repo_state, survey_target
        from bot.jobs import PublishJob
        from bot.preflight import preflight
        from bot.spec import MergeSpec, parse_source_ref

        request, settings = job.request, self.config.jobs
        pr = bool(request.pr_repo)
        if not pr:  # our own earlier merge of another revision: propose the new one as a PR on it
            state = repo_state(self.api, job.target)
            pr = state is not None and not state.is_empty
        spec = MergeSpec(adapter=parse_source_ref(job.pinned_adapter, allow_local=False),
                         base=parse_source_ref(request.base, what="base", allow_local=False) if request.base else None,
                         out=self.config.db_path.parent / "unused", dtype=request.dtype, token=self.config.token)
        checked = preflight(spec, api=self.api, check_disk=False)
        self.policy(checked)
        adapter, base = checked.adapter_pin, checked.base_pin
        publish = PublishJob(adapter=f"{adapter.name}@{adapter.revision}", base=f"{base.name}@{base.revision}",
                             repo=job.target, pr=pr, dtype=request.dtype, verify=settings.verify,
                             requested_by=job.requester, allow_local=False)
        fps = checked.fingerprints(spec)
        existing, _ = survey_target(self.api, publish.target, fps, author=self.bot_name, verified=publish.verify)
        if existing is not None:
            return existing
        flavor = settings.flavor or choose_flavor(output_bytes=checked.output_bytes,
                                                  download_bytes=checked.download_bytes, verify=publish.verify)
        return publish, fps, flavor

    def _launch(self, job: Job) -> bool:
        """Start (or find, after a crash) the Job for a claimed entry and store its id with the entry."""
        from bot.hub import PublishResult

        labels = {"merge-bot-queue": self.queue.identity, "merge-bot-entry": str(job.id),
                  "merge-bot-attempt": str(job.attempts)}
        try:
            plan = self._remote_plan(job)
            if isinstance(plan, PublishResult):
                self._finish_done(job, plan, None)
                return True
            publish, fps, flavor = plan
            job_id = self.remote.find(labels) or self.remote.launch(publish, flavor=flavor, labels=labels)
        except (MergeBotError, RefusedError) as e:
            if isinstance(e, MergeBotError) and self._is_transient(e) and job.attempts < MAX_ATTEMPTS:
                log.warning("job %d hit a transient Hub error before its Job started; back in the queue", job.id)
                self.queue.requeue(job.id)
                return True
            self._reply_failed(job, e)
            return True
        except Exception as e:
            log.warning("starting the Job for job %d failed (%s); will retry", job.id, e.__class__.__name__)
            if job.attempts < MAX_ATTEMPTS:
                self.queue.requeue(job.id)
            else:
                self.queue.finish(job.id, state="failed", error=f"could not start a Job ({e.__class__.__name__})",
                                  reply_kind="failed", reply="The merge failed: I could not start a Job for it. "
                                                             "Please ask again later.")
            return True
        self.queue.set_remote(job.id, {"id": job_id, "flavor": flavor, "fps": list(fps), "repo": publish.repo,
                                       "pr": publish.pr, "verify": publish.verify})
        log.info("job %d runs as Job %s (%s)", job.id, job_id, flavor)
        return True

    def _poll(self, job: Job) -> bool:
        """Inspect the entry's Job; when it has ended, read the outcome from the target repo and reply."""
        from bot.executors import outcome_text
        from bot.hub import PublishTarget, survey_target

        remote = job.remote_job
        try:
            state = self.remote.state(remote["id"])
        except Exception as e:  # the Hub is down: ask again at the next poll
            log.warning("could not inspect Job %s (%s)", remote["id"], e.__class__.__name__)
            return False
        if not state.ended:
            return False
        lines = self.remote.logs(remote["id"])
        target = PublishTarget(remote["repo"], pr=remote["pr"])
        try:  # a Job that published and then failed (or was cut off) still counts: the fingerprint says so
            landed, _ = survey_target(self.api, target, tuple(remote["fps"]), author=self.bot_name,
                                      verified=remote["verify"])
        except MergeBotError:
            landed = None
        except Exception as e:
            log.warning("could not read %s after Job %s (%s)", remote["repo"], remote["id"], e.__class__.__name__)
            return False
        if landed is not None:
            self._finish_done(job, landed, lines)
            return True
        message = redact(outcome_text(state, timeout_s=self.config.jobs.timeout_s, lines=lines), self.config.token)
        log.warning("Job %s for job %d ended %s without publishing", remote["id"], job.id, state.stage)
        self.queue.finish(job.id, state="failed", error=message, reply_kind="failed",
                          reply=f"The merge failed: {quote(message)}")
        return True

    def _finish_done(self, job: Job, result, lines: list[str] | None) -> None:
        """The same 'Done' reply as a local run: the CLI's own last line names what the Job did."""
        from bot.executors import action_line

        described = action_line(lines or [], result.url) or result.describe()
        self.queue.finish(job.id, state="done", url=result.url, reply_kind="done",
                          reply=f"Done: {result.url}\n\n({described.split(':')[0]}.)")

    # ---- replies ---------------------------------------------------------------------------
    def send_replies_once(self) -> int:
        """Post pending replies; one the bot already posted (its marker, its author) is not posted again."""
        sent = 0
        for reply in self.queue.pending_replies():
            marker = reply_marker(reply.key)
            try:
                details = self.api.get_discussion_details(reply.where.repo_id, reply.where.discussion,
                                                          repo_type=reply.where.repo_type)
                posted = any(getattr(e, "author", None) == self.bot_name and marker in (getattr(e, "content", "") or "")
                             for e in details.events)
                if not posted:
                    self.api.comment_discussion(reply.where.repo_id, reply.where.discussion,
                                                f"{reply.body}\n\n{marker}", repo_type=reply.where.repo_type)
            except Exception as e:
                log.warning("reply %s not sent yet (%s)", reply.key, e.__class__.__name__)
                self.queue.mark_tried(reply.id)
                continue
            self.queue.mark_sent(reply.id)
            sent += 1
        return sent

    # ---- threads ---------------------------------------------------------------------------
    def start(self) -> None:
        recovered = self.queue.recover() if self.remote is None else 0  # Jobs keep running: re-attach by id
        if recovered:
            log.warning("re-queued %d job(s) interrupted by a restart", recovered)
        for name, duty in (("merge-bot-courier", self._courier), ("merge-bot-worker", self._worker)):
            thread = threading.Thread(target=self._loop, args=(duty,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _courier(self) -> bool:
        return bool(self.triage_once() + self.send_replies_once())

    def _worker(self) -> bool:
        return self.work_once()

    def _loop(self, duty) -> None:
        while not self._stop.is_set():
            try:
                busy = duty()
            except Exception:
                log.exception("background duty failed")
                busy = False
            if not busy:
                self._wake.wait(timeout=1.0)
                self._wake.clear()


class RefusedError(Exception):
    """A request the bot will not do (policy, not a failure)."""


def service_from_env() -> Service:
    """The bot as configured by the environment; bad settings or a rejected token are one-line errors."""
    from bot.transport import hub_write_errors

    config = ServiceConfig.from_env()
    with hub_write_errors("checking the bot's token", "the bot account"):
        return Service(config)
