"""Service settings, from the environment; anything missing or malformed stops start-up with one line."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bot.errors import UsageError
from bot.executors import JobsSettings, positive_int

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass(frozen=True)
class ServiceConfig:
    token: str = field(repr=False)  # the bot account's token
    webhook_secret: str = field(repr=False)
    requests_repo: str  # repo whose discussions carry requests
    requests_repo_type: str = "model"
    db_path: Path = Path("merge-bot.sqlite")
    endpoint: str | None = None
    max_queued_per_user: int = 3
    max_queue: int = 50
    max_output_gb: float = 150.0  # a 70B model in bf16 (~141 GB): streamed, its disk is a few shards
    namespace: str | None = None  # where new repos go; default: the bot account
    executor: str = "local"  # local: merges run in this process; jobs: one Hugging Face Job per merge
    jobs: JobsSettings | None = None  # with executor "jobs"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServiceConfig":
        env = dict(os.environ if env is None else env)
        missing = [name for name in ("HF_TOKEN", "MERGEBOT_WEBHOOK_SECRET", "MERGEBOT_REQUESTS_REPO")
                   if not env.get(name, "").strip()]
        if missing:
            raise UsageError(f"missing setting(s) {', '.join(missing)}: set them in the environment (Space secrets) "
                             f"before starting the service")
        repo_type, repo = parse_requests_repo(env["MERGEBOT_REQUESTS_REPO"])
        executor = env.get("MERGEBOT_EXECUTOR", "").strip().lower() or "local"
        if executor not in ("local", "jobs"):
            raise UsageError(f"MERGEBOT_EXECUTOR must be local or jobs, not {executor[:20]!r}")
        return cls(
            token=env["HF_TOKEN"].strip(),
            webhook_secret=env["MERGEBOT_WEBHOOK_SECRET"],
            requests_repo=repo,
            requests_repo_type=repo_type,
            db_path=Path(env.get("MERGEBOT_DB") or default_db_path()),
            endpoint=env.get("HF_ENDPOINT") or None,
            max_queued_per_user=positive_int(env, "MERGEBOT_MAX_QUEUED_PER_USER", 3),
            max_queue=positive_int(env, "MERGEBOT_MAX_QUEUE", 50),
            max_output_gb=float(positive_int(env, "MERGEBOT_MAX_OUTPUT_GB", 150)),
            namespace=env.get("MERGEBOT_NAMESPACE") or None,
            executor=executor,
            jobs=JobsSettings.from_env(env) if executor == "jobs" else None,
        )


def parse_requests_repo(text: str) -> tuple[str, str]:
    """``owner/name`` (a model), or ``spaces/owner/name`` / ``datasets/owner/name`` / ``models/owner/name``."""
    parts = text.strip().strip("/").split("/")
    if len(parts) == 3 and parts[0] in REPO_TYPES:
        return REPO_TYPES[parts[0]], "/".join(parts[1:])
    if len(parts) == 2 and all(parts):
        return "model", text.strip().strip("/")
    raise UsageError(f"MERGEBOT_REQUESTS_REPO {text!r} must be owner/name or spaces|datasets|models/owner/name")


def default_db_path() -> Path:
    """/data on a Space with persistent storage, else the user's cache folder."""
    if Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/merge-bot/jobs.sqlite")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merge-bot" / "jobs.sqlite"
