"""Every error merge-bot raises on purpose, with its fixed exit code.

Messages are one line, safe to show a user (no tokens, no tracebacks), and say what
to change. The CLI and the Space only translate these; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import re


class MergeBotError(Exception):
    """Base of the family. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(redact(" ".join(str(message).split())))


class UsageError(MergeBotError):
    """Bad command-line or form input (unsupported dtype, bad repo id, ...)."""

    exit_code = 2


class SourceNotFoundError(MergeBotError):
    """Adapter or base folder / repo / revision does not exist."""

    exit_code = 3


class AccessDeniedError(MergeBotError):
    """Gated or private repo the caller's token cannot read, or a write that is refused."""

    exit_code = 4


class AdapterConfigError(MergeBotError):
    """adapter_config.json missing, not JSON, or describing something we cannot read."""

    exit_code = 5


class UnsupportedAdapterError(MergeBotError):
    """The tuner cannot be merged (prompt learning, unknown peft_type, ...)."""

    exit_code = 6


class IncompatibleBaseError(MergeBotError):
    """Adapter tensors do not fit the base, base is quantized, architecture unknown, ..."""

    exit_code = 7


class OutputError(MergeBotError):
    """Output folder exists, or not enough free disk space."""

    exit_code = 8


class PublishError(MergeBotError):
    """The Hub refused or failed a publish."""

    exit_code = 9


class VerificationError(MergeBotError):
    """Merged model does not reproduce base+adapter within tolerance."""

    exit_code = 10


class AuthenticationError(MergeBotError):
    """No token, or the Hub rejected it (HTTP 401)."""

    exit_code = 11


class RepoConflictError(PublishError):
    """The target repo exists and holds something else (HTTP 409), or moved under us."""

    exit_code = 12


class HubUnavailableError(MergeBotError):
    """A read kept failing for passing reasons (5xx, rate limit, connection) after retries."""

    exit_code = 13


# User access tokens are hf_ + 34 letters/digits; OAuth tokens hf_oauth_ + more. Short hf_ names
# (repo names like hf_dataset) are left alone.
_TOKEN_RE = re.compile(r"hf_(?:oauth_)?[A-Za-z0-9]{20,}")


def redact(text: str, *secrets: str | None) -> str:
    """Remove Hugging Face tokens (and any explicit secrets) from text meant for people."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)


class RemoteJobError(MergeBotError):
    """A Hugging Face Job could not be started (no credits, refused) or ended without publishing."""

    exit_code = 14
