"""The persistent job queue: one SQLite file, safe across threads, crashes and restarts.

Tables: ``jobs`` (one per distinct request; states queued → running → done | failed),
``subscribers`` (every discussion that asked for a job, so duplicates get the same answer),
``replies`` (an outbox: each reply is written here in the same transaction as the state
change that causes it, then posted by a background thread, so none is lost or doubled),
and ``seen_events`` (comment ids already handled, since the Hub redelivers webhooks).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bot.service.commands import MergeRequest

MAX_REPLY_TRIES = 8
MAX_REPLY_CHARS = 4000

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    checked INTEGER NOT NULL DEFAULT 0,
    requester_id TEXT NOT NULL,
    requester TEXT,
    adapter TEXT NOT NULL,
    adapter_sha TEXT,
    pr_repo TEXT,
    dtype TEXT NOT NULL,
    base TEXT,
    target TEXT,
    target_private INTEGER NOT NULL DEFAULT 0,
    comment_id TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result_url TEXT,
    error TEXT,
    remote TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_live_per_key ON jobs(key) WHERE state != 'failed';
CREATE TABLE IF NOT EXISTS subscribers (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    repo_type TEXT NOT NULL,
    repo_id TEXT NOT NULL,
    discussion INTEGER NOT NULL,
    PRIMARY KEY (job_id, repo_type, repo_id, discussion)
);
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    repo_type TEXT NOT NULL,
    repo_id TEXT NOT NULL,
    discussion INTEGER NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    sent REAL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_events (
    event_id TEXT PRIMARY KEY,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Where:
    """A discussion: where a request came from and where its answers go."""

    repo_type: str
    repo_id: str
    discussion: int

    @property
    def key(self) -> str:
        return f"{self.repo_type}:{self.repo_id}#{self.discussion}"


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    state: str
    checked: bool
    requester_id: str
    requester: str | None
    adapter: str
    adapter_sha: str | None
    pr_repo: str | None
    dtype: str
    base: str | None
    target: str | None
    target_private: bool
    comment_id: str | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    result_url: str | None
    error: str | None
    remote: str | None = None  # JSON: the Hugging Face Job running this entry (id, flavor, fingerprints, ...)

    @property
    def remote_job(self) -> dict | None:
        return json.loads(self.remote) if self.remote else None

    @property
    def request(self) -> MergeRequest:
        return MergeRequest(adapter=self.adapter, pr_repo=self.pr_repo, dtype=self.dtype, base=self.base)

    @property
    def pinned_adapter(self) -> str:
        """The adapter at the commit triage checked: the worker merges exactly that."""
        return f"{self.adapter.split('@')[0]}@{self.adapter_sha}" if self.adapter_sha else self.adapter


@dataclass(frozen=True)
class Reply:
    id: int
    key: str
    where: Where
    body: str
    tries: int


class JobQueue:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Running job -> its phases now (bot.progress.PhaseSummary): in memory, since only this process runs
        # it and a restart re-runs it anyway; never written per update.
        self._progress: dict[int, str] = {}
        self._db().executescript(SCHEMA)  # executescript manages its own transaction
        with self._tx() as db:
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "remote" not in columns:  # a queue file from before the Jobs executor
                db.execute("ALTER TABLE jobs ADD COLUMN remote TEXT")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (uuid.uuid4().hex[:16],))
            self.identity: str = db.execute("SELECT value FROM meta WHERE name = 'identity'").fetchone()[0]

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        if db.in_transaction:  # nested (inside ``handling``): part of the caller's transaction
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- receiving -------------------------------------------------------------------------
    def seen(self, event_id: str) -> bool:
        """Whether this webhook event (comment id) was handled before (the Hub redelivers)."""
        return self._db().execute("SELECT 1 FROM seen_events WHERE event_id = ?", (event_id,)).fetchone() is not None

    @contextmanager
    def handling(self, event_id: str) -> Iterator[bool]:
        """One write transaction around handling a webhook event: yields False when the event was handled
        before; else True, and the event is marked seen when the block ends without an exception.

        The seen-check, the enqueue and the reply it causes commit together (BEGIN IMMEDIATE takes the write
        lock before the check), so concurrent redeliveries of one comment give one job and one answer.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM seen_events WHERE event_id = ?", (event_id,)).fetchone() is not None:
                yield False
                return
            yield True
            self._mark_seen(db, event_id)

    @staticmethod
    def _mark_seen(db: sqlite3.Connection, event_id: str | None) -> None:
        if event_id:
            db.execute("INSERT OR IGNORE INTO seen_events(event_id, created) VALUES (?, ?)", (event_id, time.time()))

    def live_job(self, key: str) -> Job | None:
        row = self._db().execute("SELECT * FROM jobs WHERE key = ? AND state != 'failed'", (key,)).fetchone()
        return _job(row)

    def active_count(self, requester_id: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
        args: tuple = ()
        if requester_id is not None:
            sql, args = sql + " AND requester_id = ?", (requester_id,)
        return self._db().execute(sql, args).fetchone()[0]

    def enqueue(self, request: MergeRequest, *, requester_id: str, comment_id: str | None, where: Where,
                key: str | None = None, requester: str | None = None,
                event_id: str | None = None) -> tuple[Job, bool]:
        """(job, created): a new queued job, or the live job with the same key (then just subscribed).

        The event is marked seen in the same transaction, so a crash cannot lose the request.
        """
        key = key or request.key
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE key = ? AND state != 'failed'", (key,)).fetchone()
            created = row is None
            if created:
                cur = db.execute(
                    "INSERT INTO jobs(key, state, requester_id, requester, adapter, pr_repo, dtype, base, comment_id, "
                    "created) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, requester_id, requester, request.adapter, request.pr_repo, request.dtype, request.base,
                     comment_id, time.time()))
                row = db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()
            db.execute("INSERT OR IGNORE INTO subscribers VALUES (?, ?, ?, ?)",
                       (row["id"], where.repo_type, where.repo_id, where.discussion))
            self._mark_seen(db, event_id or comment_id)
        return _job(row), created

    def done_jobs_for_adapter(self, repo_id: str) -> list[Job]:
        """Finished merges of this adapter that followed its main branch (no @revision pinned)."""
        rows = self._db().execute(
            "SELECT * FROM jobs WHERE state = 'done' AND lower(adapter) = lower(?) ORDER BY id", (repo_id,)).fetchall()
        return [_job(r) for r in rows]

    def latest_done(self, key_stem: str) -> Job | None:
        """The most recent real merge of a request (the original or a refresh; skipped refreshes have no SHA)."""
        prefix = f"{key_stem}|refresh:"
        row = self._db().execute(
            "SELECT * FROM jobs WHERE state = 'done' AND adapter_sha IS NOT NULL AND (key = ? OR substr(key, 1, ?) = ?) "
            "ORDER BY id DESC LIMIT 1",
            (key_stem, len(prefix), prefix),
        ).fetchone()
        return _job(row)

    def subscriber_of(self, job_id: int) -> Where:
        return self._first_subscriber(self._db(), job_id)

    # ---- triage ----------------------------------------------------------------------------
    def unchecked(self) -> list[Job]:
        rows = self._db().execute("SELECT * FROM jobs WHERE state = 'queued' AND checked = 0 ORDER BY id").fetchall()
        return [_job(r) for r in rows]

    def accept(self, job_id: int, *, requester: str, target: str, adapter_sha: str, target_private: bool,
               reply: str) -> None:
        """Mark a job checked (adapter pinned to ``adapter_sha``) and queue its 'accepted' reply, atomically."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET checked = 1, requester = ?, target = ?, adapter_sha = ?, target_private = ? "
                       "WHERE id = ?", (requester, target, adapter_sha, int(target_private), job_id))
            where = self._first_subscriber(db, job_id)
            position = db.execute("SELECT COUNT(*) FROM jobs WHERE (state = 'queued' AND checked = 1 AND id <= ?) "
                                  "OR state = 'running'", (job_id,)).fetchone()[0]
            _add_reply(db, f"accepted:{job_id}", where, reply.replace("{position}", str(position)))

    @staticmethod
    def _first_subscriber(db: sqlite3.Connection, job_id: int) -> Where:
        row = db.execute("SELECT * FROM subscribers WHERE job_id = ? ORDER BY rowid LIMIT 1", (job_id,)).fetchone()
        return Where(row["repo_type"], row["repo_id"], row["discussion"])

    def set_progress(self, job_id: int, text: str) -> None:
        """What the running job ``job_id`` is doing now, for the status table."""
        self._progress[job_id] = text

    def requeue(self, job_id: int) -> None:
        """A run that hit a transient Hub failure goes back to the queue (attempts stay counted)."""
        self._progress.pop(job_id, None)
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'queued', remote = NULL WHERE id = ? AND state = 'running'", (job_id,))

    def position(self, job_id: int) -> int:
        """1 for the next job to run (a running job counts as ahead of everyone)."""
        return self._db().execute(
            "SELECT COUNT(*) FROM jobs WHERE (state = 'queued' AND id <= ?) OR state = 'running'", (job_id,)
        ).fetchone()[0]

    # ---- running ---------------------------------------------------------------------------
    def recover(self) -> int:
        """After a crash or restart: jobs left 'running' go back to the front of the queue (local executor;
        with Jobs, 'running' entries stay so and the worker re-attaches to their Jobs)."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state = 'queued', remote = NULL WHERE state = 'running'").rowcount

    def set_remote(self, job_id: int, remote: dict) -> None:
        """Record the Job that runs this entry (its id first of all), in the entry itself."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET remote = ? WHERE id = ?", (json.dumps(remote, sort_keys=True), job_id))

    def running(self) -> list[Job]:
        rows = self._db().execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY id").fetchall()
        return [_job(r) for r in rows]

    def claim_next(self) -> Job | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' AND checked = 1 ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
                       (time.time(), row["id"]))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def finish(self, job_id: int, *, state: str, url: str | None = None, error: str | None = None,
               reply: str | None, reply_kind: str) -> None:
        """Set the outcome and write the reply (if any) to every subscriber, in one transaction."""
        assert state in ("done", "failed")
        self._progress.pop(job_id, None)
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, result_url = ?, error = ? WHERE id = ?",
                       (state, time.time(), url, error, job_id))
            if reply is None:
                return
            for sub in db.execute("SELECT * FROM subscribers WHERE job_id = ?", (job_id,)).fetchall():
                where = Where(sub["repo_type"], sub["repo_id"], sub["discussion"])
                _add_reply(db, f"{reply_kind}:{job_id}:{where.key}", where, reply)

    # ---- replies ---------------------------------------------------------------------------
    def add_reply(self, key: str, where: Where, body: str, *, event_id: str | None = None) -> None:
        """Queue a reply (and mark the event that caused it seen) in one transaction."""
        with self._tx() as db:
            _add_reply(db, key, where, body)
            self._mark_seen(db, event_id)

    def pending_replies(self, limit: int = 20) -> list[Reply]:
        """Unsent replies, fewest tries first, so one undeliverable reply cannot hold up the rest."""
        rows = self._db().execute(
            "SELECT * FROM replies WHERE sent IS NULL AND tries < ? ORDER BY tries, id LIMIT ?",
            (MAX_REPLY_TRIES, limit)).fetchall()
        return [Reply(r["id"], r["key"], Where(r["repo_type"], r["repo_id"], r["discussion"]), r["body"], r["tries"])
                for r in rows]

    def mark_sent(self, reply_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE replies SET sent = ? WHERE id = ?", (time.time(), reply_id))

    def mark_tried(self, reply_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE replies SET tries = tries + 1 WHERE id = ?", (reply_id,))

    # ---- status ----------------------------------------------------------------------------
    def jobs(self, limit: int = 100) -> list[Job]:
        rows = self._db().execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def status_rows(self, limit: int = 100) -> list[list[str]]:
        """The public view of the queue: no tokens, no errors' internals, private targets hidden."""
        def when(t: float | None) -> str:
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else ""

        rows = []
        for job in self.jobs(limit):
            target = "(private repo)" if job.target_private else (job.target or "")
            link = "" if job.target_private else (job.result_url or "")
            progress = self._progress.get(job.id, "") if job.state == "running" else ""
            rows.append([str(job.id), job.state, job.adapter, target, job.requester or "", when(job.created),
                         when(job.finished), link, progress])
        return rows

    def job(self, job_id: int) -> Job | None:
        return _job(self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def _add_reply(db: sqlite3.Connection, key: str, where: Where, body: str) -> None:
    if len(body) > MAX_REPLY_CHARS:
        body = body[: MAX_REPLY_CHARS - 1] + "…"
    db.execute("INSERT OR IGNORE INTO replies(key, repo_type, repo_id, discussion, body, created) "
               "VALUES (?, ?, ?, ?, ?, ?)", (key, where.repo_type, where.repo_id, where.discussion, body, time.time()))


def _job(row: sqlite3.Row | None) -> Job | None:
    if row is None:
        return None
    values = dict(row)
    values["checked"] = bool(values["checked"])
    values["target_private"] = bool(values["target_private"])
    return Job(**values)
