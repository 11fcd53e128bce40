"""Reading a Hub repo's safetensors weights in place: headers by HTTP range, then byte ranges into scratch.

A merge streamed Hub to Hub never holds the base in the huggingface_hub cache. The plan is
made from each shard's header (two small range reads per file), and the merge later fetches
the base in large contiguous pieces (many tensors, up to ``PIECE_BYTES`` each, in parallel
parts; see ``bot.pipeline``), each written to a scratch file and deleted once merged. Pieces are large
on purpose: the Hub rate-limits ``/resolve`` requests, so a 70B base is a few hundred
requests, not one per tensor or block.

Requests go through huggingface_hub's own HTTP session (its proxies, headers and user
agent), with the caller's token; redirects to another host (the Hub's CDN or Xet bridge)
drop the token, as httpx does for any cross-origin redirect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bot.errors import IncompatibleBaseError
from bot.shards import TensorInfo, header_length, parse_header
from bot.transport import read_with_retries

_FIRST_READ = 256 * 1024  # most headers fit (a 70B shard's is ~30 KB); a longer one costs one more request
_TIMEOUT = 60.0
_WRITE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RemoteWeights:
    """The base's weight files on the Hub, at a pinned commit, not downloaded."""

    repo_id: str
    sha: str
    endpoint: str
    files: tuple[str, ...]  # safetensors file names, in index order
    token: str | bool | None = field(default=None, repr=False)  # False: anonymous, as huggingface_hub reads it

    def reading(self):
        """Hub failures while reading these weights, as merge-bot's one-line errors (``hub_read_errors``)."""
        from bot.spec import SourceRef
        from bot.transport import hub_read_errors

        return hub_read_errors("base", SourceRef(name=self.repo_id, revision=self.sha))

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.sha, endpoint=self.endpoint)


def _get(remote: RemoteWeights, name: str, start: int, end: int, write: Callable[[bytes], None]) -> int | None:
    """GET bytes [start, end) of ``name`` (``end`` None: to the end) into ``write``; returns the file's total
    size when the answer says it. HTTP errors come as huggingface_hub's typed errors."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=remote.token)
    headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    headers["Accept-Encoding"] = "identity"  # byte offsets are of the stored file
    with get_session().stream("GET", remote.url(name), headers=headers, follow_redirects=True,
                              timeout=_TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if response.status_code != 206 and start:
            raise IncompatibleBaseError(f"the Hub ignored a range request for {name} (HTTP {response.status_code}); "
                                        f"retry later")
        total = None
        content_range = response.headers.get("content-range", "")
        if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            total = int(content_range.rsplit("/", 1)[1])
        want = None if end is None else end - start
        if want is not None and total is not None:
            want = min(want, max(total - start, 0))  # a range past the end is cut to the file
        got = 0
        for chunk in response.iter_bytes():  # as received: re-chunking costs a copy per byte
            if want is not None and got + len(chunk) > want:
                chunk = chunk[: want - got]  # a server that sent the whole file (200) for a range from 0
            write(chunk)
            got += len(chunk)
            if want is not None and got >= want:
                break
        if want is not None and got != want:
            raise ConnectionError(f"{name}: the Hub sent {got} of {want} bytes")
        return total


def read_remote_header(remote: RemoteWeights, name: str, size: int | None) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file on the Hub, from its header alone. Each ``TensorInfo.file``
    is the bare file name: the bytes are fetched later (``fetch_part``)."""
    def attempt() -> dict[str, TensorInfo]:
        parts: list[bytes] = []
        total = _get(remote, name, 0, _FIRST_READ if size is None else min(_FIRST_READ, size), parts.append)
        data = b"".join(parts)
        file_size = size if size is not None else total
        if file_size is None:
            raise IncompatibleBaseError(f"the Hub does not say how large {name} of {remote.repo_id} is; "
                                        f"download the base and pass it with --base")
        header_len = header_length(data[:8], name, file_size)
        if len(data) < 8 + header_len:
            _get(remote, name, len(data), 8 + header_len, parts.append)
            data = b"".join(parts)
        tensors, _ = parse_header(data[8:8 + header_len], file_size, Path(name))
        return tensors

    with remote.reading():
        return read_with_retries(attempt)


# Parallel range requests: one HTTP stream rarely fills a link (per-connection limits on the Hub's
# CDN, TCP windows, per-request server work), so pieces are fetched as contiguous parts by this
# many streams at once, as hf_transfer and Xet do; parts are at least RANGE_PART_MIN, so a 70B
# base stays about a thousand requests.
RANGE_STREAMS = 4
RANGE_PART_MIN = 8 * 1024 * 1024


def split_range(start: int, end: int, streams: int | None = None, part_min: int | None = None
                ) -> list[tuple[int, int]]:
    """[start, end) as at most ``streams`` (default ``RANGE_STREAMS``) contiguous parts of at least
    ``part_min`` (default ``RANGE_PART_MIN``) bytes; one part if the range is small."""
    streams = RANGE_STREAMS if streams is None else streams
    part_min = RANGE_PART_MIN if part_min is None else part_min
    count = max(1, min(streams, (end - start) // max(part_min, 1)))
    step = max(1, -(-(end - start) // count))
    return [(at, min(at + step, end)) for at in range(start, end, step)] or [(start, end)]


class FetchStopped(Exception):
    """Raised inside a part's download once its fetcher is stopped (the job failed or ended)."""


def write_fully(fd: int, data, at: int) -> None:
    """``os.pwrite`` until all of ``data`` is written at ``at``: a nearly full disk may take part of it."""
    import os

    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, at)
        if written <= 0:
            raise OSError(28, "No space left on device")
        view, at = view[written:], at + written


def fetch_part(remote: RemoteWeights, name: str, start: int, end: int, fd: int, offset: int,
               on_bytes: Callable[[int], None] | None = None, stopped: Callable[[], bool] | None = None) -> None:
    """Write bytes [start, end) of ``name`` into the open file ``fd`` at ``offset``; transient failures
    restart this part alone. ``stopped()`` true: raise ``FetchStopped`` at the next chunk or attempt."""
    def check() -> None:
        if stopped is not None and stopped():
            raise FetchStopped

    def attempt() -> None:
        check()
        at, pending = offset, bytearray()

        def flush() -> None:
            nonlocal at
            write_fully(fd, pending, at)
            at += len(pending)
            if on_bytes:
                on_bytes(len(pending))
            pending.clear()

        def write(chunk: bytes) -> None:
            check()
            pending.extend(chunk)  # a paced link delivers a few KiB at a time: one write per MiB instead
            if len(pending) >= _WRITE_BYTES:
                flush()
        _get(remote, name, start, end, write)
        flush()

    with remote.reading():
        read_with_retries(attempt)
